//! Pure, deterministic prediction of which services each client will ask for next.
//!
//! The daemon feeds every request it forwards to [`Predictor::observe_named`] and asks
//! [`Predictor::predict_named`] which services to keep pre-authenticated ("warm") for a client.
//! Underneath, every model implements the [`Model`] trait over interned ids:
//!
//! * baselines kept for comparison: [`models::Frequent`], [`models::Recent`],
//!   [`models::Markov1`], [`models::Ppm`] (per-client variable-order context model) and
//!   [`models::Pooled`] (context counts pooled over a client's group and over all clients);
//! * the shipped model, [`models::Blend`]: per-client, per-group and global context models mixed
//!   with weights learned online from each component's recent accuracy, gated by how often the
//!   client repeats itself, and ranked over a time horizon.
//!
//! [`trace`] reads `ts_ms,client,service` CSV (optionally gzipped) request traces and [`eval`]
//! replays them through the models with the online protocol of `meshd predict eval`.
//!
//! What this crate does **not** do: no I/O other than reading from a caller-supplied
//! [`std::io::Read`] in [`trace`], no clock (time is always passed in as [`Millis`]), no globals,
//! no randomness, no async runtime. Outputs never depend on hash-map iteration order: rankings
//! break ties by service id and snapshots are written in sorted order, so the same input gives
//! byte-identical output. Memory is bounded by [`PredictorConfig`] (see `docs/PREDICTOR.md`).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod eval;
pub mod group;
mod hash;
pub mod intern;
pub mod models;
pub mod predictor;
mod store;
pub mod trace;

/// A seeded xorshift64 for tests: `next(n)` is uniform-ish in `0..n`.
#[cfg(test)]
pub(crate) fn test_rng(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut x = seed;
    move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    }
}

use serde::{Deserialize, Serialize};

pub use crate::group::GroupRule;
pub use crate::models::{Model, ModelKind};
pub use crate::predictor::{Predictor, PredictorConfig, SnapshotError};

/// A point in time, in milliseconds, on whatever clock the caller uses (only differences matter).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Millis(pub u64);

impl Millis {
    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Millis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// An interned client (a peer, pod or host that sends requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClientId(pub u32);

/// An interned service (what a client asks for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceId(pub u32);

/// An interned client group (e.g. the pods of one deployment), see [`GroupRule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupId(pub u32);

/// One ranked guess: `service` will be requested by the client, with `probability`, in about
/// `expected_in_ms` milliseconds from the `at` given to `predict`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The service to keep warm.
    pub service: ServiceId,
    /// The model's probability that this service is the client's next request (in `0..=1`;
    /// the probabilities of one ranking sum to at most 1).
    pub probability: f64,
    /// Expected time until the client uses it, in milliseconds from `at` (0 = overdue or now).
    pub expected_in_ms: u64,
}
