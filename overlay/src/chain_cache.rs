//! Verified certificate chains, remembered so that a node checks a peer's chain once while it
//! stays valid instead of on every TLS handshake and every membership-channel first contact.
//!
//! A [`ChainCache`] belongs to one set of trust anchors (the overlay CA certificates). It maps a
//! SHA-256 over (key usage, end-entity DER, intermediates' DER) to the validity window of that
//! chain's certificates — the intersection of their `notBefore`..`notAfter`. A lookup is a hit
//! only inside that window, so a hit returns what webpki would return at that moment: webpki's
//! chain check depends on nothing else than the certificates, the trust anchors, the key usage
//! and the time (trust anchors carry no validity of their own in webpki). Failures are never
//! remembered. Revocation is not webpki's business here either: callers check the deny-set on
//! every connection and packet, hit or miss.
//!
//! The cache is bounded (`capacity` entries; when full, expired entries are dropped, then the
//! whole map), and `capacity == 0` turns it off. One cache may be shared by every verifier of a
//! node (TLS client, TLS server, membership channel); it may also be shared by several nodes
//! that trust the same CA — the network simulator does that, since the check is a pure
//! function of public data and 1,000 simulated peers would otherwise check the same 1,000
//! chains each. A verifier built for other trust anchors than the cache's gets a private cache.

use std::sync::Arc;

use crate::identity::NodeIdentity;
use crate::memo::{digest, Memo, MemoStats};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// Default number of remembered chains per node (a few per member of a large overlay).
pub const DEFAULT_CAPACITY: usize = 4096;

/// Which certificate usage a chain was checked for (webpki checks the extended key usage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Usage {
    Client = 1,
    Server = 2,
}

/// Verified chains of one set of trust anchors. See the module docs.
#[derive(Debug)]
pub struct ChainCache {
    roots: [u8; 32],
    memo: Memo<Window>,
}

/// Seconds since the Unix epoch, both ends included (webpki's comparison).
#[derive(Clone, Copy, Debug)]
struct Window {
    not_before: u64,
    not_after: u64,
}

/// Counters of a [`ChainCache`]: `misses` ran webpki.
pub type ChainCacheStats = MemoStats;

impl ChainCache {
    /// A cache for the trust anchors of `identity` (its CA certificates), holding at most
    /// `capacity` chains (0: no caching, every check runs webpki).
    pub fn new(identity: &NodeIdentity, capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            roots: roots_fingerprint(identity),
            memo: Memo::new(capacity),
        })
    }

    /// `cache` if it belongs to the trust anchors of `identity`, else a private cache of the
    /// same capacity (a node whose CA set changed must not trust what the old set verified).
    pub fn for_identity(cache: Option<&Arc<Self>>, identity: &NodeIdentity) -> Arc<Self> {
        match cache {
            Some(c) if c.roots == roots_fingerprint(identity) => c.clone(),
            Some(c) => Self::new(identity, c.memo.capacity()),
            None => Self::new(identity, DEFAULT_CAPACITY),
        }
    }

    /// Hits and misses so far.
    pub fn stats(&self) -> ChainCacheStats {
        self.memo.stats()
    }

    /// Number of chains held.
    pub fn len(&self) -> usize {
        self.memo.len()
    }

    /// True when no chain is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `check` unless a chain with this key is known valid at `now`; remembers a success.
    fn verify<E>(
        &self,
        usage: Usage,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        check: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        let t = now.as_secs();
        self.memo.check(
            || chain_key(usage, end_entity, intermediates),
            |w| w.not_before <= t && t <= w.not_after,
            || {
                check()?;
                // webpki accepted every certificate, so they parse; if one does not parse
                // here, the chain is simply not remembered.
                Ok(chain_window(end_entity, intermediates))
            },
            |w| w.not_after >= t,
        )
    }
}

fn roots_fingerprint(identity: &NodeIdentity) -> [u8; 32] {
    digest(identity.ca.iter().map(|ca| ca.as_ref()))
}

fn chain_key(
    usage: Usage,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> [u8; 32] {
    let usage = [usage as u8];
    digest(
        std::iter::once(&usage[..])
            .chain(std::iter::once(end_entity.as_ref()))
            .chain(intermediates.iter().map(|c| c.as_ref())),
    )
}

/// The intersection of the certificates' validity periods (None if one does not parse or the
/// intersection is empty).
fn chain_window(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Option<Window> {
    use x509_parser::prelude::*;
    let mut w = Window {
        not_before: 0,
        not_after: u64::MAX,
    };
    for c in std::iter::once(end_entity).chain(intermediates) {
        let (_, cert) = X509Certificate::from_der(c.as_ref()).ok()?;
        let v = cert.validity();
        let nb = u64::try_from(v.not_before.timestamp()).unwrap_or(0);
        let na = u64::try_from(v.not_after.timestamp()).ok()?;
        w.not_before = w.not_before.max(nb);
        w.not_after = w.not_after.min(na);
    }
    (w.not_before <= w.not_after).then_some(w)
}

/// A client-certificate verifier (TLS server side, membership channel) in front of a cache.
#[derive(Debug)]
pub struct CachedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    cache: Arc<ChainCache>,
}

impl CachedClientVerifier {
    /// `inner` (webpki, for the cache's trust anchors) behind `cache`.
    pub fn new(inner: Arc<dyn ClientCertVerifier>, cache: Arc<ChainCache>) -> Self {
        Self { inner, cache }
    }
}

impl ClientCertVerifier for CachedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.cache
            .verify(Usage::Client, end_entity, intermediates, now, || {
                self.inner
                    .verify_client_cert(end_entity, intermediates, now)
                    .map(|_| ())
            })
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A server-certificate check behind a cache: `check` is webpki's, for the name the
/// certificate itself claims (so the result depends on the chain alone).
pub(crate) fn verify_server_chain(
    cache: &ChainCache,
    inner: &dyn ServerCertVerifier,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    own_name: &ServerName<'_>,
    ocsp_response: &[u8],
    now: UnixTime,
) -> Result<(), rustls::Error> {
    cache.verify(Usage::Server, end_entity, intermediates, now, || {
        inner
            .verify_server_cert(end_entity, intermediates, own_name, ocsp_response, now)
            .map(|_: ServerCertVerified| ())
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use time::OffsetDateTime;

    use super::*;
    use crate::identity::{generate_ca, CaMaterial, Validity};

    const T0: u64 = 1_800_000_000;

    fn ca(name: &str) -> CaMaterial {
        let day0 = OffsetDateTime::from_unix_timestamp(T0 as i64).expect("valid");
        generate_ca(name, Validity::days_from(day0, 10).expect("validity")).expect("ca")
    }

    fn ident(ca: &CaMaterial, name: &str) -> NodeIdentity {
        let day0 = OffsetDateTime::from_unix_timestamp(T0 as i64).expect("valid");
        NodeIdentity::issue(ca, name, Validity::days_from(day0, 5).expect("validity"))
            .expect("identity")
    }

    fn at(s: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(s))
    }

    fn check(
        v: &Arc<dyn ClientCertVerifier>,
        id: &NodeIdentity,
        t: UnixTime,
    ) -> Result<(), rustls::Error> {
        v.verify_client_cert(&id.chain[0], &id.chain[1..], t)
            .map(|_| ())
    }

    #[test]
    fn a_chain_is_checked_once_while_valid() {
        let ca = ca("ca");
        let me = ident(&ca, "me");
        let peer = ident(&ca, "peer");
        let cache = ChainCache::new(&me, 16);
        let v = crate::tls::chain_verifier_cached(&me, Some(&cache)).expect("verifier");
        for k in 0..3 {
            check(&v, &peer, at(T0 + 3600 + k)).expect("valid chain");
        }
        assert_eq!(cache.stats(), ChainCacheStats { hits: 2, misses: 1 });
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_remembered_chain_still_expires() {
        let ca = ca("ca");
        let me = ident(&ca, "me");
        let peer = ident(&ca, "peer");
        let cache = ChainCache::new(&me, 16);
        let v = crate::tls::chain_verifier_cached(&me, Some(&cache)).expect("verifier");
        check(&v, &peer, at(T0 + 3600)).expect("valid chain");
        // Six days on, the 5-day certificate has expired: webpki runs again and refuses.
        let later = at(T0 + 6 * 86_400);
        assert!(check(&v, &peer, later).is_err());
        assert!(check(&v, &peer, at(T0 - 86_400)).is_err(), "not yet valid");
        assert_eq!(cache.stats(), ChainCacheStats { hits: 0, misses: 3 });
    }

    #[test]
    fn failures_are_not_remembered() {
        let me = ident(&ca("ca"), "me");
        let stranger = ident(&ca("other-ca"), "stranger");
        let cache = ChainCache::new(&me, 16);
        let v = crate::tls::chain_verifier_cached(&me, Some(&cache)).expect("verifier");
        for _ in 0..2 {
            assert!(check(&v, &stranger, at(T0 + 3600)).is_err());
        }
        assert_eq!(cache.stats(), ChainCacheStats { hits: 0, misses: 2 });
        assert!(cache.is_empty());
    }

    #[test]
    fn a_cache_of_other_roots_is_not_used() {
        let ca_a = ca("ca-a");
        let ca_b = ca("ca-b");
        let a = ident(&ca_a, "a");
        let b = ident(&ca_b, "b");
        let a_peer = ident(&ca_a, "a-peer");
        let cache_a = ChainCache::new(&a, 16);
        // A verifier for CA b handed CA a's cache gets a private one: what CA a's verifiers
        // accepted must not pass for CA b.
        let vb = crate::tls::chain_verifier_cached(&b, Some(&cache_a)).expect("verifier");
        let va = crate::tls::chain_verifier_cached(&a, Some(&cache_a)).expect("verifier");
        check(&va, &a_peer, at(T0 + 3600)).expect("valid for a");
        assert!(check(&vb, &a_peer, at(T0 + 3600)).is_err());
        assert_eq!(cache_a.stats(), ChainCacheStats { hits: 0, misses: 1 });
    }

    #[test]
    fn client_and_server_usage_are_remembered_apart() {
        let peer = ident(&ca("ca"), "peer");
        assert_ne!(
            chain_key(Usage::Client, &peer.chain[0], &peer.chain[1..]),
            chain_key(Usage::Server, &peer.chain[0], &peer.chain[1..])
        );
    }

    #[test]
    fn capacity_zero_never_remembers_and_a_full_cache_starts_over() {
        let ca = ca("ca");
        let me = ident(&ca, "me");
        let peers: Vec<NodeIdentity> = (0..3).map(|i| ident(&ca, &format!("p{i}"))).collect();
        let off = ChainCache::new(&me, 0);
        let v = crate::tls::chain_verifier_cached(&me, Some(&off)).expect("verifier");
        check(&v, &peers[0], at(T0 + 3600)).expect("valid");
        check(&v, &peers[0], at(T0 + 3600)).expect("valid");
        assert_eq!(off.stats(), ChainCacheStats { hits: 0, misses: 2 });
        assert!(off.is_empty());

        let small = ChainCache::new(&me, 2);
        let v = crate::tls::chain_verifier_cached(&me, Some(&small)).expect("verifier");
        for p in &peers {
            check(&v, p, at(T0 + 3600)).expect("valid");
        }
        assert!(small.len() <= 2);
    }
}
