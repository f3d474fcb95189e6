//! Secret values: zeroized on drop, never printed (`Debug` and `Display` redact), compared in
//! constant time. No I/O.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Secret bytes (an HMAC key, a private key in PKCS#8, a shared JWT secret).
#[derive(Clone)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Wraps bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// `n` bytes from the system's cryptographic RNG.
    pub fn random(n: usize) -> Self {
        let mut v = Zeroizing::new(vec![0u8; n]);
        fill_random(&mut v);
        Self(v)
    }

    /// The bytes. Callers must not log or copy them into unzeroized buffers they keep.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Base64url (no padding), for the store file.
    pub fn to_b64(&self) -> SecretString {
        SecretString::new(URL_SAFE_NO_PAD.encode(&self.0[..]))
    }

    /// Parses base64url (no padding).
    pub fn from_b64(s: &str) -> Option<Self> {
        URL_SAFE_NO_PAD.decode(s).ok().map(Self::new)
    }
}

impl PartialEq for SecretBytes {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}
impl Eq for SecretBytes {}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([redacted; {}])", self.0.len())
    }
}

/// A secret string (an API key, a token, the admin token).
#[derive(Clone)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    /// Wraps a string.
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    /// The string. Callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time equality with a presented value.
    pub fn ct_eq_str(&self, presented: &str) -> bool {
        self.0.as_bytes().ct_eq(presented.as_bytes()).into()
    }
}

impl PartialEq for SecretString {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq_str(other.expose())
    }
}
impl Eq for SecretString {}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString([redacted])")
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl serde::Serialize for SecretString {
    /// Serialised in clear: used only for responses that hand the secret to its owner
    /// (a new API key, an issued token) and for the private store file.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.expose())
    }
}

impl<'de> serde::Deserialize<'de> for SecretString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::new)
    }
}

/// Fills `buf` from the system CSPRNG. Never seeded: secrets must not be reproducible.
pub fn fill_random(buf: &mut [u8]) {
    // SystemRandom::fill fails only if the OS RNG is unavailable, which makes every TLS
    // handshake impossible too; there is no safe fallback.
    #[allow(clippy::expect_used)]
    SystemRandom::new()
        .fill(buf)
        .expect("the operating system's random number generator is unavailable");
}

/// A random identifier: `n` random bytes as lowercase base32 (no padding).
pub fn random_id(n: usize) -> String {
    let mut b = vec![0u8; n];
    fill_random(&mut b);
    data_encoding::BASE32_NOPAD.encode(&b).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let s = SecretString::new("hunter2-very-secret".into());
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{s}").contains("hunter2"));
        let b = SecretBytes::new(b"topsecret".to_vec());
        assert!(!format!("{b:?}").contains("topsecret"));
        assert!(!format!("{b:?}").contains("116")); // no byte values either
    }

    #[test]
    fn base64_round_trip_and_random_ids() {
        let b = SecretBytes::random(32);
        let again = SecretBytes::from_b64(b.to_b64().expose()).unwrap();
        assert_eq!(b, again);
        assert_ne!(random_id(10), random_id(10));
        assert_eq!(random_id(10).len(), 16);
    }
}
