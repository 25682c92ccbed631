//! Country names in English from ISO 3166-1 alpha-2 codes and back, for formats that spell
//! countries out (Masiv's `CountryName`). The ISO short names come from `rust_iso3166`; where
//! the ISO name is one nobody writes ("Korea (Republic of)"), the everyday English name is
//! used instead, as GeoIP databases and the products do. Pure lookups: it must not guess a
//! country from anything but a code or a name it knows.

/// Everyday names where they differ from the ISO 3166-1 short name; `XK` (Kosovo) is not in
/// ISO 3166-1 but GeoIP databases use it.
const COMMON: &[(&str, &str)] = &[
    ("BO", "Bolivia"),
    ("BN", "Brunei"),
    ("CD", "Democratic Republic of the Congo"),
    ("FK", "Falkland Islands"),
    ("FM", "Micronesia"),
    ("GB", "United Kingdom"),
    ("IR", "Iran"),
    ("KP", "North Korea"),
    ("KR", "South Korea"),
    ("LA", "Laos"),
    ("MD", "Moldova"),
    ("MF", "Saint Martin"),
    ("NL", "Netherlands"),
    ("PS", "Palestine"),
    ("RU", "Russia"),
    ("SX", "Sint Maarten"),
    ("SY", "Syria"),
    ("TW", "Taiwan"),
    ("TZ", "Tanzania"),
    ("US", "United States"),
    ("VA", "Vatican City"),
    ("VE", "Venezuela"),
    ("VG", "British Virgin Islands"),
    ("VI", "U.S. Virgin Islands"),
    ("VN", "Vietnam"),
    ("XK", "Kosovo"),
];

/// The English name of a country code (any case), or `None` for an unknown code.
pub fn country_name(code: &str) -> Option<&'static str> {
    if code.len() != 2 {
        return None;
    }
    let upper = code.to_ascii_uppercase();
    if let Some((_, name)) = COMMON.iter().find(|(c, _)| *c == upper) {
        return Some(name);
    }
    rust_iso3166::from_alpha2(&upper).map(|c| c.name)
}

/// The alpha-2 code of a country named in English (everyday or ISO name, any case).
pub fn country_code(name: &str) -> Option<&'static str> {
    let name = name.trim();
    if let Some((code, _)) = COMMON.iter().find(|(_, n)| n.eq_ignore_ascii_case(name)) {
        return Some(code);
    }
    rust_iso3166::ALL
        .iter()
        .find(|c| c.name.eq_ignore_ascii_case(name))
        .map(|c| c.alpha2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_codes() {
        assert_eq!(country_name("CO"), Some("Colombia"));
        assert_eq!(country_name("us"), Some("United States"));
        assert_eq!(country_name("KR"), Some("South Korea"));
        assert_eq!(country_name("DE"), Some("Germany"));
        assert_eq!(country_name("ZZ"), None);
        assert_eq!(country_name("USA"), None);
        assert_eq!(country_code("Colombia"), Some("CO"));
        assert_eq!(country_code("united states"), Some("US"));
        assert_eq!(country_code("United States of America"), Some("US"));
        assert_eq!(country_code("Atlantis"), None);
    }

    #[test]
    fn every_code_round_trips_through_its_name() {
        for c in rust_iso3166::ALL {
            let name = country_name(c.alpha2).unwrap();
            assert_eq!(country_code(name), Some(c.alpha2), "{name}");
        }
    }
}
