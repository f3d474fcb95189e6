//! Node revocations: small records signed by the overlay CA's Ed25519 key (or an operator key
//! every node is configured to trust), spread peer to peer and enforced on every connection.
//! Pure: signing, verification, encoding; no I/O, no clock.
//!
//! ```text
//! Revocation       = postcard { target: Node([u8;20]) | Serial(hex string), issued_at: u64, reason: String }
//! SignedRevocation = postcard { body: bytes(postcard(Revocation)), signer: [u8;32], signature: bytes(64) }
//! signature        = Ed25519(signer, "meshd-revocation-v1" 0x00 || body)
//! text form        = base64url(postcard(SignedRevocation)), no padding
//! ```
//!
//! A peer accepts a record only if `signer` is one of its trust anchors' keys (the CA
//! certificate it already trusts for TLS, plus configured operator keys) and the signature
//! verifies; an arbitrary peer cannot revoke anyone. Records are never removed.

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

use crate::identity::{CertInfo, NodeId};

const CONTEXT: &[u8] = b"meshd-revocation-v1\0";
/// Largest encoded revocation body.
pub const MAX_BODY_LEN: usize = 512;
/// Longest reason kept.
pub const MAX_REASON_LEN: usize = 200;
/// Most revocations a node keeps (refusing more protects memory; 64 KiB frames carry ~400).
pub const MAX_REVOCATIONS: usize = 65_536;

/// What is revoked.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RevocationTarget {
    /// A node id (every certificate for that key).
    Node(NodeId),
    /// One certificate, by serial number (lowercase hex).
    Serial(String),
}

impl RevocationTarget {
    /// Whether this target covers `cert`.
    pub fn covers(&self, cert: &CertInfo) -> bool {
        match self {
            RevocationTarget::Node(id) => *id == cert.node_id,
            RevocationTarget::Serial(s) => *s == cert.serial,
        }
    }
}

impl std::fmt::Display for RevocationTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RevocationTarget::Node(id) => write!(f, "node {id}"),
            RevocationTarget::Serial(s) => write!(f, "serial {s}"),
        }
    }
}

/// The signed statement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// What is revoked.
    pub target: RevocationTarget,
    /// When, Unix seconds.
    pub issued_at: u64,
    /// Why (free text for operators, at most 200 bytes).
    pub reason: String,
}

/// A revocation with its signature, as stored and sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRevocation {
    /// postcard(Revocation).
    pub body: Vec<u8>,
    /// Ed25519 public key of the signer.
    pub signer: [u8; 32],
    /// Ed25519 signature over the context string and the body.
    pub signature: Vec<u8>,
}

/// Why a revocation record was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RevocationError {
    /// The record does not decode or is over its limits.
    #[error("malformed revocation: {0}")]
    Malformed(String),
    /// The signer is not a trusted key.
    #[error("revocation signed by an untrusted key")]
    UntrustedSigner,
    /// The signature does not verify.
    #[error("bad revocation signature")]
    BadSignature,
    /// The signing key could not be used.
    #[error("signing key unusable: {0}")]
    BadKey(String),
}

/// The Ed25519 public key of a CA certificate (DER), if it is an Ed25519 certificate.
pub fn ed25519_key_of_cert(der: &[u8]) -> Option<[u8; 32]> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let spki = &cert.tbs_certificate.subject_pki;
    if spki.algorithm.algorithm.to_id_string() != "1.3.101.112" {
        return None;
    }
    spki.subject_public_key.data.as_ref().try_into().ok()
}

/// An Ed25519 signer from a PKCS#8 PEM private key (the CA's `ca.key`, or an operator key).
pub struct RevocationSigner {
    kp: Ed25519KeyPair,
}

impl std::fmt::Debug for RevocationSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationSigner")
            .field("public", &URL_SAFE_NO_PAD.encode(self.kp.public_key()))
            .finish()
    }
}

impl RevocationSigner {
    /// Parses a PKCS#8 PEM Ed25519 key.
    pub fn from_pem(pem: &str) -> Result<Self, RevocationError> {
        let der = rustls_pemfile::private_key(&mut pem.as_bytes())
            .map_err(|e| RevocationError::BadKey(e.to_string()))?
            .ok_or_else(|| RevocationError::BadKey("no private key in PEM".into()))?;
        let kp = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_der())
            .map_err(|_| RevocationError::BadKey("not an Ed25519 PKCS#8 key".into()))?;
        Ok(Self { kp })
    }

    /// The public key.
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.kp.public_key().as_ref());
        out
    }

    /// Signs a revocation.
    pub fn sign(&self, rev: &Revocation) -> Result<SignedRevocation, RevocationError> {
        let mut rev = rev.clone();
        rev.reason.truncate(MAX_REASON_LEN);
        while !rev.reason.is_char_boundary(rev.reason.len()) {
            rev.reason.pop();
        }
        let body =
            postcard::to_allocvec(&rev).map_err(|e| RevocationError::Malformed(e.to_string()))?;
        if body.len() > MAX_BODY_LEN {
            return Err(RevocationError::Malformed("body too large".into()));
        }
        let mut msg = CONTEXT.to_vec();
        msg.extend_from_slice(&body);
        Ok(SignedRevocation {
            signature: self.kp.sign(&msg).as_ref().to_vec(),
            signer: self.public_key(),
            body,
        })
    }
}

impl SignedRevocation {
    /// Verifies the record against trusted signer keys and decodes it.
    pub fn verify(&self, trusted: &[[u8; 32]]) -> Result<Revocation, RevocationError> {
        if self.body.len() > MAX_BODY_LEN || self.signature.len() != 64 {
            return Err(RevocationError::Malformed("size".into()));
        }
        if !trusted.contains(&self.signer) {
            return Err(RevocationError::UntrustedSigner);
        }
        let mut msg = CONTEXT.to_vec();
        msg.extend_from_slice(&self.body);
        UnparsedPublicKey::new(&ED25519, &self.signer)
            .verify(&msg, &self.signature)
            .map_err(|_| RevocationError::BadSignature)?;
        let (rev, rest): (Revocation, _) = postcard::take_from_bytes(&self.body)
            .map_err(|e| RevocationError::Malformed(e.to_string()))?;
        if !rest.is_empty() || rev.reason.len() > MAX_REASON_LEN {
            return Err(RevocationError::Malformed(
                "trailing bytes or long reason".into(),
            ));
        }
        if let RevocationTarget::Serial(s) = &rev.target {
            if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(RevocationError::Malformed("bad serial".into()));
            }
        }
        Ok(rev)
    }

    /// The text form (for the CLI and the admin API).
    pub fn to_text(&self) -> String {
        URL_SAFE_NO_PAD.encode(postcard::to_allocvec(self).unwrap_or_default())
    }

    /// Parses the text form (does not verify).
    pub fn from_text(s: &str) -> Result<Self, RevocationError> {
        if s.len() > 2 * MAX_BODY_LEN + 256 {
            return Err(RevocationError::Malformed("too long".into()));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(s.trim())
            .map_err(|e| RevocationError::Malformed(e.to_string()))?;
        let (r, rest): (Self, _) = postcard::take_from_bytes(&bytes)
            .map_err(|e| RevocationError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(RevocationError::Malformed("trailing bytes".into()));
        }
        Ok(r)
    }
}

impl Serialize for TextRevocation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_text())
    }
}

impl<'de> Deserialize<'de> for TextRevocation {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SignedRevocation::from_text(&s)
            .map(TextRevocation)
            .map_err(serde::de::Error::custom)
    }
}

/// A [`SignedRevocation`] serialised in its text form (JSON store, admin API).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextRevocation(pub SignedRevocation);

/// The verified revocations a node holds: one record per target, never removed.
#[derive(Clone, Debug, Default)]
pub struct RevocationSet {
    records: BTreeMap<RevocationTarget, (Revocation, SignedRevocation)>,
}

impl RevocationSet {
    /// Adds a verified record; returns whether its target was new.
    pub fn insert(&mut self, rev: Revocation, signed: SignedRevocation) -> bool {
        if self.records.contains_key(&rev.target) || self.records.len() >= MAX_REVOCATIONS {
            return false;
        }
        self.records.insert(rev.target.clone(), (rev, signed));
        true
    }

    /// Whether `cert` is revoked.
    pub fn covers(&self, cert: &CertInfo) -> bool {
        self.records
            .contains_key(&RevocationTarget::Node(cert.node_id))
            || self
                .records
                .contains_key(&RevocationTarget::Serial(cert.serial.clone()))
    }

    /// Every record.
    pub fn iter(&self) -> impl Iterator<Item = (&Revocation, &SignedRevocation)> {
        self.records.values().map(|(r, s)| (r, s))
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{generate_ca, Validity};

    fn ca() -> crate::identity::CaMaterial {
        let now = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        generate_ca("t", Validity::days_from(now, 10).unwrap()).unwrap()
    }

    fn ca_key(ca: &crate::identity::CaMaterial) -> [u8; 32] {
        let der = rustls_pemfile::certs(&mut ca.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        ed25519_key_of_cert(&der).unwrap()
    }

    #[test]
    fn ca_signed_revocations_verify_and_round_trip() {
        let ca = ca();
        let signer = RevocationSigner::from_pem(&ca.key_pem).unwrap();
        assert_eq!(signer.public_key(), ca_key(&ca));
        let id: NodeId = "a".repeat(32).parse().unwrap();
        let rev = Revocation {
            target: RevocationTarget::Node(id),
            issued_at: 5,
            reason: "stolen laptop".into(),
        };
        let s = signer.sign(&rev).unwrap();
        assert_eq!(s.verify(&[ca_key(&ca)]).unwrap(), rev);
        let text = s.to_text();
        assert_eq!(SignedRevocation::from_text(&text).unwrap(), s);
    }

    #[test]
    fn untrusted_or_tampered_records_are_refused() {
        let ca = ca();
        let other = self::ca();
        let id: NodeId = "b".repeat(32).parse().unwrap();
        let rev = Revocation {
            target: RevocationTarget::Node(id),
            issued_at: 5,
            reason: String::new(),
        };
        // Signed by another CA (or an arbitrary peer's key): untrusted.
        let s = RevocationSigner::from_pem(&other.key_pem)
            .unwrap()
            .sign(&rev)
            .unwrap();
        assert_eq!(
            s.verify(&[ca_key(&ca)]),
            Err(RevocationError::UntrustedSigner)
        );
        // Claiming the CA as signer without its key: bad signature.
        let mut forged = s.clone();
        forged.signer = ca_key(&ca);
        assert_eq!(
            forged.verify(&[ca_key(&ca)]),
            Err(RevocationError::BadSignature)
        );
        // Tampered body.
        let mut t = RevocationSigner::from_pem(&ca.key_pem)
            .unwrap()
            .sign(&rev)
            .unwrap();
        let last = t.body.len() - 1;
        t.body[last] ^= 1;
        assert!(t.verify(&[ca_key(&ca)]).is_err());
        assert!(SignedRevocation::from_text("!!!").is_err());
    }
}
