//! Candidate accumulation and top-k ranking without heap allocation.
//!
//! Models add weighted counts of count tables into a fixed-size, stack-allocated candidate set,
//! then [`Cands::finish`] sorts by score (ties: smaller service id first) and writes the top k.

use crate::store::Dist;
use crate::{Millis, Prediction, ServiceId};

impl Cand {
    /// Expected delay from the client's last event (score-weighted mean of the tables').
    pub fn delay_ms(&self) -> f32 {
        if self.score > 0.0 {
            self.delay_w / self.score
        } else {
            0.0
        }
    }
}

/// Most distinct candidates considered per ranking; more are ignored (they come from the
/// low-weight tail, since tables are visited most specific first).
const MAX_CANDS: usize = 64;

/// Largest k ranked by insertion into a small buffer (larger k: selection, then sort).
const SMALL_K: usize = 8;

/// Slots of the open-addressing index (a power of two, well above `MAX_CANDS`).
const INDEX: usize = 128;

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cand {
    pub service: u32,
    pub score: f32,
    /// Sum of weight × delay, for the expected time until use.
    delay_w: f32,
    /// Whether the client has used this service before (set by [`Cands::mark_seen`]).
    pub seen: bool,
}

pub(crate) struct Cands {
    items: [Cand; MAX_CANDS],
    len: usize,
    /// `index[h]` = 1 + position in `items`, 0 = empty; linear probing.
    index: [u8; INDEX],
    /// `keys[h]` = the service of the candidate `index[h]` points to (meaningless where
    /// `index[h]` is 0, so never cleared): a probe compares services without reading `items`.
    keys: [u32; INDEX],
    /// Factor of every candidate's score, by `seen` (`[new, seen]`): the repeat gate
    /// ([`Cands::set_gate`]), applied when scores are read rather than written into each.
    gate: [f32; 2],
}

impl Default for Cands {
    fn default() -> Self {
        Self::new()
    }
}

impl Cands {
    #[inline(always)]
    pub fn new() -> Self {
        Self {
            items: [Cand::default(); MAX_CANDS],
            len: 0,
            index: [0; INDEX],
            keys: [0; INDEX],
            gate: [1.0; 2],
        }
    }

    /// Empties the set (only the index is cleared: items past `len` and keys of empty index
    /// slots are never read).
    #[inline]
    pub fn clear(&mut self) {
        self.len = 0;
        self.index = [0; INDEX];
        self.gate = [1.0; 2];
    }

    /// Position of `service` in `items`, or the empty index slot where it would go.
    #[inline]
    fn find(&self, service: u32) -> Result<usize, usize> {
        let mut h = (service.wrapping_mul(0x9E37_79B9) >> 24) as usize & (INDEX - 1);
        loop {
            match self.index[h] {
                0 => return Err(h),
                i if self.keys[h] == service => return Ok(usize::from(i) - 1),
                _ => h = (h + 1) & (INDEX - 1),
            }
        }
    }

    #[inline]
    pub fn add(&mut self, service: u32, score: f32, delay_ms: f32) {
        match self.find(service) {
            Ok(i) => {
                let c = &mut self.items[i];
                c.score += score;
                c.delay_w += score * delay_ms;
            }
            Err(slot) if self.len < MAX_CANDS => {
                self.items[self.len] = Cand {
                    service,
                    score,
                    delay_w: score * delay_ms,
                    seen: false,
                };
                self.len += 1;
                // MAX_CANDS < 255, so the position fits the u8 index.
                self.index[slot] = self.len as u8;
                self.keys[slot] = service;
            }
            Err(_) => {}
        }
    }

    /// Flags the candidates that appear in `d`.
    pub fn mark_seen(&mut self, d: &Dist) {
        for e in &d.entries {
            if let Ok(i) = self.find(e.service) {
                self.items[i].seen = true;
            }
        }
    }

    /// Adds `weight` × count of every entry of `d`.
    #[inline]
    pub fn add_dist(&mut self, d: &Dist, weight: f32) {
        self.add_top(d, weight, usize::MAX);
    }

    /// Adds `weight` × count of the `top` most counted entries of `d`.
    #[inline]
    pub fn add_top(&mut self, d: &Dist, weight: f32, top: usize) {
        // Stored counts are in units of the table's scale (lazy decay, see `Dist`).
        let weight = weight * d.scale;
        if weight <= 0.0 {
            return;
        }
        for e in &d.entries[..top.min(d.entries.len())] {
            self.add(e.service, weight * e.count, e.delay_ms);
        }
    }

    /// Replaces every candidate's score and expected delay by `f(candidate)` =
    /// `(score, delay_ms)`; the delay then counts from the `last_at` given to `finish`.
    /// `f` sees the gated score (see [`Cands::set_gate`]); the new scores are final.
    pub fn rescore(&mut self, mut f: impl FnMut(&Cand) -> (f32, f32)) {
        let gate = self.gate;
        for c in &mut self.items[..self.len] {
            let gated = Cand {
                score: c.score * gate[usize::from(c.seen)],
                ..*c
            };
            let (score, delay) = f(&gated);
            c.score = score;
            c.delay_w = score * delay;
        }
        self.gate = [1.0; 2];
    }

    /// Multiplies every score by its gate factor now (and resets the gate): for a caller that
    /// adds candidates after gating, which the gate must not touch (as an eager pass left them
    /// untouched, also where a factor is not finite).
    pub fn apply_gate(&mut self) {
        let gate = self.gate;
        for c in &mut self.items[..self.len] {
            c.score *= gate[usize::from(c.seen)];
        }
        self.gate = [1.0; 2];
    }

    /// The candidates, scores not gated.
    pub fn as_slice(&self) -> &[Cand] {
        &self.items[..self.len]
    }

    /// Multiplies the score of every candidate not seen by `new` and of every seen one
    /// (flagged by [`Cands::mark_seen`]) by `seen` — when the scores are read (by
    /// [`Cands::finish`] or [`Cands::rescore`]), so the gate costs no pass of its own. The
    /// product is the one an eager `score *= factor` would store, so results are the same
    /// bits (test `the_lazy_gate_matches_an_eager_rescale`).
    pub fn set_gate(&mut self, new: f32, seen: f32) {
        self.gate = [new, seen];
    }

    /// Writes the best `k` into `out`, best first; `last_at` is the client's last event time,
    /// from which the learned delays count.
    pub fn finish(&mut self, k: usize, last_at: u64, at: Millis, out: &mut Vec<Prediction>) {
        out.clear();
        let gate = self.gate;
        let items = &mut self.items[..self.len];
        // Best first: higher score, then smaller service id (a total order, so selecting the
        // top k and sorting only those gives exactly the head of a full sort).
        let better =
            |a: &Cand, b: &Cand| b.score.total_cmp(&a.score).then(a.service.cmp(&b.service));
        let k = k.min(items.len());
        if k == 0 {
            return;
        }
        let mut top = [Cand::default(); SMALL_K];
        let best: &[Cand] = if k <= SMALL_K {
            // One pass with a small sorted buffer: far cheaper than selecting for k = 3.
            let mut n = 0;
            for c in items.iter() {
                let c = &Cand {
                    score: c.score * gate[usize::from(c.seen)],
                    ..*c
                };
                // Fast reject: a score below the k-th best (plain float comparison, which
                // implies `total_cmp` agrees) cannot enter; anything else takes the full test.
                if n == k && (c.score < top[k - 1].score || better(c, &top[k - 1]).is_ge()) {
                    continue;
                }
                let mut i = if n < k { n } else { k - 1 };
                while i > 0 && better(c, &top[i - 1]).is_lt() {
                    top[i] = top[i - 1];
                    i -= 1;
                }
                top[i] = *c;
                n = (n + 1).min(k);
            }
            // Written from the buffer (copying it back into `items` was a `memcpy` call).
            &top[..k]
        } else {
            for c in items.iter_mut() {
                c.score *= gate[usize::from(c.seen)];
            }
            if k < items.len() {
                items.select_nth_unstable_by(k - 1, better);
            }
            items[..k].sort_unstable_by(better);
            &items[..k]
        };
        for c in best {
            if c.score.is_nan() || c.score <= 0.0 {
                break;
            }
            let delay = (c.delay_w / c.score).max(0.0) as u64;
            out.push(Prediction {
                service: ServiceId(c.service),
                probability: f64::from(c.score).clamp(0.0, 1.0),
                expected_in_ms: last_at.saturating_add(delay).saturating_sub(at.0),
            });
        }
    }
}

/// PPM-C interpolation weights for a chain of tables, most specific first: the probability of
/// `s` is `Σ w[i] × count_i(s)`. Each table keeps `total / (total + distinct)` of the mass
/// and passes the rest (the escape) down the chain; the last table keeps all that reaches it.
pub(crate) fn ppm_weights<const N: usize>(chain: &[Option<&Dist>; N]) -> [f32; N] {
    let stats: [(f32, f32); N] =
        std::array::from_fn(|i| chain[i].map_or((0.0, 0.0), |d| (d.total, d.entries.len() as f32)));
    let order: [usize; N] = std::array::from_fn(|i| i);
    let mut w = [0.0f32; N];
    ppm_chain(&stats, &order, &mut w);
    w
}

/// PPM-C weights over `stats` (`(total, distinct)` per slot), visiting the slots listed in
/// `chain` most specific first; writes the weight of each visited slot into `out`.
pub(crate) fn ppm_chain<const N: usize>(
    stats: &[(f32, f32); N],
    chain: &[usize],
    out: &mut [f32; N],
) {
    let usable = |i: usize| stats[i].0 > 0.0 && stats[i].1 > 0.0;
    let Some(last) = chain.iter().rposition(|&i| usable(i)) else {
        return;
    };
    let mut esc = 1.0f32;
    for (pos, &i) in chain.iter().enumerate().take(last + 1) {
        if !usable(i) {
            continue;
        }
        let (n, u) = stats[i];
        if pos == last {
            out[i] = esc / n;
        } else {
            out[i] = esc / (n + u);
            esc *= u / (n + u);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Decay, Dist};

    /// Two candidate sets filled alike: random services (colliding in the index), scores and
    /// delays, the services of a random "own" table flagged seen.
    fn filled(next: &mut impl FnMut(u64) -> u64, own: &Dist) -> (Cands, Cands) {
        let (mut a, mut b) = (Cands::new(), Cands::new());
        for _ in 0..next(90) {
            let s = next(200) as u32 * 128;
            let (score, delay) = (next(1000) as f32 / 997.0, next(5000) as f32);
            a.add(s, score, delay);
            b.add(s, score, delay);
        }
        a.mark_seen(own);
        b.mark_seen(own);
        (a, b)
    }

    /// The repeat gate applied when scores are read (`set_gate`) gives the same rankings,
    /// probabilities and expected times, bit for bit, as multiplying every candidate's score
    /// by its factor first; for the small-k and the sorting path, through `rescore`, and with
    /// candidates added after `apply_gate` (also for a factor that is not finite).
    #[test]
    fn the_lazy_gate_matches_an_eager_rescale() {
        let mut next = crate::test_rng(0x9E37_79B9_7F4A_7C15u64);
        let decay = Decay::new(1e9, 24);
        let eager = |c: &mut Cands, gate: [f32; 2]| {
            for it in &mut c.items[..c.len] {
                it.score *= gate[usize::from(it.seen)];
            }
        };
        let bits = |out: &[Prediction]| -> Vec<(u32, u64, u64)> {
            out.iter()
                .map(|p| (p.service.0, p.probability.to_bits(), p.expected_in_ms))
                .collect()
        };
        let mut gated = 0;
        for round in 0..3_000u64 {
            let mut own = Dist::default();
            for _ in 0..next(30) {
                own.observe(next(200) as u32 * 128, 0, 0.0, &decay);
            }
            let mut gate = [next(3000) as f32 / 1013.0, next(3000) as f32 / 1013.0];
            if round % 50 == 7 {
                // A factor that is not finite (a tiny share of new candidates).
                gate[0] = f32::INFINITY;
            }
            for k in [1, 3, 8, 20, 100] {
                let (mut lazy, mut reference) = filled(&mut next, &own);
                lazy.set_gate(gate[0], gate[1]);
                eager(&mut reference, gate);
                let (mut a, mut b) = (Vec::new(), Vec::new());
                let at = Millis(1_000 + round);
                if round % 3 == 0 {
                    lazy.finish(k, 900, at, &mut a);
                    reference.finish(k, 900, at, &mut b);
                } else if round % 3 == 1 {
                    // Candidates added after the gate was applied are not gated.
                    lazy.apply_gate();
                    for c in [&mut lazy, &mut reference] {
                        c.add(7, 0.0, 0.0);
                        c.add(128, 0.3, 10.0);
                    }
                    lazy.finish(k, 900, at, &mut a);
                    reference.finish(k, 900, at, &mut b);
                } else {
                    // `rescore` sees the gated scores, then they are final.
                    let f = |c: &Cand| (c.score * 0.5 + 0.01, c.delay_ms() + 3.0);
                    lazy.rescore(f);
                    reference.rescore(f);
                    lazy.finish(k, 1_000, at, &mut a);
                    reference.finish(k, 1_000, at, &mut b);
                }
                assert_eq!(bits(&a), bits(&b), "round {round} k {k}");
                gated += usize::from(gate != [1.0; 2] && !a.is_empty());
            }
        }
        assert!(gated > 10_000, "{gated}");
    }
}
