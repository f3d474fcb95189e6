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
        }
    }

    /// Empties the set (only the index is cleared: items past `len` are never read).
    #[inline]
    pub fn clear(&mut self) {
        self.len = 0;
        self.index = [0; INDEX];
    }

    /// Position of `service` in `items`, or the empty index slot where it would go.
    #[inline]
    fn find(&self, service: u32) -> Result<usize, usize> {
        let mut h = (service.wrapping_mul(0x9E37_79B9) >> 24) as usize & (INDEX - 1);
        loop {
            match self.index[h] {
                0 => return Err(h),
                i if self.items[usize::from(i) - 1].service == service => {
                    return Ok(usize::from(i) - 1)
                }
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
    pub fn rescore(&mut self, mut f: impl FnMut(&Cand) -> (f32, f32)) {
        for c in &mut self.items[..self.len] {
            let (score, delay) = f(c);
            c.score = score;
            c.delay_w = score * delay;
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [Cand] {
        &mut self.items[..self.len]
    }

    /// Writes the best `k` into `out`, best first; `last_at` is the client's last event time,
    /// from which the learned delays count.
    pub fn finish(&mut self, k: usize, last_at: u64, at: Millis, out: &mut Vec<Prediction>) {
        out.clear();
        let items = &mut self.items[..self.len];
        // Best first: higher score, then smaller service id (a total order, so selecting the
        // top k and sorting only those gives exactly the head of a full sort).
        let better =
            |a: &Cand, b: &Cand| b.score.total_cmp(&a.score).then(a.service.cmp(&b.service));
        let k = k.min(items.len());
        if k == 0 {
            return;
        }
        if k <= SMALL_K {
            // One pass with a small sorted buffer: far cheaper than selecting for k = 3.
            let mut top = [Cand::default(); SMALL_K];
            let mut n = 0;
            for c in items.iter() {
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
            items[..k].copy_from_slice(&top[..k]);
        } else {
            if k < items.len() {
                items.select_nth_unstable_by(k - 1, better);
            }
            items[..k].sort_unstable_by(better);
        }
        for c in items[..k].iter() {
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
