//! The driver of one run: builds the runtime (paused for virtual time), the [`SimNet`], the
//! peers (the production `overlay::Node`, each on its own [`crate::net::SimSocket`] with
//! in-memory backends), plays the workload and the fault schedule, and gathers the measurements
//! into a [`Report`].
//!
//! Task tree inside the runtime (everything ends when the runtime is dropped after the run):
//!
//! ```text
//! simulate
//!  ├─ SimNet driver (delivers packets at their arrival time)
//!  ├─ every peer's own tasks (overlay::Node)
//!  ├─ workload: sleeps until each request's time, spawns one task per request
//!  ├─ faults: sleeps until each fault's time, applies it
//!  ├─ watchers: membership convergence, catalog convergence, crash detection
//!  └─ progress bar ticker (optional)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use overlay::backend::{BackendConnector, BoxedStream, ConnectFuture};
use overlay::membership::{MembershipConfig, PeerState};
use overlay::{Node, NodeConfig, NodeIdentity, ServiceConfig, TransportSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, Instant};

use overlay::preauth::Served;

use crate::modes::Mode;
use crate::net::{peer_addr, SimNet};
use crate::pki::SimPki;
use crate::report::{
    Detection, MembershipReport, Memory, Outcome, Report, RequestRecord, RunFacts,
};
use crate::scenario::{ms, Fault, FaultKind, Scenario, TimeMode};
use crate::workload::{self, Planned};

/// Errors running a scenario.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The workload could not be built.
    #[error(transparent)]
    Workload(#[from] workload::WorkloadError),
    /// Identities could not be made.
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    /// The runtime could not be built.
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    /// A peer did not start.
    #[error("peer {peer}: {source}")]
    Peer {
        /// Peer number.
        peer: usize,
        /// The cause.
        source: overlay::NodeError,
    },
}

/// Options of a run that are not part of the scenario.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Stop the run after this much wall time and report what was measured so far
    /// (`truncated` in the report).
    pub max_wall: Option<Duration>,
    /// Stop the run when the process's resident memory reaches this many MiB (`truncated`).
    pub max_rss_mib: Option<f64>,
}

/// Runs `sc` with peers configured by `mode`; returns the report and every request record.
pub fn run(
    sc: &Scenario,
    mode: Mode,
    opts: RunOptions,
) -> Result<(Report, Vec<RequestRecord>), RunError> {
    let plan = workload::plan(sc)?;
    let pki = SimPki::new(sc.seed)?;
    let identities = (0..sc.topology.peers)
        .map(|i| pki.node(&format!("p{i}"), i as u64))
        .collect::<Result<Vec<_>, _>>()?;
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all();
    if sc.time == TimeMode::Virtual {
        builder.start_paused(true);
    }
    let rt = builder.build().map_err(RunError::Runtime)?;
    let rss_start = rss_mib();
    #[allow(clippy::disallowed_methods)] // wall time of the run, reported as such
    let wall0 = std::time::Instant::now();
    let out = rt.block_on(simulate(sc, mode, opts, plan, identities, rss_start));
    let wall_s = wall0.elapsed().as_secs_f64();
    // Dropping the runtime drops every peer and task.
    drop(rt);
    let (mut facts, records) = out?;
    facts.wall_s = wall_s;
    let report = Report::build(facts, &records);
    Ok((report, records))
}

/// Resident set size of this process, MiB (from /proc/self/statm; 0 where unavailable).
pub fn rss_mib() -> f64 {
    let page = 4096.0;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |pages| pages * page / (1024.0 * 1024.0))
}

/// Peak resident set size of this process, MiB (VmHWM in /proc/self/status).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the in-memory backends need.
struct Backends {
    request_bytes: usize,
    response_bytes: usize,
    service_time: Duration,
    /// Peers with a slower backend.
    slow: HashMap<usize, Duration>,
    /// Wire request id → the peer whose backend answered it.
    served: Mutex<HashMap<u64, usize>>,
}

/// One peer's backend connector: each connection is a `tokio::io::duplex` pipe to a small
/// simulated application that reads the request, notes who served it, waits the service
/// time and answers.
struct SimBackend {
    peer: usize,
    shared: Arc<Backends>,
}

impl BackendConnector for SimBackend {
    fn connect(&self, _service: &str, _addr: std::net::SocketAddr) -> ConnectFuture {
        let shared = self.shared.clone();
        let peer = self.peer;
        Box::pin(async move {
            let (ours, app) = tokio::io::duplex(64 * 1024);
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(app);
                let mut req = vec![0u8; shared.request_bytes];
                if r.read_exact(&mut req).await.is_err() {
                    return;
                }
                let mut id = [0u8; 8];
                id.copy_from_slice(&req[..8]);
                lock(&shared.served).insert(u64::from_be_bytes(id), peer);
                let think = shared
                    .slow
                    .get(&peer)
                    .copied()
                    .unwrap_or(shared.service_time);
                if !think.is_zero() {
                    tokio::time::sleep(think).await;
                }
                let resp = vec![0x5a; shared.response_bytes.max(1)];
                if w.write_all(&resp).await.is_ok() {
                    let _ = w.shutdown().await;
                }
                // Drain whatever else the client sends, until it closes.
                let mut sink = [0u8; 1024];
                while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
            });
            Ok(Box::new(ours) as BoxedStream)
        })
    }
}

struct Sim {
    sc: Scenario,
    mode: Mode,
    net: SimNet,
    start: Instant,
    identities: Vec<NodeIdentity>,
    /// The verified-chain cache every peer shares (`peers.shared_checks`).
    chain_cache: Option<Arc<overlay::tls::ChainCache>>,
    /// The verified-catalog cache every peer shares (`peers.shared_checks`).
    catalog_checks: Option<Arc<overlay::catalog::signed::CheckCache>>,
    /// Node id → peer index.
    index_of: HashMap<overlay::identity::NodeId, usize>,
    services: Vec<String>,
    placement: Vec<Vec<usize>>,
    backends: Arc<Backends>,
    /// The running node of each peer (None: crashed or left).
    nodes: Mutex<Vec<Option<Node>>>,
    /// Every node ever started (their counters survive crashes).
    all_nodes: Mutex<Vec<Node>>,
    generations: Mutex<Vec<u64>>,
    records: Mutex<Vec<RequestRecord>>,
    converged: Mutex<Vec<Option<Duration>>>,
    catalog_converged: Mutex<Vec<Option<Duration>>>,
    detections: Mutex<Vec<(Detection, Vec<f64>)>>,
}

impl Sim {
    fn node(&self, i: usize) -> Option<Node> {
        lock(&self.nodes).get(i).cloned().flatten()
    }

    fn config(&self, i: usize, generation: u64) -> NodeConfig {
        let p = &self.sc.peers;
        let n = self.sc.topology.peers;
        let services = self
            .placement
            .iter()
            .enumerate()
            .filter(|(_, peers)| peers.contains(&i))
            .map(|(k, _)| ServiceConfig {
                name: self.services[k].clone(),
                // Never dialled: the in-memory connector answers instead.
                backend: std::net::SocketAddr::from(([127, 255, 255, 254], 1 + k as u16)),
            })
            .collect();
        let mut cfg = NodeConfig {
            bootstrap: (0..p.bootstrap)
                .filter(|&b| b != i)
                .map(peer_addr)
                .collect(),
            services,
            membership: MembershipConfig {
                probe_period: Duration::from_millis(p.probe_period_ms),
                probe_rtt: Duration::from_millis(p.probe_rtt_ms),
                suspect_to_down: Duration::from_millis(p.suspect_ms),
                cluster_size_hint: if p.cluster_size_hint == 0 {
                    n as u32
                } else {
                    p.cluster_size_hint
                },
                periodic_gossip: match p.gossip_ms {
                    None => MembershipConfig::default().periodic_gossip,
                    Some(0) => None,
                    Some(ms) => Some((Duration::from_millis(ms), p.gossip_members)),
                },
                gossip_first_contacts_per_s: match p.gossip_first_contacts_per_s {
                    None => MembershipConfig::default().gossip_first_contacts_per_s,
                    Some(n) if n < 0 => None,
                    Some(n) => Some(n.min(i64::from(u32::MAX)) as u32),
                },
                ..MembershipConfig::default()
            },
            transport: TransportSettings {
                idle_timeout: Duration::from_millis(p.idle_timeout_ms),
                keep_alive: (p.keep_alive_ms > 0).then(|| Duration::from_millis(p.keep_alive_ms)),
                initial_rtt: Duration::from_millis(p.initial_rtt_ms),
                max_connections: p.max_connections,
                max_streams_per_connection: if p.max_streams_per_connection > 0 {
                    p.max_streams_per_connection
                } else {
                    TransportSettings::default().max_streams_per_connection
                },
                // Real time pays the real CPU: charging it again would count it twice.
                handshake_cpu_delay: match self.sc.time {
                    TimeMode::Virtual => Duration::from_micros(p.handshake_cpu_us),
                    TimeMode::Real => Duration::ZERO,
                },
                ..TransportSettings::default()
            },
            generation,
            seed: self
                .sc
                .seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add((i as u64) << 20 | generation),
            max_join_backoff: Duration::from_millis(p.max_join_backoff_ms),
            tls: {
                let mut t = overlay::tls::TlsSettings::default();
                if p.tls_client_sessions > 0 {
                    t.client_sessions = p.tls_client_sessions;
                }
                if p.tls_server_sessions > 0 {
                    t.server_sessions = p.tls_server_sessions;
                }
                t.chain_cache = self.chain_cache.clone();
                t
            },
            backend_connector: Arc::new(SimBackend {
                peer: i,
                shared: self.backends.clone(),
            }),
            catalog_checks: self.catalog_checks.clone(),
            ..NodeConfig::default()
        };
        if self.sc.services.require_token {
            let policy = overlay::auth::policy::Policy {
                require_token: true,
                ..Default::default()
            };
            for s in &cfg.services {
                cfg.auth
                    .service_policies
                    .insert(s.name.clone(), policy.clone());
            }
            // The simulated clients are a few peers standing for many callers: the per-caller
            // token limits would throttle the no-caching baseline, not measure it.
            let wide = overlay::auth::limits::Rate {
                per_second: 1_000_000,
                burst: 1_000_000,
            };
            cfg.auth.limits.per_caller_service = wide;
            cfg.auth.limits.per_service = wide;
        }
        let r = &self.sc.routing;
        cfg.routing = overlay::routing::RoutingConfig {
            max_relays: r.max_relays,
            relay: r.relays.is_empty() || r.relays.contains(&i),
            probe_interval: Duration::from_millis(r.probe_interval_ms.max(1)),
            probe_misses: r.probe_misses.max(1),
            summary_interval: Duration::from_millis(r.summary_interval_ms.max(1)),
            neighbours: r.neighbours,
            max_attempts: r.max_attempts.max(1),
            switch_ratio: r.switch_ratio,
            ..overlay::routing::RoutingConfig::default()
        };
        self.mode
            .configure(&self.sc.preauth, &self.services, &mut cfg);
        cfg
    }

    async fn start_peer(self: &Arc<Self>, i: usize) -> Result<Node, RunError> {
        let generation = {
            let mut g = lock(&self.generations);
            g[i] += 1;
            g[i]
        };
        let socket = self.net.bind(i, peer_addr(i));
        let node = Node::spawn(
            socket,
            self.identities[i].clone(),
            self.config(i, generation),
        )
        .await
        .map_err(|source| RunError::Peer { peer: i, source })?;
        lock(&self.nodes)[i] = Some(node.clone());
        lock(&self.all_nodes).push(node.clone());
        Ok(node)
    }

    fn since_start(&self) -> Duration {
        Instant::now() - self.start
    }
}

async fn simulate(
    sc: &Scenario,
    mode: Mode,
    opts: RunOptions,
    plan: Vec<Planned>,
    identities: Vec<NodeIdentity>,
    rss_start: f64,
) -> Result<(RunFacts, Vec<RequestRecord>), RunError> {
    let n = sc.topology.peers;
    let net = SimNet::new(sc.latency_model(), sc.links.spec(), sc.seed);
    let placement = sc.services.placement(n);
    let sim = Arc::new(Sim {
        sc: sc.clone(),
        mode,
        start: net.epoch(),
        net,
        index_of: identities
            .iter()
            .enumerate()
            .map(|(i, id)| (id.node_id(), i))
            .collect(),
        chain_cache: match identities.first() {
            Some(id) if sc.peers.shared_checks => Some(overlay::tls::ChainCache::new(
                id,
                overlay::chain_cache::DEFAULT_CAPACITY.max(4 * n),
            )),
            _ => None,
        },
        catalog_checks: sc
            .peers
            .shared_checks
            .then(|| overlay::catalog::signed::CheckCache::new(64 * 1024)),
        identities,
        services: (0..placement.len()).map(|k| format!("s{k}")).collect(),
        placement,
        backends: Arc::new(Backends {
            request_bytes: sc.services.request_bytes,
            response_bytes: sc.services.response_bytes,
            service_time: ms(sc.services.service_time_ms),
            slow: sc
                .services
                .slow
                .iter()
                .map(|[p, t]| (*p as usize, ms(*t)))
                .collect(),
            served: Mutex::new(HashMap::new()),
        }),
        nodes: Mutex::new(vec![None; n]),
        all_nodes: Mutex::new(Vec::with_capacity(n)),
        generations: Mutex::new(vec![0; n]),
        records: Mutex::new(Vec::new()),
        converged: Mutex::new(vec![None; n]),
        catalog_converged: Mutex::new(vec![None; n]),
        detections: Mutex::new(Vec::new()),
    });

    let progress = opts.progress.then(|| {
        let total = (sc.warmup_s + sc.duration_s).ceil() as u64;
        let pb = indicatif::ProgressBar::new(total);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} virtual s ({elapsed} wall)",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_message(format!("{} ({})", sc.name, mode.name()));
        pb
    });
    if let Some(pb) = progress.clone() {
        let sim = sim.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                pb.set_position(sim.since_start().as_secs());
            }
        });
    }

    // Oracle: each request carries the next `budget` distinct services of its client.
    let hints: Vec<Vec<usize>> = if mode.wants_hints() {
        next_services(&plan, sc.preauth.budget)
    } else {
        vec![Vec::new(); plan.len()]
    };
    let first_hints = first_services(&plan, sc.preauth.budget);
    // Workload: sleeps until the workload start, then one task per request.
    let clients_planned = plan.len();
    let work_start = sim.start + Duration::from_secs_f64(sc.warmup_s.max(0.0));
    let workload_task = {
        let sim = sim.clone();
        tokio::spawn(async move {
            let mut reqs = Vec::with_capacity(clients_planned);
            if sim.mode.wants_hints() {
                // The oracle knows the first requests too: tell it a second ahead.
                sleep_until(
                    work_start
                        .checked_sub(Duration::from_secs(1))
                        .unwrap_or(work_start),
                )
                .await;
                for ((client, app), services) in first_hints {
                    if let Some(node) = sim.node(client) {
                        let names = services.iter().map(|&s| sim.services[s].clone()).collect();
                        node.preauth_hint(&app_name(app), names);
                    }
                }
            }
            for ((id, p), hint) in plan.into_iter().enumerate().zip(hints) {
                sleep_until(work_start + p.at).await;
                reqs.push(tokio::spawn(request(sim.clone(), id as u64, p, hint)));
            }
            for r in reqs {
                let _ = r.await;
            }
        })
    };

    // Faults.
    let faults_task = {
        let sim = sim.clone();
        let mut faults = sc.faults.clone();
        faults.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
        tokio::spawn(async move {
            for f in faults {
                sleep_until(sim.start + Duration::from_secs_f64(f.at_s.max(0.0))).await;
                apply_fault(&sim, &f).await;
            }
        })
    };

    // Peers (all at t = 0, or spread), then wait for the end of the workload.
    let spread = ms(sc.peers.join_spread_ms);
    let watchers: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());
    let end = work_start + Duration::from_secs_f64(sc.duration_s.max(0.0));
    let body = async {
        for i in 0..n {
            if !spread.is_zero() {
                sleep_until(sim.start + spread * i as u32).await;
            }
            let node = sim.start_peer(i).await?;
            lock(&watchers).push(tokio::spawn(watch_convergence(sim.clone(), i, node)));
        }
        if sc.services.require_token {
            provision_keys(&sim).await;
        }
        sleep_until(end).await;
        let _ = workload_task.await;
        Ok::<(), RunError>(())
    };
    // The budget (wall time, memory) is checked every 100 ms of virtual time.
    #[allow(clippy::disallowed_methods)] // wall-clock budget of the run
    let wall0 = std::time::Instant::now();
    let watchdog = async {
        if opts.max_wall.is_none() && opts.max_rss_mib.is_none() {
            return std::future::pending().await;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let over_wall = opts.max_wall.is_some_and(|b| wall0.elapsed() >= b);
            let over_rss = opts.max_rss_mib.is_some_and(|m| rss_mib() >= m);
            if over_wall || over_rss {
                tracing::warn!(over_wall, over_rss, "run budget exhausted; stopping early");
                break;
            }
        }
    };
    let truncated = tokio::select! {
        r = body => {
            r?;
            false
        }
        _ = watchdog => true,
    };
    let watchers = std::mem::take(&mut *lock(&watchers));
    faults_task.abort();
    for w in watchers {
        w.abort();
    }
    if let Some(pb) = &progress {
        pb.finish_and_clear();
    }
    let virtual_s = sim.since_start().as_secs_f64();
    let rss_end = rss_mib();

    // Gather.
    let mut overlay: BTreeMap<String, u64> = BTreeMap::new();
    for node in lock(&sim.all_nodes).iter() {
        if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(node.stats().snapshot()) {
            for (k, v) in m {
                // Wall-clock gauges (certificate expiry) neither sum nor reproduce.
                if k.contains("expires") {
                    continue;
                }
                *overlay.entry(k).or_default() += v.as_u64().unwrap_or(0);
            }
        }
    }
    // Chain checks: webpki runs (misses) and cache answers (hits), counted once per cache.
    let chain = match &sim.chain_cache {
        Some(c) => c.stats(),
        None => lock(&sim.all_nodes)
            .iter()
            .filter_map(|node| node.chain_cache().map(|c| c.stats()))
            .fold(Default::default(), |a, s| a + s),
    };
    overlay.insert("chain_checks_webpki".into(), chain.misses);
    overlay.insert("chain_checks_cached".into(), chain.hits);
    if let Some(c) = &sim.catalog_checks {
        let s = c.stats();
        overlay.insert("catalog_checks_ed25519".into(), s.misses);
        overlay.insert("catalog_checks_cached".into(), s.hits);
    }
    let live: Vec<Node> = lock(&sim.nodes).iter().flatten().cloned().collect();
    let mut views = Vec::with_capacity(live.len());
    for node in &live {
        let peers = node.peers().await;
        views.push(peers.iter().filter(|p| p.state != PeerState::Down).count());
    }
    // Routers' link downs towards peers that never crashed and were never cut from the
    // observer: false.
    let crashed: std::collections::BTreeSet<usize> =
        lock(&sim.detections).iter().map(|(d, _)| d.peer).collect();
    let mut cut: std::collections::BTreeSet<(usize, usize)> = Default::default();
    for f in sc
        .faults
        .iter()
        .filter(|f| matches!(f.kind, FaultKind::Partition | FaultKind::Degrade))
    {
        for &a in &f.a {
            for &b in &f.b {
                cut.insert((a.min(b), a.max(b)));
            }
        }
    }
    let mut false_link_downs = 0u64;
    for (obs, node) in lock(&sim.nodes).iter().enumerate() {
        let Some(node) = node else { continue };
        for (id, downs) in node.link_downs() {
            let Some(&peer) = sim.index_of.get(&id) else {
                continue;
            };
            if !crashed.contains(&peer) && !cut.contains(&(obs.min(peer), obs.max(peer))) {
                false_link_downs += downs;
            }
        }
    }
    let down_events = overlay.get("members_down").copied().unwrap_or(0);
    let crashes: Vec<Detection> = lock(&sim.detections)
        .iter()
        .map(|(d, times)| {
            let mut t = times.clone();
            t.sort_by(f64::total_cmp);
            let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
            Detection {
                detected: t.len(),
                first_s: t.first().copied().map(r3),
                median_s: (!t.is_empty()).then(|| r3(t[t.len() / 2])),
                all_s: (t.len() == d.observers && !t.is_empty())
                    .then(|| t.last().copied().map(r3))
                    .flatten(),
                ..d.clone()
            }
        })
        .collect();
    let true_downs: u64 = crashes.iter().map(|d| d.detected as u64).sum();
    let all_of = |v: &Vec<Option<Duration>>, who: &[usize]| -> Option<f64> {
        who.iter()
            .map(|&i| v[i])
            .collect::<Option<Vec<_>>>()
            .and_then(|v| v.into_iter().max())
            .map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0)
    };
    let everyone: Vec<usize> = (0..n).collect();
    let clients = sc.clients();
    let converged = lock(&sim.converged).clone();
    let catalog_converged = lock(&sim.catalog_converged).clone();
    let membership = MembershipReport {
        converged_s: all_of(&converged, &everyone),
        converged_peers: converged.iter().flatten().count(),
        catalog_converged_s: all_of(&catalog_converged, &clients),
        crashes,
        false_downs: down_events.saturating_sub(true_downs),
        end_view_min: views.iter().copied().min().unwrap_or(0),
        end_view_mean: if views.is_empty() {
            0.0
        } else {
            (views.iter().sum::<usize>() as f64 / views.len() as f64 * 100.0).round() / 100.0
        },
        live_peers: live.len(),
        down_events,
    };
    let mut records = std::mem::take(&mut *lock(&sim.records));
    records.sort_by_key(|r| r.id);
    for node in lock(&sim.nodes).iter().flatten() {
        node.abort();
    }
    let facts = RunFacts {
        scenario: sc.name.clone(),
        seed: sc.seed,
        mode: mode.name().into(),
        peers: n,
        time: match sc.time {
            TimeMode::Virtual => "virtual".into(),
            TimeMode::Real => "real".into(),
        },
        wall_s: 0.0,
        virtual_s,
        truncated,
        membership,
        overlay,
        net: sim.net.stats(),
        memory: Memory {
            rss_start_mib: (rss_start * 10.0).round() / 10.0,
            rss_end_mib: (rss_end * 10.0).round() / 10.0,
            peak_mib: (peak_rss_mib() * 10.0).round() / 10.0,
            per_peer_kib: (((rss_end - rss_start) * 1024.0 / n as f64) * 10.0).round() / 10.0,
        },
        false_link_downs,
        restarts: sc
            .faults
            .iter()
            .filter(|f| f.kind == FaultKind::Restart)
            .flat_map(|f| f.peers.iter().map(move |p| (*p, f.at_s)))
            .collect(),
    };
    Ok((facts, records))
}

/// Gives every client peer an API key for every service, from the service's first provider.
async fn provision_keys(sim: &Arc<Sim>) {
    let clients = sim.sc.clients();
    for (k, peers) in sim.placement.iter().enumerate() {
        let name = &sim.services[k];
        let Some(provider) = peers.first().and_then(|&p| sim.node(p)) else {
            continue;
        };
        match provider.create_api_key(name).await {
            Ok((_, key)) => {
                for &c in &clients {
                    if let Some(node) = sim.node(c) {
                        node.set_upstream_key(name, key.clone());
                    }
                }
            }
            Err(e) => tracing::warn!(service = %name, error = %e, "no API key"),
        }
    }
}

/// Records when peer `i` first sees every other peer alive, and (clients) every service.
async fn watch_convergence(sim: Arc<Sim>, i: usize, node: Node) {
    let n = sim.sc.topology.peers;
    let services = sim.services.len();
    let is_client = sim.sc.clients().contains(&i);
    let members = {
        let node = node.clone();
        let sim = sim.clone();
        async move {
            node.wait_members(|m| m + 1 >= n).await;
            lock(&sim.converged)[i] = Some(sim.since_start());
        }
    };
    let catalog = async {
        if !is_client {
            return;
        }
        node.wait_catalog(|entries| {
            let mut names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            names.len() >= services
        })
        .await;
        lock(&sim.catalog_converged)[i] = Some(sim.since_start());
    };
    tokio::join!(members, catalog);
}

async fn apply_fault(sim: &Arc<Sim>, f: &Fault) {
    tracing::info!(at_s = f.at_s, kind = ?f.kind, "fault");
    match f.kind {
        FaultKind::Crash | FaultKind::Leave => {
            for &p in &f.peers {
                let Some(node) = lock(&sim.nodes)[p].take() else {
                    continue;
                };
                watch_detection(sim, p, &node);
                if f.kind == FaultKind::Crash {
                    sim.net.crash(peer_addr(p));
                    node.abort();
                } else {
                    tokio::spawn(async move { node.shutdown().await });
                }
            }
        }
        FaultKind::Restart => {
            for &p in &f.peers {
                if let Some(node) = lock(&sim.nodes)[p].take() {
                    sim.net.crash(peer_addr(p));
                    node.abort();
                }
                if let Err(e) = sim.start_peer(p).await {
                    tracing::warn!(peer = p, error = %e, "restart failed");
                }
            }
        }
        FaultKind::Partition => sim.net.partition(&f.a, &f.b, !f.one_way),
        FaultKind::Heal => sim.net.heal(),
        FaultKind::Degrade => {
            let mut spec = sim.sc.links.spec();
            spec.latency = ms(f.rtt_ms / 2.0);
            spec.jitter = ms(f.jitter_ms);
            spec.loss = if f.loss > 0.0 {
                crate::link::LossModel::Bernoulli { p: f.loss }
            } else {
                crate::link::LossModel::None
            };
            spec.bandwidth_bps =
                (f.bandwidth_mbps > 0.0).then_some((f.bandwidth_mbps * 1e6) as u64);
            sim.net.degrade(&f.a, &f.b, spec);
        }
        FaultKind::Restore => sim.net.restore(),
    }
}

/// Starts timing how long each live peer takes to mark `victim` down (or forget it).
fn watch_detection(sim: &Arc<Sim>, victim: usize, node: &Node) {
    let victim_id = node.node_id();
    let observers: Vec<Node> = lock(&sim.nodes).iter().flatten().cloned().collect();
    let at = sim.since_start();
    let slot = {
        let mut d = lock(&sim.detections);
        d.push((
            Detection {
                peer: victim,
                at_s: (at.as_secs_f64() * 1000.0).round() / 1000.0,
                observers: observers.len(),
                ..Detection::default()
            },
            Vec::new(),
        ));
        d.len() - 1
    };
    for o in observers {
        let sim = sim.clone();
        tokio::spawn(async move {
            o.wait_peers(|peers| {
                peers
                    .iter()
                    .find(|p| p.node_id.0 == victim_id)
                    .is_none_or(|p| p.state == PeerState::Down)
            })
            .await;
            let took = (sim.since_start() - at).as_secs_f64();
            lock(&sim.detections)[slot].1.push(took);
        });
    }
}

/// The name of local client `app` on its peer (what the engine profiles).
fn app_name(app: usize) -> String {
    format!("c{app}")
}

/// For each request, the next `budget` distinct services its client asks for after it.
fn next_services(plan: &[Planned], budget: usize) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); plan.len()];
    let mut by_app: HashMap<(usize, usize), Vec<usize>> = HashMap::new();
    for (i, p) in plan.iter().enumerate() {
        by_app.entry((p.client, p.app)).or_default().push(i);
    }
    for idx in by_app.values() {
        for (k, &i) in idx.iter().enumerate() {
            let mut next: Vec<usize> = Vec::with_capacity(budget);
            for &j in &idx[k + 1..] {
                if next.len() >= budget {
                    break;
                }
                if !next.contains(&plan[j].service) {
                    next.push(plan[j].service);
                }
            }
            out[i] = next;
        }
    }
    out
}

/// Each client's first `budget` distinct services, sorted by client for determinism.
fn first_services(plan: &[Planned], budget: usize) -> Vec<((usize, usize), Vec<usize>)> {
    let mut m: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
    for p in plan {
        let v = m.entry((p.client, p.app)).or_default();
        if v.len() < budget && !v.contains(&p.service) {
            v.push(p.service);
        }
    }
    m.into_iter().collect()
}

/// One request: attempts (each bounded by the timeout) until answered or out of retries.
async fn request(sim: Arc<Sim>, id: u64, p: Planned, hint: Vec<usize>) {
    let Some(node) = sim.node(p.client) else {
        return; // the client is down: no request is made
    };
    let w = &sim.sc.workload;
    let service = &sim.services[p.service];
    let app = app_name(p.app);
    let t0 = Instant::now();
    let mut attempts = 0;
    let mut answer = None;
    let mut served = None;
    let mut route = RouteInfo::default();
    for attempt in 0..=w.retries {
        attempts += 1;
        let wire_id = id << 8 | u64::from(attempt.min(255));
        let deadline = Instant::now() + Duration::from_millis(w.timeout_ms);
        // The oracle learns the client's next services the moment this request is served.
        let hint = (attempt == 0).then(|| hint.clone());
        let attempt = attempt_once(
            &sim,
            &node,
            &app,
            service,
            wire_id,
            &mut served,
            hint,
            &mut route,
        );
        match timeout(Duration::from_millis(w.timeout_ms), attempt).await {
            Ok(Some(first_byte)) => {
                answer = Some((first_byte, wire_id));
                break;
            }
            // A fast failure (no provider, refused) is retried after the attempt's timeout
            // would have run out, not in a tight loop.
            Ok(None) => {
                sleep_until(deadline.min(Instant::now() + Duration::from_millis(100))).await
            }
            Err(_) => {}
        }
    }
    let mut rec = RequestRecord {
        id,
        at_s: ((t0 - sim.start).as_secs_f64() * 1e6).round() / 1e6,
        client: p.client,
        service: p.service,
        outcome: Outcome::Failed,
        attempts,
        server: None,
        first_byte: None,
        path_rtt: None,
        cold: false,
        served: None,
        through_cut: false,
        rerouted: false,
        first_try: route.first_try,
        first_try_relays: route.first_try_relays.clone(),
        relays: route.relays.clone(),
        overlay_attempts: route.attempts,
    };

    if let Some((at, wire_id)) = answer {
        let server = lock(&sim.backends.served).remove(&wire_id);
        rec.outcome = if attempts > 1 {
            Outcome::Retried
        } else {
            Outcome::Ok
        };
        rec.rerouted = attempts > 1;
        rec.first_byte = Some(at - t0);
        rec.server = server;
        rec.path_rtt = server.map(|s| sim.net.rtt(p.client, s));
        rec.through_cut = server.is_some_and(|s| sim.net.is_cut(s, p.client));
        rec.cold = served == Some(Served::Cold);
        rec.served = served;
    }
    lock(&sim.records).push(rec);
}

/// What the router did with a request (`routed` mode), as peer indices.
#[derive(Debug, Default)]
struct RouteInfo {
    first_try: Option<usize>,
    first_try_relays: Vec<usize>,
    relays: Vec<usize>,
    attempts: u32,
}

/// A `routed` attempt: the overlay's exchange (instance and path choice, retries before the
/// first byte).
async fn routed_once(
    sim: &Sim,
    node: &Node,
    service: &str,
    req: &[u8],
    route: &mut RouteInfo,
) -> Option<Instant> {
    let idx = |ids: &[overlay::identity::NodeId]| -> Vec<usize> {
        ids.iter()
            .filter_map(|i| sim.index_of.get(i).copied())
            .collect()
    };
    let (res, attempts) = match node.exchange(service, req, true).await {
        Ok(ex) => {
            let a = ex.attempts.clone();
            (Some(ex), a)
        }
        Err(e) => (None, e.attempts),
    };
    if route.first_try.is_none() {
        if let Some(a) = attempts.first() {
            route.first_try = sim.index_of.get(&a.provider).copied();
            route.first_try_relays = idx(&a.relays);
        }
    }
    route.attempts += attempts.len() as u32;
    let ex = res?;
    let at = Instant::now();
    if let Some(a) = ex.attempts.last() {
        route.relays = idx(&a.relays);
    }
    let mut io = ex.io;
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = io.read_to_end(&mut sink).await;
    });
    Some(at)
}

/// One attempt: open the stream, send the request, wait for the first response byte, then
/// read the rest. Returns when the first byte arrived, or None on failure.
#[allow(clippy::too_many_arguments)]
async fn attempt_once(
    sim: &Sim,
    node: &Node,
    app: &str,
    service: &str,
    wire_id: u64,
    served: &mut Option<Served>,
    hint: Option<Vec<usize>>,
    route: &mut RouteInfo,
) -> Option<Instant> {
    if sim.mode == Mode::Routed {
        let mut req = vec![0u8; sim.sc.services.request_bytes];
        req[..8].copy_from_slice(&wire_id.to_be_bytes());
        return routed_once(sim, node, service, &req, route).await;
    }
    let stream = sim.mode.open(node, app, service).await.ok()?;
    *served = Some(stream.served);
    if let Some(hint) = hint.filter(|_| sim.mode.wants_hints()) {
        let names = hint.iter().map(|&s| sim.services[s].clone()).collect();
        node.preauth_hint(app, names);
    }
    let (mut send, mut recv, lease) = (stream.send, stream.recv, stream.lease);
    let mut req = vec![0u8; sim.sc.services.request_bytes];
    req[..8].copy_from_slice(&wire_id.to_be_bytes());
    send.write_all(&req).await.ok()?;
    send.finish().ok()?;
    let mut first = [0u8; 1];
    let at = match recv.read(&mut first).await {
        Ok(Some(n)) if n > 0 => Instant::now(),
        _ => return None,
    };
    // The rest of the response is read off the measured path.
    tokio::spawn(async move {
        let _ = recv.read_to_end(16 << 20).await;
        drop(send);
        drop(lease);
    });
    Some(at)
}
