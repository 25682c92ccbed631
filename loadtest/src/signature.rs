//! Standard Webhooks signatures (SPEC §4.1): `v1,` + base64(HMAC-SHA256(key,
//! "<webhook-id>.<webhook-timestamp>.<body>")), the key being the base64 text after `whsec_`.
//! It owns signing, verifying and generating secrets. It must not allocate on the verify
//! path beyond the MAC state clone: the sink calls it for every request it receives.

use crate::Error;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// Receivers following Standard Webhooks refuse timestamps further off than this.
pub const TOLERANCE_SECS: i64 = 300;

type HmacSha256 = Hmac<Sha256>;

/// A decoded endpoint secret with its HMAC key schedule done once.
#[derive(Clone)]
pub struct SigningKey {
    mac: HmacSha256,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    /// From `whsec_<base64>`; the bare base64 is accepted too, as the reference libraries do.
    pub fn from_secret(secret: &str) -> Result<Self, Error> {
        let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
        let key = STANDARD
            .decode(b64)
            .map_err(|e| Error::Secret(format!("{secret:?} is not whsec_<base64>: {e}")))?;
        if key.is_empty() {
            return Err(Error::Secret("the key after whsec_ is empty".into()));
        }
        let mac = HmacSha256::new_from_slice(&key).map_err(|e| Error::Secret(e.to_string()))?;
        Ok(SigningKey { mac })
    }

    fn mac_of(&self, id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `webhook-signature` value a sender puts on this message.
    pub fn sign(&self, id: &str, timestamp: &str, body: &[u8]) -> String {
        let tag = self.mac_of(id, timestamp, body).finalize().into_bytes();
        format!("v1,{}", STANDARD.encode(tag))
    }

    /// True when any `v1,` entry of the space-separated header matches, compared in constant
    /// time. Entries of other versions (`v1a,`) are skipped, as the reference libraries do.
    pub fn verify(&self, id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
        let mut computed: Option<[u8; 32]> = None;
        for entry in header.split(' ') {
            let Some(b64) = entry.strip_prefix("v1,") else { continue };
            let mut given = [0u8; 32];
            match STANDARD.decode_slice(b64, &mut given) {
                Ok(32) => {}
                _ => continue,
            }
            let expected =
                computed.get_or_insert_with(|| self.mac_of(id, timestamp, body).finalize().into_bytes().into());
            if constant_time_eq(expected, &given) {
                return true;
            }
        }
        false
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh `whsec_` secret over 24 random bytes, the size clickhook itself generates.
pub fn generate_secret() -> String {
    let mut key = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut key);
    format!("whsec_{}", STANDARD.encode(key))
}

/// Whether a `webhook-timestamp` header is integer seconds within the tolerance of `now`.
pub fn timestamp_fresh(timestamp: &str, now: i64) -> bool {
    timestamp
        .parse::<i64>()
        .is_ok_and(|t| (t - now).abs() <= TOLERANCE_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const TS: &str = "1649367553";
    const BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;
    const SIG: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

    #[test]
    fn matches_the_specification_test_vector() {
        let key = SigningKey::from_secret(SECRET).unwrap();
        assert_eq!(key.sign(ID, TS, BODY), SIG);
        assert!(key.verify(ID, TS, BODY, SIG));
    }

    #[test]
    fn rejects_any_change() {
        let key = SigningKey::from_secret(SECRET).unwrap();
        assert!(!key.verify(ID, "1649367554", BODY, SIG));
        assert!(!key.verify("msg_other", TS, BODY, SIG));
        assert!(!key.verify(ID, TS, b"{}", SIG));
        assert!(!key.verify(ID, TS, BODY, "v1,AAAA"));
        assert!(!key.verify(ID, TS, BODY, ""));
        assert!(!key.verify(ID, TS, BODY, &SIG.replace("v1,", "v2,")));
        let other = SigningKey::from_secret(&generate_secret()).unwrap();
        assert!(!other.verify(ID, TS, BODY, SIG));
    }

    #[test]
    fn accepts_one_good_entry_among_several() {
        let key = SigningKey::from_secret(SECRET).unwrap();
        let header = format!("v1a,c29tZXRoaW5n v1,bm90IGl0IGF0IGFsbCBub3QgaXQgYXQgYWxsIG5vdCE= {SIG}");
        assert!(key.verify(ID, TS, BODY, &header));
    }

    #[test]
    fn secrets_round_trip_and_bad_ones_are_refused() {
        let s = generate_secret();
        assert!(s.starts_with("whsec_") && s.len() == 6 + 32, "{s}");
        assert!(SigningKey::from_secret(&s).is_ok());
        assert!(SigningKey::from_secret("C2FVsBQIhrscChlQIMV+b5sSYspob7oD").is_ok());
        assert!(SigningKey::from_secret("whsec_not base64!").is_err());
        assert!(SigningKey::from_secret("whsec_").is_err());
    }

    #[test]
    fn timestamp_tolerance() {
        assert!(timestamp_fresh("1000", 1000));
        assert!(timestamp_fresh("700", 1000));
        assert!(!timestamp_fresh("699", 1000));
        assert!(!timestamp_fresh("1301", 1000));
        assert!(!timestamp_fresh("1000.5", 1000));
        assert!(!timestamp_fresh("", 1000));
    }
}
