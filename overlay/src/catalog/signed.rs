//! Self-authenticating catalog snapshots: an origin signs its own service list with its node
//! key, so any member can hand it on and every receiver can check it. No I/O.
//!
//! A signature covers `context || body`, where the context names what the body is (a
//! snapshot or a version hint) so one can never be passed off as the other. The signing key
//! travels with the body; its SubjectPublicKeyInfo hashes to the node id (§1.1 of
//! docs/PROTOCOL.md), which must be the `node_id` the body names. So an entry is accepted only
//! if the origin itself signed it, whoever delivered it.

use std::sync::Arc;

use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use rustls::pki_types::PrivateKeyDer;

use crate::identity::NodeId;
use crate::memo::{digest, Memo, MemoStats};
use crate::wire::{self, CatalogBody, CatalogHint, CatalogVersion, SignedCatalog};

/// Signature context of a snapshot body.
pub const SNAPSHOT_CONTEXT: &[u8] = b"meshd-catalog-v1\0";
/// Signature context of a hint body.
pub const HINT_CONTEXT: &[u8] = b"meshd-catalog-hint-v1\0";
/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 key bytes follow.
pub const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Why a signed catalog was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignedError {
    /// The body did not decode or broke a limit.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    /// The key does not hash to the node id the body names.
    #[error("key is not the key of node {0}")]
    KeyMismatch(NodeId),
    /// The signature does not verify.
    #[error("bad signature for node {0}")]
    BadSignature(NodeId),
    /// The node key is not an Ed25519 PKCS#8 key (local failure).
    #[error("node key unusable for signing: {0}")]
    BadKey(String),
}

/// The node id of an Ed25519 public key.
pub fn node_id_of_key(key: &[u8; 32]) -> NodeId {
    let mut spki = Vec::with_capacity(44);
    spki.extend_from_slice(&ED25519_SPKI_PREFIX);
    spki.extend_from_slice(key);
    NodeId::from_spki(&spki)
}

/// Signs this node's snapshots and hints with its node key.
pub struct CatalogSigner {
    kp: Ed25519KeyPair,
    key: [u8; 32],
    node_id: NodeId,
}

impl std::fmt::Debug for CatalogSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogSigner")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl CatalogSigner {
    /// A signer from the node's PKCS#8 key (the key its certificate carries).
    pub fn new(key: &PrivateKeyDer<'_>) -> Result<Self, SignedError> {
        let kp = Ed25519KeyPair::from_pkcs8_maybe_unchecked(key.secret_der())
            .map_err(|e| SignedError::BadKey(e.to_string()))?;
        let mut pk = [0u8; 32];
        pk.copy_from_slice(kp.public_key().as_ref());
        Ok(Self {
            node_id: node_id_of_key(&pk),
            key: pk,
            kp,
        })
    }

    /// The node id this key belongs to.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Signs `context || body` (any self-authenticating body: catalogs, route summaries).
    pub(crate) fn sign(&self, context: &[u8], body: Vec<u8>) -> SignedCatalog {
        let mut msg = Vec::with_capacity(context.len() + body.len());
        msg.extend_from_slice(context);
        msg.extend_from_slice(&body);
        SignedCatalog {
            key: self.key,
            signature: self.kp.sign(&msg).as_ref().to_vec(),
            body,
        }
    }

    /// Signs a snapshot of our services (sorted, unique).
    pub fn sign_snapshot(
        &self,
        version: CatalogVersion,
        services: Vec<String>,
    ) -> Result<SignedCatalog, SignedError> {
        let body = postcard::to_allocvec(&CatalogBody {
            node_id: self.node_id,
            version,
            services,
        })
        .map_err(|e| wire::WireError::Malformed(e.to_string()))?;
        if body.len() > wire::MAX_SIGNED_BODY_LEN {
            return Err(wire::WireError::TooLarge {
                len: body.len(),
                max: wire::MAX_SIGNED_BODY_LEN,
            }
            .into());
        }
        Ok(self.sign(SNAPSHOT_CONTEXT, body))
    }

    /// Signs a hint that our catalog is at `version`.
    pub fn sign_hint(&self, version: CatalogVersion) -> Result<SignedCatalog, SignedError> {
        let body = postcard::to_allocvec(&CatalogHint {
            node_id: self.node_id,
            version,
        })
        .map_err(|e| wire::WireError::Malformed(e.to_string()))?;
        Ok(self.sign(HINT_CONTEXT, body))
    }
}

/// A snapshot whose signature was checked: only [`verify_snapshot`] makes one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedCatalog {
    body: CatalogBody,
    signed: SignedCatalog,
}

impl VerifiedCatalog {
    /// The origin, authenticated by its signature.
    pub fn origin(&self) -> NodeId {
        self.body.node_id
    }
    /// Its version.
    pub fn version(&self) -> CatalogVersion {
        self.body.version
    }
    /// Its services (sorted, unique).
    pub fn services(&self) -> &[String] {
        &self.body.services
    }
    /// The signed form, to hand on.
    pub fn signed(&self) -> &SignedCatalog {
        &self.signed
    }
}

/// Reads the origin and version of a snapshot without checking the signature (to skip the
/// check for versions already held). Never trust the result beyond that.
pub fn peek_snapshot(s: &SignedCatalog) -> Result<(NodeId, CatalogVersion), SignedError> {
    let body = wire::decode_catalog_body(&s.body)?;
    Ok((body.node_id, body.version))
}

/// Signatures that verified, remembered by a SHA-256 over (context, key, body, signature), so
/// the same signed bytes are checked once. An Ed25519 check is a pure function of those bytes,
/// so a hit answers what the check would. Nodes do not need one (each new version reaches a
/// node's check once: older and equal versions are refused before it); the simulator shares one
/// across its peers, which would otherwise each check every origin's every version. Bounded:
/// `capacity` entries, then it starts over; failures are never remembered.
#[derive(Debug)]
pub struct CheckCache {
    memo: Memo<()>,
}

impl CheckCache {
    /// A cache of at most `capacity` signatures.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            memo: Memo::new(capacity),
        })
    }

    /// Hits and misses so far; a miss ran Ed25519.
    pub fn stats(&self) -> MemoStats {
        self.memo.stats()
    }
}

/// Checks that `s` was signed by `node_id`'s key under `context`.
pub(crate) fn check(
    context: &[u8],
    s: &SignedCatalog,
    node_id: NodeId,
    cache: Option<&CheckCache>,
) -> Result<(), SignedError> {
    if node_id_of_key(&s.key) != node_id {
        return Err(SignedError::KeyMismatch(node_id));
    }
    let verify = || {
        let mut msg = Vec::with_capacity(context.len() + s.body.len());
        msg.extend_from_slice(context);
        msg.extend_from_slice(&s.body);
        UnparsedPublicKey::new(&ED25519, &s.key)
            .verify(&msg, &s.signature)
            .map(|()| Some(()))
            .map_err(|_| SignedError::BadSignature(node_id))
    };
    match cache {
        None => verify().map(|_| ()),
        Some(c) => c.memo.check(
            || digest([context, &s.key[..], &s.body[..], &s.signature[..]]),
            |()| true,
            verify,
            |()| false,
        ),
    }
}

/// Checks a signed snapshot: the body decodes within limits, the key is the origin's, the
/// signature verifies.
pub fn verify_snapshot(s: &SignedCatalog) -> Result<VerifiedCatalog, SignedError> {
    verify_snapshot_cached(s, None)
}

/// [`verify_snapshot`], answered from `cache` for signed bytes it has seen verify.
pub fn verify_snapshot_cached(
    s: &SignedCatalog,
    cache: Option<&CheckCache>,
) -> Result<VerifiedCatalog, SignedError> {
    if s.body.len() > wire::MAX_SIGNED_BODY_LEN || s.signature.len() != 64 {
        return Err(wire::WireError::Malformed("bad signed catalog sizes".into()).into());
    }
    let body = wire::decode_catalog_body(&s.body)?;
    check(SNAPSHOT_CONTEXT, s, body.node_id, cache)?;
    Ok(VerifiedCatalog {
        body,
        signed: s.clone(),
    })
}

/// Checks a signed hint; returns what it says.
pub fn verify_hint(s: &SignedCatalog) -> Result<CatalogHint, SignedError> {
    if s.body.len() > wire::MAX_SIGNED_BODY_LEN || s.signature.len() != 64 {
        return Err(wire::WireError::Malformed("bad signed catalog sizes".into()).into());
    }
    let hint = wire::decode_catalog_hint(&s.body)?;
    check(HINT_CONTEXT, s, hint.node_id, None)?;
    Ok(hint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::test_identity as identity;

    fn v(generation: u64, seq: u64) -> CatalogVersion {
        CatalogVersion { generation, seq }
    }

    #[test]
    fn a_check_cache_answers_only_for_bytes_that_verified() {
        let id = identity("a");
        let s = CatalogSigner::new(&id.key).unwrap();
        let good = s.sign_snapshot(v(1, 2), vec!["db".into()]).unwrap();
        let cache = CheckCache::new(16);
        for _ in 0..3 {
            assert_eq!(
                verify_snapshot_cached(&good, Some(&cache)).unwrap(),
                verify_snapshot(&good).unwrap()
            );
        }
        assert_eq!(
            cache.stats(),
            MemoStats { hits: 2, misses: 1 },
            "one Ed25519 check, then hits"
        );
        // A forged signature on the same body is checked, refused and not remembered.
        let mut forged = good.clone();
        forged.signature[0] ^= 1;
        for _ in 0..2 {
            assert!(matches!(
                verify_snapshot_cached(&forged, Some(&cache)),
                Err(SignedError::BadSignature(_))
            ));
        }
        assert_eq!(cache.stats(), MemoStats { hits: 2, misses: 3 });
        // Capacity 0 remembers nothing.
        let off = CheckCache::new(0);
        verify_snapshot_cached(&good, Some(&off)).unwrap();
        verify_snapshot_cached(&good, Some(&off)).unwrap();
        assert_eq!(off.stats(), MemoStats { hits: 0, misses: 2 });
    }

    #[test]
    fn signer_key_hashes_to_the_certificate_node_id() {
        let id = identity("a");
        let s = CatalogSigner::new(&id.key).unwrap();
        assert_eq!(s.node_id(), id.node_id());
        let signed = s.sign_snapshot(v(1, 2), vec!["db".into()]).unwrap();
        let ok = verify_snapshot(&signed).unwrap();
        assert_eq!(ok.origin(), id.node_id());
        assert_eq!(ok.version(), v(1, 2));
        assert_eq!(ok.services(), ["db".to_string()]);
        assert_eq!(peek_snapshot(&signed).unwrap(), (id.node_id(), v(1, 2)));
        let hint = verify_hint(&s.sign_hint(v(1, 3)).unwrap()).unwrap();
        assert_eq!(hint.node_id, id.node_id());
    }

    #[test]
    fn snapshot_signed_by_another_key_is_refused() {
        let a = CatalogSigner::new(&identity("a").key).unwrap();
        let b = CatalogSigner::new(&identity("b").key).unwrap();
        // b signs a body that claims to be a's catalog, with its own key: key mismatch.
        let body = postcard::to_allocvec(&CatalogBody {
            node_id: a.node_id(),
            version: v(9, 9),
            services: vec!["evil".into()],
        })
        .unwrap();
        let forged = b.sign(SNAPSHOT_CONTEXT, body.clone());
        assert_eq!(
            verify_snapshot(&forged),
            Err(SignedError::KeyMismatch(a.node_id()))
        );
        // ... and with a's key attached but b's signature: bad signature.
        let forged = SignedCatalog {
            key: a.key,
            ..b.sign(SNAPSHOT_CONTEXT, body)
        };
        assert_eq!(
            verify_snapshot(&forged),
            Err(SignedError::BadSignature(a.node_id()))
        );
        // A tampered body fails too.
        let mut good = a.sign_snapshot(v(1, 1), vec!["x".into()]).unwrap();
        let last = good.body.len() - 1;
        good.body[last] ^= 1;
        assert!(verify_snapshot(&good).is_err());
        // A hint is not a snapshot and vice versa (separate contexts).
        let hint = a.sign_hint(v(1, 1)).unwrap();
        assert!(verify_snapshot(&hint).is_err());
        let snap = a.sign_snapshot(v(1, 1), vec![]).unwrap();
        assert!(verify_hint(&snap).is_err());
    }
}
