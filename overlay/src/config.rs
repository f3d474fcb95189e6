//! Validated configuration of a peer. The `meshd` binary parses TOML into raw structs and
//! converts them into these types once; everything here is already checked.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::AuthSettings;
use crate::backend::{BackendConnector, TcpConnector};

use crate::membership::MembershipConfig;
use crate::tls::TlsSettings;

/// A local service to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Name other peers reach it by.
    pub name: String,
    /// Local TCP backend; never sent to peers.
    pub backend: SocketAddr,
}

/// A local port forwarding to an overlay service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Service name.
    pub service: String,
    /// Local TCP address to listen on.
    pub listen: SocketAddr,
}

/// QUIC and stream settings.
#[derive(Clone, Debug)]
pub struct TransportSettings {
    /// Close a connection after this long without traffic. Default 30 s.
    pub idle_timeout: Duration,
    /// Send keep-alives this often (None: let idle connections close). Default none.
    pub keep_alive: Option<Duration>,
    /// Concurrent bidirectional streams a peer may open on one connection. Default 1024.
    pub max_streams_per_connection: u32,
    /// RTT assumed before the first sample (loss recovery of the first flight). Default 100 ms.
    pub initial_rtt: Duration,
    /// How long a peer has to send a stream header. Default 10 s.
    pub header_timeout: Duration,
    /// How long to wait for a local backend to accept. Default 5 s.
    pub backend_connect_timeout: Duration,
    /// Most concurrent QUIC connections (inbound and outbound). Default 4096 (~80 KiB each).
    pub max_connections: usize,
    /// Re-check open connections' peers against expiry and the deny-set this often. Default 60 s.
    pub revalidate_interval: Duration,
    /// Simulation only: time charged after each handshake, so that virtual time includes the
    /// handshake's CPU cost (crypto is free in virtual time). Default zero.
    pub handshake_cpu_delay: Duration,
}

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            keep_alive: None,
            max_streams_per_connection: 1024,
            initial_rtt: Duration::from_millis(100),
            header_timeout: Duration::from_secs(10),
            backend_connect_timeout: Duration::from_secs(5),
            max_connections: 4096,
            revalidate_interval: Duration::from_secs(60),
            handshake_cpu_delay: Duration::ZERO,
        }
    }
}

/// Pre-authentication: the client side (warm paths for local clients) and the server side
/// (what this peer accepts as speculative work and early data).
#[derive(Clone, Debug)]
pub struct PreauthSettings {
    /// The engine that keeps warm paths for local clients; None: requests take the standard
    /// path over the shared connection to each peer (the behaviour before pre-authentication).
    pub engine: Option<crate::preauth::PreauthConfig>,
    /// Services whose requests are idempotent and may ride in 0-RTT data. As a client: only
    /// these are sent early. As a server: early data for any other local service waits for the
    /// handshake to complete (so it cannot be a replay). Default: none.
    pub idempotent: std::collections::BTreeSet<String>,
    /// Pre-opened streams this peer holds for others at most; more are shed. Default 256.
    pub max_preopened_inbound: usize,
    /// Longest this peer keeps a pre-opened stream (and its backend connection) waiting for
    /// its first byte. Default 10 s.
    pub preopen_idle_max: Duration,
    /// Most 0-RTT request ids remembered against replays. Default 65,536 (~100 B each).
    pub replay_window_entries: usize,
}

impl Default for PreauthSettings {
    fn default() -> Self {
        Self {
            engine: None,
            idempotent: Default::default(),
            max_preopened_inbound: 256,
            preopen_idle_max: Duration::from_secs(10),
            replay_window_entries: 65_536,
        }
    }
}

/// Everything a peer needs besides its identity and socket.
#[derive(Clone)]
pub struct NodeConfig {
    /// Address others dial (defaults to the bound address; required when bound to 0.0.0.0).
    pub advertise: Option<SocketAddr>,
    /// Addresses of peers to join through.
    pub bootstrap: Vec<SocketAddr>,
    /// Services published at start.
    pub services: Vec<ServiceConfig>,
    /// Local forwarding ports opened at start.
    pub upstreams: Vec<UpstreamConfig>,
    /// SWIM timing.
    pub membership: MembershipConfig,
    /// The membership channel (authenticated membership datagrams beside QUIC).
    pub channel: crate::channel::ChannelConfig,
    /// QUIC settings.
    pub transport: TransportSettings,
    /// TLS cache sizes.
    pub tls: TlsSettings,
    /// Generation of this run (must grow across restarts; the daemon uses wall-clock ms).
    pub generation: u64,
    /// Seed of every random choice of this peer (membership, backoff jitter, QUIC).
    pub seed: u64,
    /// Longest wait between join attempts. Default 10 s.
    pub max_join_backoff: Duration,
    /// How backends are reached (TCP by default; the simulator injects its own).
    pub backend_connector: Arc<dyn BackendConnector>,
    /// Service authentication: tokens, limits, credential store, upstream API keys.
    pub auth: AuthSettings,
    /// Predictive pre-authentication and early data.
    pub preauth: PreauthSettings,
    /// Routing: probes, summaries, relays, retries.
    pub routing: crate::routing::RoutingConfig,
    /// Signed catalogs known to verify, shared by several nodes of one process (the
    /// simulator's peers). `None` (the default): every new catalog version is checked.
    pub catalog_checks: Option<Arc<crate::catalog::signed::CheckCache>>,
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("advertise", &self.advertise)
            .field("bootstrap", &self.bootstrap)
            .field("services", &self.services)
            .field("upstreams", &self.upstreams)
            .field("membership", &self.membership)
            .field("transport", &self.transport)
            .field("generation", &self.generation)
            .field("seed", &self.seed)
            .field("auth", &self.auth)
            .field("preauth", &self.preauth)
            .finish_non_exhaustive()
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            advertise: None,
            bootstrap: Vec::new(),
            services: Vec::new(),
            upstreams: Vec::new(),
            membership: MembershipConfig::default(),
            channel: crate::channel::ChannelConfig::default(),
            transport: TransportSettings::default(),
            tls: TlsSettings::default(),
            generation: 1,
            seed: 0,
            max_join_backoff: Duration::from_secs(10),
            backend_connector: Arc::new(TcpConnector),
            auth: AuthSettings::default(),
            preauth: PreauthSettings::default(),
            routing: crate::routing::RoutingConfig::default(),
            catalog_checks: None,
        }
    }
}
