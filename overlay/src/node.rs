//! The peer driver: owns the QUIC endpoint, the connections, the timers and the tasks, and feeds
//! the sans-IO parts ([`Membership`], [`Catalog`], [`crate::wire`]).
//!
//! Task tree (all spawned on the caller's tokio runtime; every channel is bounded):
//!
//! ```text
//! Node
//!  ├─ accept loop ── per connection: datagrams → membership actor, streams → handle_stream
//!  ├─ membership actor (owns Membership, its timers; sends datagrams, reacts to up/down)
//!  ├─ bootstrap (join with retries and backoff until a member is known)
//!  ├─ catalog refresh (pull a random member's catalog now and then)
//!  ├─ auth housekeeping (prune expired keys and limiter state every 10 s)
//!  ├─ certificate renewal (check the node certificate's age; renew or warn)
//!  └─ one listener per [[upstream]] ── per TCP client: forward over a QUIC stream
//! ```
//!
//! Service authentication (API keys, tokens, discovery, revocation) is driven from
//! [`auth`](self::auth) (`node/auth.rs`); its decisions are made by the sans-IO
//! [`crate::auth::Authority`].
//!
//! Shutdown ([`Node::shutdown`]): leave the cluster (others mark us down at once), stop the
//! tasks, close the endpoint with code SHUTDOWN and wait (bounded) for connections to close.
//!
//! The socket and the runtime are injected ([`Node::spawn`] takes any `AsyncUdpSocket`), so
//! netsim runs this exact code over a virtual network. Timing uses `tokio::time` only.

use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use quinn::{AsyncUdpSocket, VarInt};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tracing::{debug, info, warn, Instrument};

use crate::auth::{AuthSettings, Authority};
use crate::backend::{BackendConnector, BoxedStream};
use crate::catalog::{Catalog, CatalogError, ServiceEntry};
use crate::config::{NodeConfig, PreauthSettings, TransportSettings};
use crate::identity::{CertInfo, NodeId, NodeIdStr, NodeIdentity};
use crate::membership::{Membership, MembershipEvent, PeerIdentity, PeerState, Timer};
use crate::stats::{self, Stats};

mod auth;
mod catalog_sync;
mod preauth;
mod routing;
use crate::tls::{self, authenticate_peer, AuthError, DenySet};
use crate::wire::{self, code, StreamHeader, StreamKind};
pub use auth::{DeregisterReport, Registered, RevokeRequest, TokenGrant};
pub use preauth::{Lease, ServiceStream};
pub use routing::{Attempt, Duplex, Exchange, ExchangeError};

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Binding or configuring a socket failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A configured service is invalid.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The configuration is inconsistent.
    #[error("configuration: {0}")]
    Config(String),
}

/// Errors reaching a peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// The peer is not a live member.
    #[error("peer {0} is not a live member")]
    UnknownPeer(NodeId),
    /// QUIC refused to start the connection.
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The handshake failed.
    #[error("handshake: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The peer's identity was refused.
    #[error("peer refused: {0}")]
    Auth(#[from] AuthError),
    /// Too many connections.
    #[error("connection limit reached")]
    Overloaded,
}

/// A member as shown by the admin API.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PeerView {
    /// Node id.
    pub node_id: NodeIdStr,
    /// Name.
    pub name: String,
    /// Address it is reached at.
    pub addr: SocketAddr,
    /// alive, suspect or down.
    pub state: PeerState,
    /// Generation of the member's current run.
    pub generation: u64,
}

impl PartialEq for NodeIdStr {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for NodeIdStr {}

enum Cmd {
    Data {
        from: NodeId,
        name: String,
        data: Bytes,
    },
    Announce(PeerIdentity),
    /// Send a routing payload (probe, probe answer) to a member on the membership channel.
    Channel {
        to: NodeId,
        payload: Vec<u8>,
    },
    Leave(oneshot::Sender<()>),
    Peers(oneshot::Sender<Vec<(PeerIdentity, PeerState)>>),
}

/// A running peer. Cheap to clone; every clone drives the same peer.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", &self.inner.info.node_id)
            .field("name", &self.inner.info.name)
            .finish()
    }
}

struct Inner {
    info: CertInfo,
    me: PeerIdentity,
    membership_config: crate::membership::MembershipConfig,
    endpoint: quinn::Endpoint,
    /// The UDP socket shared with quinn; membership-channel datagrams are sent on it directly.
    udp: Arc<crate::demux::DemuxSocket>,
    client_config: RwLock<quinn::ClientConfig>,
    transport_config: Arc<quinn::TransportConfig>,
    /// Transport of pre-authentication's data connections: with keep-alives, since a warm
    /// connection must outlive the idle timeout (it is closed explicitly when unused).
    data_transport: Arc<quinn::TransportConfig>,
    tls_settings: tls::TlsSettings,
    identity: RwLock<NodeIdentity>,
    deny: DenySet,
    auth: RwLock<Authority>,
    auth_settings: AuthSettings,
    admin_lock: tokio::sync::Mutex<()>,
    persist_lock: Mutex<()>,
    upstream_tokens: Mutex<HashMap<(NodeId, String), (crate::auth::secret::SecretString, u64)>>,
    all_conns: Mutex<HashMap<usize, (quinn::Connection, CertInfo)>>,
    transport: TransportSettings,
    backends: Arc<dyn BackendConnector>,
    conns: Mutex<HashMap<NodeId, (quinn::Connection, CertInfo)>>,
    dial_locks: Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<()>>>>,
    conn_slots: Arc<Semaphore>,
    alive: RwLock<HashMap<NodeId, PeerIdentity>>,
    catalog: RwLock<Catalog>,
    catalog_version: watch::Sender<u64>,
    members: watch::Sender<usize>,
    membership_tx: mpsc::Sender<Cmd>,
    stats: Arc<Stats>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    upstreams: Mutex<Vec<(String, SocketAddr)>>,
    next_request_id: AtomicU64,
    round_robin: AtomicUsize,
    shutting_down: AtomicBool,
    rng: Mutex<StdRng>,
    /// The pre-authentication engine (None: disabled).
    preauth: Option<Mutex<crate::preauth::Engine>>,
    preauth_settings: PreauthSettings,
    /// Warm data connections, pre-opened streams.
    pool: Mutex<preauth::Pool>,
    preauth_wake: tokio::sync::Notify,
    /// Request ids executed from 0-RTT data (replay protection).
    replay: Mutex<crate::preauth::ReplayWindow>,
    catalog_sync: catalog_sync::State,
    /// API keys for services reached with tokens (from the config; settable at runtime).
    upstream_keys: RwLock<std::collections::BTreeMap<String, crate::auth::secret::SecretString>>,
    /// Router, probes, route gossip, relays.
    routing: routing::State,
}

impl Inner {
    /// Whether forwarding to `service` needs a token (an upstream API key is configured).
    fn has_token_requirement(&self, service: &str) -> bool {
        read(&self.upstream_keys).contains_key(service)
    }

    /// The API key configured for `service`, if any.
    fn upstream_key(&self, service: &str) -> Option<crate::auth::secret::SecretString> {
        read(&self.upstream_keys).get(service).cloned()
    }
}

/// Wall-clock seconds, for certificate expiry.
fn now_unix() -> i64 {
    (now_unix_ms() / 1000) as i64
}

/// Wall-clock milliseconds, for certificate expiry, tokens and rate limits. The only
/// wall-clock read of the driver: every decision module takes it as an argument.
#[allow(clippy::disallowed_methods)]
fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Simulation: charge the handshake's CPU time in (virtual) time.
async fn charge_handshake(t: &TransportSettings) {
    if !t.handshake_cpu_delay.is_zero() {
        tokio::time::sleep(t.handshake_cpu_delay).await;
    }
}

fn transport_config(t: &TransportSettings) -> Result<quinn::TransportConfig, NodeError> {
    let mut c = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(t.idle_timeout)
        .map_err(|_| NodeError::Config("idle_timeout too large".into()))?;
    c.max_idle_timeout(Some(idle))
        .keep_alive_interval(t.keep_alive)
        .max_concurrent_bidi_streams(VarInt::from_u32(t.max_streams_per_connection))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(Some(256 * 1024))
        .datagram_send_buffer_size(256 * 1024)
        .initial_rtt(t.initial_rtt);
    Ok(c)
}

impl Node {
    /// Binds a UDP socket on `listen` and starts the peer on it.
    pub async fn bind(
        listen: SocketAddr,
        identity: NodeIdentity,
        config: NodeConfig,
    ) -> Result<Node, NodeError> {
        let socket = std::net::UdpSocket::bind(listen).map_err(|source| NodeError::Io {
            what: format!("bind UDP {listen}"),
            source,
        })?;
        let runtime =
            quinn::default_runtime().ok_or_else(|| NodeError::Config("no async runtime".into()))?;
        let socket = runtime
            .wrap_udp_socket(socket)
            .map_err(|source| NodeError::Io {
                what: format!("UDP socket {listen}"),
                source,
            })?;
        Self::spawn(socket, identity, config).await
    }

    /// Starts the peer on an injected socket (real UDP or netsim's virtual one).
    pub async fn spawn(
        socket: Arc<dyn AsyncUdpSocket>,
        identity: NodeIdentity,
        config: NodeConfig,
    ) -> Result<Node, NodeError> {
        let transport = Arc::new(transport_config(&config.transport)?);
        let data_transport = {
            let mut t = config.transport.clone();
            t.keep_alive = t.keep_alive.or(Some(t.idle_timeout / 3));
            Arc::new(transport_config(&t)?)
        };
        // One cache of verified peer chains for TLS both ways and the membership channel.
        let mut config = config;
        config.tls.chain_cache = Some(tls::ChainCache::for_identity(
            config.tls.chain_cache.as_ref(),
            &identity,
        ));
        let server_tls = tls::server_config(&identity, config.tls.clone())?;
        let quic_server = quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)
            .map_err(|e| tls::TlsError::Quic(e.to_string()))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_server));
        server_config.transport_config(transport.clone());
        let client_tls = tls::client_config(&identity, config.tls.clone())?;
        let quic_client = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)
            .map_err(|e| tls::TlsError::Quic(e.to_string()))?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(quic_client));
        client_config.transport_config(transport.clone());

        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&config.seed.to_le_bytes());
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config.rng_seed(Some(seed));
        // No QUIC packet to or from us ever has the fixed bit clear (RFC 9287 greasing off): the
        // membership channel's marker byte, which has it clear, can never be QUIC.
        endpoint_config.grease_quic_bit(false);
        let runtime =
            quinn::default_runtime().ok_or_else(|| NodeError::Config("no async runtime".into()))?;
        let (udp, channel_rx) = crate::demux::DemuxSocket::new(socket, 4096);
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(server_config),
            udp.clone(),
            runtime,
        )
        .map_err(|source| NodeError::Io {
            what: "QUIC endpoint".into(),
            source,
        })?;
        let local = endpoint.local_addr().map_err(|source| NodeError::Io {
            what: "local address".into(),
            source,
        })?;
        let advertise = match config.advertise {
            Some(a) => a,
            None if local.ip().is_unspecified() => {
                return Err(NodeError::Config(format!(
                    "listening on {local}: set `advertise` to the address peers should dial"
                )))
            }
            None => local,
        };
        let info = identity.info.clone();
        let me = PeerIdentity {
            node_id: info.node_id,
            addr: advertise,
            generation: config.generation,
            name: info.name.clone(),
        };
        let mut catalog = Catalog::new(info.node_id, config.generation);
        for s in &config.services {
            catalog.publish(&s.name, s.backend)?;
        }
        let membership = Membership::new(me.clone(), &config.membership, config.seed);
        let channel_identity = crate::channel::local_identity(&identity)
            .map_err(|e| NodeError::Config(format!("membership channel identity: {e}")))?;
        let chain_verifier =
            tls::chain_verifier_cached(&identity, config.tls.chain_cache.as_ref())?;
        let stats = Arc::new(Stats::default());
        let (authority, deny, restored) = auth::build_authority(&identity, &config, stats.clone())?;
        let channel = crate::channel::Channel::new(
            channel_identity,
            chain_verifier,
            deny.clone(),
            config.channel.clone(),
            now_unix_ms(),
        );
        for (name, backend) in &restored {
            if catalog.backend(name).is_none() {
                catalog.publish(name, *backend)?;
            }
        }
        let (membership_tx, membership_rx) = mpsc::channel(4096);
        let mut rng = StdRng::seed_from_u64(config.seed ^ 0x6d65_7368);
        // Request ids start at a random point, so ids stay unique across restarts (the
        // far side de-duplicates 0-RTT requests by id).
        let first_request_id: u64 = rng.random::<u64>() >> 1;
        let preauth_engine = config
            .preauth
            .engine
            .clone()
            .map(|c| Mutex::new(crate::preauth::Engine::new(c, Instant::now())));
        if let Some(e) = &preauth_engine {
            let mut e = lock(e);
            for s in config.auth.upstream_keys.keys() {
                e.set_needs_token(s, true);
            }
        }
        let replay = crate::preauth::ReplayWindow::new(
            config.tls.ticket_max_age + Duration::from_secs(60),
            config.preauth.replay_window_entries,
        );
        let catalog_sync = catalog_sync::State::new(
            &identity,
            config.membership.cluster_size_hint,
            config.catalog_checks.clone(),
        )
        .map_err(|e| NodeError::Config(format!("catalog signing key: {e}")))?;
        let routing_state = routing::State::new(
            &identity,
            config.generation,
            config.routing.clone(),
            config.tls.clone(),
            config.seed,
        )
        .map_err(NodeError::Config)?;
        let inner = Arc::new(Inner {
            routing: routing_state,
            info,
            me,
            membership_config: config.membership.clone(),
            endpoint,
            udp,
            client_config: RwLock::new(client_config),
            transport_config: transport,
            data_transport,
            tls_settings: config.tls.clone(),
            identity: RwLock::new(identity),
            deny,
            auth: RwLock::new(authority),
            auth_settings: config.auth.clone(),
            admin_lock: tokio::sync::Mutex::new(()),
            persist_lock: Mutex::new(()),
            upstream_tokens: Mutex::new(HashMap::new()),
            all_conns: Mutex::new(HashMap::new()),
            conn_slots: Arc::new(Semaphore::new(config.transport.max_connections)),
            transport: config.transport.clone(),
            backends: config.backend_connector.clone(),
            conns: Mutex::new(HashMap::new()),
            dial_locks: Mutex::new(HashMap::new()),
            alive: RwLock::new(HashMap::new()),
            catalog: RwLock::new(catalog),
            catalog_version: watch::channel(0).0,
            members: watch::channel(0).0,
            membership_tx,
            stats,
            tasks: Mutex::new(Vec::new()),
            upstreams: Mutex::new(Vec::new()),
            next_request_id: AtomicU64::new(first_request_id),
            round_robin: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            rng: Mutex::new(rng),
            preauth: preauth_engine,
            preauth_settings: config.preauth.clone(),
            pool: Mutex::new(preauth::Pool::default()),
            preauth_wake: tokio::sync::Notify::new(),
            replay: Mutex::new(replay),
            catalog_sync,
            upstream_keys: RwLock::new(config.auth.upstream_keys.clone()),
        });
        let node = Node { inner };
        let span = tracing::info_span!("node", node = %node.inner.info.name);

        // Upstream listeners are bound before anything runs, so a bad port fails the start.
        let mut listeners = Vec::new();
        for up in &config.upstreams {
            let l = TcpListener::bind(up.listen)
                .await
                .map_err(|source| NodeError::Io {
                    what: format!("bind upstream {} on {}", up.service, up.listen),
                    source,
                })?;
            let addr = l.local_addr().map_err(|source| NodeError::Io {
                what: "upstream address".into(),
                source,
            })?;
            lock(&node.inner.upstreams).push((up.service.clone(), addr));
            listeners.push((up.service.clone(), l));
        }

        let mut tasks = vec![
            tokio::spawn(
                membership_actor(
                    node.inner.clone(),
                    membership,
                    membership_rx,
                    channel,
                    channel_rx,
                )
                .instrument(span.clone()),
            ),
            tokio::spawn(accept_loop(node.inner.clone()).instrument(span.clone())),
            tokio::spawn(catalog_sync::refresh_loop(node.inner.clone()).instrument(span.clone())),
            tokio::spawn(auth::housekeeping(node.inner.clone()).instrument(span.clone())),
            tokio::spawn(auth::renewal_loop(node.inner.clone()).instrument(span.clone())),
            tokio::spawn(preauth::timer_loop(node.inner.clone()).instrument(span.clone())),
            tokio::spawn(routing::probe_loop(node.inner.clone()).instrument(span.clone())),
        ];
        for (service, l) in listeners {
            tasks.push(tokio::spawn(
                upstream_loop(node.inner.clone(), service, l).instrument(span.clone()),
            ));
        }
        if !config.bootstrap.is_empty() {
            tasks.push(tokio::spawn(
                bootstrap(
                    node.inner.clone(),
                    config.bootstrap.clone(),
                    config.max_join_backoff,
                )
                .instrument(span.clone()),
            ));
        }
        lock(&node.inner.tasks).extend(tasks);
        catalog_sync::on_start(&node.inner);
        info!(parent: &span, node_id = %node.inner.info.node_id, addr = %advertise, "peer started");
        Ok(node)
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.info.node_id
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.inner.info.name
    }

    /// The address peers dial.
    pub fn addr(&self) -> SocketAddr {
        self.inner.me.addr
    }

    /// Bound addresses of the upstream listeners, by service.
    pub fn upstream_addrs(&self) -> Vec<(String, SocketAddr)> {
        lock(&self.inner.upstreams).clone()
    }

    /// Sets (or replaces) the API key this node uses to obtain tokens for `service`; forwarding
    /// to it then carries a token, fetched ahead by pre-authentication.
    pub fn set_upstream_key(&self, service: &str, key: crate::auth::secret::SecretString) {
        write(&self.inner.upstream_keys).insert(service.to_owned(), key);
        if let Some(e) = &self.inner.preauth {
            lock(e).set_needs_token(service, true);
        }
    }

    /// QUIC connections the endpoint still tracks (including closing and draining ones).
    pub fn quic_connections(&self) -> usize {
        self.inner.endpoint.open_connections()
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// The cache of verified peer chains (shared with other nodes if the config gave one).
    pub fn chain_cache(&self) -> Option<&Arc<tls::ChainCache>> {
        self.inner.tls_settings.chain_cache.as_ref()
    }

    /// The deny-set checked on every connection.
    pub fn deny_set(&self) -> &DenySet {
        &self.inner.deny
    }

    /// Every member with its state (this node excluded), sorted by name.
    pub async fn peers(&self) -> Vec<PeerView> {
        let (tx, rx) = oneshot::channel();
        if self.inner.membership_tx.send(Cmd::Peers(tx)).await.is_err() {
            return Vec::new();
        }
        let mut v: Vec<PeerView> = rx
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|(p, state)| PeerView {
                node_id: NodeIdStr(p.node_id),
                name: p.name,
                addr: p.addr,
                state,
                generation: p.generation,
            })
            .collect();
        v.sort_by(|a, b| (&a.name, a.node_id.0).cmp(&(&b.name, b.node_id.0)));
        v
    }

    /// Every service known overlay-wide (local ones included).
    pub fn services(&self) -> Vec<ServiceEntry> {
        read(&self.inner.catalog).entries()
    }

    /// Remote nodes currently offering `service`.
    pub fn providers(&self, service: &str) -> Vec<NodeId> {
        read(&self.inner.catalog).providers(service)
    }

    /// Publishes a local service and tells every live member.
    pub fn publish(&self, name: &str, backend: SocketAddr) -> Result<(), CatalogError> {
        write(&self.inner.catalog).publish(name, backend)?;
        info!(service = name, "service published");
        push_catalog_to_all(&self.inner);
        Ok(())
    }

    /// Withdraws a local service overlay-wide; returns whether it was published.
    pub fn unpublish(&self, name: &str) -> bool {
        let existed = write(&self.inner.catalog).unpublish(name);
        if existed {
            info!(service = name, "service withdrawn");
            push_catalog_to_all(&self.inner);
        }
        existed
    }

    /// Waits until the number of live members satisfies `pred`.
    pub async fn wait_members(&self, pred: impl Fn(usize) -> bool) {
        let mut rx = self.inner.members.subscribe();
        let _ = rx.wait_for(|n| pred(*n)).await;
    }

    /// Waits until the catalog satisfies `pred`.
    pub async fn wait_catalog(&self, pred: impl Fn(&[ServiceEntry]) -> bool) {
        let mut rx = self.inner.catalog_version.subscribe();
        loop {
            if pred(&self.services()) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Waits until `pred` holds for the peer list; re-checks on every membership change.
    pub async fn wait_peers(&self, pred: impl Fn(&[PeerView]) -> bool) {
        let mut rx = self.inner.members.subscribe();
        let mut cat = self.inner.catalog_version.subscribe();
        loop {
            if pred(&self.peers().await) {
                return;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                r = cat.changed() => if r.is_err() { return },
            }
        }
    }

    /// Prometheus text of this node's counters.
    pub fn render_metrics(&self) -> String {
        self.inner.stats.render_prometheus()
    }

    /// Leaves the overlay and stops: others see this node leave at once.
    pub async fn shutdown(&self) {
        if self.inner.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        let (tx, rx) = oneshot::channel();
        if self.inner.membership_tx.send(Cmd::Leave(tx)).await.is_ok() {
            let _ = rx.await;
            // Let the leave datagrams reach the wire before the connections close.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for t in lock(&self.inner.tasks).drain(..) {
            t.abort();
        }
        self.inner
            .endpoint
            .close(VarInt::from_u32(code::SHUTDOWN), b"shutdown");
        let _ = timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
        info!(node = %self.inner.info.name, "peer stopped");
    }

    /// Stops at once without telling anyone (tests and the simulator: a crash).
    pub fn abort(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        for t in lock(&self.inner.tasks).drain(..) {
            t.abort();
        }
    }

    /// A request of local client `client` for `service`: the warmest prepared path (pre-opened
    /// stream, warm connection, 0-RTT) or the standard one; the engine learns from it and
    /// prepares the client's next requests. Keep the returned lease until the exchange ends.
    pub async fn open_for(
        &self,
        client: &str,
        service: &str,
    ) -> Result<ServiceStream, ForwardError> {
        preauth::open_for(&self.inner, client, service).await
    }

    /// The pre-authentication state (`GET /v1/preauth`): each client's warm set with its
    /// probabilities and expiry, and the engine's counters.
    pub fn preauth_view(&self) -> serde_json::Value {
        preauth::view(&self.inner)
    }

    /// Tells the engine which services `client` will use next (the simulator's oracle; only
    /// used by the `hinted` policy).
    pub fn preauth_hint(&self, client: &str, services: Vec<String>) {
        preauth::hint(&self.inner, client, services)
    }

    /// Sends `request` to the best instance of `service` on the best path (direct or through
    /// relays) and waits for the first response byte; an attempt that gets none because its
    /// instance or path failed is retried on another (at most `routing.max_attempts`).
    /// `finish` half-closes after the request. Use for requests that may be repeated.
    pub async fn exchange(
        &self,
        service: &str,
        request: &[u8],
        finish: bool,
    ) -> Result<Exchange, ExchangeError> {
        routing::exchange(&self.inner, service, request, finish).await
    }

    /// The routing state (`GET /v1/routes`): coordinate, each member's link, reported load,
    /// cheapest and current path.
    pub fn routes_view(&self) -> serde_json::Value {
        routing::view(&self.inner)
    }

    /// How many times the router marked each of its links down (links marked down at least
    /// once); cheap, unlike [`Node::routes_view`].
    pub fn link_downs(&self) -> Vec<(NodeId, u64)> {
        routing::link_downs(&self.inner)
    }

    /// Opens a forwarding stream to `service` on the best provider and returns it, header sent.
    pub async fn open_service_stream(
        &self,
        service: &str,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), ForwardError> {
        open_service_stream(&self.inner, service).await
    }
}

/// Errors forwarding a local connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// No live peer offers the service.
    #[error("no peer offers service {0:?}")]
    NoProvider(String),
    /// No provider granted a token (bad key, policy, rate limit).
    #[error("no token for service {service:?}: {reason}")]
    Unauthorized {
        /// The service.
        service: String,
        /// The last refusal.
        reason: String,
    },
    /// The provider could not be reached.
    #[error("reaching {peer}: {source}")]
    Dial {
        /// The provider.
        peer: NodeId,
        /// The cause.
        source: DialError,
    },
    /// The stream could not be opened or written.
    #[error("stream to {peer}: {reason}")]
    Stream {
        /// The provider.
        peer: NodeId,
        /// What failed.
        reason: String,
    },
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}
fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Connections

impl Inner {
    fn live_conn(&self, node: NodeId) -> Option<quinn::Connection> {
        let conns = lock(&self.conns);
        conns
            .get(&node)
            .filter(|(c, _)| c.close_reason().is_none())
            .map(|(c, _)| c.clone())
    }

    /// Dials `addr`; `node` is the expected node id (None when bootstrapping).
    async fn connect(
        self: &Arc<Self>,
        node: Option<NodeId>,
        addr: SocketAddr,
    ) -> Result<(quinn::Connection, CertInfo), DialError> {
        let permit = self
            .conn_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| DialError::Overloaded)?;
        let client_config = read(&self.client_config).clone();
        let connecting =
            self.endpoint
                .connect_with(client_config, addr, &tls::server_name_for(node))?;
        let conn = connecting.await?;
        stats::inc(&self.stats.handshakes);
        charge_handshake(&self.transport).await;
        let info = match authenticate_peer(&conn, &self.deny, now_unix()) {
            Ok(info) => info,
            Err(e) => {
                stats::inc(&self.stats.connections_refused);
                conn.close(VarInt::from_u32(code::AUTH_FAILED), b"refused");
                return Err(e.into());
            }
        };
        if let Some(expected) = node {
            if info.node_id != expected {
                stats::inc(&self.stats.connections_refused);
                conn.close(VarInt::from_u32(code::AUTH_FAILED), b"wrong peer");
                return Err(AuthError::WrongPeer {
                    expected,
                    actual: info.node_id,
                }
                .into());
            }
        }
        stats::inc(&self.stats.connections_dialed);
        self.register(conn.clone(), info.clone(), permit);
        Ok((conn, info))
    }

    /// A live connection to member `node`, dialling it if needed (one dial at a time per node).
    async fn conn_to(self: &Arc<Self>, node: NodeId) -> Result<quinn::Connection, DialError> {
        if let Some(c) = self.live_conn(node) {
            return Ok(c);
        }
        let addr = read(&self.alive)
            .get(&node)
            .map(|p| p.addr)
            .ok_or(DialError::UnknownPeer(node))?;
        self.conn_to_addr(node, addr).await
    }

    async fn conn_to_addr(
        self: &Arc<Self>,
        node: NodeId,
        addr: SocketAddr,
    ) -> Result<quinn::Connection, DialError> {
        let dial_lock = lock(&self.dial_locks).entry(node).or_default().clone();
        let _guard = dial_lock.lock().await;
        if let Some(c) = self.live_conn(node) {
            return Ok(c);
        }
        let (c, _) = self.connect(Some(node), addr).await?;
        Ok(c)
    }

    /// Records an authenticated (handshake-complete) connection and starts serving it.
    fn register(
        self: &Arc<Self>,
        conn: quinn::Connection,
        info: CertInfo,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let early = EarlyCtx {
            confirmed: watch::channel(true).1,
            resumed: false,
        };
        self.register_with(conn, info, permit, early)
    }

    /// Like [`Inner::register`]; `confirmed` turns true when the handshake completes (a
    /// connection accepted in 0-RTT is served before that).
    fn register_with(
        self: &Arc<Self>,
        conn: quinn::Connection,
        info: CertInfo,
        permit: tokio::sync::OwnedSemaphorePermit,
        early: EarlyCtx,
    ) {
        {
            let mut conns = lock(&self.conns);
            let replace = conns
                .get(&info.node_id)
                .is_none_or(|(c, _)| c.close_reason().is_some());
            if replace {
                conns.insert(info.node_id, (conn.clone(), info.clone()));
            }
        }
        lock(&self.all_conns).insert(conn.stable_id(), (conn.clone(), info.clone()));
        stats::inc(&self.stats.connections_open);
        let span =
            tracing::debug_span!("conn", peer = %info.node_id.fmt_short(), name = %info.name);
        tokio::spawn(serve_connection(self.clone(), conn, info, permit, early).instrument(span));
    }
}

async fn accept_loop(inner: Arc<Inner>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        let Ok(permit) = inner.conn_slots.clone().try_acquire_owned() else {
            warn!(remote = %incoming.remote_address(), "connection limit reached; refusing");
            incoming.refuse();
            continue;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let connecting = match incoming.accept() {
                Ok(c) => c,
                Err(e) => {
                    debug!(%remote, error = %e, "inbound connection failed");
                    return;
                }
            };
            // Accept 0-RTT data (FACTS: else it waits for the handshake). A resumed client's
            // certificate comes back from the ticket, so it is authenticated before any of
            // its early data is served; a full handshake waits for the client's certificate.
            let (confirmed_tx, confirmed) = watch::channel(false);
            let mut resumed = false;
            let conn = match connecting.into_0rtt() {
                Ok((conn, accepted)) => {
                    let watcher = conn.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = accepted => { let _ = confirmed_tx.send(true); }
                            _ = watcher.closed() => {}
                        }
                    });
                    if conn.peer_identity().is_none() {
                        let mut c = confirmed.clone();
                        if c.wait_for(|v| *v).await.is_err() {
                            stats::inc(&inner.stats.connections_refused);
                            debug!(%remote, "inbound handshake failed");
                            return;
                        }
                    } else {
                        resumed = true;
                        stats::inc(&inner.stats.resumed_connections);
                    }
                    conn
                }
                Err(connecting) => match connecting.await {
                    Ok(c) => {
                        let _ = confirmed_tx.send(true);
                        c
                    }
                    Err(e) => {
                        stats::inc(&inner.stats.connections_refused);
                        debug!(%remote, error = %e, "inbound handshake failed");
                        return;
                    }
                },
            };
            stats::inc(&inner.stats.handshakes);
            charge_handshake(&inner.transport).await;
            match authenticate_peer(&conn, &inner.deny, now_unix()) {
                Ok(info) => {
                    stats::inc(&inner.stats.connections_accepted);
                    debug!(%remote, peer = %info.node_id.fmt_short(), "inbound connection");
                    inner.register_with(conn, info, permit, EarlyCtx { confirmed, resumed });
                }
                Err(e) => {
                    stats::inc(&inner.stats.connections_refused);
                    warn!(%remote, error = %e, "inbound connection refused");
                    conn.close(VarInt::from_u32(code::AUTH_FAILED), b"refused");
                }
            }
        });
    }
}

/// Serves one authenticated connection: membership datagrams and incoming streams.
async fn serve_connection(
    inner: Arc<Inner>,
    conn: quinn::Connection,
    info: CertInfo,
    _permit: tokio::sync::OwnedSemaphorePermit,
    early: EarlyCtx,
) {
    let mut revalidate = tokio::time::interval(inner.transport.revalidate_interval);
    revalidate.tick().await;
    let reason = loop {
        tokio::select! {
            d = conn.read_datagram() => match d {
                Ok(d) => handle_datagram(&inner, &info, d),
                Err(e) => break e,
            },
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    stats::inc(&inner.stats.streams_accepted);
                    let span = tracing::debug_span!("stream", id = %send.id());
                    tokio::spawn(handle_stream(inner.clone(), info.clone(), send, recv, early.clone()).instrument(span));
                }
                Err(e) => break e,
            },
            _ = revalidate.tick() => {
                if info.not_after_unix < now_unix() || inner.deny.is_denied(&info) {
                    warn!("peer certificate expired or revoked; closing connection");
                    conn.close(VarInt::from_u32(code::AUTH_FAILED), b"revoked");
                }
            }
        }
    };
    debug!(reason = %reason, "connection closed");
    stats::dec(&inner.stats.connections_open);
    lock(&inner.all_conns).remove(&conn.stable_id());
    let mut conns = lock(&inner.conns);
    if conns
        .get(&info.node_id)
        .is_some_and(|(c, _)| c.stable_id() == conn.stable_id())
    {
        conns.remove(&info.node_id);
    }
}

fn handle_datagram(inner: &Arc<Inner>, info: &CertInfo, d: Bytes) {
    match d.first() {
        Some(&wire::DATAGRAM_MEMBERSHIP) => {
            stats::inc(&inner.stats.membership_datagrams_received);
            let cmd = Cmd::Data {
                from: info.node_id,
                name: info.name.clone(),
                data: d.slice(1..),
            };
            // Membership tolerates loss: drop rather than queue without bound.
            if inner.membership_tx.try_send(cmd).is_err() {
                debug!("membership queue full; datagram dropped");
            }
        }
        Some(&wire::DATAGRAM_CATALOG) => catalog_sync::handle_gossip(inner, info, &d[1..]),
        Some(&wire::DATAGRAM_ROUTES) => routing::handle_gossip(inner, info, &d[1..]),
        Some(&k @ (wire::DATAGRAM_PROBE | wire::DATAGRAM_PROBE_ACK)) => {
            routing::handle_probe(inner, info, k, &d[1..])
        }
        other => {
            stats::inc(&inner.stats.membership_refused);
            debug!(kind = ?other, "unknown datagram kind ignored");
        }
    }
}

fn reset(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, c: u32) {
    let _ = send.reset(VarInt::from_u32(c));
    let _ = recv.stop(VarInt::from_u32(c));
}

async fn handle_stream(
    inner: Arc<Inner>,
    peer: CertInfo,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    early: EarlyCtx,
) {
    let header = match timeout(
        inner.transport.header_timeout,
        wire::io::read_header(&mut recv),
    )
    .await
    {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            stats::inc(&inner.stats.stream_errors);
            warn!(peer = %peer.node_id.fmt_short(), error = %e, "bad stream header; stream reset");
            reset(&mut send, &mut recv, e.code());
            return;
        }
        Err(_) => {
            stats::inc(&inner.stats.stream_errors);
            warn!(peer = %peer.node_id.fmt_short(), "no stream header in time; stream reset");
            reset(&mut send, &mut recv, code::HEADER_TIMEOUT);
            return;
        }
    };
    // Catalog exchange is never latency-critical: in early data it waits for the handshake,
    // so a replayed first flight cannot make this peer verify and answer it.
    if header.kind == StreamKind::CatalogSync && recv.is_0rtt() {
        let mut confirmed = early.confirmed.clone();
        if confirmed.wait_for(|v| *v).await.is_err() {
            reset(&mut send, &mut recv, code::EARLY_DATA_REFUSED);
            return;
        }
    }
    if let StreamKind::Forward { service }
    | StreamKind::ForwardAuth { service, .. }
    | StreamKind::Preopen { service, .. } = &header.kind
    {
        if !early_data_allowed(&inner, &peer, service, header.request_id, &recv, early).await {
            reset(&mut send, &mut recv, code::DUPLICATE_REQUEST);
            return;
        }
    }
    match header.kind {
        StreamKind::Preopen { service, token } => {
            let needs = read(&inner.auth).requires_token(&service);
            if needs || token.is_some() {
                let verdict = read(&inner.auth).authorize_forward(
                    &crate::auth::policy::Caller::from(&peer),
                    &service,
                    token.as_deref().unwrap_or(""),
                    now_unix_ms(),
                );
                drop(token);
                if verdict.is_err() {
                    stats::inc(&inner.stats.stream_errors);
                    reset(&mut send, &mut recv, code::UNAUTHORIZED);
                    return;
                }
            }
            preauth::serve_preopen(&inner, &peer, &service, send, recv).await
        }
        StreamKind::Forward { service } => {
            if read(&inner.auth).requires_token(&service) {
                stats::inc(&inner.stats.stream_errors);
                debug!(peer = %peer.node_id.fmt_short(), service, "forward without token refused");
                reset(&mut send, &mut recv, code::UNAUTHORIZED);
                return;
            }
            serve_forward(&inner, &peer, &service, header.request_id, send, recv).await
        }
        StreamKind::ForwardAuth { service, token } => {
            let verdict = read(&inner.auth).authorize_forward(
                &crate::auth::policy::Caller::from(&peer),
                &service,
                &token,
                now_unix_ms(),
            );
            drop(token);
            if let Err(r) = verdict {
                stats::inc(&inner.stats.stream_errors);
                debug!(peer = %peer.node_id.fmt_short(), service, reason = %r, "forward refused");
                let c = if r.status() == 429 {
                    code::RATE_LIMITED
                } else {
                    code::UNAUTHORIZED
                };
                reset(&mut send, &mut recv, c);
                return;
            }
            serve_forward(&inner, &peer, &service, header.request_id, send, recv).await
        }
        StreamKind::TokenRequest => auth::serve_token_request(&inner, &peer, send, recv).await,
        StreamKind::Discover => auth::serve_discover(&inner, &peer, send, recv).await,
        StreamKind::Revocations => auth::serve_revocations(&inner, &peer, send, recv).await,
        StreamKind::CatalogPull => {
            let snap = read(&inner.catalog).snapshot();
            match wire::encode_frame(&snap) {
                Ok(frame) => {
                    if send.write_all(&frame).await.is_ok() {
                        let _ = send.finish();
                    }
                }
                Err(e) => warn!(error = %e, "catalog too large to send"),
            }
        }
        StreamKind::CatalogPush => {
            match timeout(
                inner.transport.header_timeout,
                wire::io::read_frame(&mut recv),
            )
            .await
            {
                Ok(Ok(body)) => match wire::decode_catalog(&body) {
                    Ok(snap) => apply_catalog(&inner, peer.node_id, snap),
                    Err(e) => {
                        stats::inc(&inner.stats.stream_errors);
                        warn!(peer = %peer.node_id.fmt_short(), error = %e, "bad catalog push");
                        reset(&mut send, &mut recv, e.code());
                    }
                },
                Ok(Err(e)) => {
                    stats::inc(&inner.stats.stream_errors);
                    warn!(peer = %peer.node_id.fmt_short(), error = %e, "bad catalog push");
                    reset(&mut send, &mut recv, e.code());
                }
                Err(_) => reset(&mut send, &mut recv, code::HEADER_TIMEOUT),
            }
        }
        StreamKind::CatalogSync => catalog_sync::serve_sync(&inner, &peer, send, recv).await,
        StreamKind::Relay { route, visited } => {
            routing::serve_relay(&inner, &peer, route, visited, send, recv).await
        }
    }
}

/// What a connection's streams need to apply the early-data rules.
#[derive(Clone)]
struct EarlyCtx {
    /// Turns true when the handshake completes.
    confirmed: watch::Receiver<bool>,
    /// Resumed from a ticket: its first requests may have ridden in 0-RTT data.
    resumed: bool,
}

/// Early-data rules for a forwarding stream: a request that may have ridden in 0-RTT data (on
/// a resumed connection) is executed at most once (its id is remembered for longer than a
/// ticket lives; a replay, or the retry of a request an attacker replayed first, is refused),
/// and one that arrived before the handshake completed, for a service not marked idempotent,
/// waits for the handshake (a replayed first flight never completes it). Returns false when
/// the stream must be refused as a duplicate.
async fn early_data_allowed(
    inner: &Arc<Inner>,
    peer: &CertInfo,
    service: &str,
    request_id: u64,
    recv: &quinn::RecvStream,
    ctx: EarlyCtx,
) -> bool {
    let mut confirmed = ctx.confirmed;
    let early = recv.is_0rtt();
    if early && !inner.preauth_settings.idempotent.contains(service) {
        stats::inc(&inner.stats.early_data_held);
        debug!(
            service,
            "non-idempotent request in early data; waiting for the handshake"
        );
        if confirmed.wait_for(|v| *v).await.is_err() {
            return false;
        }
    }
    let remember = early || ctx.resumed;
    let fresh = lock(&inner.replay).check(Instant::now(), peer.node_id, request_id, remember);
    if !fresh {
        stats::inc(&inner.stats.replays_refused);
        warn!(peer = %peer.node_id.fmt_short(), service, request_id, "replayed request refused");
    }
    fresh
}

async fn serve_forward(
    inner: &Arc<Inner>,
    peer: &CertInfo,
    service: &str,
    request_id: u64,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let backend = read(&inner.catalog).backend(service);
    let Some(backend) = backend else {
        stats::inc(&inner.stats.stream_errors);
        warn!(peer = %peer.node_id.fmt_short(), service, "stream for unknown service; reset");
        reset(&mut send, &mut recv, code::UNKNOWN_SERVICE);
        return;
    };
    let tcp = match timeout(
        inner.transport.backend_connect_timeout,
        inner.backends.connect(service, backend),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            stats::inc(&inner.stats.stream_errors);
            warn!(service, error = %e, "backend refused; stream reset");
            reset(&mut send, &mut recv, code::BACKEND_UNAVAILABLE);
            return;
        }
        Err(_) => {
            stats::inc(&inner.stats.stream_errors);
            warn!(service, "backend did not accept in time; stream reset");
            reset(&mut send, &mut recv, code::BACKEND_UNAVAILABLE);
            return;
        }
    };
    debug!(service, request_id, peer = %peer.node_id.fmt_short(), "forwarding to backend");
    let _serving = routing::Serving::start(inner);
    pipe(inner, tcp, send, recv, service).await;
}

/// Copies bytes both ways between a TCP connection and a QUIC stream, with half-close.
async fn pipe(
    inner: &Arc<Inner>,
    mut tcp: BoxedStream,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    service: &str,
) {
    let mut quic = tokio::io::join(recv, send);
    match tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut quic, 64 * 1024, 64 * 1024).await
    {
        Ok((up, down)) => {
            stats::add(&inner.stats.bytes_sent, up);
            stats::add(&inner.stats.bytes_received, down);
            debug!(service, up, down, "stream done");
        }
        Err(e) => {
            stats::inc(&inner.stats.stream_errors);
            let why = e
                .get_ref()
                .and_then(|r| r.downcast_ref::<quinn::ReadError>())
                .and_then(|r| match r {
                    quinn::ReadError::Reset(c) => Some(code::name(c.into_inner())),
                    _ => None,
                });
            match why {
                Some(name) => warn!(service, reason = name, "stream reset by peer"),
                None => debug!(service, error = %e, "stream ended with error"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Forwarding from local clients

async fn upstream_loop(inner: Arc<Inner>, service: String, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((tcp, client)) => {
                let inner = inner.clone();
                let service = service.clone();
                let span = tracing::debug_span!("upstream", %service, %client);
                tokio::spawn(
                    async move {
                        if let Err(e) = forward_client(&inner, &service, tcp).await {
                            stats::inc(&inner.stats.stream_errors);
                            warn!(error = %e, "closing client connection");
                        }
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                warn!(%service, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn forward_client(
    inner: &Arc<Inner>,
    service: &str,
    tcp: TcpStream,
) -> Result<(), ForwardError> {
    let _ = tcp.set_nodelay(true);
    let local_backend = read(&inner.catalog).backend(service);
    if let Some(backend) = local_backend {
        // Published on this very node: no need to cross the overlay.
        let mut b = inner
            .backends
            .connect(service, backend)
            .await
            .map_err(|e| ForwardError::Stream {
                peer: inner.info.node_id,
                reason: format!("local backend: {e}"),
            })?;
        let mut tcp = tcp;
        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut b).await;
        return Ok(());
    }
    // When the router's path to the chosen instance goes through relays (its direct link is
    // down or much slower), the connection is relayed, end-to-end encrypted.
    if let Some(choice) = routing::relayed_choice(inner, service) {
        let mut io = routing::open_path(inner, service, &choice).await?;
        let mut tcp = tcp;
        let _serving = routing::Serving::start(inner);
        match tokio::io::copy_bidirectional(&mut tcp, &mut io).await {
            Ok((up, down)) => {
                stats::add(&inner.stats.bytes_sent, up);
                stats::add(&inner.stats.bytes_received, down);
            }
            Err(e) => debug!(service, error = %e, "relayed connection ended with error"),
        }
        return Ok(());
    }
    if inner.preauth.is_some() {
        // The local app is the client the engine profiles: one per source address.
        let client = tcp
            .peer_addr()
            .map(|a| format!("addr:{}", a.ip()))
            .unwrap_or_else(|_| "addr:unknown".into());
        let s = preauth::open_for(inner, &client, service).await?;
        let _lease = s.lease;
        pipe(inner, Box::new(tcp), s.send, s.recv, service).await;
        return Ok(());
    }
    let (send, recv) = open_service_stream(inner, service).await?;
    pipe(inner, Box::new(tcp), send, recv, service).await;
    Ok(())
}

fn pick_provider(inner: &Inner, service: &str) -> Option<NodeId> {
    let providers = read(&inner.catalog).providers(service);
    let alive = read(&inner.alive);
    let live: Vec<NodeId> = providers
        .into_iter()
        .filter(|p| alive.contains_key(p))
        .collect();
    if live.is_empty() {
        return None;
    }
    // The router's choice (measured latency and load, suspect links avoided); round robin
    // among live providers while it knows none of them.
    let st = &inner.routing;
    if let Some(c) = lock(&st.router).choose(&live, &[], Instant::now(), |n| st.pick(n)) {
        return Some(c.provider);
    }
    let i = inner.round_robin.fetch_add(1, Ordering::Relaxed) % live.len();
    Some(live[i])
}

async fn open_service_stream(
    inner: &Arc<Inner>,
    service: &str,
) -> Result<(quinn::SendStream, quinn::RecvStream), ForwardError> {
    if inner.has_token_requirement(service) {
        return auth::open_service_stream_with_token(inner, service).await;
    }
    let peer =
        pick_provider(inner, service).ok_or_else(|| ForwardError::NoProvider(service.into()))?;
    let conn = inner
        .conn_to(peer)
        .await
        .map_err(|source| ForwardError::Dial { peer, source })?;
    let kind = StreamKind::Forward {
        service: service.to_owned(),
    };
    open_stream(inner, &conn, peer, kind).await
}

/// Opens a stream on `conn` to `peer` and sends its header (`kind`, the next request id). The
/// encoded header is wiped after sending: it may carry a token.
async fn open_stream(
    inner: &Inner,
    conn: &quinn::Connection,
    peer: NodeId,
    kind: StreamKind,
) -> Result<(quinn::SendStream, quinn::RecvStream), ForwardError> {
    let failed = |e: &dyn std::fmt::Display| ForwardError::Stream {
        peer,
        reason: e.to_string(),
    };
    let (mut send, recv) = conn.open_bi().await.map_err(|e| failed(&e))?;
    stats::inc(&inner.stats.streams_opened);
    let header = zeroize::Zeroizing::new(wire::encode_header(&StreamHeader {
        kind,
        request_id: inner.next_request_id.fetch_add(1, Ordering::Relaxed),
    }));
    send.write_all(&header).await.map_err(|e| failed(&e))?;
    Ok((send, recv))
}

// ---------------------------------------------------------------------------------------------
// Catalog exchange

fn apply_catalog(inner: &Arc<Inner>, from: NodeId, snap: wire::CatalogSnapshot) {
    if !read(&inner.alive).contains_key(&from) {
        debug!(peer = %from.fmt_short(), "catalog from a non-member ignored");
        return;
    }
    let changed = write(&inner.catalog).apply_remote(from, snap);
    if changed {
        stats::inc(&inner.stats.catalog_updates);
        inner.catalog_version.send_modify(|v| *v += 1);
    }
}

async fn push_catalog(inner: &Arc<Inner>, node: NodeId, frame: Arc<Vec<u8>>) -> Result<(), String> {
    let conn = inner.conn_to(node).await.map_err(|e| e.to_string())?;
    let (mut send, _recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let header = wire::encode_header(&StreamHeader {
        kind: StreamKind::CatalogPush,
        request_id: inner.next_request_id.fetch_add(1, Ordering::Relaxed),
    });
    send.write_all(&header).await.map_err(|e| e.to_string())?;
    send.write_all(&frame).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    let _ = send.stopped().await;
    Ok(())
}

/// Our services changed: gossip the new signed snapshot (no dial per member).
fn push_catalog_to_all(inner: &Arc<Inner>) {
    catalog_sync::announce_own(inner);
}

// ---------------------------------------------------------------------------------------------
// Membership

struct TimerEntry {
    at: Instant,
    seq: u64,
    timer: Timer,
}
impl PartialEq for TimerEntry {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for TimerEntry {}
impl PartialOrd for TimerEntry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for TimerEntry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Reversed: BinaryHeap is a max-heap, we want the earliest first.
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// The membership actor's state: foca, its timers, and the membership channel.
struct Actor {
    m: Membership,
    channel: crate::channel::Channel,
    timers: BinaryHeap<TimerEntry>,
    seq: u64,
    /// Token bucket of first contacts periodic gossip may still make (tokens, last refill).
    fresh_gossip: Option<FreshBudget>,
}

/// A token bucket on tokio's clock.
struct FreshBudget {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl FreshBudget {
    fn take(&mut self, now: Instant) -> bool {
        let burst = 2.0 * self.rate;
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

async fn membership_actor(
    inner: Arc<Inner>,
    m: Membership,
    mut rx: mpsc::Receiver<Cmd>,
    channel: crate::channel::Channel,
    mut packets: mpsc::Receiver<(SocketAddr, Bytes)>,
) {
    let fresh_gossip = inner
        .membership_config
        .gossip_first_contacts_per_s
        .map(|r| FreshBudget {
            rate: f64::from(r),
            tokens: 2.0 * f64::from(r),
            at: Instant::now(),
        });
    let mut a = Actor {
        m,
        channel,
        timers: BinaryHeap::new(),
        seq: 0,
        fresh_gossip,
    };
    drain_membership(&inner, &mut a);
    loop {
        let next = a.timers.peek().map(|t| t.at);
        let channel_next = a.channel.poll_timeout();
        tokio::select! {
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { break };
                match cmd {
                    Cmd::Data { from, name, data } => handle_swim(&inner, &mut a.m, from, &name, &data),
                    Cmd::Announce(to) => a.m.announce(to),
                    Cmd::Channel { to, payload } => {
                        let addr = read(&inner.alive).get(&to).map(|p| p.addr);
                        if let Some(addr) = addr {
                            let _ = a.channel.send(Instant::now(), now_unix_ms(), to, addr, &payload);
                            flush_channel(&inner, &mut a.channel);
                        }
                    }
                    Cmd::Leave(done) => {
                        a.m.leave();
                        drain_membership(&inner, &mut a);
                        let _ = done.send(());
                        continue;
                    }
                    Cmd::Peers(reply) => {
                        let _ = reply.send(a.m.members());
                    }
                }
            }
            p = packets.recv() => {
                let Some((from, data)) = p else { break };
                handle_channel_packet(&inner, &mut a, from, &data);
            }
            _ = tokio::time::sleep_until(channel_next.unwrap_or_else(Instant::now)), if channel_next.is_some() => {
                a.channel.handle_timeout(Instant::now());
                flush_channel(&inner, &mut a.channel);
            }
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let now = Instant::now();
                while a.timers.peek().is_some_and(|t| t.at <= now) {
                    if let Some(t) = a.timers.pop() {
                        a.m.handle_timer(t.timer);
                    }
                }
            }
        }
        drain_membership(&inner, &mut a);
    }
}

/// A SWIM packet from `from` (authenticated by the channel or a QUIC connection).
fn handle_swim(inner: &Inner, m: &mut Membership, from: NodeId, name: &str, data: &[u8]) {
    if let Err(e) = m.handle_data(from, name, data) {
        stats::inc(&inner.stats.membership_refused);
        match e {
            crate::membership::MembershipError::Foca(_) => {
                debug!(peer = %from.fmt_short(), error = %e, "membership packet ignored")
            }
            _ => warn!(peer = %from.fmt_short(), error = %e, "membership packet refused"),
        }
    }
}

/// A datagram for the membership channel arrived on the socket.
fn handle_channel_packet(inner: &Arc<Inner>, a: &mut Actor, from: SocketAddr, data: &[u8]) {
    match a
        .channel
        .handle_packet(Instant::now(), now_unix_ms(), from, data)
    {
        Ok(Some(r)) => match r.payload.first() {
            Some(&wire::DATAGRAM_MEMBERSHIP) => {
                stats::inc(&inner.stats.membership_datagrams_received);
                handle_swim(
                    inner,
                    &mut a.m,
                    r.peer.node_id,
                    &r.peer.name,
                    &r.payload[1..],
                );
            }
            Some(&wire::DATAGRAM_CATALOG) => {
                catalog_sync::handle_gossip(inner, &r.peer, &r.payload[1..])
            }
            Some(&wire::DATAGRAM_ROUTES) => routing::handle_gossip(inner, &r.peer, &r.payload[1..]),
            Some(&k @ (wire::DATAGRAM_PROBE | wire::DATAGRAM_PROBE_ACK)) => {
                routing::handle_probe(inner, &r.peer, k, &r.payload[1..])
            }
            other => {
                stats::inc(&inner.stats.membership_refused);
                debug!(kind = ?other, "unknown membership channel payload ignored");
            }
        },
        Ok(None) => {}
        Err(crate::channel::ChannelError::UnknownSession) => {
            trace_drop(&crate::channel::ChannelError::UnknownSession, from)
        }
        Err(
            e @ (crate::channel::ChannelError::Revoked(_)
            | crate::channel::ChannelError::Untrusted(_)
            | crate::channel::ChannelError::BadMac
            | crate::channel::ChannelError::Expired),
        ) => {
            warn!(%from, error = %e, "membership packet refused")
        }
        Err(e) => trace_drop(&e, from),
    }
    flush_channel(inner, &mut a.channel);
}

fn trace_drop(e: &crate::channel::ChannelError, from: SocketAddr) {
    debug!(%from, error = %e, "membership packet dropped");
}

/// Puts the channel's packets on the wire and publishes its counters.
fn flush_channel(inner: &Inner, channel: &mut crate::channel::Channel) {
    while let Some((to, packet)) = channel.poll_transmit() {
        inner.udp.send_to(to, &packet);
    }
    let st = channel.stats();
    let s = &inner.stats;
    s.membership_inits_sent
        .store(st.inits_sent, Ordering::Relaxed);
    s.membership_inits_received
        .store(st.inits_received, Ordering::Relaxed);
    s.membership_hellos_sent
        .store(st.hellos_sent, Ordering::Relaxed);
    s.membership_hellos_received
        .store(st.hellos_received, Ordering::Relaxed);
    s.membership_sessions.store(st.sessions, Ordering::Relaxed);
    s.membership_chains_verified
        .store(st.chains_verified, Ordering::Relaxed);
    s.membership_channel_dropped
        .store(st.dropped, Ordering::Relaxed);
}

fn drain_membership(inner: &Arc<Inner>, a: &mut Actor) {
    while let Some((to, data)) = a.m.poll_transmit() {
        let (to, data) = retarget_gossip(inner, a, to, data);
        send_membership(inner, &mut a.channel, to, data);
    }
    let now = Instant::now();
    while let Some((after, timer)) = a.m.poll_timer() {
        a.seq += 1;
        a.timers.push(TimerEntry {
            at: now + after,
            seq: a.seq,
            timer,
        });
    }
    let mut changed = false;
    while let Some(ev) = a.m.poll_event() {
        match ev {
            MembershipEvent::Up(p) if inner.deny.is_node_denied(&p.node_id) => {
                debug!(peer = %p.node_id.fmt_short(), "revoked node reported up; ignored");
                a.channel.forget(p.node_id);
            }
            MembershipEvent::Up(p) => {
                info!(peer = %p.node_id.fmt_short(), name = %p.name, addr = %p.addr, "member up");
                auth::on_member_up(inner, p.node_id);
                stats::inc(&inner.stats.members_up);
                let (first, renewed) = {
                    let mut alive = write(&inner.alive);
                    let old = alive.insert(p.node_id, p.clone());
                    (
                        alive.len() == 1,
                        old.is_some_and(|o| o.generation != p.generation || o.addr != p.addr),
                    )
                };
                if renewed {
                    // It restarted (or moved): whatever session we hold is not its.
                    a.channel.forget(p.node_id);
                }
                changed = true;
                // No catalog dial per member: entries are signed by their origin and spread
                // by gossip; only the first member (a join) is asked for the whole catalog.
                catalog_sync::on_member_up(inner, &p, first);
                routing::on_member_up(inner, p.node_id);
            }
            MembershipEvent::Down(p) => {
                info!(peer = %p.node_id.fmt_short(), name = %p.name, "member down");
                stats::inc(&inner.stats.members_down);
                let was = write(&inner.alive).remove(&p.node_id);
                if was.is_some() {
                    changed = true;
                }
                lock(&inner.dial_locks).remove(&p.node_id);
                // Streams through a dead peer fail now, not after the QUIC idle timeout; the
                // local clients of those streams see their connections closed promptly.
                if let Some((conn, _)) = lock(&inner.conns).remove(&p.node_id) {
                    conn.close(VarInt::from_u32(code::OK), b"member down");
                }
                catalog_sync::on_member_down(inner, p.node_id);
                routing::on_member_down(inner, p.node_id);
            }
            MembershipEvent::Rejoin(me) => {
                info!(
                    generation = me.generation,
                    "declared down by others; rejoined"
                );
                catalog_sync::on_rejoin(inner, &me);
            }
            MembershipEvent::Active => debug!("joined a cluster"),
            MembershipEvent::Idle => debug!("no live members"),
        }
    }
    if changed {
        let n = read(&inner.alive).len();
        inner.members.send_replace(n);
    }
    flush_channel(inner, &mut a.channel);
}

/// Peers with a session needed before periodic gossip is kept to them.
const MIN_GOSSIP_NEIGHBOURS: usize = 8;

/// foca sends periodic gossip to fresh random members; on the membership channel each fresh
/// member costs a signed first contact (public-key operations on both sides), which during a
/// join storm is most of a peer's CPU. Past a budget of first contacts per second
/// (`gossip_first_contacts_per_s`), gossip to a member without a session therefore goes to a
/// random member we hold a session with instead (once we have a few): the same updates, the
/// same fan-out, over a random graph that grows with every probe. Probes, acks and announces
/// always go to their real target.
fn retarget_gossip(
    inner: &Inner,
    a: &mut Actor,
    to: PeerIdentity,
    data: Bytes,
) -> (PeerIdentity, Bytes) {
    let channel = &a.channel;
    if channel.has_session(to.node_id)
        || channel.session_peers() < MIN_GOSSIP_NEIGHBOURS
        || !crate::membership::is_gossip(&data)
    {
        return (to, data);
    }
    let Some(budget) = a.fresh_gossip.as_mut() else {
        return (to, data);
    };
    if budget.take(Instant::now()) {
        return (to, data);
    }
    let channel = &a.channel;
    let pick = lock(&inner.rng).random_range(0..usize::MAX);
    let Some(n) = channel.session_peer(pick) else {
        return (to, data);
    };
    let Some(target) = read(&inner.alive).get(&n).cloned() else {
        return (to, data);
    };
    match crate::membership::readdress_gossip(&data, &target) {
        Some(d) => (target, Bytes::from(d)),
        None => (to, data),
    }
}

/// Sends a SWIM packet on the membership channel (no QUIC connection needed), and a catalog
/// gossip datagram behind it when items wait.
fn send_membership(
    inner: &Arc<Inner>,
    channel: &mut crate::channel::Channel,
    to: PeerIdentity,
    data: Bytes,
) {
    if to.node_id == inner.info.node_id {
        return;
    }
    let mut buf = Vec::with_capacity(data.len() + 1);
    buf.push(wire::DATAGRAM_MEMBERSHIP);
    buf.extend_from_slice(&data);
    let (now, unix_ms) = (Instant::now(), now_unix_ms());
    match channel.send(now, unix_ms, to.node_id, to.addr, &buf) {
        Ok(()) => stats::inc(&inner.stats.membership_datagrams_sent),
        Err(e) => {
            debug!(peer = %to.node_id.fmt_short(), error = %e, "membership packet not sent");
            return;
        }
    }
    if let Some(gossip) = catalog_sync::poll_gossip(inner, 1100) {
        if channel
            .send(now, unix_ms, to.node_id, to.addr, &gossip)
            .is_ok()
        {
            stats::inc(&inner.stats.catalog_gossip_sent);
        }
    }
}

/// Joins through the bootstrap addresses, retrying with exponential backoff and jitter until
/// at least one member is known.
async fn bootstrap(inner: Arc<Inner>, addrs: Vec<SocketAddr>, max_backoff: Duration) {
    let mut members = inner.members.subscribe();
    let mut backoff = Duration::from_millis(200);
    let mut attempt = 0u32;
    loop {
        if *members.borrow() > 0 {
            info!(attempt, "joined the overlay");
            return;
        }
        for addr in &addrs {
            if *addr == inner.me.addr {
                continue;
            }
            match timeout(
                backoff.max(Duration::from_secs(2)),
                inner.connect(None, *addr),
            )
            .await
            {
                Ok(Ok((_, info))) if info.node_id != inner.info.node_id => {
                    let target = PeerIdentity {
                        node_id: info.node_id,
                        addr: *addr,
                        generation: 0,
                        name: info.name,
                    };
                    let _ = inner.membership_tx.send(Cmd::Announce(target)).await;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => debug!(%addr, error = %e, attempt, "bootstrap dial failed"),
                Err(_) => debug!(%addr, attempt, "bootstrap dial timed out"),
            }
        }
        let jitter = lock(&inner.rng).random_range(0..=backoff.as_millis() as u64 / 2);
        let wait = backoff + Duration::from_millis(jitter);
        let _ = timeout(wait, members.wait_for(|n| *n > 0)).await;
        backoff = (backoff * 2).min(max_backoff);
        attempt += 1;
        if attempt % 5 == 0 {
            warn!(attempt, "still trying to join the overlay");
        }
    }
}
