//! Remembered successful checks: the bounded memo behind [`crate::chain_cache::ChainCache`]
//! (verified certificate chains) and [`crate::catalog::signed::CheckCache`] (verified catalog
//! signatures).
//!
//! A check is remembered under a SHA-256 of what it checked ([`digest`]), with a value that
//! says when the result still holds (a chain's validity window; nothing for a signature). Failures are never remembered. At `capacity` entries, entries the caller no
//! longer needs are dropped, then, if still full, all of them; `capacity == 0` remembers
//! nothing (every check runs).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// Counters of a memo.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoStats {
    /// Checks answered from the memo.
    pub hits: u64,
    /// Checks that ran (successful or not).
    pub misses: u64,
}

impl std::ops::Add for MemoStats {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            hits: self.hits + other.hits,
            misses: self.misses + other.misses,
        }
    }
}

/// SHA-256 over `parts`, each preceded by its length (so no two part lists collide).
pub(crate) fn digest<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// Successful checks by digest, each with a value `V` that tells whether it still holds.
#[derive(Debug)]
pub(crate) struct Memo<V> {
    capacity: usize,
    map: Mutex<HashMap<[u8; 32], V>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl<V: Copy> Memo<V> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            map: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn stats(&self) -> MemoStats {
        MemoStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], V>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Ok` at once if a check under `key()` is remembered and `holds` of its value; else runs
    /// `check`, and remembers the value it returns (`None`: succeeded, but not to be
    /// remembered). When full, entries for which `keep` is false go first.
    pub(crate) fn check<E>(
        &self,
        key: impl FnOnce() -> [u8; 32],
        holds: impl FnOnce(&V) -> bool,
        check: impl FnOnce() -> Result<Option<V>, E>,
        keep: impl FnMut(&V) -> bool,
    ) -> Result<(), E> {
        if self.capacity == 0 {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return check().map(|_| ());
        }
        let key = key();
        if self.lock().get(&key).is_some_and(holds) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        if let Some(value) = check()? {
            let mut keep = keep;
            let mut map = self.lock();
            if map.len() >= self.capacity {
                map.retain(|_, v| keep(v));
                if map.len() >= self.capacity {
                    map.clear();
                }
            }
            map.insert(key, value);
        }
        Ok(())
    }
}
