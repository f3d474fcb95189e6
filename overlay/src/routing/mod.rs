//! Routing on a measured graph: which instance of a service, and which path (direct or through
//! relays) to reach it. No I/O, no clock: the driver (`node/routing.rs`) feeds measurements and
//! membership and asks for decisions, passing tokio's `Instant`.
//!
//! * **Measurements.** Own links: RTT and loss from probes (and QUIC's path statistics, when a
//!   connection is open), with a liveness verdict: `probe_misses` probes in a row unanswered
//!   mark the link down. Other peers' links come from their signed [`RouteSummary`]s; a link
//!   is expressed only by its ends, and when both ends report it the worse report counts (a
//!   liar can make a link of its own look bad, never better than its other end says).
//! * **Coordinates.** Vivaldi ([`vivaldi`]) estimates RTT to members never measured, so a
//!   never-contacted instance still gets a cost.
//! * **Graph.** `petgraph`'s compressed sparse row graph (`Csr`) holds peers and links; costs are `rtt · (1 + loss_weight · loss)`
//!   plus, for a relay, a fixed hop cost and its load. Paths are searched with at most
//!   `max_relays` relays (a hop-bounded relaxation over the graph's edges, since Dijkstra
//!   cannot bound hops) and cached until the graph changes.
//! * **Choice.** Instances: power of two choices over a peak-EWMA score in the spirit of
//!   linkerd2-proxy (`(path cost + service time) · (outstanding + 1)`), a penalty for peers whose
//!   direct link is down, and a ramp for recovered peers. Paths: hysteresis — the current path
//!   is kept until another is better by `switch_ratio` and `switch_min_ms` both, or breaks.

pub mod summary;
pub mod vivaldi;

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Duration;

use petgraph::csr::Csr;
use petgraph::graph::NodeIndex;
use petgraph::visit::EdgeRef;
use serde::Serialize;
use tokio::time::Instant;

use crate::identity::{NodeId, NodeIdStr};
use crate::wire::{CatalogVersion, LinkReport, LoadReport, RouteSummary, MAX_ROUTE_LINKS};
use vivaldi::{Coord, VivaldiConfig};

/// Node ids are SHA-256 prefixes, uniformly random and not choosable (finding two keys whose
/// ids collide in 64 bits costs ~2^32 key generations per collision, for one bucket): a
/// multiply-fold of their bytes is a sound, much cheaper hash than SipHash for the router's
/// maps, which the graph build hits ~20 times per link.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w))
                .wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_usize(&mut self, _: usize) {}
    fn finish(&self) -> u64 {
        self.0
    }
}

/// Longest a measured RTT change waits before the path tree is rebuilt (structural changes —
/// a link or member down or up, a new summary — rebuild at the next decision). Keeps the
/// rebuild (~2 ms at 1,000 peers) off most decisions.
pub const REBUILD_EVERY: Duration = Duration::from_millis(250);
/// A new summary of one origin is applied at most this often (origins publish every
/// `summary_interval`, 2 s by default): a member sending a flood of versions cannot make every
/// routing decision rebuild the graph.
pub const MIN_SUMMARY_GAP: Duration = Duration::from_millis(500);
/// How often idle relay candidates are chosen again.
const NEIGHBOURS_EVERY: Duration = Duration::from_secs(5);
/// Probe period of idle relay candidates (links in use: `probe_interval`).
const NEIGHBOUR_PROBE: Duration = Duration::from_secs(2);

type HashMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// Routing settings (the daemon's `[routing]` table).
#[derive(Clone, Debug)]
pub struct RoutingConfig {
    /// Most relays on a path (0: direct only). Default 2.
    pub max_relays: usize,
    /// Whether this peer relays streams for others. Default true.
    pub relay: bool,
    /// Most streams relayed at once. Default 256.
    pub max_relayed: usize,
    /// Most streams relayed at once for one origin. Default 32.
    pub max_relayed_per_origin: usize,
    /// Probe period of links in use. Default 200 ms.
    pub probe_interval: Duration,
    /// Unanswered probes in a row that mark a link down. Default 4.
    pub probe_misses: u32,
    /// How long a peer stays "in use" (probed) after its last request. Default 10 s.
    pub in_use: Duration,
    /// Peers kept probed even when idle (relay candidates), lowest estimated RTT first.
    /// Default 4.
    pub neighbours: usize,
    /// A summary older than this is ignored. Default 30 s.
    pub summary_ttl: Duration,
    /// How often this peer checks whether its summary changed (then signs and sends it). Default 2 s.
    pub summary_interval: Duration,
    /// Cost of 100% loss relative to RTT. Default 10 (1% loss: +10%).
    pub loss_weight: f64,
    /// Fixed cost of a relay hop, ms (copying, end-to-end TLS). Default 1 ms.
    pub relay_hop_ms: f64,
    /// Cost of each stream a peer serves or relays, ms. Default 0.05 ms.
    pub load_ms_per_stream: f64,
    /// A new path must be cheaper than `switch_ratio` × the current one... Default 0.8.
    pub switch_ratio: f64,
    /// ...and cheaper by at least this much, ms. Default 2 ms.
    pub switch_min_ms: f64,
    /// Score multiplier of a peer whose direct link is down. Default 4.
    pub suspect_penalty: f64,
    /// A recovered peer's score starts at ×(1 + ramp_penalty) and falls to ×1 over `recovery`.
    pub ramp_penalty: f64,
    /// See `ramp_penalty`. Default 10 s.
    pub recovery: Duration,
    /// Decay time of the peak-EWMA service-time estimate. Default 10 s.
    pub ewma_decay: Duration,
    /// Longest wait for a first response byte before the request is retried elsewhere (a
    /// path or instance found dead aborts the wait at once). Default 30 s.
    pub first_byte_timeout: Duration,
    /// Most attempts of one request that has received no byte (1: no retry). Default 3.
    pub max_attempts: u32,
    /// Longest time to open a path (dial, stream, end-to-end handshake) — for a relay, to
    /// reach the next hop. A peer that does not answer a handshake is not waited for until
    /// the QUIC idle timeout. Default 2 s.
    pub connect_timeout: Duration,
    /// Cost of a never-measured direct link whose far end has no coordinate yet, ms.
    pub unknown_rtt_ms: f64,
    /// Vivaldi tuning.
    pub vivaldi: VivaldiConfig,
    /// Test hook: sees (and may change) every chunk this peer relays. Tests use it to play a
    /// relay that reads or flips bytes; never set in production.
    #[doc(hidden)]
    pub relay_tap: Option<RelayTap>,
}

/// Direction of a relayed chunk, for [`RelayTap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the origin towards the destination.
    Forward,
    /// Back towards the origin.
    Back,
}

/// The function of a [`RelayTap`].
pub type TapFn = dyn Fn(Direction, &mut Vec<u8>) + Send + Sync;

/// See [`RoutingConfig::relay_tap`].
#[derive(Clone)]
pub struct RelayTap(pub std::sync::Arc<TapFn>);

impl std::fmt::Debug for RelayTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RelayTap")
    }
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            max_relays: 2,
            relay: true,
            max_relayed: 256,
            max_relayed_per_origin: 32,
            probe_interval: Duration::from_millis(200),
            probe_misses: 4,
            in_use: Duration::from_secs(10),
            neighbours: 4,
            summary_ttl: Duration::from_secs(30),
            summary_interval: Duration::from_secs(2),
            loss_weight: 10.0,
            relay_hop_ms: 1.0,
            load_ms_per_stream: 0.05,
            switch_ratio: 0.8,
            switch_min_ms: 2.0,
            suspect_penalty: 4.0,
            ramp_penalty: 3.0,
            recovery: Duration::from_secs(10),
            ewma_decay: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(30),
            max_attempts: 3,
            connect_timeout: Duration::from_secs(2),
            unknown_rtt_ms: 100.0,
            vivaldi: VivaldiConfig::default(),
            relay_tap: None,
        }
    }
}

/// A path to a destination.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Path {
    /// Relays in order (empty: direct).
    pub relays: Vec<NodeId>,
    /// The destination.
    pub dest: NodeId,
    /// Expected RTT of the path with penalties, ms.
    pub cost_ms: f64,
    /// Whether some link on it is only estimated (coordinates), not measured.
    pub estimated: bool,
}

/// The instance chosen for a request, and how to reach it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Choice {
    /// The provider.
    pub provider: NodeId,
    /// The path.
    pub path: Path,
    /// Its score (lower is better).
    pub score: f64,
}

#[derive(Clone, Debug)]
struct LocalLink {
    srtt_ms: f64,
    loss: f64,
    samples: u64,
    /// Outstanding probe: nonce, sent at.
    probe: Option<(u64, Instant)>,
    /// The last probe counted as missed (nonce, sent at, loss estimate before the miss): a
    /// late answer still counts as an RTT sample.
    late: Option<(u64, Instant, f64)>,
    /// When the last probe was sent.
    last_probe: Option<Instant>,
    misses: u32,
    down: bool,
    /// When the link last came back up (after being down).
    up_at: Option<Instant>,
    /// QUIC counters seen last (lost, sent), for loss deltas.
    quic: (u64, u64),
    /// QUIC packets sent at the last look (activity).
    quic_sent: u64,
    /// Times marked down (for reports).
    downs: u64,
    /// RTT the cached graph was built with (a change of >10% rebuilds it).
    graph_ms: f64,
}

impl LocalLink {
    fn new() -> Self {
        Self {
            srtt_ms: 0.0,
            loss: 0.0,
            samples: 0,
            probe: None,
            late: None,
            last_probe: None,
            misses: 0,
            down: false,
            up_at: None,
            quic: (0, 0),
            quic_sent: 0,
            downs: 0,
            graph_ms: 0.0,
        }
    }
}

#[derive(Clone, Debug)]
struct Member {
    /// The origin's summary and when it was last received.
    summary: Option<(RouteSummary, Instant)>,
    /// When a new summary of it was last applied.
    applied: Option<Instant>,
}

#[derive(Clone, Debug, Default)]
struct Service {
    /// Peak-EWMA of time to first byte minus path cost, ms.
    serve_ms: f64,
    at: Option<Instant>,
    outstanding: u32,
}

#[derive(Clone, Copy, Debug)]
struct Edge {
    cost: f64,
    estimated: bool,
}

/// Shortest paths from this peer with a bounded number of relays.
#[derive(Debug, Default)]
struct Tree {
    index: HashMap<NodeId, NodeIndex>,
    ids: Vec<NodeId>,
    /// `cost[h][v]`: cheapest cost to v in at most h hops; `parent[h][v]` its predecessor,
    /// whether that link is estimated, and the layer the predecessor's cost is read from.
    cost: Vec<Vec<f64>>,
    parent: Vec<Vec<Option<(usize, bool, usize)>>>,
    /// When the first summary it used stops being fresh (the tree is rebuilt then).
    expires: Option<Instant>,
}

/// What a probe tick asks the driver to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSend {
    /// To whom.
    pub peer: NodeId,
    /// Nonce to put in the probe.
    pub nonce: u64,
}

/// Events of a probe tick.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tick {
    /// Probes to send.
    pub probes: Vec<ProbeSend>,
    /// Links that were just marked down.
    pub down: Vec<NodeId>,
}

/// The router of one peer.
#[derive(Debug)]
pub struct Router {
    me: NodeId,
    generation: u64,
    cfg: RoutingConfig,
    coord: Coord,
    members: HashMap<NodeId, Member>,
    links: HashMap<NodeId, LocalLink>,
    services: HashMap<NodeId, Service>,
    routes: HashMap<NodeId, Vec<NodeId>>,
    /// Members used for a request lately, and when (kept apart from `members` so a probe
    /// tick does not pass over every member).
    in_use: HashMap<NodeId, Instant>,
    load: LoadReport,
    tree: Option<Tree>,
    /// Idle relay candidates kept probed, and when they were chosen.
    neighbours: Vec<NodeId>,
    neighbours_at: Option<Instant>,
    /// When the tree was built, and whether a measurement moved since (a soft change: the
    /// tree is rebuilt at most every `REBUILD_EVERY` for those).
    built_at: Option<Instant>,
    stale: bool,
    seq: u64,
    nonce: u64,
    switches: u64,
}

impl Router {
    /// A router for peer `me` (in run `generation`).
    pub fn new(me: NodeId, generation: u64, cfg: RoutingConfig) -> Self {
        Self {
            me,
            generation,
            cfg,
            coord: Coord::default(),
            members: HashMap::default(),
            links: HashMap::default(),
            services: HashMap::default(),
            routes: HashMap::default(),
            in_use: HashMap::default(),
            load: LoadReport::default(),
            tree: None,
            neighbours: Vec::new(),
            neighbours_at: None,
            built_at: None,
            stale: false,
            seq: 0,
            nonce: u64::from_le_bytes(me.as_bytes()[..8].try_into().unwrap_or([0; 8])),
            switches: 0,
        }
    }

    /// The settings.
    pub fn config(&self) -> &RoutingConfig {
        &self.cfg
    }

    /// This peer's coordinate.
    pub fn coord(&self) -> Coord {
        self.coord
    }

    /// Route switches made so far (hysteresis at work: each is a changed path).
    pub fn switches(&self) -> u64 {
        self.switches
    }

    fn invalidate(&mut self) {
        self.tree = None;
    }

    /// Membership says `peer` is alive.
    pub fn member_up(&mut self, peer: NodeId) {
        if peer == self.me {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.members.entry(peer) {
            e.insert(Member {
                summary: None,
                applied: None,
            });
            self.invalidate();
        }
    }

    /// Membership says `peer` is down (or left): it leaves the graph with its links.
    pub fn member_down(&mut self, peer: NodeId) {
        if self.members.remove(&peer).is_some() {
            self.links.remove(&peer);
            self.services.remove(&peer);
            self.routes.retain(|d, r| *d != peer && !r.contains(&peer));
            self.in_use.remove(&peer);
            self.invalidate();
        }
    }

    /// Whether `peer` is a member the router knows.
    pub fn is_member(&self, peer: &NodeId) -> bool {
        self.members.contains_key(peer)
    }

    /// Whether our direct link to `peer` is marked down.
    pub fn link_down(&self, peer: &NodeId) -> bool {
        self.links.get(peer).is_some_and(|l| l.down)
    }

    /// Our own load, for the next summary.
    pub fn set_load(&mut self, load: LoadReport) {
        self.load = load;
    }

    /// `peer` was used for a request now: keep its link probed.
    pub fn touch(&mut self, peer: NodeId, now: Instant) {
        if self.members.contains_key(&peer) {
            self.in_use.insert(peer, now);
        }
    }

    /// An RTT sample; `alive` when it proves the peer answers now (a probe answer; QUIC's
    /// smoothed RTT of a dead peer's connection stays put, so it proves nothing).
    fn sample(&mut self, peer: NodeId, rtt_ms: f64, now: Instant, alive: bool) -> bool {
        let Some(_) = self.members.get(&peer) else {
            return false;
        };
        let l = self.links.entry(peer).or_insert_with(LocalLink::new);
        let structural = l.samples == 0 || (alive && l.down);
        if l.samples == 0 {
            l.srtt_ms = rtt_ms;
        } else if alive && (rtt_ms > 2.0 * l.srtt_ms || rtt_ms < 0.5 * l.srtt_ms) {
            // A level shift (a path changed or recovered): follow it within a few probes.
            l.srtt_ms = 0.5 * l.srtt_ms + 0.5 * rtt_ms;
        } else {
            l.srtt_ms = 0.875 * l.srtt_ms + 0.125 * rtt_ms;
        }
        l.samples += 1;
        let moved = (l.srtt_ms - l.graph_ms).abs() > 0.1 * l.graph_ms.max(0.1);
        if moved {
            l.graph_ms = l.srtt_ms;
        }
        if moved {
            self.stale = true;
        }
        let l = self.links.get_mut(&peer).expect("inserted above");
        if alive {
            l.misses = 0;
            if l.down {
                l.down = false;
                l.up_at = Some(now);
            }
        }
        if structural {
            self.invalidate();
        }
        true
    }

    /// A probe answer arrived from `peer` (with its coordinate).
    pub fn on_probe_ack(&mut self, peer: NodeId, nonce: u64, remote: Coord, now: Instant) {
        let Some(l) = self.links.get_mut(&peer) else {
            return;
        };
        let sent = match (l.probe, l.late) {
            (Some((n, sent)), _) if n == nonce => {
                l.probe = None;
                l.loss *= 0.95;
                sent
            }
            // The answer to a probe already counted as missed: the link is slow, not dead.
            // Undo the miss and take the sample, so the wait follows the RTT.
            (_, Some((n, sent, loss))) if n == nonce => {
                l.late = None;
                l.loss = loss * 0.95;
                sent
            }
            _ => return,
        };
        let rtt = (now - sent).as_secs_f64() * 1000.0;
        if self.sample(peer, rtt.max(0.001), now, true) {
            let salt =
                self.nonce ^ u64::from_le_bytes(peer.as_bytes()[..8].try_into().unwrap_or([0; 8]));
            self.coord
                .update(&self.cfg.vivaldi, &remote, rtt.max(0.001), salt);
        }
    }

    /// An RTT sample from QUIC's path statistics on an open connection to `peer`, with its
    /// packet counters (for loss).
    pub fn on_quic_stats(
        &mut self,
        peer: NodeId,
        rtt: Duration,
        lost: u64,
        sent: u64,
        now: Instant,
    ) {
        if rtt.is_zero() || !self.members.contains_key(&peer) {
            return;
        }
        let l = self.links.entry(peer).or_insert_with(LocalLink::new);
        // An idle connection's RTT is a stale estimate: only a connection that sent packets
        // since the last look gives a sample.
        let active = sent != l.quic_sent || l.samples == 0;
        l.quic_sent = sent;
        let (pl, ps) = l.quic;
        if sent > ps + 20 {
            let frac = (lost.saturating_sub(pl)) as f64 / (sent - ps) as f64;
            l.loss = 0.8 * l.loss + 0.2 * frac.min(1.0);
            l.quic = (lost, sent);
        } else if sent < ps {
            l.quic = (lost, sent);
        }
        if active && !l.down {
            self.sample(peer, rtt.as_secs_f64() * 1000.0, now, false);
        }
    }

    /// Which links to probe now; marks links down whose probes went unanswered. Call every
    /// `probe_interval`.
    pub fn tick(&mut self, now: Instant) -> Tick {
        let mut out = Tick::default();
        // In use, on a current path, or a neighbour.
        let in_use = self.cfg.in_use;
        self.in_use
            .retain(|_, u| now.saturating_duration_since(*u) < in_use);
        let mut want: HashSet<NodeId> = self.in_use.keys().copied().collect();
        for r in self.routes.values() {
            want.extend(r.iter().copied());
        }
        // Idle relay candidates: the nearest few, chosen again every NEIGHBOURS_EVERY, probed
        // every NEIGHBOUR_PROBE (enough to keep their links in summaries).
        if self
            .neighbours_at
            .is_none_or(|t| now.saturating_duration_since(t) >= NEIGHBOURS_EVERY)
        {
            let mut near: Vec<(f64, NodeId)> = self
                .members
                .iter()
                .filter(|(_, m)| m.summary.as_ref().is_none_or(|(s, _)| s.relays))
                .map(|(id, _)| (self.direct_estimate(id).0, *id))
                .collect();
            let k = self.cfg.neighbours.min(near.len());
            if k > 0 {
                near.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            }
            self.neighbours = near.into_iter().take(k).map(|(_, id)| id).collect();
            self.neighbours_at = Some(now);
        }
        let idle: Vec<NodeId> = self
            .neighbours
            .iter()
            .copied()
            .filter(|id| !want.contains(id) && self.members.contains_key(id))
            .collect();
        let mut want: Vec<(NodeId, bool)> = want.into_iter().map(|id| (id, false)).collect();
        want.extend(idle.into_iter().map(|id| (id, true)));
        want.sort();
        let mut changed = false;
        for (peer, idle) in want {
            let l = self.links.entry(peer).or_insert_with(LocalLink::new);
            if idle
                && l.probe.is_none()
                && l.last_probe
                    .is_some_and(|t| now.saturating_duration_since(t) < NEIGHBOUR_PROBE)
            {
                continue;
            }
            if let Some((_, sent)) = l.probe {
                let wait = Duration::from_secs_f64((3.0 * l.srtt_ms / 1000.0).max(0.0))
                    .max(self.cfg.probe_interval);
                if now.saturating_duration_since(sent) < wait {
                    continue;
                }
                if let Some((n, _)) = l.probe.take() {
                    l.late = Some((n, sent, l.loss));
                }
                l.misses += 1;
                l.loss = 0.95 * l.loss + 0.05;
                if l.misses >= self.cfg.probe_misses && !l.down {
                    l.down = true;
                    l.downs += 1;
                    out.down.push(peer);
                    changed = true;
                }
            }
            self.nonce = self
                .nonce
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            l.probe = Some((self.nonce, now));
            l.last_probe = Some(now);
            out.probes.push(ProbeSend {
                peer,
                nonce: self.nonce,
            });
        }
        // Forget links of peers no longer probed (keeps memory to what is in use).
        if changed {
            self.invalidate();
        }
        out
    }

    /// Evidence from a request: `peer` did not answer in time (or its stream broke before
    /// any byte). Its link is marked down at once: new streams avoid it, probes bring it back.
    pub fn on_request_failed(&mut self, peer: NodeId) -> bool {
        let Some(l) = self.links.get_mut(&peer) else {
            return false;
        };
        if l.down {
            return false;
        }
        l.down = true;
        l.downs += 1;
        l.misses = self.cfg.probe_misses;
        self.invalidate();
        true
    }

    /// A request to `provider` started (outstanding count for the load score).
    pub fn request_started(&mut self, provider: NodeId) {
        self.services.entry(provider).or_default().outstanding += 1;
    }

    /// A request to `provider` ended; `first_byte` is its time to first byte when it got one.
    pub fn request_ended(
        &mut self,
        provider: NodeId,
        path_cost_ms: f64,
        first_byte: Option<Duration>,
        now: Instant,
    ) {
        let decay = self.cfg.ewma_decay.as_secs_f64();
        let s = self.services.entry(provider).or_default();
        s.outstanding = s.outstanding.saturating_sub(1);
        if let Some(fb) = first_byte {
            let serve = (fb.as_secs_f64() * 1000.0 - path_cost_ms).max(0.0);
            let w =
                s.at.map(|t| (-(now.saturating_duration_since(t).as_secs_f64()) / decay).exp())
                    .unwrap_or(0.0);
            // Peak-EWMA: jumps up at once, decays down slowly.
            s.serve_ms = if serve > s.serve_ms {
                serve
            } else {
                w * s.serve_ms + (1.0 - w) * serve
            };
            s.at = Some(now);
        }
    }

    /// A summary from its origin. Applied (true) if newer than the one held and the origin's
    /// last new summary is at least [`MIN_SUMMARY_GAP`] old; the same version again only
    /// refreshes it (it stays fresh for `summary_ttl` from then).
    pub fn on_summary(&mut self, s: RouteSummary, now: Instant) -> bool {
        if s.node_id == self.me {
            return false;
        }
        let Some(m) = self.members.get_mut(&s.node_id) else {
            return false;
        };
        if let Some((old, at)) = m.summary.as_mut() {
            if old.version > s.version {
                return false;
            }
            if old.version == s.version {
                *at = now;
                return false;
            }
        }
        if m.applied
            .is_some_and(|t| now.saturating_duration_since(t) < MIN_SUMMARY_GAP)
        {
            return false;
        }
        m.summary = Some((s, now));
        m.applied = Some(now);
        self.invalidate();
        true
    }

    /// How many times each link was marked down (links marked down at least once).
    pub fn link_downs(&self) -> Vec<(NodeId, u64)> {
        let mut v: Vec<(NodeId, u64)> = self
            .links
            .iter()
            .filter(|(_, l)| l.downs > 0)
            .map(|(id, l)| (*id, l.downs))
            .collect();
        v.sort_unstable();
        v
    }

    /// This peer's summary now: coordinate, load and its best measured live links.
    pub fn local_summary(&mut self) -> RouteSummary {
        self.seq += 1;
        let mut links: Vec<LinkReport> = self
            .links
            .iter()
            .filter(|(id, l)| l.samples > 0 && !l.down && self.members.contains_key(id))
            .map(|(id, l)| LinkReport {
                peer: *id,
                rtt_us: (l.srtt_ms * 1000.0).clamp(1.0, u32::MAX as f64) as u32,
                loss_ppm: (l.loss * 1e6).clamp(0.0, 1e6) as u32,
            })
            .collect();
        links.sort_by(|a, b| a.rtt_us.cmp(&b.rtt_us).then(a.peer.cmp(&b.peer)));
        links.truncate(MAX_ROUTE_LINKS);
        RouteSummary {
            node_id: self.me,
            version: CatalogVersion {
                generation: self.generation,
                seq: self.seq,
            },
            coord: self.coord,
            load: self.load,
            relays: self.cfg.relay,
            links,
        }
    }

    fn fresh_summary(&self, id: &NodeId, now: Instant) -> Option<&RouteSummary> {
        self.fresh_summary_until(id, now).map(|(s, _)| s)
    }

    /// A fresh summary of `id` and when it stops being fresh.
    fn fresh_summary_until(&self, id: &NodeId, now: Instant) -> Option<(&RouteSummary, Instant)> {
        let (s, at) = self.members.get(id)?.summary.as_ref()?;
        let until = *at + self.cfg.summary_ttl;
        (now < until).then_some((s, until))
    }

    /// Estimated direct RTT to `id` (ms) and whether it is only estimated.
    fn direct_estimate(&self, id: &NodeId) -> (f64, bool) {
        if let Some(l) = self.links.get(id).filter(|l| l.samples > 0) {
            return (l.srtt_ms * (1.0 + self.cfg.loss_weight * l.loss), false);
        }
        match self.members.get(id).and_then(|m| m.summary.as_ref()) {
            Some((s, _)) if self.coord.error < 1.0 && s.coord.error < 1.0 => {
                (self.coord.distance_ms(&s.coord), true)
            }
            _ => (self.cfg.unknown_rtt_ms, true),
        }
    }

    /// Estimated RTT to `id`, ms (measured if we have it, else coordinates): lets
    /// pre-authentication and instance choice rank peers never contacted.
    pub fn estimate_ms(&self, id: &NodeId) -> f64 {
        self.direct_estimate(id).0
    }

    fn relay_cost(&self, id: &NodeId, now: Instant) -> Option<f64> {
        let s = self.fresh_summary(id, now)?;
        if !s.relays {
            return None;
        }
        Some(
            self.cfg.relay_hop_ms
                + f64::from(s.load.relaying + s.load.serving) * self.cfg.load_ms_per_stream,
        )
    }

    fn build(&self, now: Instant) -> Tree {
        // Vertices: 0 is this peer, then the members in id order.
        let mut ids: Vec<NodeId> = Vec::with_capacity(self.members.len() + 1);
        ids.push(self.me);
        let mut members: Vec<NodeId> = self.members.keys().copied().collect();
        members.sort_unstable();
        ids.extend_from_slice(&members);
        let mut index: HashMap<NodeId, NodeIndex> = HashMap::default();
        index.reserve(ids.len());
        for (i, id) in ids.iter().enumerate() {
            index.insert(*id, NodeIndex::new(i));
        }
        let n = ids.len();
        // Directed arcs, both directions of every link, bucketed by source (a counting sort:
        // no comparison sort over all links), then sorted by target within each row.
        let mut own: Vec<Option<Edge>> = vec![None; n];
        for (i, id) in members.iter().enumerate() {
            if !self.link_down(id) {
                let (cost, estimated) = self.direct_estimate(id);
                own[i + 1] = Some(Edge { cost, estimated });
            }
        }
        let mut reported: Vec<(u32, u32, f64)> = Vec::with_capacity(self.members.len() * 16);
        let mut expires: Option<Instant> = None;
        for (i, id) in members.iter().enumerate() {
            let Some((s, until)) = self.fresh_summary_until(id, now) else {
                continue;
            };
            expires = Some(expires.map_or(until, |x| x.min(until)));
            let u = i + 1;
            for l in &s.links {
                let Some(v) = index.get(&l.peer).map(|v| v.index()) else {
                    continue;
                };
                // Links to us: our own measurement counts.
                if v == 0 || v == u {
                    continue;
                }
                reported.push((u as u32, v as u32, self.link_cost(l)));
            }
        }
        let mut start = vec![0usize; n + 1];
        for (v, e) in own.iter().enumerate() {
            if e.is_some() {
                start[1] += 1; // arc 0 -> v
                start[v + 1] += 1; // arc v -> 0
            }
        }
        for &(u, v, _) in &reported {
            start[u as usize + 1] += 1;
            start[v as usize + 1] += 1;
        }
        for i in 0..n {
            start[i + 1] += start[i];
        }
        let mut fill = start.clone();
        let mut rows: Vec<(u32, Edge)> = vec![
            (
                0,
                Edge {
                    cost: 0.0,
                    estimated: false
                }
            );
            start[n]
        ];
        for (v, e) in own.iter().enumerate() {
            if let Some(e) = e {
                rows[fill[0]] = (v as u32, *e);
                fill[0] += 1;
                rows[fill[v]] = (0, *e);
                fill[v] += 1;
            }
        }
        for &(u, v, cost) in &reported {
            let e = Edge {
                cost,
                estimated: false,
            };
            rows[fill[u as usize]] = (v, e);
            fill[u as usize] += 1;
            rows[fill[v as usize]] = (u, e);
            fill[v as usize] += 1;
        }
        let mut sorted: Vec<(u32, u32, Edge)> = Vec::with_capacity(rows.len());
        for u in 0..n {
            let row = &mut rows[start[u]..start[u + 1]];
            row.sort_unstable_by_key(|r| r.0);
            for &(v, e) in row.iter() {
                match sorted.last_mut() {
                    // Two reports of one link: the worse counts.
                    Some(last) if last.0 == u as u32 && last.1 == v => {
                        last.2.cost = last.2.cost.max(e.cost)
                    }
                    _ => sorted.push((u as u32, v, e)),
                }
            }
        }
        let g: Csr<(), Edge, petgraph::Directed, u32> =
            Csr::from_sorted_edges(&sorted).unwrap_or_else(|_| Csr::with_nodes(0));
        let in_graph = g.node_count();
        // Hop-bounded relaxation: layer h holds the best cost with at most h hops.
        let hops = self.cfg.max_relays + 1;
        let relay: Vec<Option<f64>> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                if i == 0 {
                    None
                } else {
                    self.relay_cost(id, now)
                }
            })
            .collect();
        let mut cost = vec![vec![f64::INFINITY; n]; hops + 1];
        let mut parent: Vec<Vec<Option<(usize, bool, usize)>>> = vec![vec![None; n]; hops + 1];
        cost[0][0] = 0.0;
        let mut frontier: Vec<usize> = vec![0];
        let mut queued = vec![false; n];
        for h in 1..=hops {
            let (before, after) = cost.split_at_mut(h);
            let prev = &before[h - 1];
            let cur = &mut after[0];
            cur.copy_from_slice(prev);
            parent[h] = parent[h - 1].clone();
            let mut next = Vec::new();
            queued.iter_mut().for_each(|q| *q = false);
            for &u in &frontier {
                if u >= in_graph {
                    continue;
                }
                let du = prev[u];
                // Only this peer and relays forward.
                let extra = if u == 0 {
                    0.0
                } else {
                    match relay[u] {
                        Some(c) => c,
                        None => continue,
                    }
                };
                for e in g.edges(u as u32) {
                    let v = e.target() as usize;
                    if v == 0 {
                        continue;
                    }
                    let w = e.weight();
                    let c = du + extra + w.cost;
                    if c < cur[v] {
                        cur[v] = c;
                        parent[h][v] = Some((u, w.estimated, h - 1));
                        if !queued[v] {
                            queued[v] = true;
                            next.push(v);
                        }
                    }
                }
            }
            frontier = next;
        }
        Tree {
            index,
            ids,
            cost,
            parent,
            expires,
        }
    }

    fn tree(&mut self, now: Instant) -> &Tree {
        let soft_due = self.stale
            && self
                .built_at
                .is_none_or(|t| now.saturating_duration_since(t) >= REBUILD_EVERY);
        let expired = self
            .tree
            .as_ref()
            .and_then(|t| t.expires)
            .is_some_and(|e| now >= e);
        if self.tree.is_none() || soft_due || expired {
            self.tree = Some(self.build(now));
            self.built_at = Some(now);
            self.stale = false;
        }
        self.tree.get_or_insert_with(Tree::default)
    }

    /// The cheapest path to `dest` in the current graph (no hysteresis).
    fn best_path(&mut self, dest: NodeId, now: Instant) -> Option<Path> {
        // Never relay around a direct link that was not measured and is not down: an
        // estimate is no reason to pay a relay (the first request measures the link).
        let unmeasured = dest != self.me
            && self.members.contains_key(&dest)
            && !self.link_down(&dest)
            && self.links.get(&dest).is_none_or(|l| l.samples == 0);
        if unmeasured {
            return Some(Path {
                relays: Vec::new(),
                dest,
                cost_ms: self.direct_estimate(&dest).0,
                estimated: true,
            });
        }
        let tree = self.tree(now);
        let v = *tree.index.get(&dest)?;
        let h = tree.cost.len() - 1;
        let total = tree.cost[h][v.index()];
        if !total.is_finite() {
            return None;
        }
        // Walk back through the layers.
        let mut relays = Vec::new();
        let mut estimated = false;
        let mut at = v.index();
        let mut layer = h;
        while let Some((p, est, from)) = tree.parent[layer][at] {
            estimated |= est;
            if p == 0 {
                break;
            }
            relays.push(tree.ids[p]);
            at = p;
            layer = from;
        }
        relays.reverse();
        Some(Path {
            relays,
            dest,
            cost_ms: total,
            estimated,
        })
    }

    /// Cost of a given path in the current graph, if all its links still exist.
    fn path_cost(&self, relays: &[NodeId], dest: NodeId, now: Instant) -> Option<f64> {
        let mut prev = self.me;
        let mut total = 0.0;
        for hop in relays.iter().chain(std::iter::once(&dest)) {
            if !self.members.contains_key(hop) {
                return None;
            }
            let c = if prev == self.me {
                if self.link_down(hop) {
                    return None;
                }
                self.direct_estimate(hop).0
            } else {
                total += self.relay_cost(&prev, now)?;
                self.reported(&prev, hop, now)?
            };
            total += c;
            prev = *hop;
        }
        Some(total)
    }

    /// Cost of a reported link, ms: RTT with the loss penalty (as for our own links).
    fn link_cost(&self, l: &LinkReport) -> f64 {
        f64::from(l.rtt_us) / 1000.0 * (1.0 + self.cfg.loss_weight * f64::from(l.loss_ppm) / 1e6)
    }

    fn reported(&self, a: &NodeId, b: &NodeId, now: Instant) -> Option<f64> {
        let one = |x: &NodeId, y: &NodeId| {
            self.fresh_summary(x, now)?
                .links
                .iter()
                .find(|l| l.peer == *y)
                .map(|l| self.link_cost(l))
        };
        match (one(a, b), one(b, a)) {
            (Some(x), Some(y)) => Some(x.max(y)),
            (x, y) => x.or(y),
        }
    }

    /// The path to use to `dest`: the current one unless a clearly better one exists or it
    /// broke (hysteresis).
    pub fn route(&mut self, dest: NodeId, now: Instant) -> Option<Path> {
        let best = self.best_path(dest, now)?;
        if let Some(cur) = self.routes.get(&dest).cloned() {
            if cur == best.relays {
                return Some(best);
            }
            if let Some(c) = self.path_cost(&cur, dest, now) {
                let better = best.cost_ms < c * self.cfg.switch_ratio
                    && c - best.cost_ms > self.cfg.switch_min_ms;
                if !better {
                    return Some(Path {
                        relays: cur,
                        dest,
                        cost_ms: c,
                        estimated: best.estimated,
                    });
                }
            }
            self.switches += 1;
        }
        self.routes.insert(dest, best.relays.clone());
        Some(best)
    }

    fn ramp(&self, id: &NodeId, now: Instant) -> f64 {
        let Some(up) = self.links.get(id).and_then(|l| l.up_at) else {
            return 1.0;
        };
        let t = now.saturating_duration_since(up).as_secs_f64();
        let r = self.cfg.recovery.as_secs_f64();
        if t >= r || r <= 0.0 {
            1.0
        } else {
            1.0 + self.cfg.ramp_penalty * (1.0 - t / r)
        }
    }

    fn score(&mut self, provider: NodeId, now: Instant) -> Option<Choice> {
        // No path at all (its direct link suspected, no relay): try it directly anyway, at
        // the suspect's price — it may have recovered, and it is the only way left.
        let path = match self.route(provider, now) {
            Some(p) => p,
            None if self.members.contains_key(&provider) => Path {
                relays: Vec::new(),
                dest: provider,
                cost_ms: self.direct_estimate(&provider).0,
                estimated: true,
            },
            None => return None,
        };
        let s = self.services.get(&provider).cloned().unwrap_or_default();
        let reported = self
            .fresh_summary(&provider, now)
            .map(|x| {
                f64::from(x.load.backend_us) / 1000.0
                    + f64::from(x.load.serving) * self.cfg.load_ms_per_stream
            })
            .unwrap_or(0.0);
        let serve = if s.at.is_some() { s.serve_ms } else { reported };
        let mut score = (path.cost_ms + serve) * f64::from(s.outstanding + 1);
        if self.link_down(&provider) {
            score *= self.cfg.suspect_penalty;
        }
        score *= self.ramp(&provider, now);
        Some(Choice {
            provider,
            path,
            score,
        })
    }

    /// Chooses an instance among `providers` (not in `exclude`) and its path: power of two
    /// choices on the score; `pick` draws random indices (the driver's seeded RNG).
    pub fn choose(
        &mut self,
        providers: &[NodeId],
        exclude: &[NodeId],
        now: Instant,
        mut pick: impl FnMut(usize) -> usize,
    ) -> Option<Choice> {
        let live: Vec<NodeId> = providers
            .iter()
            .copied()
            .filter(|p| *p != self.me && self.members.contains_key(p) && !exclude.contains(p))
            .collect();
        // Prefer instances whose direct link is up; a suspected one only if nothing else is.
        let healthy: Vec<NodeId> = live
            .iter()
            .copied()
            .filter(|p| !self.link_down(p))
            .collect();
        let pool = if healthy.is_empty() { live } else { healthy };
        match pool.len() {
            0 => None,
            1 => self.score(pool[0], now),
            2 => {
                let a = self.score(pool[0], now);
                let b = self.score(pool[1], now);
                best_of(a, b)
            }
            n => {
                let i = pick(n);
                let mut j = pick(n - 1);
                if j >= i {
                    j += 1;
                }
                let a = self.score(pool[i], now);
                let b = self.score(pool[j], now);
                best_of(a, b)
            }
        }
    }

    /// How long to wait for the first byte on `choice` before retrying elsewhere.
    ///
    /// Fixed, not adaptive: a slow backend must not be mistaken for a dead one (that would
    /// repeat requests). Dead paths are found by probes and membership, which abort the wait.
    pub fn first_byte_timeout(&self, _choice: &Choice) -> Duration {
        self.cfg.first_byte_timeout
    }

    /// The operator view (`GET /v1/routes`).
    pub fn view(&mut self, now: Instant) -> RoutesView {
        let mut peers: Vec<PeerRoute> = Vec::new();
        let mut ids: Vec<NodeId> = self.members.keys().copied().collect();
        ids.sort();
        for id in ids {
            let path = self.best_path(id, now);
            let cur = self.routes.get(&id).cloned();
            let l = self.links.get(&id);
            let m = &self.members[&id];
            peers.push(PeerRoute {
                node_id: NodeIdStr(id),
                rtt_ms: l.filter(|l| l.samples > 0).map(|l| round3(l.srtt_ms)),
                loss: l.map(|l| round3(l.loss)).unwrap_or(0.0),
                link_down: l.is_some_and(|l| l.down),
                downs: l.map(|l| l.downs).unwrap_or(0),
                estimated_rtt_ms: round3(self.estimate_ms(&id)),
                load: self.fresh_summary(&id, now).map(|s| s.load),
                relays: m.summary.as_ref().is_some_and(|(s, _)| s.relays),
                reported_links: m.summary.as_ref().map(|(s, _)| s.links.len()).unwrap_or(0),
                best: path.map(|p| RouteView {
                    via: p.relays.iter().map(|r| NodeIdStr(*r)).collect(),
                    cost_ms: round3(p.cost_ms),
                    estimated: p.estimated,
                }),
                current_via: cur.map(|r| r.into_iter().map(NodeIdStr).collect()),
            });
        }
        RoutesView {
            node_id: NodeIdStr(self.me),
            coord: self.coord,
            max_relays: self.cfg.max_relays,
            relays: self.cfg.relay,
            switches: self.switches,
            peers,
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn best_of(a: Option<Choice>, b: Option<Choice>) -> Option<Choice> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.score < a.score { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// `GET /v1/routes`.
#[derive(Clone, Debug, Serialize)]
pub struct RoutesView {
    /// This peer.
    pub node_id: NodeIdStr,
    /// Its coordinate.
    pub coord: Coord,
    /// Most relays on a path.
    pub max_relays: usize,
    /// Whether it relays for others.
    pub relays: bool,
    /// Path switches so far.
    pub switches: u64,
    /// Every member with its link and path.
    pub peers: Vec<PeerRoute>,
}

/// One member in [`RoutesView`].
#[derive(Clone, Debug, Serialize)]
pub struct PeerRoute {
    /// The member.
    pub node_id: NodeIdStr,
    /// Measured RTT of our direct link, ms.
    pub rtt_ms: Option<f64>,
    /// Measured loss of our direct link.
    pub loss: f64,
    /// Our direct link is marked down.
    pub link_down: bool,
    /// Times it was marked down.
    pub downs: u64,
    /// RTT estimate (measured, else coordinates), ms.
    pub estimated_rtt_ms: f64,
    /// Its reported load.
    pub load: Option<LoadReport>,
    /// Whether it relays.
    pub relays: bool,
    /// Links in its summary.
    pub reported_links: usize,
    /// Cheapest path now.
    pub best: Option<RouteView>,
    /// Path in use (hysteresis), if any.
    pub current_via: Option<Vec<NodeIdStr>>,
}

/// A path in [`RoutesView`].
#[derive(Clone, Debug, Serialize)]
pub struct RouteView {
    /// Relays, in order.
    pub via: Vec<NodeIdStr>,
    /// Cost, ms.
    pub cost_ms: f64,
    /// Some link only estimated.
    pub estimated: bool,
}

#[cfg(test)]
mod tests;
