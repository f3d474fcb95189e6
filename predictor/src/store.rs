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

/// "No slot" for [`Slab`] handles and [`Entry::child`] links.
pub(crate) const NO_SLOT: u32 = u32::MAX;

/// One counted successor of a context.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// The service id.
    pub service: u32,
    /// Decayed count, in units of the table's [`Dist::scale`] (the count is `count * scale`).
    pub count: f32,
    /// Moving average of the time from the context's last event to this service, ms.
    pub delay_ms: f32,
    /// Accelerator, not state (never serialized): [`Slab`] slot of the context one order
    /// longer that this service leads to, [`NO_SLOT`] if not known. Exact while set: the slab
    /// clears every link to a slot it vacates ([`Links`]), so a link is followed without
    /// reading the child's slot or comparing keys.
    #[serde(skip, default = "no_slot")]
    pub child: u32,
}

fn no_slot() -> u32 {
    NO_SLOT
}

/// Decayed successor counts of one context.
///
/// Decay is lazy: instead of multiplying every entry's count at each update, the table keeps
/// one factor, [`Dist::scale`], that all entries' counts are multiplied by when read; an update
/// multiplies `scale` (and `total`) by the decay and adds `1 / scale` to the entry. The entries
/// are only rescaled when `scale` gets small ([`RENORM`], about once per 40 half-lives).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Dist {
    /// Sorted by `count`, largest first.
    pub entries: Vec<Entry>,
    /// Decayed total of all counts ever added (including those of evicted entries); not scaled.
    pub total: f32,
    /// Time of the last update.
    pub last_at: u64,
    /// Multiplier of every entry's stored count (in `RENORM..=1`).
    pub scale: f32,
}

impl Default for Dist {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            total: 0.0,
            last_at: 0,
            scale: 1.0,
        }
    }
}

/// Decay settings shared by all tables of one model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct Decay {
    /// Half-lives per ms (counts halve every `1 / per_ms` ms): a multiplication per decayed
    /// table instead of a division.
    pub per_ms: f64,
    /// Cap on entries per distribution.
    pub max_entries: usize,
}

impl Decay {
    /// Counts halving every `half_life_ms` ms, at most `max_entries` per distribution.
    pub fn new(half_life_ms: f64, max_entries: usize) -> Self {
        Self {
            per_ms: 1.0 / half_life_ms,
            max_entries,
        }
    }

    /// Multiplier for counts last updated `dt_ms` ago: `2^(-dt / half_life)`, computed with a
    /// fast, deterministic approximation (relative error below 0.2%), 0 after 126 half-lives.
    #[inline]
    pub fn factor(&self, dt_ms: u64) -> f32 {
        if dt_ms == 0 {
            return 1.0;
        }
        // Through `i64`: one conversion instruction (`u64 → f64` takes a branch and several);
        // beyond `i64::MAX` ms every factor is 0 anyway.
        let dt = dt_ms.min(i64::MAX as u64) as i64 as f64;
        exp2_neg((dt * self.per_ms) as f32)
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
    // `x` is in 0..126 here, so truncation is the floor (and avoids a libm call).
    let ni = x as i32;
    let n = ni as f32;
    let f = x - n;
    let frac = 1.0 + f * (-std::f32::consts::LN_2 + f * (0.237_804 + f * -0.044_657));
    // `n` is in 0..126, so the exponent field 127 - n stays in 1..=127: a normal f32.
    let pow = f32::from_bits(((127 - ni) as u32) << 23);
    frac * pow
}

/// `e^x` for `x` in about `-87..=87` (clamped outside), same approximation as [`exp2_neg`];
/// 0 for NaN.
///
/// Without branches or float-to-int conversions, so that loops over it vectorise: with
/// `y = x·log2(e)` and `c = ⌈y⌉`,
/// `e^x = 2^c · 2^-(c - y)`, `c − y` in `[0, 1)` taking the cubic fit of [`exp2_neg`]. This is
/// the same arithmetic, operation for operation, as the two-branch form it replaced
/// (`2^⌈y⌉ · exp2_neg(⌈y⌉ − y)` for `y ≥ 0`, `exp2_neg(−y)` below; for `y < 0`, `⌈y⌉ =
/// −trunc(−y)` and `⌈y⌉ − y` rounds exactly as `−y − trunc(−y)` does; a fraction that rounds
/// to 1 is carried as that form did), so every result is bit-identical (tests
/// `exp_approx_is_bit_identical_to_the_branching_form` and, over all 2^32 inputs,
/// `exp_approx_is_bit_identical_everywhere`, `--ignored`).
#[inline]
pub(crate) fn exp_approx(x: f32) -> f32 {
    let y = (x * std::f32::consts::LOG2_E).clamp(-125.0, 125.0);
    // `y.ceil()` without a libm call (the baseline x86-64 target has no `roundss`) and without
    // a float-to-int conversion (Rust's saturating `as i32` does not vectorise): adding
    // 1.5·2^23 rounds `y` (|y| <= 125) to the nearest integer, which then sits in the low
    // mantissa bits; one step up where that rounded down. Exact integers throughout.
    const ROUND: f32 = 12_582_912.0;
    let t = y + ROUND;
    let near = t - ROUND;
    let up = near < y;
    let c = if up { near + 1.0 } else { near };
    let ci = (t.to_bits() as i32 - ROUND.to_bits() as i32) + i32::from(up);
    let f = c - y;
    // For a tiny positive `y`, `c − y` rounds to 1: the branching form then evaluated
    // `2^c · exp2_neg(1) = 2^(c−1) · fit(0)`, so do the same.
    let wrap = f >= 1.0;
    let f = if wrap { 0.0 } else { f };
    let ci = ci - i32::from(wrap);
    let frac = 1.0 + f * (-std::f32::consts::LN_2 + f * (0.237_804 + f * -0.044_657));
    // `c` is in -125..=125, so the exponent field 127 + c stays in 2..=252: a normal f32.
    let r = frac * f32::from_bits(((127 + ci) as u32) << 23);
    if y.is_nan() {
        0.0
    } else {
        r
    }
}

/// Weight of the delay moving average's newest sample.
const DELAY_ALPHA: f32 = 0.25;
/// Counts below this are rescaled away to keep `f32` away from denormals.
const TINY: f32 = 1e-20;
/// A table's [`Dist::scale`] below this is folded into its entries (stored counts stay far
/// from `f32`'s range limits: at most about 2^40 times the true count).
const RENORM: f32 = 1e-12;

impl Dist {
    /// Adds one occurrence of `service` at `at`, `delay_ms` after the context's last event.
    /// Returns the service's count just before (not decayed) and its position afterwards.
    #[inline(always)]
    pub fn observe(&mut self, service: u32, at: u64, delay_ms: f32, decay: &Decay) -> (f32, usize) {
        let found = self.entries.iter().position(|e| e.service == service);
        let before = found.map_or(0.0, |i| self.entries[i].count * self.scale);
        let f = decay.factor(at.saturating_sub(self.last_at));
        if f < 1.0 {
            self.scale *= f;
            self.total *= f;
            if self.total < TINY {
                self.entries.clear();
                self.total = 0.0;
                self.scale = 1.0;
            } else if self.scale < RENORM {
                self.renormalise();
            }
        }
        self.last_at = self.last_at.max(at);
        self.total += 1.0;
        // One occurrence, in the units of the stored counts.
        let one = 1.0 / self.scale;
        let found = found.filter(|_| !self.entries.is_empty());
        let mut i = match found {
            Some(i) => {
                let e = &mut self.entries[i];
                e.count += one;
                e.delay_ms += DELAY_ALPHA * (delay_ms - e.delay_ms);
                i
            }
            None => {
                let entry = Entry {
                    service,
                    count: one,
                    delay_ms,
                    child: NO_SLOT,
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
        // Move the entry up past every entry before it counted less (ties keep the older entry
        // first): shift that run down by one and write the entry once, instead of swapping it
        // up one place at a time. An entry that stays (the common case) is not touched.
        if i > 0 && self.entries[i - 1].count < self.entries[i].count {
            let e = self.entries[i];
            while i > 0 && self.entries[i - 1].count < e.count {
                self.entries[i] = self.entries[i - 1];
                i -= 1;
            }
            self.entries[i] = e;
        }
        (before, i)
    }

    /// Folds [`Dist::scale`] into the stored counts (scale becomes 1); also repairs a scale
    /// that is not a usable factor (e.g. from a corrupted snapshot).
    pub fn renormalise(&mut self) {
        let s = if self.scale.is_finite() && self.scale > 0.0 {
            self.scale
        } else {
            0.0
        };
        for e in &mut self.entries {
            e.count *= s;
        }
        self.scale = 1.0;
    }

    /// Count of `service` (not decayed to any particular time).
    #[cfg(test)]
    pub fn count(&self, service: u32) -> f32 {
        self.entries
            .iter()
            .find(|e| e.service == service)
            .map_or(0.0, |e| e.count * self.scale)
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

/// Values of a [`Slab`] that hold links to other slots ([`Entry::child`]): when the slab
/// vacates slots, it has every live value drop its links to them.
pub(crate) trait Links {
    /// Clears every link to a slot for which `dead` is true (default: the value has none).
    fn unlink(&mut self, dead: &dyn Fn(u32) -> bool) {
        let _ = dead;
    }
}

impl Links for Dist {
    fn unlink(&mut self, dead: &dyn Fn(u32) -> bool) {
        for e in &mut self.entries {
            if e.child != NO_SLOT && dead(e.child) {
                e.child = NO_SLOT;
            }
        }
    }
}

#[cfg(test)]
impl Links for u64 {}

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

/// Keys of a [`Slab`]: one value that is never a real key marks a vacant slot (so a slot
/// needs no separate flag, and a context's slot fits one cache line).
pub(crate) trait SlotKey: Copy {
    /// The key of a vacant slot (never a real key).
    const VACANT: Self;
    /// Whether this is [`SlotKey::VACANT`].
    fn is_vacant(&self) -> bool;
}

#[cfg(test)]
impl SlotKey for u32 {
    const VACANT: Self = u32::MAX;
    fn is_vacant(&self) -> bool {
        *self == u32::MAX
    }
}

/// One slot of a [`Slab`]: live unless its key is [`SlotKey::VACANT`]. Aligned to a cache
/// line: a context's slot (24-byte key, 40-byte table) is then exactly one line, so reading
/// a table's statistics is one memory access, not two for the slots that straddle lines.
#[derive(Debug, Clone)]
#[repr(align(64))]
struct Slot<K, V> {
    key: K,
    value: V,
}

impl<K: SlotKey, V> Slot<K, V> {
    #[inline]
    fn live(&self) -> bool {
        !self.key.is_vacant()
    }
}

/// A slot number and the slab's epoch when it was taken (`slot | epoch << 32`): valid while
/// the slab has vacated no slot since ([`Slab::check`], no read of the slot, no key
/// comparison). Eviction batches are rare (one per quarter of the cap of new contexts), and
/// after one every hint falls back to a keyed lookup once.
pub(crate) type Hint = u64;

/// A hint that never matches.
pub(crate) const NO_HINT: Hint = u64::MAX;

/// A [`Bounded`] table whose values live in a slab, so that callers can keep a value's slot
/// number as a handle and skip the hash lookup next time. A handle is only a hint, valid while
/// its epoch is current ([`Hint`], [`Slab::check`]); slots are reused after eviction, and links
/// to vacated slots are cleared ([`Links`]).
///
/// Same cap, TTL and eviction policy as [`Bounded`] (the evicted set does not depend on slot
/// order); slots are allocated from a free list, so the same operations give the same slots.
#[derive(Debug, Clone)]
pub(crate) struct Slab<K, V> {
    index: FxHashMap<K, u32>,
    slots: Vec<Slot<K, V>>,
    free: Vec<u32>,
    cap: usize,
    ttl_ms: u64,
    /// Moves on whenever a slot is vacated, so hints taken earlier stop matching; saturates at
    /// `u32::MAX`, from where no hint matches (every use is a keyed lookup: still correct, and
    /// only after 2^32 - 1 eviction batches).
    epoch: u32,
    /// `epoch << 32`, the high half of every current hint; `u64::MAX` (which no masked hint
    /// equals) once the epoch has saturated.
    tag: u64,
}

impl<K: SlotKey + Eq + Hash + Ord, V: Stamped + Default + Links> Slab<K, V> {
    pub fn new(cap: usize, ttl_ms: u64) -> Self {
        Self {
            index: FxHashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            // Slot numbers are u32 with `NO_SLOT` reserved.
            cap: cap.clamp(4, NO_SLOT as usize - 1),
            ttl_ms,
            epoch: 0,
            tag: 0,
        }
    }

    /// The slot holding `key`, if any (one hash lookup).
    #[inline]
    pub fn slot_of(&self, key: &K) -> Option<u32> {
        self.index.get(key).copied()
    }

    /// The hint for `slot` at the current epoch (the slot is not read). Only for live slots
    /// (see [`Slab::check`]): every caller has just found `slot` live, or holds an exact link
    /// to it.
    #[inline]
    pub fn hint(&self, slot: u32) -> Hint {
        debug_assert!(self.slots.get(slot as usize).is_some_and(|s| s.live()));
        u64::from(slot) | self.tag
    }

    /// Whether `hint` was taken at the current epoch (and the epoch has not saturated).
    #[inline]
    fn current(&self, hint: Hint) -> bool {
        hint & 0xFFFF_FFFF_0000_0000 == self.tag
    }

    /// The slot of `hint` if it still holds the key it held when the hint was taken (no key
    /// comparison, no hash lookup, no read of the slot).
    ///
    /// The epoch alone decides: hints are only taken of live slots, and vacating a slot
    /// moves the epoch on, so a hint of the current epoch is of a live slot with its key.
    #[inline]
    pub fn check(&self, hint: Hint) -> Option<u32> {
        let slot = hint as u32;
        (self.current(hint) && (slot as usize) < self.slots.len()).then(|| {
            debug_assert!(self.slots[slot as usize].live());
            slot
        })
    }

    /// The value for `hint`, if still valid (see [`Slab::check`]).
    #[inline]
    pub fn at_hint(&self, hint: Hint) -> Option<&V> {
        if !self.current(hint) {
            return None;
        }
        self.slots.get(hint as u32 as usize).map(|s| {
            debug_assert!(s.live());
            &s.value
        })
    }

    /// Whether `slot` holds `key` (no hash lookup; for debug assertions and tests).
    #[inline]
    pub fn holds(&self, slot: u32, key: &K) -> bool {
        self.slots
            .get(slot as usize)
            .is_some_and(|s| s.live() && s.key == *key)
    }

    /// `hint` if it holds `key`, else the slot found by a hash lookup.
    #[cfg(test)]
    pub fn resolve(&self, hint: u32, key: &K) -> Option<u32> {
        if self.holds(hint, key) {
            Some(hint)
        } else {
            self.slot_of(key)
        }
    }

    /// The value for `key`: in `hint` if that slot holds it (one check, no hash lookup), else
    /// found by a hash lookup.
    #[cfg(test)]
    pub fn get_hinted(&self, hint: u32, key: &K) -> Option<&V> {
        match self.slots.get(hint as usize) {
            Some(s) if s.live() && s.key == *key => Some(&s.value),
            _ => self.slot_of(key).and_then(|s| self.at(s)),
        }
    }

    /// The value in `slot`, if live.
    #[inline]
    pub fn at(&self, slot: u32) -> Option<&V> {
        self.slots
            .get(slot as usize)
            .filter(|s| s.live())
            .map(|s| &s.value)
    }

    /// The value in `slot`, known live (the slot of a current hint, or just upserted): no
    /// live check, only the bounds check (`None` out of bounds).
    #[inline]
    pub fn live_mut(&mut self, slot: u32) -> Option<&mut V> {
        self.slots.get_mut(slot as usize).map(|s| {
            debug_assert!(s.live());
            &mut s.value
        })
    }

    /// The value in `slot`, known live (see [`Slab::live_mut`]).
    #[inline]
    pub fn live_ref(&self, slot: u32) -> Option<&V> {
        self.slots.get(slot as usize).map(|s| {
            debug_assert!(s.live());
            &s.value
        })
    }

    /// The value in `slot`, if live.
    #[cfg(test)]
    pub fn at_mut(&mut self, slot: u32) -> Option<&mut V> {
        self.slots
            .get_mut(slot as usize)
            .filter(|s| s.live())
            .map(|s| &mut s.value)
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// The slot of `key`, created (evicting first if the table is full) with a default value if
    /// new. Returns whether it was created.
    pub fn upsert(&mut self, key: K, now: u64) -> (u32, bool) {
        debug_assert!(!key.is_vacant());
        if let Some(&slot) = self.index.get(&key) {
            return (slot, false);
        }
        if self.index.len() >= self.cap {
            self.evict(now);
        }
        let slot = match self.free.pop() {
            Some(slot) => {
                let s = &mut self.slots[slot as usize];
                s.key = key;
                slot
            }
            None => {
                self.slots.push(Slot {
                    key,
                    value: V::default(),
                });
                // The cap keeps the slot count below `NO_SLOT`.
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(key, slot);
        (slot, true)
    }

    /// Frees `slot` (if live) and moves the epoch on; links to it must then be cleared
    /// ([`Slab::unlink_vacated`]) before any is followed.
    fn vacate(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        if s.live() {
            s.value = V::default();
            self.index.remove(&s.key);
            s.key = K::VACANT;
            self.free.push(slot);
            self.set_epoch(self.epoch.saturating_add(1));
        }
    }

    fn set_epoch(&mut self, epoch: u32) {
        self.epoch = epoch;
        self.tag = if epoch == u32::MAX {
            u64::MAX
        } else {
            u64::from(epoch) << 32
        };
    }

    /// Clears every live value's links to vacated slots (once per eviction batch: O(entries)).
    fn unlink_vacated(&mut self) {
        let live: Vec<bool> = self.slots.iter().map(Slot::live).collect();
        let dead = |slot: u32| !live.get(slot as usize).copied().unwrap_or(false);
        for s in self.slots.iter_mut().filter(|s| s.live()) {
            s.value.unlink(&dead);
        }
    }

    /// Batch eviction: idle values first, then the least recently seen down to 3/4 of the cap
    /// (the same policy as [`Bounded::evict`]).
    pub fn evict(&mut self, now: u64) {
        let (ttl, before) = (self.ttl_ms, self.index.len());
        let idle: Vec<u32> = (0..self.slots.len() as u32)
            .filter(|&i| {
                let s = &self.slots[i as usize];
                s.live() && now.saturating_sub(s.value.last_at()) > ttl
            })
            .collect();
        for slot in idle {
            self.vacate(slot);
        }
        let low = self.cap - self.cap / 4;
        if self.index.len() > low {
            let mut ages: Vec<(u64, K, u32)> = (0..self.slots.len() as u32)
                .filter_map(|i| {
                    let s = &self.slots[i as usize];
                    s.live().then(|| (s.value.last_at(), s.key, i))
                })
                .collect();
            let excess = self.index.len() - low;
            // (last_at, key) pairs are distinct: the `excess` smallest are one well-defined set.
            ages.select_nth_unstable(excess - 1);
            let mut gone: Vec<u32> = ages[..excess].iter().map(|a| a.2).collect();
            // Free slots in a canonical order, so later allocations do not depend on selection.
            gone.sort_unstable();
            for slot in gone {
                self.vacate(slot);
            }
        }
        if self.index.len() != before {
            self.unlink_vacated();
        }
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.slots
            .iter_mut()
            .filter(|s| s.live())
            .map(|s| &mut s.value)
    }

    /// Entries sorted by key, for canonical snapshots.
    pub fn sorted(&self) -> Vec<(K, &V)> {
        let mut v: Vec<(K, &V)> = self
            .slots
            .iter()
            .filter(|s| s.live())
            .map(|s| (s.key, &s.value))
            .collect();
        v.sort_unstable_by_key(|e| e.0);
        v
    }

    /// Rebuilds from snapshot entries, keeping at most `cap` of them (a repeated key keeps its
    /// last value, as [`Bounded::from_entries`]).
    pub fn from_entries(cap: usize, ttl_ms: u64, entries: Vec<(K, V)>) -> Self {
        let mut b = Self::new(cap, ttl_ms);
        let n = entries.len().min(b.cap);
        b.index.reserve(n);
        b.slots.reserve(n);
        // A vacant-marker key is never a real one (only a corrupted snapshot holds one).
        for (k, v) in entries.into_iter().filter(|e| !e.0.is_vacant()).take(b.cap) {
            if let Some(&slot) = b.index.get(&k) {
                b.slots[slot as usize].value = v;
                continue;
            }
            b.index.insert(k, b.slots.len() as u32);
            b.slots.push(Slot { key: k, value: v });
        }
        b
    }

    /// Approximate bytes held: index and slots plus whatever `heap` says each value owns.
    pub fn bytes(&self, heap: impl Fn(&V) -> usize) -> usize {
        self.index.capacity() * (std::mem::size_of::<(K, u32)>() + 1)
            + self.slots.capacity() * std::mem::size_of::<Slot<K, V>>()
            + self.free.capacity() * 4
            + self
                .slots
                .iter()
                .filter(|s| s.live())
                .map(|s| heap(&s.value))
                .sum::<usize>()
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
        let d = Decay::new(1e9, 3);
        let mut dist = Dist::default();
        for s in [1, 2, 2, 3, 3, 3, 4] {
            dist.observe(s, 0, 0.0, &d);
        }
        let order: Vec<u32> = dist.entries.iter().map(|e| e.service).collect();
        // 4 replaced the least counted entry (1); 3 leads with three.
        assert_eq!(order, vec![3, 2, 4]);
        assert!((dist.total - 7.0).abs() < 1e-6);
    }

    /// The entry whose count grew moves up past every entry counted less, and stops at the
    /// first counted as much or more (ties keep the older entry first), exactly as the
    /// one-place swaps it replaced did.
    #[test]
    fn dist_moves_an_entry_past_the_less_counted_only() {
        let d = Decay::new(1e9, 6);
        let mut dist = Dist::default();
        // Counts 3, 2, 2, 1: service 3's second count ties with the 2s and stays behind them;
        // its third passes them but not service 0.
        for s in [0, 0, 0, 1, 1, 2, 2, 3] {
            dist.observe(s, 0, 0.0, &d);
        }
        let order = |dist: &Dist| dist.entries.iter().map(|e| e.service).collect::<Vec<_>>();
        assert_eq!(order(&dist), vec![0, 1, 2, 3]);
        assert_eq!(dist.observe(3, 0, 0.0, &d).1, 3, "a tie does not move");
        assert_eq!(order(&dist), vec![0, 1, 2, 3]);
        assert_eq!(dist.observe(3, 0, 0.0, &d).1, 1, "past the 2s, not the 3");
        assert_eq!(order(&dist), vec![0, 3, 1, 2]);
        // Against the swaps, on random sorted tables with one count raised by one (no decay:
        // the same `at`), ties included.
        let mut next = crate::test_rng(0x2545_f491_4f6c_dd1du64);
        let d = Decay::new(1e9, 24);
        for _ in 0..20_000 {
            let len = 1 + next(24) as usize;
            let mut counts: Vec<f32> = (0..len).map(|_| next(6) as f32 + 1.0).collect();
            counts.sort_by(|a, b| b.total_cmp(a));
            let mut dist = Dist {
                entries: counts
                    .iter()
                    .enumerate()
                    .map(|(s, &count)| Entry {
                        service: s as u32,
                        count,
                        delay_ms: 0.0,
                        child: s as u32,
                    })
                    .collect(),
                total: counts.iter().sum(),
                last_at: 5,
                scale: 1.0,
            };
            let i = next(len as u64) as usize;
            let mut swapped = dist.entries.clone();
            swapped[i].count += 1.0;
            let mut j = i;
            while j > 0 && swapped[j - 1].count < swapped[j].count {
                swapped.swap(j - 1, j);
                j -= 1;
            }
            assert_eq!(dist.observe(i as u32, 5, 0.0, &d).1, j);
            assert_eq!(dist.entries, swapped);
        }
    }

    #[test]
    fn decay_factor_matches_exp2() {
        let d = Decay::new(1000.0, 8);
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

    /// The branching form `exp_approx` had until the fifth speed round.
    fn exp_approx_branching(x: f32) -> f32 {
        let y = (x * std::f32::consts::LOG2_E).clamp(-125.0, 125.0);
        if y >= 0.0 {
            let ti = y as i32;
            let ni = if (ti as f32) < y { ti + 1 } else { ti };
            let n = ni as f32;
            f32::from_bits(((127 + ni) as u32) << 23) * exp2_neg(n - y)
        } else {
            exp2_neg(-y)
        }
    }

    fn exp_approx_check(bits: u32) {
        let x = f32::from_bits(bits);
        let (a, b) = (exp_approx(x), exp_approx_branching(x));
        assert_eq!(a.to_bits(), b.to_bits(), "e^{x} ({bits:#x}): {a} vs {b}");
    }

    #[test]
    fn exp_approx_is_bit_identical_to_the_branching_form() {
        // Every f32 whose exponent puts it in the interesting range (|x| from 2^-24 to 2^8,
        // covering the clamp at ±86.6), with a stride, plus the special values.
        let mut bits = 0u32;
        loop {
            exp_approx_check(bits);
            exp_approx_check(bits | 0x8000_0000);
            bits = match bits.checked_add(if (0x3380_0000..0x4380_0000).contains(&bits) {
                97
            } else {
                9_973
            }) {
                Some(b) if b < 0x8000_0000 => b,
                _ => break,
            };
        }
        for x in [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            86.6,
            -86.6,
            1.0,
        ] {
            exp_approx_check(x.to_bits());
        }
    }

    /// The whole f32 range (`cargo test --release -p predictor -- --ignored exp_approx`).
    #[test]
    #[ignore]
    fn exp_approx_is_bit_identical_everywhere() {
        for bits in 0..=u32::MAX {
            exp_approx_check(bits);
        }
    }

    #[test]
    fn dist_decays_with_time() {
        let d = Decay::new(1000.0, 8);
        let mut dist = Dist::default();
        dist.observe(1, 0, 0.0, &d);
        dist.observe(1, 0, 0.0, &d);
        dist.observe(2, 1000, 0.0, &d);
        assert!((dist.count(1) - 1.0).abs() < 1e-6, "two counts halved once");
        dist.observe(2, 1000, 0.0, &d);
        assert_eq!(dist.entries[0].service, 2, "recent behaviour overtakes old");
    }

    #[test]
    fn lazy_decay_matches_eager_decay_and_renormalises() {
        let d = Decay::new(1000.0, 8);
        let mut dist = Dist::default();
        let mut eager = [0.0f64; 3];
        let mut last = 0u64;
        // 60 s of events, then a 45 s gap (2^-45: below `RENORM`, well above `TINY` here).
        let times = (0..600u64).map(|i| i * 100).chain([105_000, 105_100]);
        for (i, at) in times.enumerate() {
            let f = (-((at - last) as f64) / 1000.0).exp2();
            for c in &mut eager {
                *c *= f;
            }
            let s = (i % 3) as u32;
            eager[s as usize] += 1.0;
            dist.observe(s, at, 0.0, &d);
            last = at;
            for (s, &want) in eager.iter().enumerate() {
                let got = f64::from(dist.count(s as u32));
                assert!(
                    (got - want).abs() <= want * 1e-2 + 1e-9,
                    "t {at} s {s}: {got} vs {want}"
                );
            }
            assert!(dist.scale >= RENORM && dist.scale <= 1.0);
            if at == 105_000 {
                assert_eq!(
                    dist.scale, 1.0,
                    "the gap's decay was folded into the entries"
                );
            }
        }
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

    #[test]
    fn slab_handles_are_checked_and_slots_reused() {
        let mut s: Slab<u32, u64> = Slab::new(8, u64::MAX);
        let mut handles = Vec::new();
        for i in 0..100u32 {
            let (slot, created) = s.upsert(i, u64::from(i));
            assert!(created);
            *s.at_mut(slot).expect("live") = u64::from(i);
            handles.push(slot);
            assert!(s.index.len() <= 8);
            assert_eq!(s.upsert(i, u64::from(i)), (slot, false));
        }
        // Old handles are either still right or detected as stale.
        for (i, &h) in handles.iter().enumerate() {
            let key = i as u32;
            assert_eq!(s.holds(h, &key), s.slot_of(&key) == Some(h));
            assert_eq!(s.resolve(h, &key), s.slot_of(&key));
            assert_eq!(s.get_hinted(h, &key), s.slot_of(&key).and_then(|x| s.at(x)));
        }
        assert!(s.slot_of(&99).is_some() && s.slot_of(&0).is_none());
        assert!(s.slots.len() <= 8, "evicted slots are reused");
        assert!(!s.holds(NO_SLOT, &99));
    }

    #[test]
    fn slab_hints_match_exactly_until_a_slot_is_vacated() {
        let mut s: Slab<u32, u64> = Slab::new(8, u64::MAX);
        let mut hints = Vec::new();
        let mut valid_seen = 0;
        for i in 0..200u32 {
            let epoch = s.epoch;
            let (slot, _) = s.upsert(i % 50, u64::from(i));
            if s.epoch != epoch {
                // An eviction: every earlier hint stops matching.
                for &(_, h) in &hints {
                    assert_eq!(s.check(h), None);
                }
            }
            hints.push((i % 50, s.hint(slot)));
            for &(k, h) in &hints {
                // Never a false positive: a valid hint's slot holds its key ...
                if let Some(x) = s.check(h) {
                    assert_eq!(s.slot_of(&k), Some(x), "key {k}");
                    assert_eq!(s.at_hint(h), s.at(x));
                    valid_seen += 1;
                } else {
                    assert_eq!(s.at_hint(h), None);
                }
            }
            // ... and a key's latest hint stays valid while no slot has been vacated.
            for k in 0..50u32 {
                if let Some(&(_, h)) = hints.iter().rev().find(|e| e.0 == k) {
                    if (h >> 32) as u32 == s.epoch {
                        assert_eq!(s.check(h), s.slot_of(&k), "key {k}");
                    }
                }
            }
        }
        assert!(valid_seen > 100, "{valid_seen}");
        assert_eq!(s.check(NO_HINT), None);
        // A saturated epoch matches no hint (keyed lookups from then on).
        let (slot, _) = s.upsert(1_000, 0);
        s.set_epoch(u32::MAX);
        let h = s.hint(slot);
        assert_eq!(s.check(h), None);
        assert_eq!(s.at_hint(h), None);
    }

    /// A vacant slot is marked by its key: a snapshot holding that key (only a corrupted
    /// one can) must not create a slot that is indexed but counts as vacant.
    #[test]
    fn slab_restore_drops_the_vacant_marker_key() {
        let s: Slab<u32, u64> =
            Slab::from_entries(8, u64::MAX, vec![(1, 5), (u32::MAX, 6), (2, 7)]);
        assert_eq!(s.index.len(), 2);
        assert_eq!(s.slot_of(&u32::MAX), None);
        assert_eq!(s.sorted(), vec![(1, &5), (2, &7)]);
    }

    #[test]
    fn vacating_slots_clears_the_links_to_them() {
        let mut s: Slab<u32, Dist> = Slab::new(8, u64::MAX);
        let decay = Decay::new(1000.0, 24);
        let (target, _) = s.upsert(0, 0);
        for k in 1..8u32 {
            let (slot, _) = s.upsert(k, u64::from(k));
            let d = s.at_mut(slot).expect("live");
            d.observe(7, u64::from(k), 0.0, &decay);
            d.entries[0].child = target;
        }
        // Key 0 is the least recently seen: the next new key evicts it (and others).
        let _ = s.upsert(100, 1_000);
        assert!(s.slot_of(&0).is_none());
        for k in 1..8u32 {
            if let Some(d) = s.slot_of(&k).and_then(|x| s.at(x)) {
                // The target's slot may be reused by key 100: the link must be gone.
                assert_eq!(d.entries[0].child, NO_SLOT, "key {k}");
            }
        }
    }
}
