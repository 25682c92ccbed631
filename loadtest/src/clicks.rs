//! Synthetic clicks shaped like SPEC §3.1: a link with its ids, slug, domain and campaign
//! fields, a visitor with IP, user agent, referer and geography, about 600 bytes of JSON.
//! It owns what a click looks like and which link click `i` lands on; it must stay cheap
//! (no JSON library, no allocation beyond the output buffer) because the driver builds every
//! click on the hot path, and it must only produce human user agents: endpoint filters on
//! bots are not what a load test measures.

use std::io::Write;

const USER_AGENTS: [&str; 6] = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/123.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.3 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/16.6 Mobile/15E148 Safari/604.1",
];

const REFERERS: [&str; 5] = [
    "https://twitter.com/",
    "https://www.facebook.com/",
    "https://www.google.com/",
    "https://news.ycombinator.com/",
    "https://mail.example.org/inbox",
];

/// (country, region, city, isp, language)
const PLACES: [(&str, &str, &str, &str, &str); 5] = [
    ("US", "CA", "San Francisco", "Comcast", "en-US"),
    ("DE", "BE", "Berlin", "Deutsche Telekom", "de-DE"),
    ("BR", "SP", "Sao Paulo", "Vivo", "pt-BR"),
    ("CO", "DC", "Bogota", "Claro", "es-CO"),
    ("IT", "RM", "Roma", "TIM", "it-IT"),
];

const CONNECTIONS: [&str; 3] = ["cable", "cellular", "corporate"];

/// Builds click `i` of a run. Link ids are the integers `0..links`; with `client_ids` each
/// click carries its own idempotency key `<prefix>-<i>`.
#[derive(Clone, Debug)]
pub struct ClickFactory {
    links: u64,
    client_id_prefix: Option<String>,
    run_tag: String,
    timestamp: String,
}

impl ClickFactory {
    /// `links` is clamped to at least 1; `timestamp` is the RFC 3339 click time every click carries.
    pub fn new(links: u64, run_tag: &str, client_ids: bool, timestamp: String) -> Self {
        ClickFactory {
            links: links.max(1),
            client_id_prefix: client_ids.then(|| format!("lt-{run_tag}")),
            run_tag: run_tag.to_string(),
            timestamp,
        }
    }

    pub fn links(&self) -> u64 {
        self.links
    }

    /// Which link click `i` is on: spread pseudo-randomly but reproducibly over all links.
    pub fn link_of(&self, i: u64) -> u64 {
        mix(i) % self.links
    }

    /// The client idempotency key click `i` carries, if the factory sends them.
    pub fn client_id(&self, i: u64) -> Option<String> {
        self.client_id_prefix.as_ref().map(|p| format!("{p}-{i}"))
    }

    /// Appends click `i` as one JSON object (no trailing newline); returns its link.
    pub fn write(&self, i: u64, out: &mut Vec<u8>) -> u64 {
        let link = self.link_of(i);
        let h = mix(i ^ 0x9e37_79b9_7f4a_7c15);
        let ua = USER_AGENTS[(h % USER_AGENTS.len() as u64) as usize];
        let referer = REFERERS[((h >> 8) % REFERERS.len() as u64) as usize];
        let (country, region, city, isp, language) = PLACES[((h >> 16) % PLACES.len() as u64) as usize];
        let connection = CONNECTIONS[((h >> 24) % CONNECTIONS.len() as u64) as usize];
        let ip = ((h >> 32) % 254) + 1;
        let workspace = link % 97;
        // Writing into a Vec cannot fail; the Result only exists for io::Write's signature.
        let _ = self.write_fields(
            out,
            Fields {
                i,
                link,
                workspace,
                ua,
                referer,
                country,
                region,
                city,
                isp,
                language,
                connection,
                ip,
            },
        );
        link
    }

    fn write_fields(&self, out: &mut Vec<u8>, f: Fields<'_>) -> std::io::Result<()> {
        out.push(b'{');
        if let Some(prefix) = &self.client_id_prefix {
            write!(out, "\"id\":\"{prefix}-{}\",", f.i)?;
        }
        write!(
            out,
            concat!(
                "\"timestamp\":\"{ts}\",",
                "\"link\":{{\"id\":{link},\"workspace_id\":\"ws_{ws}\",\"slug\":\"s{link}x\",\"domain\":\"links.example\",",
                "\"destination\":\"https://shop.example.com/spring?ref={link}\",\"campaign_id\":\"cmp_{ws}\",",
                "\"utm\":{{\"source\":\"newsletter\",\"medium\":\"email\",\"campaign\":\"spring\"}}}},",
                "\"click\":{{\"ip\":\"203.0.113.{ip}\",\"user_agent\":\"{ua}\",\"referer\":\"{referer}\",",
                "\"country\":\"{country}\",\"region\":\"{region}\",\"city\":\"{city}\",\"isp\":\"{isp}\",",
                "\"language\":\"{language}\",\"connection_type\":\"{connection}\",\"params\":{{\"utm_source\":\"twitter\"}}}},",
                "\"metadata\":{{\"loadtest\":\"{tag}\",\"seq\":{i}}}}}"
            ),
            ts = self.timestamp,
            link = f.link,
            ws = f.workspace,
            ip = f.ip,
            ua = f.ua,
            referer = f.referer,
            country = f.country,
            region = f.region,
            city = f.city,
            isp = f.isp,
            language = f.language,
            connection = f.connection,
            tag = self.run_tag,
            i = f.i,
        )
    }
}

struct Fields<'a> {
    i: u64,
    link: u64,
    workspace: u64,
    ua: &'a str,
    referer: &'a str,
    country: &'a str,
    region: &'a str,
    city: &'a str,
    isp: &'a str,
    language: &'a str,
    connection: &'a str,
    ip: u64,
}

/// splitmix64's finaliser: a cheap, well-spread hash of the click number.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clicks_are_valid_json_of_realistic_size() {
        let f = ClickFactory::new(10_000, "t1", true, "2024-05-01T10:00:00Z".into());
        for i in [0u64, 1, 7, 99_999, u64::MAX / 3] {
            let mut buf = Vec::new();
            let link = f.write(i, &mut buf);
            assert!((550..=720).contains(&buf.len()), "click is {} bytes", buf.len());
            let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
            assert_eq!(v["link"]["id"].as_u64(), Some(link));
            assert_eq!(v["id"].as_str(), Some(format!("lt-t1-{i}").as_str()));
            assert_eq!(v["click"]["country"].as_str().map(str::len), Some(2));
            assert!(v["click"]["user_agent"].as_str().unwrap().starts_with("Mozilla/5.0"));
        }
    }

    #[test]
    fn links_spread_over_the_whole_range() {
        let f = ClickFactory::new(100, "t", false, "2024-05-01T10:00:00Z".into());
        let mut seen = [0u32; 100];
        for i in 0..10_000 {
            seen[f.link_of(i) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (50..=150).contains(&n)), "{seen:?}");
        let mut buf = Vec::new();
        f.write(3, &mut buf);
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert!(v.get("id").is_none());
    }
}
