//! The prediction models: one [`Model`] trait, the baselines and the shipped [`Blend`].
//!
//! Every model learns online from `observe(client, service, at)` and ranks services for a
//! client with `predict(client, at, k)`. All share the same bounded, decaying count tables
//! (`crate::store`), so they differ only in which contexts they count and how they combine them:
//!
//! | name | what it predicts from |
//! |---|---|
//! | `frequent` | the client's own most frequent services (decayed counts) |
//! | `recent` | the client's k most recently used services |
//! | `markov1` | the client's own first-order transitions (last service → next) |
//! | `ppm` | the client's own contexts of order 2, 1, 0 with PPM-C back-off |
//! | `pooled` | contexts pooled over the client's group and over all clients, PPM-C back-off |
//! | `blend` | **shipped**: client (orders 1, 0), group and global (orders 4..0 and the bag) context models mixed by learned weights |
//! | `blend-full` | the previous shipped blend: every scope at orders 4..0 and the bag (a comparison) |
//!
//! No I/O, no clock, no randomness. Rankings break ties by service id.

pub(crate) mod blend;
mod core;
mod rank;
mod simple;

use serde::{Deserialize, Serialize};

pub use self::blend::{Blend, BlendParams};
pub use self::simple::{Frequent, Markov1, Pooled, Ppm, Recent};
use crate::{ClientId, GroupId, Millis, Prediction, ServiceId};

/// A model that learns which services each client uses and ranks them.
pub trait Model {
    /// The model's name as used by `meshd predict eval --model`.
    fn name(&self) -> &'static str;

    /// Learns that `client` requested `service` at `at`. `group`, when `Some`, (re)assigns the
    /// client's group; `None` keeps whatever group the client had.
    fn observe_grouped(
        &mut self,
        client: ClientId,
        group: Option<GroupId>,
        service: ServiceId,
        at: Millis,
    );

    /// Learns that `client` requested `service` at `at` (keeping the client's group).
    fn observe(&mut self, client: ClientId, service: ServiceId, at: Millis) {
        self.observe_grouped(client, None, service, at);
    }

    /// Writes the top `k` services for `client` at `at` into `out` (cleared first), best first.
    fn predict_into(&self, client: ClientId, at: Millis, k: usize, out: &mut Vec<Prediction>);

    /// The top `k` services for `client` at `at`, best first.
    fn predict(&self, client: ClientId, at: Millis, k: usize) -> Vec<Prediction> {
        let mut out = Vec::with_capacity(k);
        self.predict_into(client, at, k, &mut out);
        out
    }

    /// Like [`Model::predict_into`], but ranks by the probability that the client uses each
    /// service *within `horizon_ms`* of `at` (not only next): what keeping a set of services
    /// warm for that long needs. `probability` is then that probability (rankings no longer
    /// sum to 1) and `expected_in_ms` counts from `at`. Models without a notion of time fall
    /// back to the next-request ranking (the default).
    fn predict_within_into(
        &self,
        client: ClientId,
        at: Millis,
        horizon_ms: u64,
        k: usize,
        out: &mut Vec<Prediction>,
    ) {
        let _ = horizon_ms;
        self.predict_into(client, at, k, out);
    }

    /// The top `k` services for `client` by probability of use within `horizon_ms` of `at`
    /// (see [`Model::predict_within_into`]).
    fn predict_within(
        &self,
        client: ClientId,
        at: Millis,
        horizon_ms: u64,
        k: usize,
    ) -> Vec<Prediction> {
        let mut out = Vec::with_capacity(k);
        self.predict_within_into(client, at, horizon_ms, k, &mut out);
        out
    }

    /// Drops everything learned about `client` alone (its id is about to be reused).
    fn forget_client(&mut self, client: ClientId);

    /// Drops everything learned about these groups alone (their ids are about to be reused).
    fn forget_groups(&mut self, groups: &[GroupId]);

    /// Drops every count of the given services (their ids are about to be reused).
    fn forget_services(&mut self, services: &[ServiceId]);

    /// Approximate heap and table bytes held.
    fn memory_bytes(&self) -> usize;

    /// Number of clients currently tracked.
    fn clients(&self) -> usize;
}

/// Settings shared by all models: memory bounds, decay and context order.
///
/// Memory: roughly `max_clients` × ~150 B + `max_contexts` × (~70 B + 12 B per counted
/// successor, at most `max_entries`) + `max_groups` × ~40 B.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Clients tracked at most (default 100,000). Least recently seen are dropped first.
    pub max_clients: usize,
    /// Groups tracked at most (default 10,000).
    pub max_groups: usize,
    /// Contexts (count tables) held at most, all scopes together (default 500,000).
    pub max_contexts: usize,
    /// Successors counted per context at most (default 24).
    pub max_entries: usize,
    /// A client, group or context idle this long is dropped at the next eviction (ms, default
    /// 24 h).
    pub idle_ttl_ms: u64,
    /// Counts halve every this many ms of the context's own time (default 30 min).
    pub half_life_ms: u64,
    /// Highest context order of the shipped model (1..=4, default 4).
    pub max_order: usize,
    /// Highest context order of the `ppm` and `pooled` baselines (1..=4, default 2, the
    /// reference order of the traces' README).
    pub baseline_order: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            max_clients: 100_000,
            max_groups: 10_000,
            max_contexts: 500_000,
            max_entries: 24,
            idle_ttl_ms: 24 * 3600 * 1000,
            half_life_ms: 30 * 60 * 1000,
            max_order: 4,
            baseline_order: 2,
        }
    }
}

/// Every model by name; `Blend` is the one the daemon ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ModelKind {
    /// See [`Frequent`].
    Frequent,
    /// See [`Recent`].
    Recent,
    /// See [`Markov1`].
    Markov1,
    /// See [`Ppm`].
    Ppm,
    /// See [`Pooled`].
    Pooled,
    /// The previous shipped blend with all 18 tables ([`BlendParams::full`]), kept as a
    /// comparison.
    BlendFull,
    /// See [`Blend`] (shipped).
    Blend,
}

impl ModelKind {
    /// All models, baselines first, then the full blend (a comparison), the shipped one last.
    pub const ALL: [ModelKind; 7] = [
        ModelKind::Frequent,
        ModelKind::Recent,
        ModelKind::Markov1,
        ModelKind::Ppm,
        ModelKind::Pooled,
        ModelKind::BlendFull,
        ModelKind::Blend,
    ];

    /// The model the daemon uses.
    pub const SHIPPED: ModelKind = ModelKind::Blend;

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Frequent => "frequent",
            ModelKind::Recent => "recent",
            ModelKind::Markov1 => "markov1",
            ModelKind::Ppm => "ppm",
            ModelKind::Pooled => "pooled",
            ModelKind::BlendFull => "blend-full",
            ModelKind::Blend => "blend",
        }
    }

    /// The model called `name`, if any.
    pub fn from_name(name: &str) -> Option<ModelKind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// All valid names, comma-separated (for error messages).
    pub fn names() -> String {
        Self::ALL.map(ModelKind::name).join(", ")
    }

    /// Whether this is the shipped model.
    pub fn is_shipped(self) -> bool {
        self == Self::SHIPPED
    }

    /// A fresh model of this kind.
    pub fn build(self, config: &ModelConfig) -> Box<dyn Model + Send> {
        match self {
            ModelKind::Frequent => Box::new(Frequent::new(config)),
            ModelKind::Recent => Box::new(Recent::new(config)),
            ModelKind::Markov1 => Box::new(Markov1::new(config)),
            ModelKind::Ppm => Box::new(Ppm::new(config)),
            ModelKind::Pooled => Box::new(Pooled::new(config)),
            ModelKind::BlendFull => Box::new(Blend::full(config)),
            ModelKind::Blend => Box::new(Blend::new(config)),
        }
    }
}
