//! Enrichment tests: a table of real user agents with what each must yield, and the rules
//! for fields the click already brings. They must not reach the network or a GeoIP file
//! they did not build themselves.

use super::*;
use serde_json::json;

/// (user agent, browser name, OS name, device, device vendor, bot name)
type Row = (
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
);

const TABLE: &[Row] = &[
    // Desktop
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
        Some("Chrome"), Some("Windows"), "desktop", None, None,
    ),
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/116.0.0.0 Safari/537.36 Edg/116.0.1938.54",
        Some("Edge"), Some("Windows"), "desktop", None, None,
    ),
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0",
        Some("Firefox"), Some("Windows"), "desktop", None, None,
    ),
    (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 Safari/605.1.15",
        Some("Safari"), Some("Mac OS X"), "desktop", Some("Apple"), None,
    ),
    (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
        Some("Chrome"), Some("Mac OS X"), "desktop", Some("Apple"), None,
    ),
    (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
        Some("Chrome"), Some("Linux"), "desktop", None, None,
    ),
    (
        "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0",
        Some("Firefox"), Some("Ubuntu"), "desktop", None, None,
    ),
    (
        "Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
        Some("Chrome"), Some("Chrome OS"), "desktop", None, None,
    ),
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36 OPR/106.0.0.0",
        Some("Opera"), Some("Windows"), "desktop", None, None,
    ),
    (
        "Mozilla/5.0 (Windows NT 6.1; WOW64; Trident/7.0; rv:11.0) like Gecko",
        Some("IE"), Some("Windows"), "desktop", None, None,
    ),
    // iOS
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1.2 Mobile/15E148 Safari/604.1",
        Some("Mobile Safari"), Some("iOS"), "mobile", Some("Apple"), None,
    ),
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) CriOS/120.0.6099.119 Mobile/15E148 Safari/604.1",
        Some("Chrome Mobile iOS"), Some("iOS"), "mobile", Some("Apple"), None,
    ),
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) FxiOS/120.0 Mobile/15E148 Safari/605.1.15",
        Some("Firefox iOS"), Some("iOS"), "mobile", Some("Apple"), None,
    ),
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148 Instagram 309.0.2.28.108 (iPhone15,2; iOS 17_1; en_US; en; scale=3.00; 1179x2556; 538404316)",
        Some("Instagram"), Some("iOS"), "mobile", Some("Apple"), None,
    ),
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 16_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148 [FBAN/FBIOS;FBDV/iPhone14,5;FBMD/iPhone;FBSN/iOS;FBSV/16.5;FBSS/3;FBID/phone;FBLC/en_US;FBOP/5]",
        Some("Facebook"), Some("iOS"), "mobile", Some("Apple"), None,
    ),
    (
        "Mozilla/5.0 (iPad; CPU OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
        Some("Mobile Safari"), Some("iOS"), "tablet", Some("Apple"), None,
    ),
    (
        "Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) CriOS/119.0.6045.169 Mobile/15E148 Safari/604.1",
        Some("Chrome Mobile iOS"), Some("iOS"), "tablet", Some("Apple"), None,
    ),
    // Android phones
    (
        "Mozilla/5.0 (Linux; Android 10; SM-G973F) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/121.0.0.0 Mobile Safari/537.36",
        Some("Chrome Mobile"), Some("Android"), "mobile", Some("Samsung"), None,
    ),
    (
        "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Mobile Safari/537.36",
        Some("Chrome Mobile"), Some("Android"), "mobile", None, None,
    ),
    (
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.6099.144 Mobile Safari/537.36",
        Some("Chrome Mobile"), Some("Android"), "mobile", Some("Google"), None,
    ),
    (
        "Mozilla/5.0 (Linux; Android 13; SAMSUNG SM-S911B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/23.0 Chrome/115.0.0.0 Mobile Safari/537.36",
        Some("Samsung Internet"), Some("Android"), "mobile", Some("Samsung"), None,
    ),
    (
        "Mozilla/5.0 (Android 14; Mobile; rv:121.0) Gecko/121.0 Firefox/121.0",
        Some("Firefox Mobile"), Some("Android"), "mobile", None, None,
    ),
    (
        "Mozilla/5.0 (Linux; Android 11; Redmi Note 8 Pro) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Mobile Safari/537.36",
        Some("Chrome Mobile"), Some("Android"), "mobile", Some("XiaoMi"), None,
    ),
    (
        "Mozilla/5.0 (Linux; Android 13; SM-A536B Build/TP1A.220624.014; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/119.0.6045.163 Mobile Safari/537.36 [FB_IAB/FB4A;FBAV/442.0.0.33.113;]",
        Some("Facebook"), Some("Android"), "mobile", Some("Samsung"), None,
    ),
    (
        "Mozilla/5.0 (Linux; Android 11; moto g(30)) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Mobile Safari/537.36 EdgA/120.0.2210.84",
        Some("Edge Mobile"), Some("Android"), "mobile", Some("Motorola"), None,
    ),
    (
        "Opera/9.80 (Android; Opera Mini/36.2.2254/119.132; U; id) Presto/2.12.423 Version/12.16",
        Some("Opera Mini"), Some("Android"), "mobile", None, None,
    ),
    // Android tablets and other tablets
    (
        "Mozilla/5.0 (Linux; Android 13; SM-X200) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
        Some("Chrome"), Some("Android"), "tablet", Some("Samsung"), None,
    ),
    (
        "Mozilla/5.0 (Android 13; Tablet; rv:121.0) Gecko/121.0 Firefox/121.0",
        Some("Firefox Mobile"), Some("Android"), "tablet", None, None,
    ),
    (
        "Mozilla/5.0 (Linux; Android 9; KFMAWI) AppleWebKit/537.36 (KHTML, like Gecko) Silk/120.3.1 like Chrome/120.0.6099.115 Safari/537.36",
        Some("Amazon Silk"), Some("Android"), "tablet", Some("Amazon"), None,
    ),
    // Other devices
    (
        "Mozilla/5.0 (SMART-TV; Linux; Tizen 6.0) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/4.0 Chrome/76.0.3809.146 TV Safari/537.36",
        Some("Samsung Internet"), Some("Tizen"), "unknown", None, None,
    ),
    ("", None, None, "unknown", None, None),
    // Bots and link-preview fetchers
    (
        "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        Some("Googlebot"), None, "bot", None, Some("Googlebot"),
    ),
    (
        "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.6099.216 Mobile Safari/537.36 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        Some("Googlebot"), Some("Android"), "bot", None, Some("Googlebot"),
    ),
    (
        "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
        Some("bingbot"), None, "bot", None, Some("Bingbot"),
    ),
    (
        "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
        Some("Slackbot-LinkExpanding"), None, "bot", None, Some("Slackbot"),
    ),
    ("Twitterbot/1.0", Some("Twitterbot"), None, "bot", None, Some("Twitterbot")),
    (
        "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
        Some("FacebookBot"), None, "bot", None, Some("facebookexternalhit"),
    ),
    ("WhatsApp/2.23.20.0 A", Some("WhatsApp"), None, "bot", None, Some("WhatsApp")),
    ("TelegramBot (like TwitterBot)", Some("TelegramBot"), None, "bot", None, Some("TelegramBot")),
    (
        "LinkedInBot/1.0 (compatible; Mozilla/5.0; Apache-HttpClient +http://www.linkedin.com)",
        Some("LinkedInBot"), None, "bot", None, Some("LinkedInBot"),
    ),
    (
        "Mozilla/5.0 (compatible; Discordbot/2.0; +https://discordapp.com)",
        Some("Discordbot"), None, "bot", None, Some("Discordbot"),
    ),
    (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/13.1.1 Safari/605.1.15 (Applebot/0.1; +http://www.apple.com/go/applebot)",
        Some("Applebot"), Some("Mac OS X"), "bot", None, Some("Applebot"),
    ),
    (
        "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)",
        Some("YandexBot"), None, "bot", None, Some("YandexBot"),
    ),
    (
        "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
        Some("AhrefsBot"), None, "bot", None, Some("AhrefsBot"),
    ),
    (
        "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.0; +https://openai.com/gptbot)",
        Some("GPTBot"), None, "bot", None, Some("GPTBot"),
    ),
    ("curl/8.4.0", Some("curl"), None, "bot", None, Some("curl")),
    ("python-requests/2.31.0", Some("Python Requests"), None, "bot", None, Some("python-requests")),
    (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.6099.109 Safari/537.36",
        Some("HeadlessChrome"), Some("Linux"), "bot", None, Some("HeadlessChrome"),
    ),
    (
        "Mozilla/5.0 (compatible; SomeNewCrawler/1.0; +https://crawler.example/about)",
        Some("SomeNewCrawler"), None, "bot", None, Some("SomeNewCrawler"),
    ),
];

#[test]
fn user_agent_table() {
    let parser = ua::UaParser::new();
    let mut failures = Vec::new();
    for (ua, browser, os, device, vendor, bot) in TABLE {
        let got = parser.parse(ua);
        let row = (
            got.browser.as_deref(),
            got.os.as_deref(),
            got.device.as_str(),
            got.vendor.as_deref(),
            got.bot.as_deref(),
        );
        if row != (*browser, *os, *device, *vendor, *bot) {
            failures.push(format!(
                "{ua}\n   got {row:?}\n  want {:?}",
                (browser, os, device, vendor, bot)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows differ:\n{}",
        failures.len(),
        TABLE.len(),
        failures.join("\n")
    );
    assert!(TABLE.len() >= 40);
    assert!(TABLE.iter().filter(|r| r.5.is_some()).count() >= 10);
}

/// Enriches `click` as a map, and as ingest does, over the click's text; both must agree.
fn enrich(click: Value) -> (Value, bool) {
    enrich_both(&Enricher::new(), click)
}

fn enrich_both(enricher: &Enricher, click: Value) -> (Value, bool) {
    let mut map = click.as_object().cloned().unwrap_or_default();
    let is_bot = enricher.enrich(&mut map);
    let text = json!({"link": {"id": 1}, "click": click}).to_string();
    let prepared = crate::ingest::click::prepare_raw(text.as_bytes(), 0, enricher, "2025-01-01T00:00:00.000Z").unwrap();
    let stored: Value = serde_json::from_slice(&prepared.data).unwrap();
    assert_eq!(
        stored["click"],
        Value::Object(map.clone()),
        "over text and over a map differ"
    );
    assert_eq!(prepared.routing.is_bot, is_bot);
    (Value::Object(map), is_bot)
}

#[test]
fn adds_every_field_with_versions() {
    let (click, is_bot) = enrich(json!({
        "user_agent": "Mozilla/5.0 (Linux; Android 10; SM-G973F) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/121.0.0.0 Mobile Safari/537.36",
        "country": "de"
    }));
    assert!(!is_bot);
    assert_eq!(
        click["browser"],
        json!({"name": "Chrome Mobile", "version": "121.0.0.0"})
    );
    assert_eq!(click["os"], json!({"name": "Android", "version": "10"}));
    assert_eq!(click["device"], "mobile");
    assert_eq!(click["device_vendor"], "Samsung");
    assert_eq!(click["bot_name"], Value::Null);
    assert_eq!(click["is_eu_country"], true);
}

#[test]
fn a_click_without_user_agent_or_country_gets_nulls() {
    let (click, is_bot) = enrich(json!({}));
    assert!(!is_bot);
    assert_eq!(
        click,
        json!({
            "browser": {"name": null, "version": null},
            "os": {"name": null, "version": null},
            "device": "unknown",
            "device_vendor": null,
            "bot_name": null,
            "is_eu_country": null
        })
    );
}

#[test]
fn bots_are_reported() {
    let (click, is_bot) = enrich(json!({"user_agent": "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)"}));
    assert!(is_bot);
    assert_eq!(click["device"], "bot");
    assert_eq!(click["bot_name"], "Slackbot");
}

#[test]
fn values_the_click_brings_win() {
    let (click, is_bot) = enrich(json!({
        "user_agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/116.0.0.0 Safari/537.36 Edg/116.0.1938.54",
        "browser": {"name": "Microsoft Edge"},
        "device": "mobile",
        "device_vendor": "Samsung",
        "is_eu_country": false,
        "country": "FR"
    }));
    assert!(!is_bot);
    assert_eq!(click["browser"], json!({"name": "Microsoft Edge", "version": null}));
    assert_eq!(click["os"], json!({"name": "Windows", "version": "10"}));
    assert_eq!(click["device"], "mobile");
    assert_eq!(click["device_vendor"], "Samsung");
    assert_eq!(click["is_eu_country"], false);
}

#[test]
fn a_named_bot_is_a_bot_without_user_agent() {
    let (click, is_bot) = enrich(json!({"bot_name": "Googlebot"}));
    assert!(is_bot);
    assert_eq!(click["device"], "bot");
}

#[test]
fn wrongly_typed_fields_are_replaced() {
    let (click, _) = enrich(json!({"browser": "Chrome", "device": "phone", "bot_name": 3}));
    assert_eq!(click["browser"], json!({"name": null, "version": null}));
    assert_eq!(click["device"], "unknown");
    assert_eq!(click["bot_name"], Value::Null);
}

#[test]
fn eu_membership() {
    assert!(is_eu_country("DE"));
    assert!(is_eu_country("se"));
    assert!(!is_eu_country("GB"));
    assert!(!is_eu_country("US"));
    assert!(!is_eu_country(""));
}

#[test]
fn geoip_fills_geography_before_eu_membership_is_decided() {
    let mut writer = mmdb_writer::Writer::new("Clickhook-Test-City");
    let record = json!({"country": {"iso_code": "DE"}, "subdivisions": [{"iso_code": "BE"}], "city": {"names": {"en": "Berlin"}}});
    writer
        .insert("198.51.0.0/16".parse::<ipnet::IpNet>().unwrap(), &record)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("city.mmdb");
    std::fs::write(&path, writer.to_bytes().unwrap()).unwrap();

    let enricher = Enricher::with_geoip(&path).unwrap();
    let (click, _) = enrich_both(&enricher, json!({"ip": "198.51.7.7"}));
    assert_eq!(click["country"], "DE");
    assert_eq!(click["region"], "BE");
    assert_eq!(click["city"], "Berlin");
    assert_eq!(click["is_eu_country"], true);
    assert!(click.get("isp").is_none());
    let (kept, _) = enrich_both(&enricher, json!({"ip": "198.51.7.7", "country": "AT", "city": null}));
    assert_eq!(
        (&kept["country"], &kept["city"], &kept["is_eu_country"]),
        (&json!("AT"), &json!("Berlin"), &json!(true))
    );
}

#[test]
fn geoip_open_error_names_the_file() {
    let err = Enricher::with_geoip(Path::new("/nonexistent/GeoLite2-City.mmdb"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/GeoLite2-City.mmdb"), "{err}");
}
