//! Offline evaluation of the models on a trace, with the online protocol of
//! `meshd predict eval`.
//!
//! Protocol, exactly: events in time order (stable, so ties keep file order); for each event,
//! rank services for its client *before* seeing it, score hit@1, hit@3 and hit@k, then learn
//! from it. Scores are reported over all events and over the last 30% of events (the *tail*),
//! which the models reach warmed on the first 70%.
//!
//! The *budget view* replays the same rankings as a pre-authentication daemon would use them:
//! for a budget of B warm services per client, the warm set before each event is the top B of
//! the ranking. A service entering the set costs one warm-up (a handshake); it is *wasted* if it
//! leaves the set (or the trace ends) without the client having used it meanwhile.
//!
//! Pure: takes parsed events, returns plain serde rows. No I/O, no clock (the CLI times runs).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::hash::FxHashMap;
use crate::models::{Model, ModelConfig, ModelKind};
use crate::trace::Event;
use crate::{ClientId, GroupId, GroupRule, Millis, Prediction, ServiceId};

/// Default horizon of the horizon budget view (ms): about what a pre-authenticated connection
/// is worth keeping warm for ahead of use.
pub const DEFAULT_HORIZON_MS: u64 = 1000;

/// Evaluation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    /// The k of hit@k (hit@1 and hit@3 are always reported too).
    pub k: usize,
    /// Budgets of warm services per client for the budget view.
    pub budgets: Vec<usize>,
    /// Time a warm-up takes, ms: a service entering a warm set at `t` only counts as warm from
    /// `t + warmup_ms` on (0 = instantly, the default).
    pub warmup_ms: u64,
    /// Horizon of the second budget view, ranked by [`Model::predict_within_into`], ms.
    pub horizon_ms: u64,
    /// Share of events, at the end, reported separately as the tail (0.3).
    pub tail_share: f64,
    /// Memory and decay settings of every model.
    pub model: ModelConfig,
    /// How client names map to groups.
    pub groups: GroupRule,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            k: 3,
            budgets: vec![1, 2, 3, 5],
            horizon_ms: DEFAULT_HORIZON_MS,
            warmup_ms: 0,
            tail_share: 0.3,
            model: ModelConfig::default(),
            groups: GroupRule::default(),
        }
    }
}

/// Hit rate and waste for one budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetRow {
    /// Warm services per client.
    pub budget: usize,
    /// Share of events whose service was warm.
    pub hit_rate: f64,
    /// Warm-ups (handshakes) per event.
    pub warmups_per_event: f64,
    /// Share of warm-ups never used before being dropped (or the end of the trace).
    pub waste: f64,
}

/// Result of one model on one trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRow {
    /// Trace name (as given by the caller).
    pub trace: String,
    /// Model name.
    pub model: String,
    /// Whether this is the model the daemon ships.
    pub shipped: bool,
    /// Events scored.
    pub events: u64,
    /// Events in the tail (last 30%).
    pub tail_events: u64,
    /// The k of `hit_at_k`.
    pub k: usize,
    /// Share of events whose service was ranked first.
    pub hit_at_1: f64,
    /// Share of events whose service was in the top 3.
    pub hit_at_3: f64,
    /// Share of events whose service was in the top k.
    pub hit_at_k: f64,
    /// hit@1 over the tail.
    pub tail_hit_at_1: f64,
    /// hit@3 over the tail.
    pub tail_hit_at_3: f64,
    /// hit@k over the tail.
    pub tail_hit_at_k: f64,
    /// Mean number of ranked services returned per event (at most k).
    pub predictions_per_event: f64,
    /// Share of events that were their client's first request to that service.
    pub first_request_share: f64,
    /// Model memory at the end of the trace, bytes (approximate).
    pub memory_bytes: u64,
    /// Clients tracked at the end.
    pub clients: u64,
    /// The budget view, warm sets = top B of the next-request ranking.
    pub budget: Vec<BudgetRow>,
    /// The warm-up time used in both budget views, ms.
    pub warmup_ms: u64,
    /// The horizon used for `horizon_budget`, ms.
    pub horizon_ms: u64,
    /// The budget view with warm sets = top B of the within-horizon ranking
    /// ([`Model::predict_within_into`]; the same as `budget` for models without one).
    pub horizon_budget: Vec<BudgetRow>,
}

/// A trace interned and sorted once, then replayed through any number of models.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// `(at, client, group, service)` in time order.
    events: Vec<(Millis, ClientId, Option<GroupId>, ServiceId)>,
    clients: usize,
    services: usize,
    first_request_share: f64,
}

impl Prepared {
    /// Interns names (ids in order of first appearance) and sorts by time (stable).
    pub fn new(events: &[Event], groups: &GroupRule) -> Self {
        let mut order: Vec<usize> = (0..events.len()).collect();
        order.sort_by_key(|&i| events[i].ts_ms);
        let mut clients: FxHashMap<&str, (ClientId, Option<GroupId>)> = FxHashMap::default();
        let mut group_ids: FxHashMap<&str, GroupId> = FxHashMap::default();
        let mut services: FxHashMap<&str, ServiceId> = FxHashMap::default();
        let mut pairs: HashSet<(ClientId, ServiceId)> = HashSet::new();
        let mut firsts = 0u64;
        let mut out = Vec::with_capacity(events.len());
        for i in order {
            let ev = &events[i];
            let next_client = ClientId(clients.len() as u32);
            let &mut (client, group) = clients.entry(ev.client.as_str()).or_insert_with(|| {
                let group = groups.group_of(&ev.client).map(|g| {
                    let next = GroupId(group_ids.len() as u32);
                    *group_ids.entry(g).or_insert(next)
                });
                (next_client, group)
            });
            let next_service = ServiceId(services.len() as u32);
            let service = *services.entry(ev.service.as_str()).or_insert(next_service);
            if pairs.insert((client, service)) {
                firsts += 1;
            }
            out.push((Millis(ev.ts_ms), client, group, service));
        }
        let n = out.len().max(1) as f64;
        Self {
            events: out,
            clients: clients.len(),
            services: services.len(),
            first_request_share: firsts as f64 / n,
        }
    }

    /// The events, in time order, as `(at, client, group, service)`.
    pub fn iter(
        &self,
    ) -> impl Iterator<Item = (Millis, ClientId, Option<GroupId>, ServiceId)> + '_ {
        self.events.iter().copied()
    }

    /// Number of events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether there are no events.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Distinct clients.
    pub fn clients(&self) -> usize {
        self.clients
    }

    /// Distinct services.
    pub fn services(&self) -> usize {
        self.services
    }

    /// Share of events that were a client's first request to that service.
    pub fn first_request_share(&self) -> f64 {
        self.first_request_share
    }
}

#[derive(Default, Clone, Copy)]
struct Hits {
    n: u64,
    h1: u64,
    h3: u64,
    hk: u64,
}

impl Hits {
    fn add(&mut self, preds: &[Prediction], service: ServiceId, k: usize) {
        let rank = preds.iter().position(|p| p.service == service);
        self.n += 1;
        self.h1 += u64::from(rank == Some(0));
        self.h3 += u64::from(rank.is_some_and(|r| r < 3));
        self.hk += u64::from(rank.is_some_and(|r| r < k));
    }

    fn rate(x: u64, n: u64) -> f64 {
        if n == 0 {
            0.0
        } else {
            x as f64 / n as f64
        }
    }
}

/// Warm sets of every client for one budget.
struct BudgetSim {
    budget: usize,
    warmup_ms: u64,
    /// Per client: (service, used since it entered, warm from).
    warm: FxHashMap<ClientId, Vec<(ServiceId, bool, u64)>>,
    hits: u64,
    warmups: u64,
    wasted: u64,
}

impl BudgetSim {
    fn new(budget: usize, warmup_ms: u64) -> Self {
        Self {
            budget,
            warmup_ms,
            warm: FxHashMap::default(),
            hits: 0,
            warmups: 0,
            wasted: 0,
        }
    }

    fn step(&mut self, client: ClientId, at: Millis, preds: &[Prediction], service: ServiceId) {
        let top = &preds[..preds.len().min(self.budget)];
        let set = self.warm.entry(client).or_default();
        set.retain(|&(s, used, _)| {
            let keep = top.iter().any(|p| p.service == s);
            if !keep && !used {
                self.wasted += 1;
            }
            keep
        });
        for p in top {
            if !set.iter().any(|&(s, _, _)| s == p.service) {
                set.push((p.service, false, at.0.saturating_add(self.warmup_ms)));
                self.warmups += 1;
            }
        }
        if let Some(e) = set.iter_mut().find(|(s, _, _)| *s == service) {
            if e.2 <= at.0 {
                e.1 = true;
                self.hits += 1;
            }
        }
    }

    fn finish(self, events: u64) -> BudgetRow {
        let unused = self
            .warm
            .values()
            .flatten()
            .filter(|(_, used, _)| !used)
            .count() as u64;
        BudgetRow {
            budget: self.budget,
            hit_rate: Hits::rate(self.hits, events),
            warmups_per_event: Hits::rate(self.warmups, events),
            waste: Hits::rate(self.wasted + unused, self.warmups),
        }
    }
}

/// Replays `trace` through a fresh model of kind `kind` (see the module docs).
pub fn evaluate(name: &str, trace: &Prepared, kind: ModelKind, cfg: &EvalConfig) -> EvalRow {
    let mut model = kind.build(&cfg.model);
    evaluate_model(name, trace, model.as_mut(), kind.is_shipped(), cfg)
}

/// Replays `trace` through `model` (normally fresh); `shipped` is copied into the row.
pub fn evaluate_model(
    name: &str,
    trace: &Prepared,
    model: &mut dyn Model,
    shipped: bool,
    cfg: &EvalConfig,
) -> EvalRow {
    let k = cfg.k.max(1);
    let depth = cfg.budgets.iter().copied().chain([k, 3]).max().unwrap_or(k);
    let n = trace.events.len();
    let tail_start = n - ((n as f64 * cfg.tail_share.clamp(0.0, 1.0)).round() as usize).min(n);
    let (mut all, mut tail) = (Hits::default(), Hits::default());
    let sim = |&b: &usize| BudgetSim::new(b, cfg.warmup_ms);
    let mut sims: Vec<BudgetSim> = cfg.budgets.iter().map(sim).collect();
    let mut horizon_sims: Vec<BudgetSim> = cfg.budgets.iter().map(sim).collect();
    let budget_depth = cfg.budgets.iter().copied().max().unwrap_or(0);
    let mut issued = 0u64;
    let mut preds = Vec::with_capacity(depth);
    let mut within = Vec::with_capacity(budget_depth);
    for (i, &(at, client, group, service)) in trace.events.iter().enumerate() {
        model.predict_into(client, at, depth, &mut preds);
        issued += preds.len().min(k) as u64;
        all.add(&preds, service, k);
        if i >= tail_start {
            tail.add(&preds, service, k);
        }
        for sim in &mut sims {
            sim.step(client, at, &preds, service);
        }
        if budget_depth > 0 {
            model.predict_within_into(client, at, cfg.horizon_ms, budget_depth, &mut within);
            for sim in &mut horizon_sims {
                sim.step(client, at, &within, service);
            }
        }
        model.observe_grouped(client, group, service, at);
    }
    EvalRow {
        trace: name.to_owned(),
        model: model.name().to_owned(),
        shipped,
        events: all.n,
        tail_events: tail.n,
        k,
        hit_at_1: Hits::rate(all.h1, all.n),
        hit_at_3: Hits::rate(all.h3, all.n),
        hit_at_k: Hits::rate(all.hk, all.n),
        tail_hit_at_1: Hits::rate(tail.h1, tail.n),
        tail_hit_at_3: Hits::rate(tail.h3, tail.n),
        tail_hit_at_k: Hits::rate(tail.hk, tail.n),
        predictions_per_event: Hits::rate(issued, all.n),
        first_request_share: trace.first_request_share,
        memory_bytes: model.memory_bytes() as u64,
        clients: model.clients() as u64,
        budget: sims.into_iter().map(|s| s.finish(all.n)).collect(),
        warmup_ms: cfg.warmup_ms,
        horizon_ms: cfg.horizon_ms,
        horizon_budget: horizon_sims.into_iter().map(|s| s.finish(all.n)).collect(),
    }
}
