//! Service API keys: generation, keyed hashing and constant-time checks. No I/O, no clock
//! (times are passed in as Unix seconds).
//!
//! An API key looks like `mk_<key id>_<secret>`:
//!
//! - `mk_` marks a meshd key (so scanners and the discovery endpoint can tell it from a JWT);
//! - the **key id** is 16 lowercase base32 characters (80 random bits). It is public: it is
//!   logged, listed, and used to retire or revoke the key;
//! - the **secret** is 43 base64url characters (256 random bits from the OS CSPRNG).
//!
//! Only `HMAC-SHA256(node secret, "meshd-api-key-v1" 0x00 <whole key>)` is stored. A check
//! looks the record up by key id, recomputes the HMAC and compares in constant time
//! (`subtle`). The node secret lives in the credential store (mode 0600) and never leaves it
//! except in a backup.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::secret::{fill_random, random_id, SecretBytes, SecretString};

/// Prefix of every API key.
pub const KEY_PREFIX: &str = "mk_";
/// Length of a printed key id.
pub const KEY_ID_LEN: usize = 16;
/// Longest API key accepted for checking (checked before any work).
pub const MAX_API_KEY_LEN: usize = 128;
const HASH_CONTEXT: &[u8] = b"meshd-api-key-v1\0";

/// The public identifier of an API key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId(String);

impl KeyId {
    /// A fresh random key id.
    pub fn random() -> Self {
        Self(random_id(10))
    }

    /// The printed form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for KeyId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<KeyId> for String {
    fn from(k: KeyId) -> String {
        k.0
    }
}

impl std::str::FromStr for KeyId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.len() == KEY_ID_LEN
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
        {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "malformed key id {:?} (expected {KEY_ID_LEN} base32 characters)",
                s.chars().take(40).collect::<String>()
            ))
        }
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0)
    }
}

/// Splits a presented key into its id and checks its shape. Never allocates for junk input.
pub fn parse_api_key(presented: &str) -> Option<KeyId> {
    if presented.len() > MAX_API_KEY_LEN {
        return None;
    }
    let rest = presented.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_at_checked(KEY_ID_LEN)?;
    let secret = secret.strip_prefix('_')?;
    if secret.len() != 43
        || !secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return None;
    }
    id.parse().ok()
}

/// Whether `s` looks like an API key (as opposed to a token).
pub fn looks_like_api_key(s: &str) -> bool {
    s.starts_with(KEY_PREFIX)
}

/// The node-local HMAC key that API keys are hashed with (its HMAC key schedule is computed
/// once, so a check costs two SHA-256 compressions over the key and context).
#[derive(Clone)]
pub struct KeyHasher {
    secret: SecretBytes,
    key: ring::hmac::Key,
}

impl PartialEq for KeyHasher {
    fn eq(&self, other: &Self) -> bool {
        self.secret == other.secret
    }
}
impl Eq for KeyHasher {}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyHasher").finish_non_exhaustive()
    }
}

impl KeyHasher {
    /// A fresh random hasher (32-byte key).
    pub fn generate() -> Self {
        Self::from_secret(SecretBytes::random(32))
    }

    /// From a stored secret.
    pub fn from_secret(secret: SecretBytes) -> Self {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.expose());
        Self { secret, key }
    }

    /// The secret, for the store file.
    pub fn secret(&self) -> &SecretBytes {
        &self.secret
    }

    /// HMAC-SHA256 of a whole API key.
    pub fn hash(&self, api_key: &str) -> [u8; 32] {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        ctx.update(HASH_CONTEXT);
        ctx.update(api_key.as_bytes());
        let tag = ctx.sign();
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

/// A stored API key: never the key itself, only its keyed hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// Public id.
    pub key_id: KeyId,
    /// HMAC-SHA256 of the whole key, base64url.
    #[serde(with = "b64_32")]
    pub hash: [u8; 32],
    /// When it was created, Unix seconds.
    pub created_at: u64,
    /// When it stops working (set when retired; the overlap window), Unix seconds.
    #[serde(default)]
    pub not_after: Option<u64>,
}

impl ApiKeyRecord {
    /// Whether the key is usable at `now`.
    pub fn is_active(&self, now: u64) -> bool {
        self.not_after.is_none_or(|t| now < t)
    }
}

/// Makes a new API key; returns the key (to show once) and the record to store.
pub fn generate(hasher: &KeyHasher, now: u64) -> (SecretString, ApiKeyRecord) {
    let key_id = KeyId::random();
    let mut secret = zeroize::Zeroizing::new([0u8; 32]);
    fill_random(&mut secret[..]);
    let key = SecretString::new(format!(
        "{KEY_PREFIX}{key_id}_{}",
        URL_SAFE_NO_PAD.encode(&secret[..])
    ));
    let record = ApiKeyRecord {
        hash: hasher.hash(key.expose()),
        key_id,
        created_at: now,
        not_after: None,
    };
    (key, record)
}

/// Why a presented API key was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyRefusal {
    /// Not shaped like an API key.
    #[error("malformed API key")]
    Malformed,
    /// No key with this id exists for the service.
    #[error("unknown API key id")]
    UnknownKeyId,
    /// The key was retired (its overlap window ended) or revoked.
    #[error("API key retired")]
    Retired,
    /// The id exists but the secret does not match.
    #[error("wrong API key")]
    WrongKey,
}

/// Checks `presented` against the records of one service.
pub fn check<'a>(
    hasher: &KeyHasher,
    records: impl IntoIterator<Item = &'a ApiKeyRecord>,
    presented: &str,
    now: u64,
) -> Result<KeyId, KeyRefusal> {
    let id = parse_api_key(presented).ok_or(KeyRefusal::Malformed)?;
    let rec = records
        .into_iter()
        .find(|r| r.key_id == id)
        .ok_or(KeyRefusal::UnknownKeyId)?;
    // Compare before looking at retirement so that timing does not tell a retired key with a
    // wrong secret from a retired key with the right one.
    let ok: bool = hasher.hash(presented).ct_eq(&rec.hash).into();
    if !ok {
        return Err(KeyRefusal::WrongKey);
    }
    if !rec.is_active(now) {
        return Err(KeyRefusal::Retired);
    }
    Ok(id)
}

mod b64_32 {
    use super::*;

    pub fn serialize<S: serde::Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&URL_SAFE_NO_PAD.encode(v))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let v = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(serde::de::Error::custom)?;
        v.try_into()
            .map_err(|_| serde::de::Error::custom("expected 32 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_check_and_are_shaped() {
        let h = KeyHasher::generate();
        let (key, rec) = generate(&h, 100);
        assert!(key.expose().starts_with("mk_"));
        assert_eq!(key.expose().len(), 3 + 16 + 1 + 43);
        assert_eq!(parse_api_key(key.expose()), Some(rec.key_id.clone()));
        assert_eq!(check(&h, [&rec], key.expose(), 101), Ok(rec.key_id.clone()));
        // The record holds no trace of the secret.
        let json = serde_json::to_string(&rec).unwrap();
        assert!(!json.contains(&key.expose()[20..]));
    }

    #[test]
    fn refusals() {
        let h = KeyHasher::generate();
        let (key, mut rec) = generate(&h, 100);
        let (other, _) = generate(&h, 100);
        // Unknown key id.
        assert_eq!(
            check(&h, [&rec], other.expose(), 101),
            Err(KeyRefusal::UnknownKeyId)
        );
        // Wrong key: right id, wrong secret.
        let mut wrong = key.expose().to_owned();
        let last = wrong.pop().unwrap();
        wrong.push(if last == 'A' { 'B' } else { 'A' });
        assert_eq!(check(&h, [&rec], &wrong, 101), Err(KeyRefusal::WrongKey));
        // Malformed.
        for bad in [
            "",
            "mk_",
            "Bearer x",
            &"mk_".repeat(100),
            "mk_aaaaaaaaaaaaaaaa_short",
        ] {
            assert_eq!(check(&h, [&rec], bad, 101), Err(KeyRefusal::Malformed));
        }
        // A different node secret does not accept the key.
        let h2 = KeyHasher::generate();
        assert_eq!(
            check(&h2, [&rec], key.expose(), 101),
            Err(KeyRefusal::WrongKey)
        );
        // Retired with an overlap window: works until not_after, then refused.
        rec.not_after = Some(200);
        assert!(check(&h, [&rec], key.expose(), 199).is_ok());
        assert_eq!(
            check(&h, [&rec], key.expose(), 200),
            Err(KeyRefusal::Retired)
        );
    }
}
