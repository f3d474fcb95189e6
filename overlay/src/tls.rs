//! TLS for the overlay: TLS 1.3 only, mutual authentication against the overlay CA, ALPN `meshd/1`.
//!
//! Both sides verify the peer's chain to the overlay CA (validity, key usage) with webpki, and both
//! sides then read the peer's node id from its certificate *after every handshake* with
//! [`authenticate_peer`] — also on resumed connections, where rustls does not call the verifier.
//!
//! One rustls client config is built per local identity and kept: rustls resumes sessions only
//! with the same config (see ../shared/FACTS.md).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ServerSessionMemoryCache, StoresServerSessions, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::time::Instant;

pub use crate::chain_cache::ChainCache;
use crate::chain_cache::{verify_server_chain, CachedClientVerifier};
use crate::identity::{parse_node_cert, CertInfo, NodeId, NodeIdentity};

/// ALPN protocol id of meshd version 1.
pub const ALPN: &[u8] = b"meshd/1";
/// Server name used when dialing an address whose node id is not known yet (bootstrap).
/// Any node certificate from the overlay CA is accepted; the id is learned from the certificate.
pub const ANY_NODE_SERVER_NAME: &str = "any.node.meshd";

/// Errors building TLS configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rustls refused the configuration (bad key, no CA, ...).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA certificate could not be used as a trust anchor.
    #[error("CA certificate not usable as trust anchor: {0}")]
    BadCa(String),
    /// quinn refused the rustls configuration.
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
}

/// Why a connected peer was refused after the handshake.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    /// The peer presented no certificate.
    #[error("peer presented no certificate")]
    NoCertificate,
    /// The certificate's node id does not match its key, or it is malformed.
    #[error("peer certificate invalid: {0}")]
    BadCertificate(String),
    /// The node id is on the deny-set (revoked).
    #[error("peer {0} is denied")]
    Denied(NodeId),
    /// The certificate expired (checked here too because resumption skips the verifier).
    #[error("peer certificate expired")]
    Expired,
    /// The peer is not the node that was dialled.
    #[error("peer is {actual}, expected {expected}")]
    WrongPeer {
        /// The node dialled.
        expected: NodeId,
        /// The node that answered.
        actual: NodeId,
    },
}

/// Node ids (and, later, certificate serials) refused on every connection.
#[derive(Clone, Default)]
pub struct DenySet {
    inner: Arc<RwLock<DenyInner>>,
}

#[derive(Default)]
struct DenyInner {
    nodes: HashSet<NodeId>,
    serials: HashSet<String>,
}

impl fmt::Debug for DenySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DenySet").finish_non_exhaustive()
    }
}

impl DenySet {
    /// Denies a node id.
    pub fn deny_node(&self, id: NodeId) {
        self.write().nodes.insert(id);
    }

    /// Denies a certificate serial (lowercase hex).
    pub fn deny_serial(&self, serial: &str) {
        self.write().serials.insert(serial.to_ascii_lowercase());
    }

    /// Whether a node id is denied.
    pub fn is_node_denied(&self, id: &NodeId) -> bool {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.nodes.contains(id)
    }

    /// Whether this certificate is denied.
    pub fn is_denied(&self, info: &CertInfo) -> bool {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.nodes.contains(&info.node_id) || inner.serials.contains(&info.serial)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, DenyInner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reads and checks the peer's identity on an established (or resumed) connection.
///
/// `now_unix` is the wall-clock time in seconds, passed in by the driver.
pub fn authenticate_peer(
    conn: &quinn::Connection,
    deny: &DenySet,
    now_unix: i64,
) -> Result<CertInfo, AuthError> {
    let identity = conn.peer_identity().ok_or(AuthError::NoCertificate)?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| AuthError::NoCertificate)?;
    authenticate_chain(&chain, deny, now_unix)
}

/// Checks a peer certificate chain that rustls already verified against the overlay CA (a
/// QUIC connection's, or an end-to-end TLS session's inside a relayed stream): parses the
/// leaf, checks expiry and the deny set.
pub fn authenticate_chain(
    chain: &[CertificateDer<'_>],
    deny: &DenySet,
    now_unix: i64,
) -> Result<CertInfo, AuthError> {
    let leaf = chain.first().ok_or(AuthError::NoCertificate)?;
    let info = parse_node_cert(leaf).map_err(|e| AuthError::BadCertificate(e.to_string()))?;
    if info.not_after_unix < now_unix {
        return Err(AuthError::Expired);
    }
    if deny.is_denied(&info) {
        return Err(AuthError::Denied(info.node_id));
    }
    Ok(info)
}

/// Settings for TLS caches.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// Client session cache entries (rustls keeps ~8 per server): size for the overlay.
    pub client_sessions: usize,
    /// Server session cache entries (one per outstanding ticket).
    pub server_sessions: usize,
    /// A resumption ticket older than this is refused by its issuer (full handshake instead),
    /// bounding how long a captured ticket or a revoked peer's ticket is worth anything.
    /// Default 10 minutes (rustls alone would honour stateful tickets for 24 h).
    pub ticket_max_age: Duration,
    /// Verified peer chains (TLS both ways and the membership channel). `None`: a node makes
    /// its own ([`ChainCache`]'s default capacity); configs built outside a node get a
    /// private one each. A cache of other trust anchors than the identity's is not used.
    pub chain_cache: Option<Arc<ChainCache>>,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            client_sessions: 8 * 1024,
            server_sessions: 16 * 1024,
            ticket_max_age: Duration::from_secs(600),
            chain_cache: None,
        }
    }
}

/// The server's session store: rustls' in-memory cache (stateful, single-use tickets: `take`
/// removes, so a replayed 0-RTT first flight finds no session) with a maximum ticket age. There
/// is no ticket-encryption key to steal or rotate: a ticket is a random id into this store,
/// which dies with the process. Ages are read from tokio's clock (virtual under netsim).
#[derive(Debug)]
pub struct TimedSessionStore {
    inner: Arc<dyn StoresServerSessions>,
    born: Mutex<HashMap<Vec<u8>, Instant>>,
    max_age: Duration,
    cap: usize,
}

impl TimedSessionStore {
    /// A store of at most `cap` sessions, each valid for `max_age`.
    pub fn new(cap: usize, max_age: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner: ServerSessionMemoryCache::new(cap),
            born: Mutex::new(HashMap::new()),
            max_age,
            cap: cap.max(1),
        })
    }

    fn born(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Instant>> {
        self.born.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fresh(&self, key: &[u8]) -> bool {
        self.born()
            .get(key)
            .is_some_and(|t| t.elapsed() <= self.max_age)
    }
}

impl StoresServerSessions for TimedSessionStore {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let mut born = self.born();
        if born.len() >= self.cap {
            // Forget expired entries, then the oldest eighth if still full.
            let max_age = self.max_age;
            born.retain(|_, t| t.elapsed() <= max_age);
            if born.len() >= self.cap {
                let mut ages: Vec<Instant> = born.values().copied().collect();
                ages.sort_unstable();
                let cut = ages[(ages.len() / 8).min(ages.len() - 1)];
                born.retain(|_, t| *t > cut);
            }
        }
        born.insert(key.clone(), Instant::now());
        drop(born);
        self.inner.put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        if !self.fresh(key) {
            return None;
        }
        self.inner.get(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let fresh = self.fresh(key);
        self.born().remove(key);
        let v = self.inner.take(key);
        if fresh {
            v
        } else {
            None
        }
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// The crypto provider: ring, offering only TLS13_AES_128_GCM_SHA256 (cheapest handshake here).
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .retain(|s| s.suite() == rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

fn roots(identity: &NodeIdentity) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in &identity.ca {
        roots
            .add(ca.clone())
            .map_err(|e| TlsError::BadCa(e.to_string()))?;
    }
    Ok(roots)
}

/// A verifier of node certificates against the overlay CA outside TLS (the membership channel):
/// webpki's chain check with the client-auth usage, as on the server side of a handshake,
/// behind a private [`ChainCache`].
pub fn chain_verifier(
    identity: &NodeIdentity,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    chain_verifier_cached(identity, None)
}

/// [`chain_verifier`] behind `cache` (see [`TlsSettings::chain_cache`]).
pub fn chain_verifier_cached(
    identity: &NodeIdentity,
    cache: Option<&Arc<ChainCache>>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(identity)?), provider())
        .build()
        .map_err(|e| TlsError::BadCa(e.to_string()))?;
    Ok(Arc::new(CachedClientVerifier::new(
        inner,
        ChainCache::for_identity(cache, identity),
    )))
}

/// Builds the rustls server config for a local identity.
pub fn server_config(
    identity: &NodeIdentity,
    settings: TlsSettings,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = chain_verifier_cached(identity, settings.chain_cache.as_ref())?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.session_storage = TimedSessionStore::new(settings.server_sessions, settings.ticket_max_age);
    // QUIC allows 0 or u32::MAX; 0-RTT acceptance is decided per connection by the driver.
    cfg.max_early_data_size = u32::MAX;
    Ok(cfg)
}

/// Builds the rustls client config for a local identity. Build it once and keep it.
pub fn client_config(
    identity: &NodeIdentity,
    settings: TlsSettings,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let inner =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots(identity)?), provider.clone())
            .build()
            .map_err(|e| TlsError::BadCa(e.to_string()))?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NodeServerVerifier {
            inner,
            cache: ChainCache::for_identity(settings.chain_cache.as_ref(), identity),
        }))
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.resumption = Resumption::in_memory_sessions(settings.client_sessions);
    cfg.enable_early_data = true;
    Ok(cfg)
}

/// TLS configs of the end-to-end session inside relayed streams (TLS 1.3 over a byte stream,
/// ALPN `meshd-e2e/1`, same mutual authentication as QUIC, no early data).
pub fn e2e_configs(
    identity: &NodeIdentity,
    settings: TlsSettings,
) -> Result<(Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>), TlsError> {
    let small = TlsSettings {
        client_sessions: settings.client_sessions.min(256),
        server_sessions: settings.server_sessions.min(256),
        ..settings
    };
    let mut server = server_config(identity, small.clone())?;
    server.alpn_protocols = vec![crate::wire::E2E_ALPN.to_vec()];
    server.max_early_data_size = 0;
    let mut client = client_config(identity, small)?;
    client.alpn_protocols = vec![crate::wire::E2E_ALPN.to_vec()];
    client.enable_early_data = false;
    Ok((Arc::new(server), Arc::new(client)))
}

/// The server name to dial a node with.
pub fn server_name_for(node: Option<NodeId>) -> String {
    match node {
        Some(id) => id.san(),
        None => ANY_NODE_SERVER_NAME.to_owned(),
    }
}

/// Verifies a server's certificate chain to the overlay CA with webpki, against the node id
/// the certificate itself claims (after checking that id against its key), and then that this
/// id is the one dialled (or any node, for [`ANY_NODE_SERVER_NAME`]).
#[derive(Debug)]
struct NodeServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    cache: Arc<ChainCache>,
}

impl ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let info = parse_node_cert(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        })?;
        let actual = ServerName::try_from(info.node_id.san())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        verify_server_chain(
            &self.cache,
            self.inner.as_ref(),
            end_entity,
            intermediates,
            &actual,
            ocsp_response,
            now,
        )?;
        match server_name {
            ServerName::DnsName(n) if n.as_ref() == ANY_NODE_SERVER_NAME => Ok(()),
            ServerName::DnsName(n) if n.as_ref() == info.node_id.san() => Ok(()),
            _ => Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            )),
        }?;
        Ok(ServerCertVerified::assertion())
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
