//! Bounded name interning: `&str` names to small integer ids and back.
//!
//! An [`Interner`] holds at most `cap` names. When a new name arrives at a full table, one batch
//! eviction frees the least recently used quarter (ties: smallest id) and reports the freed ids,
//! so the owner can make the models forget them before the ids are handed out again. Ids are
//! recycled smallest first, which keeps them dense (models index by them) and deterministic.
//!
//! No I/O, no clock: "recently" is the `at` passed by the caller.

use serde::{Deserialize, Serialize};

use crate::hash::FxHashMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Slot {
    name: Box<str>,
    last_at: u64,
}

/// A bounded two-way map between names and dense `u32` ids (see the module docs).
#[derive(Debug, Clone)]
pub struct Interner {
    ids: FxHashMap<Box<str>, u32>,
    slots: Vec<Option<Slot>>,
    /// Free ids, largest first (so `pop` hands out the smallest).
    free: Vec<u32>,
    cap: usize,
}

/// Serialized form: just the slots; the index and free list are rebuilt on restore.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct InternerState {
    slots: Vec<Option<Slot>>,
}

impl Interner {
    /// An empty interner holding at most `cap` names (at least 4).
    pub fn new(cap: usize) -> Self {
        Self {
            ids: FxHashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            cap: cap.max(4),
        }
    }

    /// Number of names held.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no name is held.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The id of `name`, if held.
    pub fn id(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    /// The name of `id`, if held.
    pub fn name(&self, id: u32) -> Option<&str> {
        self.slots.get(id as usize)?.as_ref().map(|s| &*s.name)
    }

    /// Marks `id` used at `at`.
    pub fn touch(&mut self, id: u32, at: u64) {
        if let Some(Some(slot)) = self.slots.get_mut(id as usize) {
            slot.last_at = slot.last_at.max(at);
        }
    }

    /// The id of `name`, interning it if new; ids freed to make room are appended to `evicted`.
    /// Returns the id and whether it is new.
    pub fn intern(&mut self, name: &str, at: u64, evicted: &mut Vec<u32>) -> (u32, bool) {
        if let Some(&id) = self.ids.get(name) {
            self.touch(id, at);
            return (id, false);
        }
        if self.ids.len() >= self.cap {
            self.evict(evicted);
        }
        let slot = Slot {
            name: name.into(),
            last_at: at,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some(slot);
                id
            }
            None => {
                self.slots.push(Some(slot));
                // The table never holds more than `cap` (a usize that fits memory) names, and
                // ids are dense, so this fits u32 for any cap below 2^32.
                u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.ids.insert(name.into(), id);
        (id, true)
    }

    fn evict(&mut self, evicted: &mut Vec<u32>) {
        let mut ages: Vec<(u64, u32)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (s.last_at, i as u32)))
            .collect();
        let target = self.cap - self.cap / 4;
        let excess = self
            .ids
            .len()
            .saturating_sub(target)
            .clamp(1, ages.len().max(1));
        if ages.len() > excess {
            // Distinct (last_at, id) pairs: the `excess` smallest are well defined.
            ages.select_nth_unstable(excess - 1);
            ages.truncate(excess);
        }
        ages.sort_unstable();
        for &(_, id) in &ages {
            if let Some(slot) = self.slots[id as usize].take() {
                self.ids.remove(&slot.name);
                evicted.push(id);
            }
        }
        self.rebuild_free();
    }

    fn rebuild_free(&mut self) {
        self.free = (0..self.slots.len() as u32)
            .rev()
            .filter(|&i| self.slots[i as usize].is_none())
            .collect();
    }

    /// Approximate bytes held.
    pub fn memory_bytes(&self) -> usize {
        let names: usize = self.slots.iter().flatten().map(|s| s.name.len() * 2).sum();
        self.ids.capacity() * (std::mem::size_of::<(Box<str>, u32)>() + 1)
            + self.slots.capacity() * std::mem::size_of::<Option<Slot>>()
            + self.free.capacity() * 4
            + names
    }

    pub(crate) fn state(&self) -> InternerState {
        InternerState {
            slots: self.slots.clone(),
        }
    }

    /// Rebuilds from a snapshot; `None` if it is inconsistent (duplicate names, over the cap).
    pub(crate) fn from_state(cap: usize, state: InternerState) -> Option<Self> {
        let mut me = Self::new(cap);
        if state.slots.len() > me.cap.saturating_mul(2) {
            return None;
        }
        for (i, slot) in state.slots.iter().enumerate() {
            if let Some(s) = slot {
                if me.ids.insert(s.name.clone(), i as u32).is_some() {
                    return None;
                }
            }
        }
        if me.ids.len() > me.cap {
            return None;
        }
        me.slots = state.slots;
        me.rebuild_free();
        Some(me)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_names() {
        let mut i = Interner::new(10);
        let mut ev = Vec::new();
        let (a, new_a) = i.intern("a", 0, &mut ev);
        let (b, _) = i.intern("b", 0, &mut ev);
        let (a2, new_a2) = i.intern("a", 1, &mut ev);
        assert!(new_a && !new_a2);
        assert_eq!(a, a2);
        assert_ne!(a, b);
        assert_eq!(i.name(b), Some("b"));
        assert_eq!(i.id("c"), None);
    }

    #[test]
    fn evicts_least_recent_and_recycles_ids() {
        let mut i = Interner::new(8);
        let mut ev = Vec::new();
        for n in 0..8u64 {
            i.intern(&n.to_string(), n, &mut ev);
        }
        i.intern("0", 100, &mut ev); // "0" is now the most recent
        assert!(ev.is_empty());
        let (id, _) = i.intern("new", 101, &mut ev);
        assert_eq!(
            ev,
            vec![1, 2],
            "the two least recently used names were freed"
        );
        assert_eq!(id, 1, "smallest freed id is reused");
        assert_eq!(i.id("0"), Some(0));
        assert_eq!(i.id("1"), None);
        assert!(i.len() <= 8);
    }
}
