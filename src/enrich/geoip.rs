//! Optional geography from a MaxMind database (`[enrich] geoip`): fills a click's
//! `country`, `region`, `city`, `isp` and `organization` from its `ip` where the shortener
//! did not send them. It reads whichever of those the database has (City, Country, ISP, ASN
//! or a combined file), never overwrites a value the click brought, and must not fail a
//! click: an address the database does not know simply adds nothing.

use super::{ClickObject, EnrichError};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

/// An open database, read into memory once.
pub struct GeoIp {
    reader: maxminddb::Reader<Vec<u8>>,
}

impl std::fmt::Debug for GeoIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoIp")
            .field("database_type", &self.reader.metadata().database_type)
            .finish()
    }
}

/// The fields of the GeoIP2 / GeoLite2 record layouts this module reads; every one optional
/// so that one struct decodes every database type.
#[derive(Deserialize, Default)]
struct Record<'a> {
    #[serde(borrow)]
    country: Option<Country<'a>>,
    #[serde(borrow)]
    subdivisions: Option<Vec<Subdivision<'a>>>,
    #[serde(borrow)]
    city: Option<City<'a>>,
    isp: Option<&'a str>,
    organization: Option<&'a str>,
    autonomous_system_organization: Option<&'a str>,
}

#[derive(Deserialize)]
struct Country<'a> {
    iso_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct Subdivision<'a> {
    iso_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct City<'a> {
    #[serde(borrow)]
    names: Option<BTreeMap<&'a str, &'a str>>,
}

impl GeoIp {
    pub fn open(path: &Path) -> Result<GeoIp, EnrichError> {
        let reader = maxminddb::Reader::open_readfile(path).map_err(|e| EnrichError::GeoIp {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(GeoIp { reader })
    }

    /// Adds what the database knows about `click.ip` to the fields the click lacks.
    pub fn fill<C: ClickObject + ?Sized>(&self, click: &mut C) {
        let wanted = ["country", "region", "city", "isp", "organization"];
        if wanted.iter().all(|k| click.present(k)) {
            return;
        }
        let Some(ip) = click.string("ip").and_then(|s| s.trim().parse::<IpAddr>().ok()) else {
            return;
        };
        // "::ffff:a.b.c.d" (as proxies often report IPv4 visitors) must find the IPv4 record,
        // also in an IPv4-only database.
        let ip = ip.to_canonical();
        let Ok(found) = self.reader.lookup(ip) else { return };
        let record: Record<'_> = match found.decode() {
            Ok(Some(r)) => r,
            _ => return,
        };
        let region = record
            .subdivisions
            .as_ref()
            .and_then(|s| s.first())
            .and_then(|s| s.iso_code);
        let city = record
            .city
            .as_ref()
            .and_then(|c| c.names.as_ref())
            .and_then(|n| n.get("en").copied());
        let isp = record.isp.or(record.autonomous_system_organization);
        let values = [
            ("country", record.country.as_ref().and_then(|c| c.iso_code)),
            ("region", region),
            ("city", city),
            ("isp", isp),
            ("organization", record.organization),
        ];
        for (key, value) in values {
            if let Some(v) = value {
                if !click.present(key) {
                    click.set(key, Value::from(v));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;
    use serde_json::json;

    #[derive(Serialize)]
    struct CityRecord {
        country: IsoCode,
        subdivisions: Vec<IsoCode>,
        city: Names,
        isp: &'static str,
        organization: &'static str,
    }
    #[derive(Serialize)]
    struct IsoCode {
        iso_code: &'static str,
    }
    #[derive(Serialize)]
    struct Names {
        names: BTreeMap<&'static str, &'static str>,
    }

    fn database(dir: &Path) -> std::path::PathBuf {
        let mut w = mmdb_writer::Writer::new("Clickhook-Test-City");
        let rec = CityRecord {
            country: IsoCode { iso_code: "GB" },
            subdivisions: vec![IsoCode { iso_code: "ENG" }],
            city: Names {
                names: [("en", "London"), ("de", "London")].into(),
            },
            isp: "Andrews & Arnold Ltd",
            organization: "Andrews & Arnold",
        };
        w.insert("81.2.69.0/24".parse::<ipnet::IpNet>().unwrap(), &rec).unwrap();
        let path = dir.join("test.mmdb");
        std::fs::write(&path, w.to_bytes().unwrap()).unwrap();
        path
    }

    #[test]
    fn fills_only_what_the_click_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let geo = GeoIp::open(&database(dir.path())).unwrap();
        let mut click = json!({"ip": "81.2.69.142", "city": "Croydon"})
            .as_object()
            .unwrap()
            .clone();
        geo.fill(&mut click);
        assert_eq!(click["country"], "GB");
        assert_eq!(click["region"], "ENG");
        assert_eq!(click["city"], "Croydon");
        assert_eq!(click["isp"], "Andrews & Arnold Ltd");
        assert_eq!(click["organization"], "Andrews & Arnold");
    }

    #[test]
    fn ipv4_mapped_addresses_find_the_ipv4_record() {
        let dir = tempfile::tempdir().unwrap();
        let geo = GeoIp::open(&database(dir.path())).unwrap();
        let mut click = json!({"ip": "::ffff:81.2.69.160"}).as_object().unwrap().clone();
        geo.fill(&mut click);
        assert_eq!(click["country"], "GB");
    }

    #[test]
    fn unknown_or_bad_addresses_add_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let geo = GeoIp::open(&database(dir.path())).unwrap();
        for ip in ["8.8.8.8", "not an ip", "2001:db8::1"] {
            let mut click = json!({ "ip": ip }).as_object().unwrap().clone();
            geo.fill(&mut click);
            assert_eq!(click.len(), 1, "{ip}");
        }
    }

    #[test]
    fn a_missing_or_broken_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.mmdb");
        let err = GeoIp::open(&missing).unwrap_err().to_string();
        assert!(err.contains("nope.mmdb"), "{err}");
        let junk = dir.path().join("junk.mmdb");
        std::fs::write(&junk, b"not a database").unwrap();
        let err = GeoIp::open(&junk).unwrap_err().to_string();
        assert!(err.contains("junk.mmdb"), "{err}");
    }
}
