//! Scenarios as data: the TOML schema of `netsim/scenarios/*.toml`, `--set KEY=VALUE`
//! overrides, and validation. Every key has a default, so a scenario file names only what it
//! changes; unknown keys are errors.
//!
//! Time in a scenario: peers start at t = 0 (optionally spread by `peers.join_spread_ms`); the
//! workload starts at `warmup_s` and runs for `duration_s`; fault times (`at_s`) count from 0.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::link::{LinkSpec, LossModel};
use crate::topology::LatencyModel;

/// Errors loading a scenario.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML did not parse or did not match the schema.
    #[error("{0}")]
    Parse(String),
    /// A `--set` was malformed.
    #[error("--set {0}: expected KEY=VALUE with a dotted KEY")]
    BadOverride(String),
    /// The scenario is inconsistent.
    #[error("invalid scenario: {0}")]
    Invalid(String),
}

/// How time passes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeMode {
    /// Paused tokio clock that jumps to the next event: fast and reproducible.
    #[default]
    Virtual,
    /// Wall-clock timers (same in-memory network): for checking virtual runs at small scale.
    Real,
}

/// A whole scenario.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// Name shown in reports.
    pub name: String,
    /// Mode `netsim run` uses when `--mode` is not given (default "shared").
    pub mode: String,
    /// Seed of every random choice (network, peers, workload, identities).
    pub seed: u64,
    /// Virtual or real time.
    pub time: TimeMode,
    /// Seconds from start before the workload begins (joins, catalog exchange).
    pub warmup_s: f64,
    /// Seconds the workload runs.
    pub duration_s: f64,
    /// Where peers are.
    pub topology: Topology,
    /// Link properties.
    pub links: Links,
    /// Peer configuration.
    pub peers: Peers,
    /// Published services.
    pub services: Services,
    /// Requests.
    pub workload: Workload,
    /// Pre-authentication settings of the `pool`, `predictive` and `oracle` modes.
    pub preauth: PreauthSection,
    /// Routing settings of every peer (`routed` mode uses them most).
    pub routing: RoutingSection,
    /// Fault schedule.
    pub faults: Vec<Fault>,
}

/// `[routing]`: the peers' router settings (see `overlay::routing::RoutingConfig`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingSection {
    /// Most relays on a path.
    pub max_relays: usize,
    /// Peers that relay for others (empty: every peer).
    pub relays: Vec<usize>,
    /// Probe period, ms.
    pub probe_interval_ms: u64,
    /// Unanswered probes that mark a link down.
    pub probe_misses: u32,
    /// Summary period, ms.
    pub summary_interval_ms: u64,
    /// Idle peers kept probed.
    pub neighbours: usize,
    /// Attempts of a request that got no byte.
    pub max_attempts: u32,
    /// Switch ratio of the path hysteresis.
    pub switch_ratio: f64,
}

impl Default for RoutingSection {
    fn default() -> Self {
        let d = overlay::routing::RoutingConfig::default();
        Self {
            max_relays: d.max_relays,
            relays: Vec::new(),
            probe_interval_ms: d.probe_interval.as_millis() as u64,
            probe_misses: d.probe_misses,
            summary_interval_ms: d.summary_interval.as_millis() as u64,
            neighbours: d.neighbours,
            max_attempts: d.max_attempts,
            switch_ratio: d.switch_ratio,
        }
    }
}

/// `[preauth]`: what `netsim compare`'s pre-authentication modes use.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreauthSection {
    /// Warm services per client (B), for `pool`, `predictive` and `oracle` alike.
    pub budget: usize,
    /// Predictor horizon, ms.
    pub horizon_ms: u64,
    /// An unused warm entry is dropped after this long, ms.
    pub entry_ttl_ms: u64,
    /// A pre-opened stream unused this long is closed, ms.
    pub stream_deadline_ms: u64,
    /// Speculative handshakes per second per peer.
    pub speculative_per_s: f64,
    /// Every simulated service is idempotent (its requests may ride in 0-RTT).
    pub idempotent: bool,
    /// Most warm connections per peer.
    pub max_warm_connections: usize,
    /// Most pre-opened streams per peer.
    pub max_preopened_streams: usize,
}

impl Default for PreauthSection {
    fn default() -> Self {
        Self {
            budget: 3,
            horizon_ms: 2000,
            entry_ttl_ms: 30_000,
            stream_deadline_ms: 5000,
            speculative_per_s: 20.0,
            idempotent: true,
            max_warm_connections: 64,
            max_preopened_streams: 32,
        }
    }
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            name: "unnamed".into(),
            mode: "shared".into(),
            seed: 1,
            time: TimeMode::Virtual,
            warmup_s: 5.0,
            duration_s: 10.0,
            topology: Topology::default(),
            links: Links::default(),
            peers: Peers::default(),
            services: Services::default(),
            workload: Workload::default(),
            preauth: PreauthSection::default(),
            routing: RoutingSection::default(),
            faults: Vec::new(),
        }
    }
}

/// Latency model selector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopologyModel {
    /// Every pair at `links.rtt_ms`.
    #[default]
    Uniform,
    /// Peers round-robin over regions; `region_rtt_ms` is the region matrix (with one region
    /// per peer it is a full peer matrix).
    Regions,
    /// Peers at seeded random points in a square; RTT grows with distance.
    Coordinates,
}

/// `[topology]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Topology {
    /// Number of peers.
    pub peers: usize,
    /// Latency model.
    pub model: TopologyModel,
    /// Regions: symmetric RTT matrix in ms.
    pub region_rtt_ms: Vec<Vec<f64>>,
    /// Coordinates: side of the square.
    pub side: f64,
    /// Coordinates: RTT at distance 0, ms.
    pub base_rtt_ms: f64,
    /// Coordinates: RTT per unit of distance, ms.
    pub ms_per_unit: f64,
}

impl Default for Topology {
    fn default() -> Self {
        Self {
            peers: 2,
            model: TopologyModel::Uniform,
            region_rtt_ms: Vec::new(),
            side: 100.0,
            base_rtt_ms: 1.0,
            ms_per_unit: 1.0,
        }
    }
}

/// Gilbert–Elliott parameters (`[links.burst]`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Burst {
    /// Good → bad per packet.
    pub p_gb: f64,
    /// Bad → good per packet.
    pub p_bg: f64,
    /// Loss in the good state.
    #[serde(default)]
    pub loss_good: f64,
    /// Loss in the bad state.
    pub loss_bad: f64,
}

/// `[links]`: every link, unless a fault degrades it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Links {
    /// Uniform topology: RTT between any two peers, ms.
    pub rtt_ms: f64,
    /// Per-packet extra delay, uniform in 0..=jitter, never reordering a link; ms.
    pub jitter_ms: f64,
    /// Independent loss probability per packet (ignored when `burst` is set).
    pub loss: f64,
    /// Bursty loss instead of independent loss.
    pub burst: Option<Burst>,
    /// Link bandwidth, Mbit/s; 0 = unlimited.
    pub bandwidth_mbps: f64,
    /// Sender queue before drop-tail, KiB.
    pub queue_kib: u64,
    /// Largest UDP payload, bytes.
    pub mtu: usize,
}

impl Default for Links {
    fn default() -> Self {
        Self {
            rtt_ms: 20.0,
            jitter_ms: 0.0,
            loss: 0.0,
            burst: None,
            bandwidth_mbps: 0.0,
            queue_kib: 256,
            mtu: 1500,
        }
    }
}

impl Links {
    /// The loss model these settings describe.
    pub fn loss_model(&self) -> LossModel {
        match self.burst {
            Some(b) => LossModel::GilbertElliott {
                p_gb: b.p_gb,
                p_bg: b.p_bg,
                loss_good: b.loss_good,
                loss_bad: b.loss_bad,
            },
            None if self.loss > 0.0 => LossModel::Bernoulli { p: self.loss },
            None => LossModel::None,
        }
    }

    /// The link spec (latency comes from the topology).
    pub fn spec(&self) -> LinkSpec {
        LinkSpec {
            latency: Duration::ZERO,
            jitter: ms(self.jitter_ms),
            loss: self.loss_model(),
            bandwidth_bps: (self.bandwidth_mbps > 0.0)
                .then_some((self.bandwidth_mbps * 1e6) as u64),
            queue_bytes: self.queue_kib * 1024,
            mtu: self.mtu,
        }
    }
}

/// `[peers]`: how every peer is configured.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Peers {
    /// The first `bootstrap` peers are the others' bootstrap addresses.
    pub bootstrap: usize,
    /// Peer `i` starts at `i * join_spread_ms`.
    pub join_spread_ms: f64,
    /// SWIM probe period, ms.
    pub probe_period_ms: u64,
    /// SWIM direct ack timeout, ms.
    pub probe_rtt_ms: u64,
    /// SWIM suspicion before down, ms.
    pub suspect_ms: u64,
    /// foca cluster size hint; 0 = the number of peers.
    pub cluster_size_hint: u32,
    /// QUIC idle timeout, ms.
    pub idle_timeout_ms: u64,
    /// QUIC keep-alive, ms; 0 = none.
    pub keep_alive_ms: u64,
    /// QUIC initial RTT estimate, ms.
    pub initial_rtt_ms: u64,
    /// CPU time charged per handshake per side, µs (see `netsim calibrate`).
    pub handshake_cpu_us: u64,
    /// Connection cap per peer.
    pub max_connections: usize,
    /// Longest wait between join attempts, ms.
    pub max_join_backoff_ms: u64,
    /// rustls client session cache entries (0 = overlay's default, 8192). rustls allocates
    /// the caches at full capacity up front: ~1.5 MiB per peer at the defaults.
    pub tls_client_sessions: usize,
    /// rustls server session cache entries (0 = overlay's default, 16384).
    pub tls_server_sessions: usize,
    /// Concurrent bidirectional streams per connection (0 = overlay's default, 1024). quinn
    /// allocates stream state for the whole window when a connection opens.
    pub max_streams_per_connection: u32,
    /// foca periodic gossip period, ms (unset = the overlay's default, 200; 0 = off).
    pub gossip_ms: Option<u64>,
    /// Members per periodic gossip round.
    pub gossip_members: usize,
    /// First contacts per second periodic gossip may make before it is redirected to members
    /// with a membership-channel session (unset = the overlay's default, 2; -1 = never
    /// redirect; 0 = always).
    pub gossip_first_contacts_per_s: Option<i64>,
    /// Share the results of signature checks on public data between peers: one
    /// verified-chain cache for every peer (they trust the same CA), so each distinct
    /// certificate chain runs webpki once per run instead of once per peer that meets it, and
    /// one cache of verified signed catalogs, so each origin's version runs Ed25519 once
    /// instead of once per peer. Simulator CPU only: such a check is a pure function of the
    /// bytes checked, so every peer gets the answer its own check would give, and virtual time
    /// never counted that CPU anyway. `false`: a chain cache per peer and no catalog cache, as
    /// each deployed node has. Default true.
    pub shared_checks: bool,
}

impl Default for Peers {
    fn default() -> Self {
        Self {
            bootstrap: 1,
            join_spread_ms: 0.0,
            probe_period_ms: 1000,
            probe_rtt_ms: 500,
            suspect_ms: 4000,
            cluster_size_hint: 0,
            idle_timeout_ms: 30_000,
            keep_alive_ms: 0,
            initial_rtt_ms: 100,
            handshake_cpu_us: 0,
            max_connections: 4096,
            max_join_backoff_ms: 2000,
            tls_client_sessions: 0,
            tls_server_sessions: 0,
            max_streams_per_connection: 0,
            gossip_ms: None,
            gossip_members: 3,
            gossip_first_contacts_per_s: None,
            shared_checks: true,
        }
    }
}

/// `[services]`: what is published where.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Services {
    /// Number of services, named `s0`, `s1`, ...
    pub count: usize,
    /// Providers per service, placed from the last peer backwards (clients are the first
    /// peers): service `k`'s replica `j` is on peer `N - 1 - ((k + j * count) % N)`.
    pub providers: usize,
    /// Explicit placement instead: `placement[k]` lists service `k`'s peers.
    pub placement: Vec<Vec<usize>>,
    /// Request size sent by the client, bytes (at least 8: it carries the request id).
    pub request_bytes: usize,
    /// Response size, bytes.
    pub response_bytes: usize,
    /// Backend think time before answering, ms.
    pub service_time_ms: f64,
    /// Every service requires a token (policy `require_token`): each client peer gets an API
    /// key from each service's first provider, and exchanges it for tokens. Use with one
    /// provider per service (a key is only known to the provider that issued it).
    pub require_token: bool,
    /// Peers whose backends are slower: `[[peer, service_time_ms], ...]` (an overloaded
    /// instance).
    pub slow: Vec<[f64; 2]>,
}

impl Default for Services {
    fn default() -> Self {
        Self {
            count: 1,
            providers: 1,
            placement: Vec::new(),
            request_bytes: 64,
            response_bytes: 256,
            service_time_ms: 0.0,
            require_token: false,
            slow: Vec::new(),
        }
    }
}

impl Services {
    /// The peers publishing each service.
    pub fn placement(&self, peers: usize) -> Vec<Vec<usize>> {
        if !self.placement.is_empty() {
            return self.placement.clone();
        }
        (0..self.count)
            .map(|k| {
                let mut v: Vec<usize> = (0..self.providers)
                    .map(|j| peers - 1 - ((k + j * self.count) % peers))
                    .collect();
                v.sort_unstable();
                v.dedup();
                v
            })
            .collect()
    }
}

/// Workload generator selector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    /// No requests.
    #[default]
    None,
    /// Poisson arrivals per client, services drawn from a Zipf law.
    Poisson,
    /// Poisson arrivals; each client's next service follows a Markov chain.
    Markov,
    /// Replay of a `ts_ms,client,service` CSV (optionally gzipped).
    Trace,
    /// Explicit `[t_ms, client, service]` triples from `script`.
    Script,
}

/// `[workload]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Workload {
    /// Generator.
    pub kind: WorkloadKind,
    /// Client peers are peers `0..clients`; 0 = every peer that publishes nothing.
    pub clients: usize,
    /// Requests per second per client (poisson, markov).
    pub rate_per_client: f64,
    /// Zipf exponent over services (0 = uniform).
    pub zipf_s: f64,
    /// Markov: probability that a client's next service is its current one's successor.
    pub markov_p: f64,
    /// Trace file (`ts_ms,client,service`, `.gz` allowed).
    pub trace: String,
    /// Trace time is divided by this.
    pub trace_speed: f64,
    /// Most trace rows replayed (0 = all that fit in `duration_s`).
    pub trace_limit: usize,
    /// Script: `[t_ms, client, service]` from the workload start.
    pub script: Vec<[f64; 3]>,
    /// Per-attempt timeout, ms.
    pub timeout_ms: u64,
    /// Extra attempts after a failure.
    pub retries: u32,
    /// Cap on requests generated (0 = none).
    pub max_requests: usize,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            kind: WorkloadKind::None,
            clients: 0,
            rate_per_client: 1.0,
            zipf_s: 1.0,
            markov_p: 0.8,
            trace: String::new(),
            trace_speed: 1.0,
            trace_limit: 0,
            script: Vec::new(),
            timeout_ms: 2000,
            retries: 1,
            max_requests: 0,
        }
    }
}

/// What a fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// `peers` crash: socket and tasks gone, no goodbye.
    Crash,
    /// `peers` leave gracefully.
    Leave,
    /// `peers` restart: same identity, next generation, same address.
    Restart,
    /// Cut `a` from `b` (both ways unless `one_way`).
    Partition,
    /// Remove every partition.
    Heal,
    /// Links between `a` and `b` get the fault's link settings.
    Degrade,
    /// Remove every degradation.
    Restore,
}

/// `[[faults]]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// When, seconds from start.
    pub at_s: f64,
    /// What.
    pub kind: FaultKind,
    /// Peers (crash, leave, restart).
    #[serde(default)]
    pub peers: Vec<usize>,
    /// One side (partition, degrade).
    #[serde(default)]
    pub a: Vec<usize>,
    /// Other side (partition, degrade).
    #[serde(default)]
    pub b: Vec<usize>,
    /// Partition in one direction only (a → b cut).
    #[serde(default)]
    pub one_way: bool,
    /// Degrade: RTT, ms (0 = unchanged).
    #[serde(default)]
    pub rtt_ms: f64,
    /// Degrade: loss.
    #[serde(default)]
    pub loss: f64,
    /// Degrade: jitter, ms.
    #[serde(default)]
    pub jitter_ms: f64,
    /// Degrade: bandwidth, Mbit/s (0 = unlimited).
    #[serde(default)]
    pub bandwidth_mbps: f64,
}

/// Milliseconds (fractional) as a duration.
pub fn ms(x: f64) -> Duration {
    Duration::from_secs_f64(x.max(0.0) / 1000.0)
}

impl Scenario {
    /// Loads `path` and applies `--set` overrides (`KEY=VALUE`, VALUE in TOML syntax or a bare
    /// string).
    pub fn load(path: &Path, sets: &[String]) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, sets)
            .map_err(|e| ScenarioError::Parse(format!("{}: {e}", path.display())))
    }

    /// Parses TOML text and applies overrides.
    pub fn parse(text: &str, sets: &[String]) -> Result<Self, ScenarioError> {
        let mut value: toml::Value =
            toml::from_str(text).map_err(|e| ScenarioError::Parse(e.to_string()))?;
        for s in sets {
            apply_override(&mut value, s)?;
        }
        let sc: Scenario = value
            .try_into()
            .map_err(|e: toml::de::Error| ScenarioError::Parse(e.to_string()))?;
        sc.validate()?;
        Ok(sc)
    }

    /// Checks consistency.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let n = self.topology.peers;
        let bad = |m: String| Err(ScenarioError::Invalid(m));
        if n < 2 {
            return bad(format!("topology.peers = {n}: need at least 2"));
        }
        if n > 60_000 {
            return bad(format!("topology.peers = {n}: at most 60000"));
        }
        if self.peers.bootstrap == 0 || self.peers.bootstrap > n {
            return bad("peers.bootstrap must be 1..=topology.peers".into());
        }
        if !(0.0..=1.0).contains(&self.links.loss) {
            return bad("links.loss must be in 0..=1".into());
        }
        if self.services.request_bytes < 8 {
            return bad("services.request_bytes must be at least 8".into());
        }
        let placement = self.services.placement(n);
        if placement.iter().flatten().any(|&p| p >= n) {
            return bad("services.placement names a peer that does not exist".into());
        }
        if self.topology.model == TopologyModel::Regions && self.topology.region_rtt_ms.is_empty() {
            return bad("topology.region_rtt_ms is required with model = \"regions\"".into());
        }
        for f in &self.faults {
            if f.peers.iter().chain(&f.a).chain(&f.b).any(|&p| p >= n) {
                return bad(format!(
                    "fault at {} s names a peer that does not exist",
                    f.at_s
                ));
            }
        }
        for s in &self.workload.script {
            if s[1] as usize >= n || s[2] as usize >= placement.len() {
                return bad(format!("script entry {s:?}: no such client or service"));
            }
        }
        if self.workload.kind == WorkloadKind::Trace && self.workload.trace.is_empty() {
            return bad("workload.trace (a CSV path) is required with kind = \"trace\"".into());
        }
        Ok(())
    }

    /// The latency model of the topology.
    pub fn latency_model(&self) -> LatencyModel {
        let n = self.topology.peers;
        match self.topology.model {
            TopologyModel::Uniform => LatencyModel::uniform(n, self.links.rtt_ms),
            TopologyModel::Regions => LatencyModel::regions(n, self.topology.region_rtt_ms.clone()),
            TopologyModel::Coordinates => LatencyModel::coordinates(
                n,
                self.topology.side,
                self.topology.base_rtt_ms,
                self.topology.ms_per_unit,
                self.seed,
            ),
        }
    }

    /// Client peers.
    pub fn clients(&self) -> Vec<usize> {
        let n = self.topology.peers;
        if self.workload.clients > 0 {
            return (0..self.workload.clients.min(n)).collect();
        }
        let providers: std::collections::BTreeSet<usize> =
            self.services.placement(n).into_iter().flatten().collect();
        (0..n).filter(|p| !providers.contains(p)).collect()
    }
}

fn apply_override(root: &mut toml::Value, set: &str) -> Result<(), ScenarioError> {
    let (key, raw) = set
        .split_once('=')
        .ok_or_else(|| ScenarioError::BadOverride(set.into()))?;
    let path: Vec<&str> = key.trim().split('.').collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err(ScenarioError::BadOverride(set.into()));
    }
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    let mut cur = root;
    for (i, seg) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        cur = match cur {
            toml::Value::Table(t) => {
                if last {
                    t.insert((*seg).to_owned(), value);
                    return Ok(());
                }
                t.entry((*seg).to_owned())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            }
            toml::Value::Array(a) => {
                let idx: usize = seg
                    .parse()
                    .map_err(|_| ScenarioError::BadOverride(set.into()))?;
                let slot = a
                    .get_mut(idx)
                    .ok_or_else(|| ScenarioError::BadOverride(set.into()))?;
                if last {
                    *slot = value;
                    return Ok(());
                }
                slot
            }
            _ => return Err(ScenarioError::BadOverride(set.into())),
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let s = Scenario::parse(
            "name = \"t\"\n[topology]\npeers = 4\n[[faults]]\nat_s = 1\nkind = \"crash\"\npeers = [3]\n",
            &[
                "links.rtt_ms=80".into(),
                "workload.trace=/tmp/x.csv".into(),
                "faults.0.at_s=2.5".into(),
                "services.count=3".into(),
            ],
        )
        .unwrap();
        assert_eq!(s.links.rtt_ms, 80.0);
        assert_eq!(s.workload.trace, "/tmp/x.csv");
        assert_eq!(s.faults[0].at_s, 2.5);
        assert_eq!(s.services.count, 3);
        assert_eq!(s.topology.peers, 4);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = Scenario::parse("[links]\nrtt = 3\n", &[]).unwrap_err();
        assert!(e.to_string().contains("rtt"), "{e}");
        let e = Scenario::parse("", &["links.nope=1".into()]).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        assert!(Scenario::parse("", &["novalue".into()]).is_err());
    }

    #[test]
    fn placement_from_the_end_and_clients_from_the_start() {
        let s = Scenario::parse(
            "[topology]\npeers = 10\n[services]\ncount = 3\nproviders = 2\n",
            &[],
        )
        .unwrap();
        assert_eq!(
            s.services.placement(10),
            vec![vec![6, 9], vec![5, 8], vec![4, 7]]
        );
        assert_eq!(s.clients(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn bundled_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                Scenario::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 3);
    }
}
