//! The daemon's front: the shipped model plus name interning, group derivation and snapshots.
//!
//! [`Predictor`] takes names (`&str`) and caller-supplied times, interns clients, services and
//! groups in bounded tables (least recently used names are dropped and the model forgets them
//! before their ids are reused), and forwards to [`Blend`]. Its whole learned state can be saved
//! with [`Predictor::snapshot`] and loaded with [`Predictor::restore`] so a restarted peer keeps
//! what it learned.
//!
//! Snapshot format: `postcard` encoding of a versioned struct ([`SNAPSHOT_VERSION`]) holding the
//! configuration, the three name tables and the model tables, every map written sorted by key,
//! so equal states give byte-identical snapshots. Restoring validates the version and that the
//! tables are consistent and within the configured bounds; malformed bytes give an error, never
//! a panic.
//!
//! No I/O (the caller stores the bytes), no clock.

use serde::{Deserialize, Serialize};

use crate::intern::{Interner, InternerState};
use crate::models::blend::{BlendParams, BlendState};
use crate::models::{Blend, Model, ModelConfig};
use crate::{ClientId, GroupId, GroupRule, Millis, Prediction, ServiceId};

/// Version written into snapshots; restoring any other version fails. (2: per-client use
/// timing for the horizon ranking; 3: lazily decayed count tables, with a scale per table;
/// 4: the leaner shipped blend, whose parameters name the orders and bags of each scope.)
pub const SNAPSHOT_VERSION: u32 = 4;

/// Everything configurable about the [`Predictor`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PredictorConfig {
    /// Memory bounds, decay and context order (also bounds the client and group name tables).
    pub model: ModelConfig,
    /// Tuning of the shipped model.
    pub blend: BlendParams,
    /// How client names map to groups.
    pub groups: GroupRule,
    /// Service names held at most (default 65,536); least recently used are forgotten first.
    pub max_services: usize,
}

impl Default for PredictorConfig {
    fn default() -> Self {
        Self {
            model: ModelConfig::default(),
            blend: BlendParams::default(),
            groups: GroupRule::default(),
            max_services: 65_536,
        }
    }
}

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The bytes are not a postcard-encoded snapshot.
    #[error("snapshot is not decodable: {0}")]
    Decode(#[from] postcard::Error),
    /// The snapshot was written by an incompatible version.
    #[error("snapshot version {found} is not supported (expected {SNAPSHOT_VERSION})")]
    Version {
        /// Version found in the snapshot.
        found: u32,
    },
    /// The snapshot decodes but its tables contradict each other or the bounds.
    #[error("snapshot is inconsistent: {0}")]
    Inconsistent(&'static str),
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    config: PredictorConfig,
    clients: InternerState,
    services: InternerState,
    groups: InternerState,
    client_groups: Vec<Option<GroupId>>,
    model: BlendState,
}

/// The shipped predictor behind a name-based API (see the module docs).
#[derive(Debug, Clone)]
pub struct Predictor {
    config: PredictorConfig,
    model: Blend,
    clients: Interner,
    services: Interner,
    groups: Interner,
    /// Group of each client id (indexed by id).
    client_groups: Vec<Option<GroupId>>,
    scratch: Vec<u32>,
    preds: Vec<Prediction>,
}

impl Predictor {
    /// An empty predictor.
    pub fn new(config: PredictorConfig) -> Self {
        Self {
            model: Blend::with_params(&config.model, config.blend),
            clients: Interner::new(config.model.max_clients),
            services: Interner::new(config.max_services),
            groups: Interner::new(config.model.max_groups),
            client_groups: Vec::new(),
            scratch: Vec::new(),
            preds: Vec::new(),
            config,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &PredictorConfig {
        &self.config
    }

    /// Learns that `client` requested `service` at `at_ms`.
    pub fn observe_named(&mut self, client: &str, service: &str, at_ms: u64) {
        let (cid, gid) = self.intern_client(client, at_ms);
        let sid = self.intern_service(service, at_ms);
        self.model.observe_grouped(cid, gid, sid, Millis(at_ms));
    }

    /// The top `k` services for `client` at `at_ms`: `(service, probability, expected_in_ms)`,
    /// best first. Empty for a client never seen (or forgotten).
    pub fn predict_named(&self, client: &str, at_ms: u64, k: usize) -> Vec<(String, f64, u64)> {
        let Some(cid) = self.clients.id(client) else {
            return Vec::new();
        };
        self.model
            .predict(ClientId(cid), Millis(at_ms), k)
            .into_iter()
            .filter_map(|p| {
                Some((
                    self.services.name(p.service.0)?.to_owned(),
                    p.probability,
                    p.expected_in_ms,
                ))
            })
            .collect()
    }

    /// Like [`Predictor::predict_named`] but calls `f(service, probability, expected_in_ms)`
    /// for each prediction instead of allocating strings.
    pub fn predict_each(
        &mut self,
        client: &str,
        at_ms: u64,
        k: usize,
        mut f: impl FnMut(&str, f64, u64),
    ) {
        let Some(cid) = self.clients.id(client) else {
            return;
        };
        let mut preds = std::mem::take(&mut self.preds);
        self.model
            .predict_into(ClientId(cid), Millis(at_ms), k, &mut preds);
        for p in &preds {
            if let Some(name) = self.services.name(p.service.0) {
                f(name, p.probability, p.expected_in_ms);
            }
        }
        self.preds = preds;
    }

    /// The top `k` services for `client` by probability of use within `horizon_ms` of `at_ms`
    /// (see [`Model::predict_within_into`]): `(service, probability, expected_in_ms)`, best
    /// first. What a warm set kept for `horizon_ms` should hold.
    pub fn predict_within_named(
        &self,
        client: &str,
        at_ms: u64,
        horizon_ms: u64,
        k: usize,
    ) -> Vec<(String, f64, u64)> {
        let Some(cid) = self.clients.id(client) else {
            return Vec::new();
        };
        self.model
            .predict_within(ClientId(cid), Millis(at_ms), horizon_ms, k)
            .into_iter()
            .filter_map(|p| {
                Some((
                    self.services.name(p.service.0)?.to_owned(),
                    p.probability,
                    p.expected_in_ms,
                ))
            })
            .collect()
    }

    /// Like [`Predictor::predict_within_named`] but calls `f(service, probability,
    /// expected_in_ms)` for each prediction instead of allocating strings.
    pub fn predict_within_each(
        &mut self,
        client: &str,
        at_ms: u64,
        horizon_ms: u64,
        k: usize,
        mut f: impl FnMut(&str, f64, u64),
    ) {
        let Some(cid) = self.clients.id(client) else {
            return;
        };
        let mut preds = std::mem::take(&mut self.preds);
        self.model
            .predict_within_into(ClientId(cid), Millis(at_ms), horizon_ms, k, &mut preds);
        for p in &preds {
            if let Some(name) = self.services.name(p.service.0) {
                f(name, p.probability, p.expected_in_ms);
            }
        }
        self.preds = preds;
    }

    fn intern_client(&mut self, client: &str, at: u64) -> (ClientId, Option<GroupId>) {
        self.scratch.clear();
        let (cid, new) = self.clients.intern(client, at, &mut self.scratch);
        for &gone in &self.scratch {
            self.model.forget_client(ClientId(gone));
            if let Some(g) = self.client_groups.get_mut(gone as usize) {
                *g = None;
            }
        }
        let idx = cid as usize;
        if self.client_groups.len() <= idx {
            self.client_groups.resize(idx + 1, None);
        }
        if new {
            let group = self.config.groups.group_of(client).map(str::to_owned);
            self.client_groups[idx] = group.map(|g| self.intern_group(&g, at));
        } else if let Some(g) = self.client_groups[idx] {
            self.groups.touch(g.0, at);
        }
        (ClientId(cid), self.client_groups[idx])
    }

    fn intern_group(&mut self, group: &str, at: u64) -> GroupId {
        self.scratch.clear();
        let (gid, _) = self.groups.intern(group, at, &mut self.scratch);
        if !self.scratch.is_empty() {
            self.scratch.sort_unstable();
            let gone: Vec<GroupId> = self.scratch.iter().map(|&g| GroupId(g)).collect();
            self.model.forget_groups(&gone);
            let scratch = &self.scratch;
            for g in &mut self.client_groups {
                if g.is_some_and(|g| scratch.binary_search(&g.0).is_ok()) {
                    *g = None;
                }
            }
        }
        GroupId(gid)
    }

    fn intern_service(&mut self, service: &str, at: u64) -> ServiceId {
        self.scratch.clear();
        let (sid, _) = self.services.intern(service, at, &mut self.scratch);
        if !self.scratch.is_empty() {
            let gone: Vec<ServiceId> = self.scratch.iter().map(|&s| ServiceId(s)).collect();
            self.model.forget_services(&gone);
        }
        ServiceId(sid)
    }

    /// Clients currently known.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Services currently known.
    pub fn services(&self) -> usize {
        self.services.len()
    }

    /// Approximate bytes held (model tables plus name tables).
    pub fn memory_bytes(&self) -> usize {
        self.model.memory_bytes()
            + self.clients.memory_bytes()
            + self.services.memory_bytes()
            + self.groups.memory_bytes()
            + self.client_groups.capacity() * std::mem::size_of::<Option<GroupId>>()
    }

    /// The learned state as bytes (see the module docs for the format).
    pub fn snapshot(&self) -> Vec<u8> {
        let snap = Snapshot {
            version: SNAPSHOT_VERSION,
            config: self.config.clone(),
            clients: self.clients.state(),
            services: self.services.state(),
            groups: self.groups.state(),
            client_groups: self.client_groups.clone(),
            model: self.model.state(),
        };
        // Serializing plain structs, vectors and strings into a Vec cannot fail.
        postcard::to_stdvec(&snap).unwrap_or_default()
    }

    /// A predictor with the state of `bytes` (made by [`Predictor::snapshot`]).
    pub fn restore(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let snap: Snapshot = postcard::from_bytes(bytes)?;
        if snap.version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Version {
                found: snap.version,
            });
        }
        let cfg = snap.config;
        let clients = Interner::from_state(cfg.model.max_clients, snap.clients)
            .ok_or(SnapshotError::Inconsistent("client names"))?;
        let services = Interner::from_state(cfg.max_services, snap.services)
            .ok_or(SnapshotError::Inconsistent("service names"))?;
        let groups = Interner::from_state(cfg.model.max_groups, snap.groups)
            .ok_or(SnapshotError::Inconsistent("group names"))?;
        let mut client_groups = snap.client_groups;
        if client_groups.len() > cfg.model.max_clients.max(4) * 2 {
            return Err(SnapshotError::Inconsistent("client groups"));
        }
        for g in &mut client_groups {
            if g.is_some_and(|g| groups.name(g.0).is_none()) {
                return Err(SnapshotError::Inconsistent(
                    "client group refers to no group",
                ));
            }
        }
        Ok(Self {
            model: Blend::restore(&cfg.model, cfg.blend, snap.model),
            clients,
            services,
            groups,
            client_groups,
            scratch: Vec::new(),
            preds: Vec::new(),
            config: cfg,
        })
    }
}
