//! Standard Webhooks signing (SPEC §4.1): `v1,<base64 HMAC-SHA256("<id>.<ts>.<body>")>`
//! keyed by the base64 text after `whsec_`. It owns secret parsing and generation; it must
//! not pick the timestamp (the sender signs at send time) nor know about endpoints.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("a secret must look like \"whsec_<base64>\"")]
    NoPrefix,
    #[error("the text after \"whsec_\" is not base64: {0}")]
    NotBase64(base64::DecodeError),
    #[error("the key must be between 16 and 64 bytes, this one has {0}")]
    KeyLength(usize),
}

/// A decoded HMAC key.
#[derive(Clone)]
pub struct SigningKey {
    key: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

impl SigningKey {
    pub fn from_secret(secret: &str) -> Result<Self, SignError> {
        let b64 = secret.strip_prefix("whsec_").ok_or(SignError::NoPrefix)?;
        let key = B64.decode(b64).map_err(SignError::NotBase64)?;
        if !(16..=64).contains(&key.len()) {
            return Err(SignError::KeyLength(key.len()));
        }
        Ok(SigningKey { key })
    }

    /// `v1,<signature>` for one message.
    pub fn sign(&self, webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
        // HMAC accepts keys of any length, so new_from_slice cannot fail here.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC takes any key length");
        let ts = timestamp.to_string();
        mac.update(webhook_id.as_bytes());
        mac.update(b".");
        mac.update(ts.as_bytes());
        mac.update(b".");
        mac.update(body);
        let mut out = String::with_capacity(48);
        out.push_str("v1,");
        B64.encode_string(mac.finalize().into_bytes(), &mut out);
        out
    }
}

/// The `webhook-signature` header value for every key, space-separated (rotation signs
/// with both the new and the old secret).
pub fn signature_header(keys: &[SigningKey], webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|k| k.sign(webhook_id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A fresh `whsec_` secret with 24 random bytes, as Standard Webhooks libraries generate.
pub fn generate_secret() -> String {
    let mut key = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut key);
    format!("whsec_{}", B64.encode(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_specification_test_vector() {
        let key = SigningKey::from_secret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        let sig = key.sign(
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        );
        assert_eq!(sig, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
    }

    #[test]
    fn several_keys_are_joined_by_exactly_one_space() {
        let a = SigningKey::from_secret(&generate_secret()).unwrap();
        let b = SigningKey::from_secret(&generate_secret()).unwrap();
        let header = signature_header(&[a, b], "id", 1, b"{}");
        let parts: Vec<_> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.starts_with("v1,") && p.len() > 10));
    }

    #[test]
    fn rejects_malformed_secrets() {
        assert!(matches!(SigningKey::from_secret("abc"), Err(SignError::NoPrefix)));
        assert!(matches!(
            SigningKey::from_secret("whsec_!!!"),
            Err(SignError::NotBase64(_))
        ));
        assert!(matches!(
            SigningKey::from_secret("whsec_YWJj"),
            Err(SignError::KeyLength(3))
        ));
    }
}

/// Which Standard Webhooks signatures an endpoint receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureScheme {
    /// HMAC-SHA256 (`v1,`), which every Standard Webhooks library verifies.
    #[default]
    V1,
    /// Ed25519 (`v1a,`), verified with the endpoint's public key (`whpk_…`).
    V1a,
    /// Both, space-separated.
    Both,
}

impl SignatureScheme {
    pub fn hmac(self) -> bool {
        matches!(self, SignatureScheme::V1 | SignatureScheme::Both)
    }
    pub fn ed25519(self) -> bool {
        matches!(self, SignatureScheme::V1a | SignatureScheme::Both)
    }
}

/// An Ed25519 signing key, written `whsk_<base64 of the 32-byte seed>`; its public half
/// is `whpk_<base64 of the 32-byte public key>`.
#[derive(Clone)]
pub struct AsymmetricKey {
    key: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for AsymmetricKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AsymmetricKey(<redacted>)")
    }
}

impl AsymmetricKey {
    pub fn from_secret(secret: &str) -> Result<Self, SignError> {
        let b64 = secret.strip_prefix("whsk_").ok_or(SignError::NoPrefix)?;
        let bytes = B64.decode(b64).map_err(SignError::NotBase64)?;
        let seed: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| SignError::KeyLength(bytes.len()))?;
        Ok(AsymmetricKey {
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    pub fn generate() -> String {
        let mut seed = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut seed);
        format!("whsk_{}", B64.encode(seed))
    }

    pub fn public_key(&self) -> String {
        format!("whpk_{}", B64.encode(self.key.verifying_key().to_bytes()))
    }

    /// `v1a,<signature>` for one message.
    pub fn sign(&self, webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
        use ed25519_dalek::Signer;
        let mut message = Vec::with_capacity(webhook_id.len() + body.len() + 24);
        message.extend_from_slice(webhook_id.as_bytes());
        message.push(b'.');
        message.extend_from_slice(timestamp.to_string().as_bytes());
        message.push(b'.');
        message.extend_from_slice(body);
        format!("v1a,{}", B64.encode(self.key.sign(&message).to_bytes()))
    }
}

#[cfg(test)]
mod asymmetric_tests {
    use super::*;

    #[test]
    fn v1a_signatures_verify_with_the_public_key() {
        use ed25519_dalek::Verifier;
        let secret = AsymmetricKey::generate();
        let key = AsymmetricKey::from_secret(&secret).unwrap();
        let sig = key.sign("msg_1", 1649367553, b"{}");
        let raw = B64.decode(sig.strip_prefix("v1a,").unwrap()).unwrap();
        let public = B64.decode(key.public_key().strip_prefix("whpk_").unwrap()).unwrap();
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&public.try_into().unwrap()).unwrap();
        let signature = ed25519_dalek::Signature::from_slice(&raw).unwrap();
        assert!(vk.verify(b"msg_1.1649367553.{}", &signature).is_ok());
        assert!(vk.verify(b"msg_1.1649367554.{}", &signature).is_err());
        assert!(AsymmetricKey::from_secret("whsec_abc").is_err());
    }
}
