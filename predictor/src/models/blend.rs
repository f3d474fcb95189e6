//! The shipped model: client, group and global context models mixed by learned weights.
//!
//! For the client's current context, each scope gives PPM-C back-off distributions over its
//! count tables: the client alone over its orders 1..=0 (its own frequencies and transitions),
//! the client's group and all clients over orders `max_order..=0` (long), 1..=0 (short) and
//! the unordered last two services (bag) — the long contexts are counted where there is the
//! most data, pooled over every client with the same recent history. Which orders and bags
//! each scope counts is a parameter ([`BlendParams::orders`], [`BlendParams::bags`]);
//! [`BlendParams::full`] counts all of them in every scope (the `blend-full` comparison model).
//! The experts are mixed linearly with weights learned per client by exponentiated gradient on
//! log loss (a new client starts from equal weights), each scaled by how much data its scope
//! has. A microservice pod thus trusts its own history once it has one, a new pod leans on its
//! deployment's, and a web client on everybody's.
//!
//! A *repeat gate* then splits the mass between services the client already used (in its own
//! order-0 table) and new ones, in the proportion the client has shown (`rho`, a moving average
//! of "this request repeated an earlier service", started from the model-wide average). Web
//! clients rarely fetch the same path twice; pods call the same few services all the time.
//!
//! No I/O, no clock, no randomness; ties rank by service id.

use serde::{Deserialize, Serialize};

use crate::models::core::{
    ClientState, Core, CoreState, BAG_SLOT, CLIENT, GLOBAL, GROUP, MAX_ORDER, SLOTS,
};
use crate::models::rank::{Cand, Cands};
use crate::models::{Model, ModelConfig};
use crate::store::{exp_approx, Dist};
use crate::{ClientId, GroupId, Millis, Prediction, ServiceId};

/// Tuning of [`Blend`]; the defaults are what the daemon ships.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlendParams {
    /// Learning rate of the mixture weights (exponentiated gradient on log loss).
    pub rate: f32,
    /// Share of weight spread back evenly after every update, so no expert is ever written off.
    pub share: f32,
    /// Highest order of the short-memory experts (the long ones use `max_order`).
    pub low_order: usize,
    /// Weight of the newest event in the repeat-rate average.
    pub repeat_alpha: f32,
    /// Events a client needs before its own mixture weights replace the model-wide ones.
    pub own_after: u32,
    /// Data a scope needs to be fully trusted: an expert's weight is scaled by
    /// `n / (n + trust)`, `n` its scope's decayed order-0 count, so a client with one request
    /// does not outvote its group.
    pub trust: f32,
    /// Entries of each table considered as candidates (tables are sorted by count).
    pub top: usize,
    /// Strength of the repeat gate, 0 (off) to 1 (scores fully re-split by the repeat rate).
    pub gate: f32,
    /// Highest context order counted per scope (client, group, global), each at most
    /// `ModelConfig::max_order`.
    pub orders: [usize; 3],
    /// Whether each scope (client, group, global) counts the bag context.
    pub bags: [bool; 3],
    /// Whether the model-wide mixture weights (new clients' starting weights) are learned
    /// (one more weight update per event) rather than equal. The model-wide repeat rate is
    /// learned either way.
    pub learn_prior_weights: bool,
}

impl Default for BlendParams {
    fn default() -> Self {
        Self {
            rate: 0.3,
            share: 0.01,
            low_order: 1,
            repeat_alpha: 0.3,
            gate: 0.5,
            own_after: 0,
            top: 8,
            trust: 2.0,
            orders: [1, MAX_ORDER, MAX_ORDER],
            bags: [false, true, true],
            learn_prior_weights: false,
        }
    }
}

impl BlendParams {
    /// The previous shipped model (`blend-full`, kept as a comparison): every scope at every
    /// order with its bag (18 tables), model-wide weights learned.
    pub fn full() -> Self {
        Self {
            orders: [MAX_ORDER; 3],
            bags: [true; 3],
            learn_prior_weights: true,
            ..Self::default()
        }
    }
}

/// Tables whose share of the mixture's probability mass (weight × total count) is below this
/// are skipped when ranking: they can only reorder near-ties.
const MIN_MASS: f32 = 3e-4;

/// Experts: for each scope (client, group, global), a long chain (orders `max_order..=0`), a
/// short one (orders `low_order..=0`) and a bag chain (the last two services in any order, then
/// orders 1 and 0). Expert `e` belongs to scope `e / 3`.
const EXPERTS: usize = 9;
/// [`EXPERTS`] rounded up to whole SIMD lanes of 4.
const LANES: usize = 12;

/// What the blend learns per client (and model-wide, as the prior of new clients).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Skill {
    /// Mixture weight of each expert (sums to 1).
    w: [f32; EXPERTS],
    /// Share of requests that repeated a service the client had used before.
    rho: f32,
    /// Moving average of the client's gap between requests, ms (0 = unknown).
    gap_ms: f32,
    /// Timing of the client's most recently used services, for the horizon ranking (at most
    /// [`MAX_USES`], least recently used replaced first; empty in the model-wide prior).
    uses: Vec<Use>,
}

impl Default for Skill {
    fn default() -> Self {
        Self {
            w: [1.0 / EXPERTS as f32; EXPERTS],
            rho: 0.5,
            gap_ms: 0.0,
            uses: Vec::new(),
        }
    }
}

/// Services whose use timing is kept per client.
pub(crate) const MAX_USES: usize = 16;
/// Weight of the newest sample in the timing moving averages.
const TIME_ALPHA: f32 = 0.3;
/// Most future requests the horizon ranking looks ahead over.
const MAX_STEPS: f32 = 64.0;

/// When a client last used a service and how regularly it comes back to it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct Use {
    service: u32,
    last_at: u64,
    /// Moving average of the interval between two uses, ms (meaningful once `uses >= 2`).
    interval_ms: f32,
    /// Moving average of the interval's absolute deviation from `interval_ms`, ms.
    dev_ms: f32,
    uses: u32,
}

impl Skill {
    /// Records a request for `service` at `at`; `gap` is the time since the client's previous
    /// request (None for its first).
    fn note_use(&mut self, service: u32, at: u64, gap: Option<u64>) {
        if let Some(gap) = gap {
            let gap = gap as f32;
            self.gap_ms = if self.gap_ms > 0.0 {
                self.gap_ms + TIME_ALPHA * (gap - self.gap_ms)
            } else {
                gap.max(f32::MIN_POSITIVE)
            };
        }
        if let Some(u) = self.uses.iter_mut().find(|u| u.service == service) {
            let dt = at.saturating_sub(u.last_at) as f32;
            if u.uses >= 2 {
                u.dev_ms += TIME_ALPHA * ((dt - u.interval_ms).abs() - u.dev_ms);
                u.interval_ms += TIME_ALPHA * (dt - u.interval_ms);
            } else {
                u.interval_ms = dt;
                u.dev_ms = dt / 2.0;
            }
            u.last_at = u.last_at.max(at);
            u.uses = u.uses.saturating_add(1);
            return;
        }
        let new = Use {
            service,
            last_at: at,
            interval_ms: 0.0,
            dev_ms: 0.0,
            uses: 1,
        };
        if self.uses.len() < MAX_USES {
            self.uses.push(new);
        } else if let Some(old) = self.uses.iter_mut().min_by_key(|u| (u.last_at, u.service)) {
            *old = new;
        }
    }

    /// Probability that a periodic `u` is used within `horizon` ms of `at`, and when it is
    /// due (ms from `at`). 0 until the service has been used twice.
    fn periodic(u: &Use, at: u64, horizon: f32) -> (f32, f32) {
        if u.uses < 2 || u.interval_ms <= 0.0 {
            return (0.0, 0.0);
        }
        let t = at.saturating_sub(u.last_at) as f32;
        let (period, spread) = (u.interval_ms, u.dev_ms + 0.1 * u.interval_ms + 1.0);
        // Due time is `period` after the last use, give or take `spread`: the chance that it
        // falls before `at + horizon` (logistic approximation of a normal CDF) ...
        let z = (t + horizon - period) / spread;
        let due = 1.0 / (1.0 + exp_approx(-1.7 * z));
        // ... fading once the service is long overdue (the client may have stopped using it).
        let late = ((t - period - 3.0 * spread) / period.max(1.0)).max(0.0);
        let p = due * exp_approx(-late);
        (p.clamp(0.0, 1.0), (period - t).max(0.0))
    }
}

/// Snapshot of a [`Blend`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct BlendState {
    core: CoreState<Skill>,
    global: Skill,
}

/// The shipped model (see the module docs).
#[derive(Debug, Clone)]
pub struct Blend {
    name: &'static str,
    core: Core<Skill>,
    global: Skill,
    params: BlendParams,
    memo: ExpertMemo,
}

/// Each expert's PPM-C weights over its scope's tables.
#[derive(Clone, Copy, Default)]
struct Experts {
    /// `w[slot][e]`: weight of table `slot` (order, or the bag) of scope `e / 3` in expert `e`;
    /// slot-major and padded to whole lanes (with 0), so that sums over slots for all experts
    /// at once are plain vector operations.
    w: [[f32; LANES]; SLOTS],
    avail: [bool; EXPERTS],
    /// `avail` as 1.0 / 0.0, padded to whole lanes with 0.
    mask: [f32; LANES],
}

impl Experts {
    /// Weights from `(total, distinct)` of every table, indexed `[scope][slot]`.
    ///
    /// The same arithmetic as `rank::ppm_chain` over the chains `hi..=0` (long), `lo..=0` (short)
    /// and `BAG, 1, 0` (bag, if the bag table has data), specialised: the chains are
    /// descending runs of orders, so each is walked once with per-table values shared.
    #[cfg(test)]
    fn new(stats: &Stats, his: [usize; 3], lo: usize) -> Self {
        let mut ex = Self {
            w: [[0.0; LANES]; SLOTS],
            avail: [false; EXPERTS],
            mask: [0.0; LANES],
        };
        ex.fill(stats, his, lo);
        ex
    }

    /// The experts' weights (see `new`, the test reference's entry point) written in place
    /// (no copy of the result).
    fn fill(&mut self, stats: &Stats, his: [usize; 3], lo: usize) {
        let Self { w, avail, mask } = self;
        *w = [[0.0; LANES]; SLOTS];
        *avail = [false; EXPERTS];
        for s in [CLIENT, GROUP, GLOBAL] {
            let st = &stats[s];
            // A scope without tables (e.g. a group not shared): no expert, nothing to write.
            if st.iter().all(|&(n, _)| n == 0.0) {
                continue;
            }
            let hi = his[s];
            // The short chain only when it differs from the long one.
            let lo = if lo < hi { Some(lo) } else { None };
            // `&` rather than `&&`: no branches (measured: fewer instructions).
            let ok: [bool; SLOTS] = std::array::from_fn(|i| (st[i].0 > 0.0) & (st[i].1 > 0.0));
            // Lowest usable order: where the descending chains end (all end at order 0's
            // side, so the last usable table of each is the lowest usable one it visits).
            let Some(low) = (0..=hi).find(|&i| ok[i]) else {
                // No usable order: only the bag could be (alone in its chain).
                if ok[BAG_SLOT] {
                    w[BAG_SLOT][3 * s + 2] = 1.0 / st[BAG_SLOT].0;
                    avail[3 * s + 2] = w[BAG_SLOT][3 * s + 2] > 0.0;
                }
                continue;
            };
            // The long and short chains: orders `top..=0`.
            for (e, top) in [(3 * s, Some(hi)), (3 * s + 1, lo)] {
                let Some(top) = top else { continue };
                if low <= top {
                    descend(st, &ok, top, low, 1.0, w, e);
                }
            }
            if st[BAG_SLOT].0 > 0.0 {
                let e = 3 * s + 2;
                let mut esc = 1.0f32;
                if ok[BAG_SLOT] {
                    let (n, u) = st[BAG_SLOT];
                    if low > 1 {
                        // Nothing usable after the bag: it keeps everything.
                        w[BAG_SLOT][e] = esc / n;
                    } else {
                        w[BAG_SLOT][e] = esc / (n + u);
                        esc *= u / (n + u);
                    }
                }
                if low <= 1 {
                    descend(st, &ok, 1, low, esc, w, e);
                }
            }
            for e in 3 * s..3 * s + 3 {
                avail[e] = w.iter().any(|w| w[e] > 0.0);
            }
        }
        *mask = [0.0; LANES];
        for (m, &a) in mask.iter_mut().zip(avail.iter()) {
            *m = f32::from(u8::from(a));
        }
    }

    /// Mixture weights `w`, scaled by each scope's data (`n0[scope]`, see
    /// [`BlendParams::trust`]) and renormalised over the available experts.
    fn mix(&self, w: &[f32; EXPERTS], n0: &[f32; 3], trust: f32) -> [f32; EXPERTS] {
        // Each scope's trust factor once, then branch-free over the experts.
        let f: [f32; 3] =
            std::array::from_fn(|s| n0[s] / (n0[s] + trust.max(0.0) + f32::MIN_POSITIVE));
        let out: [f32; EXPERTS] = std::array::from_fn(|e| self.mask[e] * w[e].max(0.0) * f[e / 3]);
        let mut sum = 0.0;
        for x in &out {
            sum += x;
        }
        if sum > 0.0 {
            let inv = 1.0 / sum;
            out.map(|x| x * inv)
        } else {
            out
        }
    }
}

/// `(total, distinct)` of every table of a context, `[scope][slot]`: all that [`Experts::fill`]
/// depends on (the orders are fixed per model).
type Stats = [[(f32, f32); SLOTS]; 3];

/// The experts' weights last computed by `predict`, so that the `observe` that follows (which
/// sees the same tables just before updating them) need not recompute them. Pure memoisation
/// of [`Experts::fill`] keyed by the bits of its whole input, so a hit gives exactly what a
/// recomputation would. Behind a `Mutex` only so that `Blend` stays `Sync`: `predict` (`&self`) fills it when
/// the lock is free (`try_lock`, never waits; otherwise it works on a fresh local copy),
/// `observe` (`&mut self`) reads it without locking.
#[derive(Default)]
struct ExpertMemo(std::sync::Mutex<Scratch>);

/// What the lock holds: the memo, and the candidate buffer of the ranking (reused, so it is
/// not initialised anew for every prediction).
#[derive(Default)]
struct Scratch {
    memo: Memo,
    cands: Cands,
}

/// The memo's content, filled in place; `valid` until the first fill.
struct Memo {
    valid: bool,
    /// The bits of the statistics the experts were computed from: equal bits give equal
    /// experts (a stricter test than float equality, and one that vectorises).
    key: StatBits,
    ex: Experts,
}

impl Default for Memo {
    fn default() -> Self {
        Self {
            valid: false,
            key: [0; 3 * SLOTS * 2],
            ex: Experts::default(),
        }
    }
}

/// [`Stats`] as bits, flat: `(scope · SLOTS + slot) · 2` + 0 (total) or 1 (distinct).
type StatBits = [u32; 3 * SLOTS * 2];

fn stat_bits(stats: &Stats) -> StatBits {
    std::array::from_fn(|k| {
        let (n, u) = stats[k / (2 * SLOTS)][k / 2 % SLOTS];
        if k % 2 == 0 {
            n.to_bits()
        } else {
            u.to_bits()
        }
    })
}

/// `a == b` as one OR of XORs over the words (vector instructions; the derived comparison
/// of the 144-byte keys is a `memcmp` call).
#[inline]
fn same_bits(a: &StatBits, b: &StatBits) -> bool {
    a.iter().zip(b).fold(0, |d, (x, y)| d | (x ^ y)) == 0
}

impl Memo {
    /// The experts for `stats`, recomputed (in place) unless they are the memoised ones.
    #[inline]
    fn experts(&mut self, stats: &Stats, his: [usize; 3], lo: usize) -> &Experts {
        let key = stat_bits(stats);
        if !(self.valid && same_bits(&self.key, &key)) {
            self.store(key, stats, his, lo);
        }
        &self.ex
    }

    /// The experts for `stats`, computed and memoised without looking at the memo first
    /// (for `predict`, whose tables have almost always changed since the last `observe`).
    #[inline]
    fn recompute(&mut self, stats: &Stats, his: [usize; 3], lo: usize) -> &Experts {
        // The key written in place (a `StatBits` built and moved in is a `memcpy` call).
        for (k, &(n, u)) in self.key.chunks_exact_mut(2).zip(stats.iter().flatten()) {
            k[0] = n.to_bits();
            k[1] = u.to_bits();
        }
        self.valid = true;
        self.ex.fill(stats, his, lo);
        &self.ex
    }

    fn store(&mut self, key: StatBits, stats: &Stats, his: [usize; 3], lo: usize) {
        self.valid = true;
        self.key = key;
        self.ex.fill(stats, his, lo);
    }
}

impl Clone for ExpertMemo {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for ExpertMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExpertMemo")
    }
}

/// PPM-C weights (as `rank::ppm_chain`) of orders `top` down to `low` (the last usable one),
/// starting with escape mass `esc`.
#[inline(always)]
fn descend(
    st: &[(f32, f32); SLOTS],
    ok: &[bool; SLOTS],
    top: usize,
    low: usize,
    mut esc: f32,
    out: &mut [[f32; LANES]; SLOTS],
    e: usize,
) {
    for i in (low + 1..=top).rev() {
        if ok[i] {
            let (n, u) = st[i];
            out[i][e] = esc / (n + u);
            esc *= u / (n + u);
        }
    }
    out[low][e] = esc / st[low].0;
}

fn stats_of(t: &[[Option<&Dist>; SLOTS]; 3]) -> Stats {
    std::array::from_fn(|s| {
        std::array::from_fn(|i| t[s][i].map_or((0.0, 0.0), |d| (d.total, d.entries.len() as f32)))
    })
}

impl Blend {
    /// A fresh model with the shipped parameters.
    pub fn new(cfg: &ModelConfig) -> Self {
        Self::with_params(cfg, BlendParams::default())
    }

    /// The previous shipped model (`blend-full`, see [`BlendParams::full`]).
    pub fn full(cfg: &ModelConfig) -> Self {
        Self {
            name: "blend-full",
            ..Self::with_params(cfg, BlendParams::full())
        }
    }

    /// A fresh model with explicit parameters.
    pub fn with_params(cfg: &ModelConfig, params: BlendParams) -> Self {
        let mut core = Core::new(
            cfg,
            [true, true, true],
            0,
            cfg.max_order.clamp(1, MAX_ORDER),
        );
        core.bag = params.bags;
        core.his = std::array::from_fn(|s| params.orders[s].clamp(core.lo, core.hi));
        Self {
            name: "blend",
            core,
            global: Skill::default(),
            params,
            memo: ExpertMemo::default(),
        }
    }

    pub(crate) fn state(&self) -> BlendState {
        BlendState {
            core: self.core.state(),
            global: self.global.clone(),
        }
    }

    pub(crate) fn restore(cfg: &ModelConfig, params: BlendParams, s: BlendState) -> Self {
        let mut me = Self::with_params(cfg, params);
        me.core.restore(s.core);
        me.global = s.global;
        me
    }

    fn low(&self) -> usize {
        self.params.low_order.min(self.core.hi)
    }

    /// Exponentiated-gradient step of the mixture weights towards the experts that gave the
    /// observed service more probability than the mixture did; unavailable experts (`mask` 0)
    /// keep theirs.
    ///
    /// Branch-free over whole lanes (the mask multiplies instead of an `if` per expert), so
    /// the compiler keeps it in SIMD registers; the sums run in expert order.
    fn update_skill(
        skill: &mut Skill,
        p: &BlendParams,
        probs: &[f32; LANES],
        mask: &[f32; LANES],
        repeat: Option<bool>,
    ) {
        let mut w = [0.0f32; LANES];
        w[..EXPERTS].copy_from_slice(&skill.w);
        let (mut mix, mut mass, mut n) = (0.0f32, 0.0f32, 0.0f32);
        for e in 0..EXPERTS {
            let mw = mask[e] * w[e];
            mix += mw * probs[e];
            mass += mw;
            n += mask[e];
        }
        if mix > 0.0 && mass > 0.0 {
            // `probs / (mix / mass)`, one division for all lanes.
            let inv = mass / mix;
            let mut x = [0.0f32; LANES];
            for e in 0..LANES {
                x[e] = exp_approx(p.rate * (probs[e] * inv - 1.0));
            }
            let new: [f32; LANES] = std::array::from_fn(|e| mask[e] * w[e] * x[e]);
            let mut sum = 0.0;
            for v in &new[..EXPERTS] {
                sum += v;
            }
            if sum > 0.0 && sum.is_finite() {
                let (scale, spread) = ((1.0 - p.share) * mass / sum, p.share * mass / n);
                for e in 0..EXPERTS {
                    let updated = scale * new[e] + spread;
                    skill.w[e] = if mask[e] > 0.0 { updated } else { w[e] };
                }
            }
        }
        if let Some(r) = repeat {
            let x = if r { 1.0 } else { 0.0 };
            skill.rho += p.repeat_alpha * (x - skill.rho);
        }
    }
}

impl Blend {
    fn observe_impl(
        &mut self,
        client: ClientId,
        group: Option<GroupId>,
        service: ServiceId,
        at: Millis,
    ) {
        let mut stats = [[(0.0f32, 0.0f32); SLOTS]; 3];
        let mut counts = [[0.0f32; SLOTS]; 3];
        let (his, lo, p) = (self.core.his, self.low(), self.params);
        let prior = &self.global;
        // One client lookup for `touch` and the update; the client's entry as the update
        // leaves it (no further lookup for its skill).
        let ((events, last_at), c) = self.core.touch_learn(
            client,
            group,
            (service.0, at.0),
            || prior.clone(),
            |s, slot, pre| {
                stats[s][slot] = (pre.total, pre.distinct);
                counts[s][slot] = pre.count;
            },
        );
        let first = events == 0;
        let gap = (!first).then(|| at.0.saturating_sub(last_at));
        let mut own_ex;
        let ex = match self.memo.0.get_mut() {
            Ok(s) => &mut s.memo,
            Err(_) => {
                own_ex = Memo::default();
                &mut own_ex
            }
        }
        .experts(&stats, his, lo);
        // Each expert's probability of the service, `Σ_slot w[slot][e] · count[slot]` summed
        // in slot order (as `Iterator::sum`, from -0.0), all experts at once (whole lanes).
        let mut probs = [-0.0f32; LANES];
        for (slot, w) in ex.w.iter().enumerate() {
            // The count of table `slot` of each expert's scope, in the experts' lanes.
            let c: [f32; LANES] = std::array::from_fn(|e| {
                if e < EXPERTS {
                    counts[e / 3][slot]
                } else {
                    0.0
                }
            });
            for e in 0..LANES {
                probs[e] += w[e] * c[e];
            }
        }
        let repeat = (!first).then_some(counts[CLIENT][0] > 0.0);
        // The model-wide skill is the prior of new clients. Its repeat rate is learned from
        // every request; its mixture weights only if `learn_prior_weights` (a second
        // exponentiated-gradient step per event): otherwise a new client starts from equal
        // weights, and the trust factor leans it on the scopes that have data.
        if p.learn_prior_weights {
            Self::update_skill(&mut self.global, &p, &probs, &ex.mask, repeat);
        } else if let Some(r) = repeat {
            self.global.rho += p.repeat_alpha * (f32::from(u8::from(r)) - self.global.rho);
        }
        Self::update_skill(&mut c.ext, &p, &probs, &ex.mask, repeat);
        c.ext.note_use(service.0, at.0, gap);
    }

    fn predict_next_into(&self, client: ClientId, at: Millis, k: usize, out: &mut Vec<Prediction>) {
        out.clear();
        let Some(c) = self.core.clients.get(&client) else {
            return;
        };
        let mut guard = self.memo.0.try_lock().ok();
        let mut local;
        let Scratch { memo, cands } = match guard.as_deref_mut() {
            Some(s) => s,
            None => {
                local = Scratch::default();
                &mut local
            }
        };
        cands.clear();
        self.rank(c, memo, cands);
        cands.finish(k, c.last_at, at, out);
    }

    /// See [`Model::predict_within_into`]: each candidate's probability of use within
    /// `horizon_ms`, combining the next-step distribution, the client's long-run mix over the
    /// requests it will make within the horizon, and per-service periodicity.
    fn predict_horizon_into(
        &self,
        client: ClientId,
        at: Millis,
        horizon_ms: u64,
        k: usize,
        out: &mut Vec<Prediction>,
    ) {
        out.clear();
        let Some(c) = self.core.clients.get(&client) else {
            return;
        };
        let mut guard = self.memo.0.try_lock().ok();
        let mut local;
        let Scratch { memo, cands } = match guard.as_deref_mut() {
            Some(s) => s,
            None => {
                local = Scratch::default();
                &mut local
            }
        };
        cands.clear();
        let own = self.rank(c, memo, cands);
        // The client's used services join after the gate, ungated.
        cands.apply_gate();
        let skill = &c.ext;
        for u in &skill.uses {
            cands.add(u.service, 0.0, 0.0);
        }
        let horizon = horizon_ms as f32;
        // Requests the client will make within the horizon, from its usual gap (the first of
        // them is the one the next-step ranking is about).
        let steps = if skill.gap_ms > 0.0 {
            (horizon / skill.gap_ms).clamp(1.0, MAX_STEPS)
        } else {
            1.0
        };
        let since_last = at.0.saturating_sub(c.last_at) as f32;
        cands.rescore(|cand: &Cand| {
            let p1 = cand.score.clamp(0.0, 1.0);
            let next_in = cand.delay_ms().max(0.0) - since_last;
            // Later requests: drawn from the client's own long-run mix (order-0 table).
            let q = own.map_or(0.0, |d| {
                d.entries
                    .iter()
                    .find(|e| e.service == cand.service)
                    .map_or(0.0, |e| e.count * d.scale / d.total.max(f32::MIN_POSITIVE))
            });
            let miss_later = (1.0 - q.clamp(0.0, 1.0)).powf(steps - 1.0);
            let p_seq = 1.0 - (1.0 - p1) * miss_later;
            let (p_per, due) = skill
                .uses
                .iter()
                .find(|u| u.service == cand.service)
                .map_or((0.0, 0.0), |u| Skill::periodic(u, at.0, horizon));
            let p = 1.0 - (1.0 - p_seq) * (1.0 - p_per);
            let expected = if p_per > p_seq { due } else { next_in.max(0.0) };
            (p, expected)
        });
        cands.finish(k, at.0, at, out);
    }

    /// The next-step scores of `c`'s candidates (into `cands`, which must be empty); returns
    /// the client's own order-0 table.
    fn rank<'a>(
        &'a self,
        c: &'a ClientState<Skill>,
        memo: &mut Memo,
        cands: &mut Cands,
    ) -> Option<&'a Dist> {
        let mut t = [[None; SLOTS]; 3];
        self.core.view_into(c, &mut t);
        let stats = stats_of(&t);
        let ex = memo.recompute(&stats, self.core.his, self.low());
        let skill = if c.events >= self.params.own_after {
            &c.ext
        } else {
            &self.global
        };
        let n0 = [stats[CLIENT][0].0, stats[GROUP][0].0, stats[GLOBAL][0].0];
        let lam = ex.mix(&skill.w, &n0, self.params.trust);
        for s in [CLIENT, GROUP, GLOBAL] {
            for (i, d) in t[s].iter().enumerate() {
                let Some(d) = d else { continue };
                let w: f32 = (3 * s..3 * s + 3).map(|e| lam[e] * ex.w[i][e]).sum();
                // A table contributing almost no probability mass is not worth reading.
                if w * d.total < MIN_MASS {
                    continue;
                }
                cands.add_top(d, w, self.params.top);
            }
        }
        if self.params.gate > 0.0 {
            if let Some(own) = t[CLIENT][0] {
                cands.mark_seen(own);
                let (mut seen, mut new) = (0.0f32, 0.0f32);
                for it in cands.as_slice() {
                    if it.seen {
                        seen += it.score;
                    } else {
                        new += it.score;
                    }
                }
                if seen > 0.0 && new > 0.0 {
                    let rho = c.ext.rho.clamp(0.0, 1.0);
                    // The gate, too, trusts a client's repeat rate only once it has some history.
                    let n = c.events as f32;
                    let g = self.params.gate.min(1.0) * n
                        / (n + self.params.trust.max(0.0) + f32::MIN_POSITIVE);
                    let total = seen + new;
                    // Each score is multiplied by its class's factor when read (`Cands`).
                    let factor = |gated: f32| g * gated * total + (1.0 - g);
                    cands.set_gate(factor((1.0 - rho) / new), factor(rho / seen));
                }
            }
        }
        t[CLIENT][0]
    }
}

impl Model for Blend {
    fn name(&self) -> &'static str {
        self.name
    }

    fn observe_grouped(
        &mut self,
        client: ClientId,
        group: Option<GroupId>,
        service: ServiceId,
        at: Millis,
    ) {
        self.observe_impl(client, group, service, at);
    }

    fn predict_into(&self, client: ClientId, at: Millis, k: usize, out: &mut Vec<Prediction>) {
        self.predict_next_into(client, at, k, out);
    }

    fn predict_within_into(
        &self,
        client: ClientId,
        at: Millis,
        horizon_ms: u64,
        k: usize,
        out: &mut Vec<Prediction>,
    ) {
        self.predict_horizon_into(client, at, horizon_ms, k, out);
    }

    fn forget_client(&mut self, client: ClientId) {
        self.core.forget_client(client);
    }

    fn forget_groups(&mut self, groups: &[GroupId]) {
        self.core.forget_groups(groups);
    }

    fn forget_services(&mut self, services: &[ServiceId]) {
        let ids: Vec<u32> = services.iter().map(|s| s.0).collect();
        self.core.forget_services(&ids);
    }

    fn memory_bytes(&self) -> usize {
        self.core.memory_bytes(|_| 0)
    }

    fn clients(&self) -> usize {
        self.core.clients.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::rank::ppm_chain;

    /// The reference's experts, `w[e][slot]`.
    struct Reference {
        w: [[f32; SLOTS]; EXPERTS],
        avail: [bool; EXPERTS],
    }

    /// The reference: the generic PPM-C chain walker over the three chains.
    fn reference(stats: &Stats, hi: usize, lo: usize) -> Reference {
        let mut w = [[0.0; SLOTS]; EXPERTS];
        let mut avail = [false; EXPERTS];
        let long: [usize; MAX_ORDER + 1] = std::array::from_fn(|i| hi.saturating_sub(i));
        let short: [usize; MAX_ORDER + 1] = std::array::from_fn(|i| lo.saturating_sub(i));
        let bag = [BAG_SLOT, 1, 0];
        for s in [CLIENT, GROUP, GLOBAL] {
            ppm_chain(&stats[s], &long[..=hi], &mut w[3 * s]);
            if lo < hi {
                ppm_chain(&stats[s], &short[..=lo], &mut w[3 * s + 1]);
            }
            if stats[s][BAG_SLOT].0 > 0.0 {
                ppm_chain(&stats[s], &bag, &mut w[3 * s + 2]);
            }
            for e in 3 * s..3 * s + 3 {
                avail[e] = w[e].iter().any(|&x| x > 0.0);
            }
        }
        Reference { w, avail }
    }

    #[test]
    fn specialised_expert_weights_are_bit_identical_to_the_chain_walker() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let stats: Stats = std::array::from_fn(|_| {
                std::array::from_fn(|_| match next() % 4 {
                    0 => (0.0, 0.0),
                    1 => ((next() % 1000) as f32 / 7.0, 0.0),
                    _ => ((next() % 1000) as f32 / 7.0, (next() % 24) as f32),
                })
            });
            for (hi, lo) in [(4, 1), (4, 0), (2, 1), (1, 1), (3, 2)] {
                let (a, b) = (Experts::new(&stats, [hi; 3], lo), reference(&stats, hi, lo));
                assert_eq!(a.avail, b.avail, "{stats:?} {hi} {lo}");
                for e in 0..EXPERTS {
                    for i in 0..SLOTS {
                        assert_eq!(a.w[i][e].to_bits(), b.w[e][i].to_bits(), "{stats:?}");
                    }
                }
            }
        }
    }
}
