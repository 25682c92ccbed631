//! User-agent parsing: browser, OS, device type, device vendor and bot name from one
//! `User-Agent` string. Browser, OS and vendor come from the uap-core dataset
//! (`regexes.json`, uap-core 0.18.0, Apache-2.0) run by the `ua-parser` crate; device type
//! and bot names are decided here, because uap-core has no device types and names only some
//! link-preview fetchers. A full parse costs tens of microseconds while real traffic repeats
//! a few thousand strings, so a bounded cache keyed by the string sits in front. This module
//! must not read or write click JSON: the enricher decides which fields to fill.

use quick_cache::sync::Cache;
use std::sync::{Arc, OnceLock};
use ua_parser::{Extractor, Regexes};

#[derive(Debug, thiserror::Error)]
pub enum UaError {
    #[error("the user-agent dataset does not load: {0}")]
    Dataset(String),
}

/// The uap-core dataset, converted from its YAML to JSON so that no YAML parser is needed.
const DATASET: &str = include_str!("regexes.json");

/// Distinct user agents remembered; the working set of real traffic is far smaller.
const CACHE_ENTRIES: usize = 8192;

/// Longer strings are cut here before parsing and caching: no browser needs more, and a
/// hostile header must not buy unbounded regex time or cache memory.
const MAX_UA_BYTES: usize = 1024;

/// The device kinds of SPEC §3.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    Desktop,
    Mobile,
    Tablet,
    Bot,
    #[default]
    Unknown,
}

impl Device {
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Desktop => "desktop",
            Device::Mobile => "mobile",
            Device::Tablet => "tablet",
            Device::Bot => "bot",
            Device::Unknown => "unknown",
        }
    }

    pub fn from_name(name: &str) -> Option<Device> {
        Some(match name {
            "desktop" => Device::Desktop,
            "mobile" => Device::Mobile,
            "tablet" => Device::Tablet,
            "bot" => Device::Bot,
            "unknown" => Device::Unknown,
            _ => return None,
        })
    }
}

/// What one user agent says about the visitor.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedUserAgent {
    /// uap-core family, e.g. "Chrome Mobile"; `None` when unrecognised.
    pub browser: Option<String>,
    pub browser_version: Option<String>,
    pub os: Option<String>,
    pub os_version: Option<String>,
    pub device: Device,
    /// The device's maker, e.g. "Samsung" or "Apple"; `None` for generic devices and bots.
    pub vendor: Option<String>,
    /// Set exactly when `device` is [`Device::Bot`].
    pub bot: Option<String>,
}

/// Parses user agents through a bounded cache. Cheap to share between threads.
pub struct UaParser {
    cache: Cache<Box<str>, Arc<ParsedUserAgent>>,
}

impl std::fmt::Debug for UaParser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UaParser").field("cached", &self.cache.len()).finish()
    }
}

impl Default for UaParser {
    fn default() -> Self {
        UaParser::new()
    }
}

impl UaParser {
    pub fn new() -> Self {
        // The extractor (about 1,200 compiled regexes, tens of MB) is built on the first
        // user agent to parse, so a daemon that has not seen one stays small.
        UaParser {
            cache: Cache::new(CACHE_ENTRIES),
        }
    }

    pub fn parse(&self, ua: &str) -> Arc<ParsedUserAgent> {
        let ua = truncate(ua, MAX_UA_BYTES);
        if let Some(hit) = self.cache.get(ua) {
            return hit;
        }
        let info = Arc::new(parse_uncached(ua));
        self.cache.insert(ua.into(), Arc::clone(&info));
        info
    }
}

/// The process-wide extractor: it is large and immutable, so every enricher shares it.
fn extractor() -> Option<&'static Extractor<'static>> {
    static EXTRACTOR: OnceLock<Result<Extractor<'static>, UaError>> = OnceLock::new();
    EXTRACTOR.get_or_init(load_dataset).as_ref().ok()
}

fn load_dataset() -> Result<Extractor<'static>, UaError> {
    let regexes: Regexes<'static> = serde_json::from_str(DATASET).map_err(|e| UaError::Dataset(e.to_string()))?;
    Extractor::try_from(regexes).map_err(|e| {
        let err = UaError::Dataset(e.to_string());
        // Enrichment then degrades to "unknown" rather than refusing clicks; say so once.
        tracing::error!(error = %err, "user-agent parsing disabled");
        err
    })
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Parses without the cache.
pub fn parse_uncached(ua: &str) -> ParsedUserAgent {
    let ua = ua.trim();
    if ua.is_empty() {
        return ParsedUserAgent::default();
    }
    let (agent, os, dev) = match extractor() {
        Some(e) => e.extract(ua),
        None => (None, None, None),
    };
    let browser = agent.as_ref().map(|a| a.family.as_ref()).filter(|f| known(f));
    let browser_version = match (&browser, &agent) {
        (Some(_), Some(a)) => join_version(&[a.major, a.minor, a.patch, a.patch_minor]),
        _ => None,
    };
    let os_name = os.as_ref().map(|o| o.os.as_ref()).filter(|f| known(f));
    let os_version = match (&os_name, &os) {
        (Some(_), Some(o)) => join_version(&[
            o.major.as_deref(),
            o.minor.as_deref(),
            o.patch.as_deref(),
            o.patch_minor.as_deref(),
        ]),
        _ => None,
    };
    let dev_family = dev.as_ref().map_or("Other", |d| d.device.as_ref());
    let brand = dev.as_ref().and_then(|d| d.brand.as_deref());

    let bot = known_bot(ua).map(str::to_string).or_else(|| {
        // uap-core files every crawler it recognises under the device family "Spider".
        (dev_family == "Spider").then(|| browser.unwrap_or("unknown bot").to_string())
    });
    let device = if bot.is_some() {
        Device::Bot
    } else {
        classify(ua, os_name, dev_family)
    };
    let vendor = match device {
        Device::Bot | Device::Unknown => None,
        _ => vendor(brand, dev.as_ref().and_then(|d| d.model.as_deref())),
    };
    ParsedUserAgent {
        browser: browser.map(str::to_string),
        browser_version,
        os: os_name.map(str::to_string),
        os_version,
        device,
        vendor,
        bot,
    }
}

fn vendor(brand: Option<&str>, model: Option<&str>) -> Option<String> {
    match brand {
        Some(b) if !b.starts_with("Generic") && b != "Spider" => Some(b.to_string()),
        // uap-core files Samsung tablets (no "Mobile" token) under a generic brand; their
        // model numbers say who made them.
        _ if model.is_some_and(|m| m.starts_with("SM-")) => Some("Samsung".to_string()),
        _ => None,
    }
}

/// uap-core answers "Other" when nothing matched.
fn known(family: &str) -> bool {
    !family.is_empty() && family != "Other"
}

fn join_version(parts: &[Option<&str>]) -> Option<String> {
    let mut out = String::new();
    for part in parts.iter().map_while(|p| p.filter(|s| !s.is_empty())) {
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(part);
    }
    (!out.is_empty()).then_some(out)
}

/// Crawlers and link-preview fetchers by a token of their user agent (lower case), with the
/// name reported as `bot_name`. First match wins, so more specific tokens come first (Telegram
/// says "like TwitterBot"; Google's special crawlers also say "Googlebot").
const BOTS: &[(&str, &str)] = &[
    ("telegrambot", "TelegramBot"),
    ("adsbot-google", "AdsBot-Google"),
    ("mediapartners-google", "Mediapartners-Google"),
    ("google-inspectiontool", "Google-InspectionTool"),
    ("googleother", "GoogleOther"),
    ("feedfetcher-google", "FeedFetcher-Google"),
    ("storebot-google", "Storebot-Google"),
    ("google-pagerenderer", "Google-PageRenderer"),
    ("apis-google", "APIs-Google"),
    ("googlebot", "Googlebot"),
    ("bingpreview", "BingPreview"),
    ("bingbot", "Bingbot"),
    ("msnbot", "msnbot"),
    ("slackbot", "Slackbot"),
    ("slack-imgproxy", "Slackbot"),
    ("twitterbot", "Twitterbot"),
    ("facebookexternalhit", "facebookexternalhit"),
    ("facebookcatalog", "facebookcatalog"),
    ("meta-externalagent", "meta-externalagent"),
    ("meta-externalfetcher", "meta-externalfetcher"),
    ("facebot", "Facebot"),
    ("whatsapp", "WhatsApp"),
    ("linkedinbot", "LinkedInBot"),
    ("discordbot", "Discordbot"),
    ("skypeuripreview", "SkypeUriPreview"),
    ("pinterestbot", "Pinterestbot"),
    ("pinterest/0.", "Pinterestbot"),
    ("redditbot", "redditbot"),
    ("applebot", "Applebot"),
    ("duckduckbot", "DuckDuckBot"),
    ("duckassistbot", "DuckAssistBot"),
    ("duckduckgo-favicons-bot", "DuckDuckGo-Favicons-Bot"),
    ("yandexbot", "YandexBot"),
    ("yandexmobilebot", "YandexMobileBot"),
    ("baiduspider", "Baiduspider"),
    ("sogou web spider", "Sogou"),
    ("petalbot", "PetalBot"),
    ("bytespider", "Bytespider"),
    ("gptbot", "GPTBot"),
    ("chatgpt-user", "ChatGPT-User"),
    ("oai-searchbot", "OAI-SearchBot"),
    ("claudebot", "ClaudeBot"),
    ("claude-user", "Claude-User"),
    ("perplexitybot", "PerplexityBot"),
    ("amazonbot", "Amazonbot"),
    ("ccbot", "CCBot"),
    ("ahrefsbot", "AhrefsBot"),
    ("semrushbot", "SemrushBot"),
    ("mj12bot", "MJ12bot"),
    ("dotbot", "DotBot"),
    ("seznambot", "SeznamBot"),
    ("yahoo! slurp", "Yahoo! Slurp"),
    ("qwantbot", "Qwantbot"),
    ("ia_archiver", "ia_archiver"),
    ("archive.org_bot", "archive.org_bot"),
    ("uptimerobot", "UptimeRobot"),
    ("pingdom", "Pingdom"),
    ("iframely", "Iframely"),
    ("embedly", "Embedly"),
    ("vkshare", "vkShare"),
    ("mastodon/", "Mastodon"),
    ("cardyb", "Bluesky"),
    ("headlesschrome", "HeadlessChrome"),
    ("phantomjs", "PhantomJS"),
    ("python-requests", "python-requests"),
    ("python-urllib", "Python-urllib"),
    ("aiohttp", "aiohttp"),
    ("go-http-client", "Go-http-client"),
    ("curl/", "curl"),
    ("wget/", "Wget"),
    ("apache-httpclient", "Apache-HttpClient"),
    ("java/", "Java"),
    ("okhttp", "okhttp"),
    ("node-fetch", "node-fetch"),
    ("axios/", "axios"),
    ("libwww-perl", "libwww-perl"),
    ("scrapy", "Scrapy"),
];

fn known_bot(ua: &str) -> Option<&'static str> {
    let lower = ua.to_ascii_lowercase();
    BOTS.iter()
        .find(|(token, _)| lower.contains(token))
        .map(|(_, name)| *name)
}

/// Televisions, consoles and streaming sticks: none of desktop, mobile or tablet.
const OTHER_DEVICES: &[&str] = &[
    "SMART-TV",
    "SmartTV",
    "SMARTTV",
    "Smart TV",
    "GoogleTV",
    "Android TV",
    "AppleTV",
    "CrKey",
    "Web0S",
    "HbbTV",
    "BRAVIA",
    "PlayStation",
    "Xbox",
    "Nintendo",
];

const MOBILE_OSES: &[&str] = &[
    "Android",
    "iOS",
    "Windows Phone",
    "Windows Mobile",
    "BlackBerry OS",
    "KaiOS",
    "Firefox OS",
    "Symbian OS",
];

const DESKTOP_OSES: &[&str] = &[
    "Windows",
    "Mac OS X",
    "macOS",
    "Linux",
    "Ubuntu",
    "Chrome OS",
    "ChromeOS",
    "Fedora",
    "Debian",
    "FreeBSD",
    "OpenBSD",
    "NetBSD",
    "Solaris",
    "Linux Mint",
    "Arch Linux",
    "Gentoo",
    "Red Hat",
    "SUSE",
    "openSUSE",
    "Kubuntu",
    "CentOS",
];

fn classify(ua: &str, os: Option<&str>, dev_family: &str) -> Device {
    let has = |token: &str| ua.contains(token);
    if OTHER_DEVICES.iter().any(|t| has(t)) {
        return Device::Unknown;
    }
    // Android browsers in the "Linux; Android" form say "Mobile" on phones only.
    let android_tablet = has("Linux; Android") && !has("Mobi");
    if dev_family == "iPad"
        || has("iPad")
        || (has("Tablet") && !has("Tablet PC"))
        || has("Kindle")
        || has("Silk/")
        || has("PlayBook")
        || android_tablet
    {
        return Device::Tablet;
    }
    if has("Mobi")
        || has("iPhone")
        || has("iPod")
        || has("Opera Mini")
        || dev_family == "iPhone"
        || os.is_some_and(|o| MOBILE_OSES.contains(&o))
    {
        return Device::Mobile;
    }
    if os.is_some_and(|o| DESKTOP_OSES.contains(&o) || (o.starts_with("Windows") && o != "Windows CE"))
        || has("Windows NT")
        || has("Macintosh")
        || has("X11")
        || has("CrOS")
    {
        return Device::Desktop;
    }
    Device::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_loads() {
        assert!(load_dataset().is_ok());
    }

    #[test]
    fn long_strings_are_cut_on_a_char_boundary() {
        let s = "é".repeat(600);
        let cut = truncate(&s, MAX_UA_BYTES);
        assert!(cut.len() <= MAX_UA_BYTES);
        assert!(s.starts_with(cut));
    }

    #[test]
    fn cache_answers_the_same_as_a_parse() {
        let p = UaParser::new();
        let ua = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) \
                  Version/17.1.2 Mobile/15E148 Safari/604.1";
        let first = p.parse(ua);
        let second = p.parse(ua);
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(*first, parse_uncached(ua));
    }

    #[test]
    fn empty_agent_is_unknown() {
        assert_eq!(parse_uncached("  "), ParsedUserAgent::default());
    }
}
