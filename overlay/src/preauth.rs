//! Predictive pre-authentication: which services to keep warm for each local client, sans-IO.
//!
//! The [`Engine`] is told about every request a local client makes
//! ([`Engine::handle_request`]) and how it was served ([`Engine::handle_served`]); it learns the
//! client's habits with the shipped [`predictor::Predictor`] and keeps, per client, a *warm set*
//! of at most `budget` services, each prepared at one [`Level`]:
//!
//! - [`Level::Token`]: only the service token is held (refreshed before it expires);
//! - [`Level::Ticket`]: nothing is held but a 0-RTT resumption ticket for the provider;
//! - [`Level::Connection`]: an established QUIC connection to the provider is kept;
//! - [`Level::Stream`]: a stream is opened ahead, header sent, the provider's backend dialled.
//!
//! The level of each candidate is chosen by expected benefit against cost: a warm entry saves
//! `p × rounds × rtt` (p: probability of use within the horizon, rounds: round trips the level
//! saves, rtt: the measured path RTT) and costs a configured price per level, scaled by an
//! adaptive factor per client that rises while entries are wasted and falls while requests miss.
//! Providers that refuse speculative work (shed it under load) are backed off exponentially, and
//! speculative handshakes are capped per second by a token bucket.
//!
//! What it wants done is drained with [`Engine::poll_action`] ([`Action::Warm`],
//! [`Action::Cool`]); its next deadline is [`Engine::poll_timeout`]. It does no I/O and reads no
//! clock: every call takes `now`. The driver (`node/preauth.rs`) owns connections, streams and
//! tokens, and decides nothing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use predictor::{Predictor, PredictorConfig};
use serde::Serialize;
use tokio::time::Instant;

use crate::identity::NodeId;

/// How the warm set is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Policy {
    /// Nothing is kept warm: every request takes the standard (cold) path.
    Off,
    /// The `budget` most recently used services of each client (a connection pool of that size).
    Recent,
    /// The services the predictor expects within the horizon, worth their cost.
    Predictive,
    /// The set given by [`Engine::set_hint`] (used by the simulator's oracle).
    Hinted,
}

/// How deep a warm entry is prepared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// The service token is held.
    Token,
    /// A 0-RTT resumption ticket for the provider is held.
    Ticket,
    /// A QUIC connection to the provider is open.
    Connection,
    /// A stream is open, header sent, backend dialled.
    Stream,
}

/// How a request was actually served (reported by the driver).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Served {
    /// Took a pre-opened stream.
    Stream,
    /// Used a warm connection.
    Connection,
    /// Dialled with a 0-RTT resumption ticket (request in the first flight).
    Ticket,
    /// Full handshake (and token fetch, if the service needs one).
    Cold,
}

/// Settings of the engine. Defaults suit a host with a few dozen local clients.
#[derive(Clone, Debug)]
pub struct PreauthConfig {
    /// How the warm set is chosen. Default [`Policy::Predictive`].
    pub policy: Policy,
    /// Most warm services per client (B). Default 3.
    pub budget: usize,
    /// Most warm connections this peer keeps for all clients together. Default 64 (~80 KiB each).
    pub max_warm_connections: usize,
    /// Most pre-opened streams for all clients together. Default 32.
    pub max_preopened_streams: usize,
    /// Speculative handshakes per second (token bucket rate; the burst is `budget` × 2). Default 20.
    pub speculative_handshakes_per_s: f64,
    /// Speculative handshakes per second for any one client (burst `budget`). Default 5.
    pub speculative_handshakes_per_client_per_s: f64,
    /// Horizon over which the predictor ranks services. Default 2 s.
    pub horizon: Duration,
    /// An unused entry is dropped after this long. Default 30 s.
    pub entry_ttl: Duration,
    /// A pre-opened stream unused this long is closed (and the far backend released). Default 5 s.
    pub stream_deadline: Duration,
    /// What one handshake costs, ms: its CPU on both peers (FACTS: ~0.75 ms here). A warm
    /// connection saves it when used, and wastes it when not. Default 0.75.
    pub handshake_cost_ms: f64,
    /// Cost of holding a warm connection until it is used or dropped (memory, keep-alives),
    /// in ms-equivalents. Default 0.05.
    pub hold_cost_ms: f64,
    /// What a pre-opened stream saves beyond a warm connection when used (the far peer's
    /// backend dial and stream set-up), ms. Default 0.3.
    pub stream_gain_ms: f64,
    /// Cost of holding a pre-opened stream (a backend connection held on the far peer), ms.
    /// Default 0.1.
    pub stream_cost_ms: f64,
    /// RTT assumed for a path never measured. Default 20 ms.
    pub default_rtt: Duration,
    /// Most local clients profiled; the least recently seen is forgotten. Default 1024.
    pub max_clients: usize,
    /// Use 0-RTT resumption for idempotent services. Default true.
    pub zero_rtt: bool,
    /// Keep service tokens between requests (until 80% of their lifetime). Default true;
    /// false fetches one per request (the simulator's no-caching baseline).
    pub cache_tokens: bool,
    /// The predictor's settings.
    pub predictor: PredictorConfig,
}

impl Default for PreauthConfig {
    fn default() -> Self {
        Self {
            policy: Policy::Predictive,
            budget: 3,
            max_warm_connections: 64,
            max_preopened_streams: 32,
            speculative_handshakes_per_s: 20.0,
            speculative_handshakes_per_client_per_s: 5.0,
            horizon: Duration::from_secs(2),
            entry_ttl: Duration::from_secs(30),
            stream_deadline: Duration::from_secs(5),
            handshake_cost_ms: 0.75,
            hold_cost_ms: 0.05,
            stream_gain_ms: 0.3,
            stream_cost_ms: 0.1,
            default_rtt: Duration::from_millis(20),
            max_clients: 1024,
            zero_rtt: true,
            cache_tokens: true,
            predictor: PredictorConfig::default(),
        }
    }
}

/// What the engine wants the driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Prepare `service` for `client` at `level` (or change the level of a prepared entry).
    Warm {
        /// The local client.
        client: String,
        /// The service.
        service: String,
        /// How deep.
        level: Level,
    },
    /// Release what was prepared for (`client`, `service`).
    Cool {
        /// The local client.
        client: String,
        /// The service.
        service: String,
    },
}

/// One warm entry, as shown by `GET /v1/preauth`.
#[derive(Clone, Debug, Serialize)]
pub struct WarmView {
    /// The service.
    pub service: String,
    /// Level prepared.
    pub level: Level,
    /// Probability of use within the horizon when it was (re)chosen.
    pub probability: f64,
    /// Expected time until use, ms, when it was (re)chosen.
    pub expected_in_ms: u64,
    /// Milliseconds until it is dropped if unused.
    pub expires_in_ms: u64,
}

/// Counters of the engine, per level where it matters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PreauthStats {
    /// Requests seen.
    pub requests: u64,
    /// Predictions issued (entries chosen, counting re-choices).
    pub predictions: u64,
    /// Requests served by a pre-opened stream.
    pub hits_stream: u64,
    /// Requests served by a warm connection.
    pub hits_connection: u64,
    /// Requests served by 0-RTT resumption.
    pub hits_ticket: u64,
    /// Requests that took the cold path.
    pub misses: u64,
    /// Entries prepared.
    pub prepared: u64,
    /// Entries dropped without having been used.
    pub wasted: u64,
    /// Speculative handshakes allowed by the bucket.
    pub speculative_handshakes: u64,
    /// Speculative handshakes refused by the bucket or a backed-off peer.
    pub speculative_denied: u64,
    /// Refusals of speculative work by providers.
    pub refusals: u64,
}

#[derive(Clone, Debug)]
struct Entry {
    level: Level,
    probability: f64,
    expected_in_ms: u64,
    expires: Instant,
    /// Used at least once since it was prepared (else dropping it is waste).
    used: bool,
    /// Used since the driver last prepared it (a pre-opened stream must be opened again).
    rearm: bool,
}

#[derive(Debug)]
struct Client {
    warm: BTreeMap<String, Entry>,
    /// Distinct services, most recent first (for [`Policy::Recent`]).
    recent: VecDeque<String>,
    hint: Vec<String>,
    /// This client's speculative-handshake bucket: tokens and when it was last filled.
    bucket: (f64, Instant),
    /// Multiplies every cost: > 1 while entries are wasted, < 1 while requests miss.
    scale: f64,
    last_seen: Instant,
}

#[derive(Debug, Default)]
struct Peer {
    shed_until: Option<Instant>,
    backoff: Duration,
}

/// The pre-authentication engine of one peer (see the module docs).
#[derive(Debug)]
pub struct Engine {
    cfg: PreauthConfig,
    predictor: Predictor,
    epoch: Instant,
    clients: HashMap<String, Client>,
    rtt: HashMap<String, Duration>,
    token_services: std::collections::HashSet<String>,
    peers: HashMap<NodeId, Peer>,
    bucket: f64,
    bucket_at: Instant,
    actions: VecDeque<Action>,
    stats: PreauthStats,
    /// Entries at connection level or deeper, over all clients (kept, not scanned).
    deep: usize,
    /// Entries at stream level, over all clients.
    streams: usize,
}

/// (entries at connection level or deeper, entries at stream level) of one warm set.
fn depth(warm: &BTreeMap<String, Entry>) -> (usize, usize) {
    warm.values().fold((0, 0), |(d, s), e| {
        (
            d + usize::from(e.level >= Level::Connection),
            s + usize::from(e.level == Level::Stream),
        )
    })
}

const MIN_SCALE: f64 = 0.25;
const MAX_SCALE: f64 = 8.0;

impl Engine {
    /// A new engine; `now` anchors the predictor's millisecond clock.
    pub fn new(cfg: PreauthConfig, now: Instant) -> Self {
        Self {
            predictor: Predictor::new(cfg.predictor.clone()),
            epoch: now,
            clients: HashMap::new(),
            rtt: HashMap::new(),
            token_services: Default::default(),
            peers: HashMap::new(),
            bucket: (cfg.budget * 2).max(1) as f64,
            bucket_at: now,
            actions: VecDeque::new(),
            stats: PreauthStats::default(),
            deep: 0,
            streams: 0,
            cfg,
        }
    }

    /// The settings.
    pub fn config(&self) -> &PreauthConfig {
        &self.cfg
    }

    /// Counters.
    pub fn stats(&self) -> PreauthStats {
        self.stats
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Marks `service` as needing a token (a warm entry then saves one more round trip).
    pub fn set_needs_token(&mut self, service: &str, needs: bool) {
        if needs {
            self.token_services.insert(service.to_owned());
        } else {
            self.token_services.remove(service);
        }
    }

    /// Records the measured RTT of the path to `service`'s chosen provider.
    pub fn handle_rtt(&mut self, service: &str, rtt: Duration) {
        if self.rtt.len() >= 4096 && !self.rtt.contains_key(service) {
            return; // bounded: unmeasured services use the default
        }
        let e = self.rtt.entry(service.to_owned()).or_insert(rtt);
        // EWMA, 1/4 weight to the new sample.
        *e = (*e * 3 + rtt) / 4;
    }

    /// The oracle's warm set for `client` (only used with [`Policy::Hinted`]).
    pub fn set_hint(&mut self, now: Instant, client: &str, services: Vec<String>) {
        self.client_mut(now, client).hint = services;
        self.replan(now, client);
    }

    /// A local client asks for `service` now. Returns the level prepared for it, if any (the
    /// driver looks for that path first). Plans the client's next warm set.
    pub fn handle_request(&mut self, now: Instant, client: &str, service: &str) -> Option<Level> {
        self.stats.requests += 1;
        let at = self.ms(now);
        if self.cfg.policy == Policy::Predictive {
            self.predictor.observe_named(client, service, at);
        }
        let c = self.client_mut(now, client);
        c.last_seen = now;
        if let Some(i) = c.recent.iter().position(|s| s == service) {
            c.recent.remove(i);
        }
        c.recent.push_front(service.to_owned());
        c.recent.truncate(64);
        let level = c.warm.get_mut(service).map(|e| {
            e.used = true;
            e.rearm = true;
            e.level
        });
        self.replan(now, client);
        level
    }

    /// How the last request of `client` for `service` was served.
    pub fn handle_served(&mut self, client: &str, service: &str, served: Served) {
        match served {
            Served::Stream => self.stats.hits_stream += 1,
            Served::Connection => self.stats.hits_connection += 1,
            Served::Ticket => self.stats.hits_ticket += 1,
            Served::Cold => self.stats.misses += 1,
        }
        let budget = self.cfg.budget;
        if let Some(c) = self.clients.get_mut(client) {
            if served == Served::Cold && c.warm.len() < budget.max(1) {
                // A miss with room in the budget: spend more.
                c.scale = (c.scale * 0.8).max(MIN_SCALE);
            }
            let _ = service;
        }
    }

    /// A provider refused speculative work (it sheds load): back off from it.
    pub fn handle_refused(&mut self, now: Instant, peer: NodeId) {
        self.stats.refusals += 1;
        let p = self.peers.entry(peer).or_default();
        p.backoff = (p.backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
        p.shed_until = Some(now + p.backoff);
    }

    /// Whether a speculative handshake to `peer` for `client` may start now: the peer is not
    /// backed off, and both the peer-wide and the client's buckets have a token (taken).
    pub fn try_speculate(&mut self, now: Instant, peer: NodeId, client: &str) -> bool {
        if self
            .peers
            .get(&peer)
            .and_then(|p| p.shed_until)
            .is_some_and(|t| now < t)
        {
            self.stats.speculative_denied += 1;
            return false;
        }
        let burst = (self.cfg.budget * 2).max(1) as f64;
        let dt = now.saturating_duration_since(self.bucket_at).as_secs_f64();
        self.bucket = (self.bucket + dt * self.cfg.speculative_handshakes_per_s).min(burst);
        self.bucket_at = now;
        let client_rate = self.cfg.speculative_handshakes_per_client_per_s;
        let client_burst = self.cfg.budget.max(1) as f64;
        let client_ok = match self.clients.get_mut(client) {
            Some(c) => {
                let dt = now.saturating_duration_since(c.bucket.1).as_secs_f64();
                c.bucket = ((c.bucket.0 + dt * client_rate).min(client_burst), now);
                c.bucket.0 >= 1.0
            }
            None => true,
        };
        if self.bucket >= 1.0 && client_ok {
            self.bucket -= 1.0;
            if let Some(c) = self.clients.get_mut(client) {
                c.bucket.0 -= 1.0;
            }
            self.stats.speculative_handshakes += 1;
            true
        } else {
            self.stats.speculative_denied += 1;
            false
        }
    }

    /// Drops entries that outlived their TTL and clients not seen for long.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut expired = Vec::new();
        for (name, c) in &self.clients {
            for (s, e) in &c.warm {
                if e.expires <= now {
                    expired.push((name.clone(), s.clone()));
                }
            }
        }
        for (client, service) in expired {
            self.cool(&client, &service);
        }
    }

    /// The next time [`Engine::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.clients
            .values()
            .flat_map(|c| c.warm.values().map(|e| e.expires))
            .min()
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The warm set of every client, sorted, for `GET /v1/preauth`.
    pub fn view(&self, now: Instant) -> BTreeMap<String, Vec<WarmView>> {
        self.clients
            .iter()
            .map(|(name, c)| {
                let v = c
                    .warm
                    .iter()
                    .map(|(s, e)| WarmView {
                        service: s.clone(),
                        level: e.level,
                        probability: (e.probability * 1000.0).round() / 1000.0,
                        expected_in_ms: e.expected_in_ms,
                        expires_in_ms: e.expires.saturating_duration_since(now).as_millis() as u64,
                    })
                    .collect();
                (name.clone(), v)
            })
            .collect()
    }

    /// Entries currently warm at `level` or deeper, over all clients.
    pub fn warm_count(&self, level: Level) -> usize {
        self.clients
            .values()
            .flat_map(|c| c.warm.values())
            .filter(|e| e.level >= level)
            .count()
    }

    fn client_mut(&mut self, now: Instant, client: &str) -> &mut Client {
        if !self.clients.contains_key(client) && self.clients.len() >= self.cfg.max_clients {
            // Forget the least recently seen client (ties: smallest name, for determinism).
            let victim = self
                .clients
                .iter()
                .min_by(|a, b| (a.1.last_seen, a.0).cmp(&(b.1.last_seen, b.0)))
                .map(|(k, _)| k.clone());
            if let Some(v) = victim {
                let services: Vec<String> = self
                    .clients
                    .get(&v)
                    .map(|c| c.warm.keys().cloned().collect())
                    .unwrap_or_default();
                for s in services {
                    self.cool(&v, &s);
                }
                self.clients.remove(&v);
            }
        }
        self.clients
            .entry(client.to_owned())
            .or_insert_with(|| Client {
                warm: BTreeMap::new(),
                recent: VecDeque::new(),
                hint: Vec::new(),
                bucket: ((self.cfg.budget.max(1)) as f64, now),
                scale: 1.0,
                last_seen: now,
            })
    }

    fn cool(&mut self, client: &str, service: &str) {
        let Some(c) = self.clients.get_mut(client) else {
            return;
        };
        if let Some(e) = c.warm.remove(service) {
            if e.level >= Level::Connection {
                self.deep = self.deep.saturating_sub(1);
            }
            if e.level == Level::Stream {
                self.streams = self.streams.saturating_sub(1);
            }
            if !e.used {
                self.stats.wasted += 1;
                c.scale = (c.scale * 1.25).min(MAX_SCALE);
            }
            self.actions.push_back(Action::Cool {
                client: client.to_owned(),
                service: service.to_owned(),
            });
        }
    }

    /// Candidates `(service, probability, expected_in_ms)`, best first.
    fn candidates(&mut self, now: Instant, client: &str) -> Vec<(String, f64, u64)> {
        let k = self.cfg.budget;
        if k == 0 {
            return Vec::new();
        }
        match self.cfg.policy {
            Policy::Off => Vec::new(),
            Policy::Recent => self
                .clients
                .get(client)
                .map(|c| {
                    c.recent
                        .iter()
                        .take(k)
                        .map(|s| (s.clone(), 1.0, 0))
                        .collect()
                })
                .unwrap_or_default(),
            Policy::Hinted => self
                .clients
                .get(client)
                .map(|c| c.hint.iter().take(k).map(|s| (s.clone(), 1.0, 0)).collect())
                .unwrap_or_default(),
            Policy::Predictive => {
                // The next requests first (the warm set is re-planned at every request), then
                // what is expected within the horizon (periodic services, longer gaps).
                let at = self.ms(now);
                let horizon = self.cfg.horizon.as_millis() as u64;
                let mut c = self.predictor.predict_named(client, at, k);
                for w in self.predictor.predict_within_named(client, at, horizon, k) {
                    if !c.iter().any(|x| x.0 == w.0) {
                        c.push(w);
                    }
                }
                c
            }
        }
    }

    /// The level worth preparing for a candidate, if any.
    fn level_for(&self, scale: f64, service: &str, p: f64, expected_in_ms: u64) -> Option<Level> {
        match self.cfg.policy {
            Policy::Recent => return Some(Level::Connection),
            Policy::Hinted => return Some(Level::Stream),
            Policy::Off | Policy::Predictive => {}
        }
        let rtt = self
            .rtt
            .get(service)
            .copied()
            .unwrap_or(self.cfg.default_rtt)
            .as_secs_f64()
            * 1000.0;
        // Expected gain against expected cost, in ms. A warm connection saves, when used, the
        // handshake's round trip (and the token's, for a service that needs one) and its CPU;
        // unused, its handshake was wasted and it was held for nothing.
        let needs_token = self.token_services.contains(service);
        let rounds = if needs_token { 2.0 } else { 1.0 };
        let hs = self.cfg.handshake_cost_ms;
        let gain = p * (rounds * rtt + hs);
        let cost = ((1.0 - p) * hs + self.cfg.hold_cost_ms) * scale;
        let soon = expected_in_ms <= self.cfg.stream_deadline.as_millis() as u64;
        let stream_pays =
            p * self.cfg.stream_gain_ms >= (1.0 - p) * self.cfg.stream_cost_ms * scale;
        if gain >= cost && soon && p >= 0.5 && stream_pays {
            Some(Level::Stream)
        } else if gain >= cost {
            Some(Level::Connection)
        } else if needs_token && p * rtt >= self.cfg.hold_cost_ms * scale {
            // A token costs the issuer one signature and nothing to hold.
            Some(Level::Token)
        } else if self.cfg.zero_rtt && p > 0.0 {
            // A ticket costs nothing to hold (the session cache keeps it anyway).
            Some(Level::Ticket)
        } else {
            None
        }
    }

    fn replan(&mut self, now: Instant, client: &str) {
        let cands = self.candidates(now, client);
        let scale = self.clients.get(client).map_or(1.0, |c| c.scale);
        let mut want: Vec<(String, Level, f64, u64)> = Vec::new();
        for (s, p, t) in cands {
            if want.len() >= self.cfg.budget {
                break;
            }
            if let Some(level) = self.level_for(scale, &s, p, t) {
                want.push((s, level, p, t));
            }
        }
        // Global caps: demote what does not fit. This client's own entries are re-decided
        // here, so only the others' count against the caps.
        let Some(c) = self.clients.get(client) else {
            return;
        };
        let (mine_deep, mine_streams) = depth(&c.warm);
        let other_deep = self.deep.saturating_sub(mine_deep);
        let other_streams = self.streams.saturating_sub(mine_streams);
        let mut conns = other_deep;
        let mut streams = other_streams;
        for w in &mut want {
            if w.1 == Level::Stream {
                if streams >= self.cfg.max_preopened_streams {
                    w.1 = Level::Connection;
                } else {
                    streams += 1;
                }
            }
            if w.1 >= Level::Connection {
                if conns >= self.cfg.max_warm_connections {
                    w.1 = Level::Ticket;
                } else {
                    conns += 1;
                }
            }
        }
        let drop: Vec<String> = c
            .warm
            .keys()
            .filter(|s| !want.iter().any(|w| &w.0 == *s))
            .cloned()
            .collect();
        for s in drop {
            self.cool(client, &s);
        }
        let ttl = self.cfg.entry_ttl;
        let mut new_actions = Vec::new();
        if let Some(c) = self.clients.get_mut(client) {
            for (s, level, p, t) in want {
                self.stats.predictions += 1;
                match c.warm.get_mut(&s) {
                    Some(e) => {
                        let changed = e.level != level;
                        e.level = level;
                        e.probability = p;
                        e.expected_in_ms = t;
                        e.expires = now + ttl;
                        if changed || e.rearm {
                            // A used stream must be opened again; a new level prepared.
                            e.rearm = false;
                            new_actions.push(Action::Warm {
                                client: client.to_owned(),
                                service: s,
                                level,
                            });
                        }
                    }
                    None => {
                        self.stats.prepared += 1;
                        c.warm.insert(
                            s.clone(),
                            Entry {
                                level,
                                probability: p,
                                expected_in_ms: t,
                                expires: now + ttl,
                                used: false,
                                rearm: false,
                            },
                        );
                        new_actions.push(Action::Warm {
                            client: client.to_owned(),
                            service: s,
                            level,
                        });
                    }
                }
            }
        }
        if let Some(c) = self.clients.get(client) {
            let (d, s) = depth(&c.warm);
            self.deep = other_deep + d;
            self.streams = other_streams + s;
        }
        self.actions.extend(new_actions);
    }
}

/// Request ids already executed from 0-RTT data, per peer, for a bounded window: a replayed
/// early request (or the client's 1-RTT retry of a request an attacker replayed first) is
/// refused instead of executed twice. Sans-IO: `now` is passed in.
#[derive(Debug)]
pub struct ReplayWindow {
    seen: HashMap<(NodeId, u64), Instant>,
    order: VecDeque<(Instant, NodeId, u64)>,
    window: Duration,
    cap: usize,
}

impl ReplayWindow {
    /// Remembers ids for `window` (at least as long as a ticket lives), at most `cap` of them.
    pub fn new(window: Duration, cap: usize) -> Self {
        Self {
            seen: HashMap::new(),
            order: VecDeque::new(),
            window,
            cap: cap.max(1),
        }
    }

    /// Whether `(peer, id)` is new; records it when `record` (the request rode in 0-RTT).
    pub fn check(&mut self, now: Instant, peer: NodeId, id: u64, record: bool) -> bool {
        while let Some(&(t, p, i)) = self.order.front() {
            if now.saturating_duration_since(t) < self.window && self.order.len() < self.cap {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&(p, i)) == Some(&t) {
                self.seen.remove(&(p, i));
            }
        }
        if self.seen.contains_key(&(peer, id)) {
            return false;
        }
        if record {
            self.seen.insert((peer, id), now);
            self.order.push_back((now, peer, id));
        }
        true
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(policy: Policy, budget: usize) -> (Engine, Instant) {
        let now = Instant::now();
        let cfg = PreauthConfig {
            policy,
            budget,
            ..PreauthConfig::default()
        };
        (Engine::new(cfg, now), now)
    }

    fn drain(e: &mut Engine) -> Vec<Action> {
        std::iter::from_fn(|| e.poll_action()).collect()
    }

    #[test]
    fn off_never_warms() {
        let (mut e, now) = engine(Policy::Off, 3);
        for i in 0..50 {
            e.handle_request(now + Duration::from_millis(i * 10), "app", "a");
        }
        assert!(drain(&mut e).is_empty());
        assert_eq!(e.warm_count(Level::Token), 0);
    }

    #[test]
    fn recent_keeps_the_last_b_services() {
        let (mut e, now) = engine(Policy::Recent, 2);
        e.handle_request(now, "app", "a");
        e.handle_request(now, "app", "b");
        e.handle_request(now, "app", "c");
        let view = e.view(now);
        let names: Vec<&str> = view["app"].iter().map(|w| w.service.as_str()).collect();
        assert_eq!(names, ["b", "c"]);
        let acts = drain(&mut e);
        assert!(acts.contains(&Action::Cool {
            client: "app".into(),
            service: "a".into()
        }));
        // "a" was prepared and dropped unused.
        assert_eq!(e.stats().wasted, 1);
    }

    #[test]
    fn predictive_learns_a_cycle_and_hits() {
        let (mut e, now) = engine(Policy::Predictive, 2);
        let seq = ["login", "cart", "pay"];
        let mut hits = 0;
        for i in 0..300u64 {
            let s = seq[(i % 3) as usize];
            let t = now + Duration::from_millis(i * 20);
            if e.handle_request(t, "web", s).is_some() {
                hits += 1;
            }
        }
        // After a short warm-up every request finds its service warm.
        assert!(hits > 280, "hits {hits}");
        assert!(e.stats().predictions > 0);
    }

    #[test]
    fn budget_holds_under_a_client_that_asks_for_everything() {
        let (mut e, now) = engine(Policy::Predictive, 3);
        for i in 0..2000u64 {
            let s = format!("svc{}", i % 97);
            e.handle_request(now + Duration::from_millis(i), "greedy", &s);
            assert!(e.view(now).get("greedy").map_or(0, |v| v.len()) <= 3);
        }
    }

    #[test]
    fn global_caps_demote_to_cheaper_levels() {
        let now = Instant::now();
        let cfg = PreauthConfig {
            policy: Policy::Recent,
            budget: 4,
            max_warm_connections: 5,
            ..PreauthConfig::default()
        };
        let mut e = Engine::new(cfg, now);
        for c in 0..4 {
            for s in 0..4 {
                e.handle_request(now, &format!("c{c}"), &format!("s{s}"));
            }
        }
        assert!(e.warm_count(Level::Connection) <= 5);
    }

    #[test]
    fn refusals_back_off_and_bucket_caps_speculation() {
        let (mut e, now) = engine(Policy::Predictive, 1);
        let peer = NodeId::from_spki(b"peer");
        // Burst of 2, then 20/s.
        assert!(e.try_speculate(now, peer, "a"));
        assert!(e.try_speculate(now, peer, "b"));
        assert!(!e.try_speculate(now, peer, "c"));
        assert!(e.try_speculate(now + Duration::from_millis(60), peer, "d"));
        e.handle_refused(now, peer);
        assert!(!e.try_speculate(now + Duration::from_millis(500), peer, "e"));
        assert!(e.try_speculate(now + Duration::from_secs(2), peer, "f"));
    }

    #[test]
    fn one_client_cannot_spend_the_whole_speculation_budget() {
        let now = Instant::now();
        let cfg = PreauthConfig {
            policy: Policy::Recent,
            budget: 2,
            speculative_handshakes_per_s: 1000.0,
            speculative_handshakes_per_client_per_s: 1.0,
            ..PreauthConfig::default()
        };
        let mut e = Engine::new(cfg, now);
        e.handle_request(now, "greedy", "s");
        e.handle_request(now, "calm", "s");
        let peer = NodeId::from_spki(b"p");
        let t = now + Duration::from_millis(10);
        // The client's burst is its budget (2), then 1/s.
        assert!(e.try_speculate(t, peer, "greedy"));
        assert!(e.try_speculate(t, peer, "greedy"));
        assert!(!e.try_speculate(t, peer, "greedy"));
        assert!(
            e.try_speculate(t, peer, "calm"),
            "other clients keep theirs"
        );
        assert!(e.try_speculate(t + Duration::from_secs(1), peer, "greedy"));
    }

    #[test]
    fn unused_entries_expire_and_count_as_waste() {
        let (mut e, now) = engine(Policy::Recent, 2);
        e.handle_request(now, "app", "a");
        drain(&mut e);
        let t = e.poll_timeout().expect("an entry is warm");
        e.handle_timeout(t);
        assert_eq!(
            drain(&mut e),
            vec![Action::Cool {
                client: "app".into(),
                service: "a".into()
            }]
        );
        // Prepared after the request that chose it, and never used since.
        assert_eq!(e.stats().wasted, 1);
    }

    #[test]
    fn long_links_are_worth_more() {
        let (mut e, _) = engine(Policy::Predictive, 3);
        e.handle_rtt("far", Duration::from_millis(200));
        e.handle_rtt("near", Duration::from_millis(1));
        assert_eq!(
            e.level_for(1.0, "far", 0.1, 10_000),
            Some(Level::Connection)
        );
        assert_eq!(e.level_for(1.0, "near", 0.1, 10_000), Some(Level::Ticket));
        // Wasted entries make the client's warm-ups dearer.
        assert_eq!(e.level_for(8.0, "far", 0.02, 10_000), Some(Level::Ticket));
        // Likely and soon: a pre-opened stream.
        assert_eq!(e.level_for(1.0, "near", 0.9, 10), Some(Level::Stream));
    }

    #[test]
    fn replay_window_refuses_a_second_execution_and_stays_bounded() {
        let now = Instant::now();
        let a = NodeId::from_spki(b"a");
        let b = NodeId::from_spki(b"b");
        let mut w = ReplayWindow::new(Duration::from_secs(10), 100);
        assert!(w.check(now, a, 1, true));
        assert!(
            !w.check(now, a, 1, false),
            "a 1-RTT retry of an executed 0-RTT id"
        );
        assert!(!w.check(now, a, 1, true));
        assert!(w.check(now, b, 1, true), "ids are per peer");
        assert!(w.check(now, a, 2, false));
        assert!(
            w.check(now, a, 2, false),
            "ids not from 0-RTT are not remembered"
        );
        assert!(
            w.check(now + Duration::from_secs(11), a, 1, false),
            "window passed"
        );
        for i in 0..1000 {
            w.check(now + Duration::from_secs(20), a, 100 + i, true);
        }
        assert!(w.len() <= 100);
    }

    #[test]
    fn kept_depth_counters_match_a_scan() {
        let now = Instant::now();
        let cfg = PreauthConfig {
            policy: Policy::Predictive,
            budget: 3,
            max_warm_connections: 7,
            max_preopened_streams: 3,
            handshake_cost_ms: 0.0,
            hold_cost_ms: 0.0,
            ..PreauthConfig::default()
        };
        let mut e = Engine::new(cfg, now);
        for i in 0..3000u64 {
            let t = now + Duration::from_millis(i * 3);
            e.handle_request(t, &format!("c{}", i % 11), &format!("s{}", (i * 7) % 13));
            if i % 500 == 0 {
                e.handle_timeout(t + Duration::from_secs(31));
            }
            assert_eq!(e.deep, e.warm_count(Level::Connection), "at {i}");
            assert_eq!(e.streams, e.warm_count(Level::Stream), "at {i}");
            assert!(e.deep <= 7 && e.streams <= 3);
        }
    }

    #[test]
    fn client_count_is_bounded() {
        let now = Instant::now();
        let cfg = PreauthConfig {
            policy: Policy::Recent,
            max_clients: 10,
            ..PreauthConfig::default()
        };
        let mut e = Engine::new(cfg, now);
        for i in 0..1000u64 {
            e.handle_request(now + Duration::from_millis(i), &format!("c{i}"), "s");
        }
        assert!(e.view(now).len() <= 10);
    }
}
