//! Bounded, decaying count tables shared by the models.
//!
//! * [`Dist`]: decayed counts of the services that followed one context, kept sorted by count
//!   (ties keep the older entry first) and capped at a few entries: when full, the least counted
//!   entry is replaced (the heavy hitters survive, the tail churns).
//! * [`Bounded`]: a hash map whose values carry a last-seen time, with a hard cap. When an insert
//!   takes it over the cap, one batch eviction drops every value idle for longer than the TTL
//!   and then the least recently seen ones (ties: smallest key) until it is down to 3/4 of the
//!   cap. That makes eviction amortised O(log n) per insert, deterministic, and never lets a
//!   table grow past its cap.
//!
//! No I/O and no clock: times are the `at` the caller passed to `observe`.

use std::hash::Hash;

use serde::{Deserialize, Serialize};

use crate::hash::FxHashMap;

/// Marker for "no service" in a context history.
pub(crate) const NONE: u32 = u32::MAX;

/// One counted successor of a context.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// The service id.
    pub service: u32,
    /// Decayed count.
    pub count: f32,
    /// Moving average of the time from the context's last event to this service, ms.
    pub delay_ms: f32,
}

/// Decayed successor counts of one context.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Dist {
    /// Sorted by `count`, largest first.
    pub entries: Vec<Entry>,
    /// Decayed total of all counts ever added (including those of evicted entries).
    pub total: f32,
    /// Time of the last update.
    pub last_at: u64,
}

/// Decay settings shared by all tables of one model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct Decay {
    /// Counts halve every this many ms.
    pub half_life_ms: f64,
    /// Cap on entries per distribution.
    pub max_entries: usize,
}

impl Decay {
    /// Multiplier for counts last updated `dt_ms` ago: `2^(-dt / half_life)`, computed with a
    /// fast, deterministic approximation (relative error below 0.2%), 0 after 126 half-lives.
    #[inline]
    pub fn factor(&self, dt_ms: u64) -> f32 {
        if dt_ms == 0 {
            return 1.0;
        }
        exp2_neg((dt_ms as f64 / self.half_life_ms) as f32)
    }
}

/// `2^-x` for `x >= 0` by a fast, deterministic approximation (relative error below 0.1%);
/// 0 from `x >= 126` on (and for NaN).
#[inline]
pub(crate) fn exp2_neg(x: f32) -> f32 {
    if x.is_nan() || x >= 126.0 {
        return 0.0;
    }
    let x = x.max(0.0);
    // 2^-x = 2^-(n + f) = 2^-n * 2^-f with n integer, f in [0, 1); 2^-f by a cubic fit.
    let n = x.floor();
    let f = x - n;
    let frac = 1.0 + f * (-std::f32::consts::LN_2 + f * (0.237_804 + f * -0.044_657));
    // `n` is in 0..126, so the exponent field 127 - n stays in 1..=127: a normal f32.
    let pow = f32::from_bits(((127 - n as i32) as u32) << 23);
    frac * pow
}

/// `e^x` for `x` in about `-87..=87` (clamped outside), same approximation as [`exp2_neg`].
#[inline]
pub(crate) fn exp_approx(x: f32) -> f32 {
    let y = (x * std::f32::consts::LOG2_E).clamp(-125.0, 125.0);
    if y >= 0.0 {
        let n = y.ceil();
        // 2^y = 2^n * 2^-(n - y); 2^n with n in 0..=125 is a normal f32.
        f32::from_bits(((127 + n as i32) as u32) << 23) * exp2_neg(n - y)
    } else {
        exp2_neg(-y)
    }
}

/// Weight of the delay moving average's newest sample.
const DELAY_ALPHA: f32 = 0.25;
/// Counts below this are rescaled away to keep `f32` away from denormals.
const TINY: f32 = 1e-20;

impl Dist {
    /// Adds one occurrence of `service` at `at`, `delay_ms` after the context's last event.
    pub fn observe(&mut self, service: u32, at: u64, delay_ms: f32, decay: &Decay) {
        let f = decay.factor(at.saturating_sub(self.last_at));
        if f < 1.0 {
            for e in &mut self.entries {
                e.count *= f;
            }
            self.total *= f;
            if self.total < TINY {
                self.entries.clear();
                self.total = 0.0;
            }
        }
        self.last_at = self.last_at.max(at);
        self.total += 1.0;
        let mut i = match self.entries.iter().position(|e| e.service == service) {
            Some(i) => {
                let e = &mut self.entries[i];
                e.count += 1.0;
                e.delay_ms += DELAY_ALPHA * (delay_ms - e.delay_ms);
                i
            }
            None => {
                let entry = Entry {
                    service,
                    count: 1.0,
                    delay_ms,
                };
                if self.entries.len() >= decay.max_entries.max(1) {
                    let last = self.entries.len() - 1;
                    self.entries[last] = entry;
                    last
                } else {
                    self.entries.push(entry);
                    self.entries.len() - 1
                }
            }
        };
        while i > 0 && self.entries[i - 1].count < self.entries[i].count {
            self.entries.swap(i - 1, i);
            i -= 1;
        }
    }

    /// Count of `service` (not decayed to any particular time).
    pub fn count(&self, service: u32) -> f32 {
        self.entries
            .iter()
            .find(|e| e.service == service)
            .map_or(0.0, |e| e.count)
    }

    /// Drops every entry whose service `gone` says is gone.
    pub fn retain_services(&mut self, gone: &impl Fn(u32) -> bool) {
        self.entries.retain(|e| !gone(e.service));
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Entry>()
    }
}

/// Something with a last-seen time, for [`Bounded`].
pub(crate) trait Stamped {
    fn last_at(&self) -> u64;
}

impl Stamped for Dist {
    fn last_at(&self) -> u64 {
        self.last_at
    }
}

/// A hash map with a hard cap and batch least-recently-seen eviction (see module docs).
#[derive(Debug, Clone)]
pub(crate) struct Bounded<K, V> {
    map: FxHashMap<K, V>,
    cap: usize,
    ttl_ms: u64,
}

impl<K: Copy + Eq + Hash + Ord, V: Stamped> Bounded<K, V> {
    pub fn new(cap: usize, ttl_ms: u64) -> Self {
        Self {
            map: FxHashMap::default(),
            cap: cap.max(4),
            ttl_ms,
        }
    }

    #[inline]
    pub fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key)
    }

    #[inline]
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.map.get_mut(key)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.map.remove(key)
    }

    /// Makes room (evicting if full) and returns the value for `key`, created by `make` if new.
    /// Returns whether the value was created.
    pub fn upsert(&mut self, key: K, now: u64, make: impl FnOnce() -> V) -> (&mut V, bool) {
        // One hash lookup on the common path; the extra check only when the table is full.
        if self.map.len() >= self.cap && !self.map.contains_key(&key) {
            self.evict(now);
        }
        let mut created = false;
        let v = self.map.entry(key).or_insert_with(|| {
            created = true;
            make()
        });
        (v, created)
    }

    /// Batch eviction: idle values first, then the least recently seen down to 3/4 of the cap.
    pub fn evict(&mut self, now: u64) {
        let ttl = self.ttl_ms;
        self.map
            .retain(|_, v| now.saturating_sub(v.last_at()) <= ttl);
        let low = self.cap - self.cap / 4;
        if self.map.len() > low {
            let mut ages: Vec<(u64, K)> = self.map.iter().map(|(k, v)| (v.last_at(), *k)).collect();
            let excess = self.map.len() - low;
            // (last_at, key) pairs are distinct, so the `excess` smallest form one well-defined
            // set whatever the map's iteration order: selection is enough, no full sort.
            ages.select_nth_unstable(excess - 1);
            for (_, k) in &ages[..excess] {
                self.map.remove(k);
            }
        }
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.map.values_mut()
    }

    /// Entries sorted by key, for canonical snapshots.
    pub fn sorted(&self) -> Vec<(K, &V)> {
        let mut v: Vec<(K, &V)> = self.map.iter().map(|(k, v)| (*k, v)).collect();
        v.sort_unstable_by_key(|e| e.0);
        v
    }

    /// Rebuilds from snapshot entries, keeping at most `cap` of them.
    pub fn from_entries(cap: usize, ttl_ms: u64, entries: Vec<(K, V)>) -> Self {
        let mut b = Self::new(cap, ttl_ms);
        b.map.reserve(entries.len().min(b.cap));
        for (k, v) in entries.into_iter().take(b.cap) {
            b.map.insert(k, v);
        }
        b
    }

    /// Approximate bytes held: table slots plus whatever `heap` says each value owns.
    pub fn bytes(&self, heap: impl Fn(&V) -> usize) -> usize {
        self.map.capacity() * (std::mem::size_of::<(K, V)>() + 1)
            + self.map.values().map(heap).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Stamped for u64 {
        fn last_at(&self) -> u64 {
            *self
        }
    }

    #[test]
    fn dist_keeps_sorted_and_capped() {
        let d = Decay {
            half_life_ms: 1e9,
            max_entries: 3,
        };
        let mut dist = Dist::default();
        for s in [1, 2, 2, 3, 3, 3, 4] {
            dist.observe(s, 0, 0.0, &d);
        }
        let order: Vec<u32> = dist.entries.iter().map(|e| e.service).collect();
        // 4 replaced the least counted entry (1); 3 leads with three.
        assert_eq!(order, vec![3, 2, 4]);
        assert!((dist.total - 7.0).abs() < 1e-6);
    }

    #[test]
    fn decay_factor_matches_exp2() {
        let d = Decay {
            half_life_ms: 1000.0,
            max_entries: 8,
        };
        for dt in [1u64, 10, 250, 500, 999, 1000, 1500, 7777, 60_000, 125_000] {
            let exact = (-(dt as f64) / 1000.0).exp2() as f32;
            let approx = d.factor(dt);
            assert!(
                (approx - exact).abs() <= exact * 2e-3,
                "dt {dt}: {approx} vs {exact}"
            );
        }
        assert_eq!(d.factor(0), 1.0);
        assert_eq!(d.factor(u64::MAX), 0.0);
        for x in [-80.0f32, -3.3, -0.5, 0.0, 0.2, 1.0, 7.9, 40.0] {
            let (exact, approx) = (x.exp(), exp_approx(x));
            assert!(
                (approx - exact).abs() <= exact * 2e-3,
                "e^{x}: {approx} vs {exact}"
            );
        }
    }

    #[test]
    fn dist_decays_with_time() {
        let d = Decay {
            half_life_ms: 1000.0,
            max_entries: 8,
        };
        let mut dist = Dist::default();
        dist.observe(1, 0, 0.0, &d);
        dist.observe(1, 0, 0.0, &d);
        dist.observe(2, 1000, 0.0, &d);
        assert!((dist.count(1) - 1.0).abs() < 1e-6, "two counts halved once");
        dist.observe(2, 1000, 0.0, &d);
        assert_eq!(dist.entries[0].service, 2, "recent behaviour overtakes old");
    }

    #[test]
    fn bounded_never_exceeds_cap_and_drops_oldest() {
        let mut b: Bounded<u32, u64> = Bounded::new(100, u64::MAX);
        for i in 0..10_000u32 {
            let (v, _) = b.upsert(i, u64::from(i), || 0);
            *v = u64::from(i);
            assert!(b.len() <= 100);
        }
        assert!(b.get(&9_999).is_some());
        assert!(b.get(&0).is_none());
    }
}
