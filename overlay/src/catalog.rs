//! The service catalog: which peers publish which services. No I/O.
//!
//! Local services keep their backend address here and never send it anywhere; peers learn only
//! names. A remote entry is keyed by its *authenticated origin*: either the node that signed
//! the snapshot with its node key ([`signed`], protocol 1.1: any member may hand it on), or —
//! for the legacy unsigned `CatalogPush` — the node mTLS authenticated for the connection.
//! Nobody can speak for another node.
//!
//! Entries of origins that are not (yet) live members are held aside, invisible, until the
//! origin is seen alive ([`Catalog::set_live`]): a joining peer may pull the whole catalog
//! before it knows every member. A member declared down loses its entries
//! ([`Catalog::set_down`]); entries from an earlier generation of a member are dropped when
//! it comes back in a newer one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;

use serde::Serialize;

use crate::identity::{valid_name, NodeId, NodeIdStr};
use crate::wire::{CatalogSnapshot, CatalogVersion, SignedCatalog, MAX_SERVICES_PER_PEER};

pub mod gossip;
pub mod signed;

use signed::{CatalogSigner, SignedError, VerifiedCatalog};

/// Most remote origins held (live and held aside together); past it, new origins are refused.
pub const MAX_ORIGINS: usize = 16 * 1024;

/// Errors changing the local catalog.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CatalogError {
    /// The name is not a valid service name.
    #[error("invalid service name {0:?}: 1 to 63 characters of a-z, 0-9, '-', '_' or '.'")]
    BadName(String),
    /// A service with this name is already published here.
    #[error("service {0:?} is already published")]
    Exists(String),
    /// Too many services on this node.
    #[error("too many services (limit {MAX_SERVICES_PER_PEER})")]
    Full,
}

/// What applying a verified snapshot did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Not newer than what is held (or our own, or from an older generation): ignored.
    Stale,
    /// Newer, and the visible services changed.
    Changed,
    /// Newer, same services (or the origin is not a live member yet: held aside).
    Stored,
    /// Refused: too many origins held.
    Full,
}

impl Applied {
    /// Whether the snapshot was new information (worth handing on).
    pub fn is_new(self) -> bool {
        matches!(self, Applied::Changed | Applied::Stored)
    }
}

/// One row of the overlay-wide catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceEntry {
    /// Service name.
    pub name: String,
    /// Node offering it.
    pub node_id: NodeIdStr,
    /// Whether it is this node.
    pub local: bool,
}

#[derive(Debug, Clone)]
struct Remote {
    version: CatalogVersion,
    services: BTreeSet<String>,
    /// The origin's signature, to hand the entry on (None: legacy unsigned push).
    signed: Option<SignedCatalog>,
}

/// Local and remote service registrations.
#[derive(Debug)]
pub struct Catalog {
    me: NodeId,
    local: BTreeMap<String, SocketAddr>,
    version: CatalogVersion,
    own_signed: Option<SignedCatalog>,
    remote: HashMap<NodeId, Remote>,
    /// Verified entries of origins not known alive yet.
    aside: HashMap<NodeId, Remote>,
    /// Live members and the generation they run in.
    live: HashMap<NodeId, u64>,
    by_service: BTreeMap<String, BTreeSet<NodeId>>,
}

impl Catalog {
    /// An empty catalog for node `me` in generation `generation`.
    pub fn new(me: NodeId, generation: u64) -> Self {
        Self {
            me,
            local: BTreeMap::new(),
            version: CatalogVersion { generation, seq: 0 },
            own_signed: None,
            remote: HashMap::new(),
            aside: HashMap::new(),
            live: HashMap::new(),
            by_service: BTreeMap::new(),
        }
    }

    /// Publishes a local service.
    pub fn publish(&mut self, name: &str, backend: SocketAddr) -> Result<(), CatalogError> {
        if !valid_name(name) {
            return Err(CatalogError::BadName(name.to_owned()));
        }
        if self.local.contains_key(name) {
            return Err(CatalogError::Exists(name.to_owned()));
        }
        if self.local.len() >= MAX_SERVICES_PER_PEER {
            return Err(CatalogError::Full);
        }
        self.local.insert(name.to_owned(), backend);
        self.version.seq += 1;
        self.own_signed = None;
        Ok(())
    }

    /// Withdraws a local service; returns whether it existed.
    pub fn unpublish(&mut self, name: &str) -> bool {
        let existed = self.local.remove(name).is_some();
        if existed {
            self.version.seq += 1;
            self.own_signed = None;
        }
        existed
    }

    /// Moves our version past everything sent so far: into `generation` if it is newer (a
    /// rejoin under a renewed identity), else one step up. Others then take our next
    /// snapshot even if they hold the previous one.
    pub fn renew(&mut self, generation: u64) {
        if generation > self.version.generation {
            self.version = CatalogVersion { generation, seq: 0 };
        } else {
            self.version.seq += 1;
        }
        self.own_signed = None;
    }

    /// Our current version.
    pub fn version(&self) -> CatalogVersion {
        self.version
    }

    /// Whether we publish anything.
    pub fn has_local(&self) -> bool {
        !self.local.is_empty()
    }

    /// The backend of a local service.
    pub fn backend(&self, name: &str) -> Option<SocketAddr> {
        self.local.get(name).copied()
    }

    /// Our snapshot, to send to peers.
    pub fn snapshot(&self) -> CatalogSnapshot {
        CatalogSnapshot {
            version: self.version,
            services: self.local.keys().cloned().collect(),
        }
    }

    /// Our snapshot, signed (signed once per version and kept).
    pub fn signed_own(&mut self, signer: &CatalogSigner) -> Result<SignedCatalog, SignedError> {
        if let Some(s) = &self.own_signed {
            return Ok(s.clone());
        }
        let s = signer.sign_snapshot(self.version, self.local.keys().cloned().collect())?;
        self.own_signed = Some(s.clone());
        Ok(s)
    }

    /// The version held for `origin` (visible or held aside).
    pub fn version_of(&self, origin: NodeId) -> Option<CatalogVersion> {
        self.remote
            .get(&origin)
            .or_else(|| self.aside.get(&origin))
            .map(|r| r.version)
    }

    /// Applies a snapshot received from authenticated node `from` over a connection (legacy
    /// unsigned push; the caller checked `from` is a live member); returns whether it changed
    /// anything. Older or equal versions are ignored.
    pub fn apply_remote(&mut self, from: NodeId, snap: CatalogSnapshot) -> bool {
        if from == self.me {
            return false;
        }
        if self.version_of(from).is_some_and(|v| v >= snap.version) {
            return false;
        }
        self.aside.remove(&from);
        self.put_visible(
            from,
            Remote {
                version: snap.version,
                services: snap.services.into_iter().collect(),
                signed: None,
            },
        )
    }

    /// Applies a snapshot whose origin signature was checked.
    pub fn apply_verified(&mut self, v: VerifiedCatalog) -> Applied {
        let origin = v.origin();
        if origin == self.me {
            return Applied::Stale;
        }
        let version = v.version();
        if let Some(held) = self
            .remote
            .get_mut(&origin)
            .or_else(|| self.aside.get_mut(&origin))
        {
            if held.version > version {
                return Applied::Stale;
            }
            if held.version == version {
                if held.signed.is_none() {
                    // Same content, now with the origin's signature: we can hand it on.
                    held.signed = Some(v.signed().clone());
                }
                return Applied::Stale;
            }
        } else if self.remote.len() + self.aside.len() >= MAX_ORIGINS {
            return Applied::Full;
        }
        let entry = Remote {
            version,
            services: v.services().iter().cloned().collect(),
            signed: Some(v.signed().clone()),
        };
        match self.live.get(&origin) {
            Some(&g) if version.generation < g => Applied::Stale,
            Some(_) => {
                if self.put_visible(origin, entry) {
                    Applied::Changed
                } else {
                    Applied::Stored
                }
            }
            None => {
                self.aside.insert(origin, entry);
                Applied::Stored
            }
        }
    }

    fn put_visible(&mut self, origin: NodeId, entry: Remote) -> bool {
        let new = entry.services.clone();
        let old = self
            .remote
            .insert(origin, entry)
            .map(|r| r.services)
            .unwrap_or_default();
        for gone in old.difference(&new) {
            self.unindex(gone, origin);
        }
        for added in new.difference(&old) {
            self.by_service
                .entry(added.clone())
                .or_default()
                .insert(origin);
        }
        old != new
    }

    /// `node` is a live member running generation `generation`: its entries held aside become
    /// visible, and entries of its earlier generations are dropped. Returns whether the
    /// visible catalog changed.
    pub fn set_live(&mut self, node: NodeId, generation: u64) -> bool {
        if node == self.me {
            return false;
        }
        self.live.insert(node, generation);
        let mut changed = false;
        if self
            .remote
            .get(&node)
            .is_some_and(|r| r.version.generation < generation)
        {
            changed |= self.remove_visible(node);
        }
        if let Some(entry) = self.aside.remove(&node) {
            if entry.version.generation >= generation {
                changed |= self.put_visible(node, entry);
            }
        }
        changed
    }

    /// `node` was declared down or left: its entries are removed. Returns whether it had any
    /// visible.
    pub fn set_down(&mut self, node: NodeId) -> bool {
        self.live.remove(&node);
        self.remove_peer(node)
    }

    /// Removes everything node `from` published (it left, died or was revoked); returns
    /// whether it had any.
    pub fn remove_peer(&mut self, from: NodeId) -> bool {
        self.aside.remove(&from);
        self.remove_visible(from)
    }

    fn remove_visible(&mut self, from: NodeId) -> bool {
        match self.remote.remove(&from) {
            Some(r) => {
                for s in &r.services {
                    self.unindex(s, from);
                }
                !r.services.is_empty()
            }
            None => false,
        }
    }

    /// Signed entries to hand on: those of `origins` (all when empty), ours included when it
    /// is signed and asked for. Capped at `max`.
    pub fn signed_entries(&mut self, origins: &[NodeId], max: usize) -> Vec<SignedCatalog> {
        let wanted = |n: &NodeId| origins.is_empty() || origins.contains(n);
        let mut out = Vec::new();
        if wanted(&self.me) && (self.has_local() || self.version.seq > 0) {
            if let Some(s) = &self.own_signed {
                out.push(s.clone());
            }
        }
        let mut others: Vec<(&NodeId, &SignedCatalog)> = self
            .remote
            .iter()
            .chain(self.aside.iter())
            .filter(|(n, _)| wanted(n))
            .filter_map(|(n, r)| r.signed.as_ref().map(|s| (n, s)))
            .collect();
        others.sort_by_key(|(n, _)| **n);
        out.extend(others.into_iter().map(|(_, s)| s.clone()));
        out.truncate(max);
        out
    }

    fn unindex(&mut self, service: &str, node: NodeId) {
        if let Some(set) = self.by_service.get_mut(service) {
            set.remove(&node);
            if set.is_empty() {
                self.by_service.remove(service);
            }
        }
    }

    /// Remote nodes publishing `service`, in node id order.
    pub fn providers(&self, service: &str) -> Vec<NodeId> {
        self.by_service
            .get(service)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Every entry, local first, sorted by name then node.
    pub fn entries(&self) -> Vec<ServiceEntry> {
        let mut out: Vec<ServiceEntry> = self
            .local
            .keys()
            .map(|name| ServiceEntry {
                name: name.clone(),
                node_id: NodeIdStr(self.me),
                local: true,
            })
            .collect();
        for (name, nodes) in &self.by_service {
            for n in nodes {
                out.push(ServiceEntry {
                    name: name.clone(),
                    node_id: NodeIdStr(*n),
                    local: false,
                });
            }
        }
        out.sort_by(|a, b| (&a.name, a.node_id.0, !a.local).cmp(&(&b.name, b.node_id.0, !b.local)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId::from_spki(&[n])
    }

    fn snap(generation: u64, seq: u64, names: &[&str]) -> CatalogSnapshot {
        CatalogSnapshot {
            version: CatalogVersion { generation, seq },
            services: names.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn remote_updates_follow_versions() {
        let mut c = Catalog::new(id(0), 1);
        assert!(c.apply_remote(id(1), snap(1, 1, &["a", "b"])));
        assert_eq!(c.providers("a"), vec![id(1)]);
        // Stale snapshot ignored.
        assert!(!c.apply_remote(id(1), snap(1, 0, &[])));
        assert_eq!(c.providers("b"), vec![id(1)]);
        // Newer one withdraws b.
        assert!(c.apply_remote(id(1), snap(1, 2, &["a"])));
        assert!(c.providers("b").is_empty());
        // A restart (new generation) with seq 0 still wins.
        assert!(c.apply_remote(id(1), snap(2, 0, &["c"])));
        assert!(c.providers("a").is_empty());
        assert!(c.remove_peer(id(1)));
        assert!(c.providers("c").is_empty());
        assert!(c.entries().is_empty());
    }

    fn signer(name: &str) -> signed::CatalogSigner {
        use crate::identity::{generate_ca, NodeIdentity, Validity};
        let now = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let ca = generate_ca("t", Validity::days_from(now, 10).unwrap()).unwrap();
        let id = NodeIdentity::issue(&ca, name, Validity::days_from(now, 10).unwrap()).unwrap();
        signed::CatalogSigner::new(&id.key).unwrap()
    }

    fn verified(
        s: &signed::CatalogSigner,
        generation: u64,
        seq: u64,
        names: &[&str],
    ) -> VerifiedCatalog {
        let signed = s
            .sign_snapshot(
                CatalogVersion { generation, seq },
                names.iter().map(|n| n.to_string()).collect(),
            )
            .unwrap();
        signed::verify_snapshot(&signed).unwrap()
    }

    #[test]
    fn signed_entries_wait_for_liveness_and_go_with_the_member() {
        let a = signer("a");
        let mut c = Catalog::new(id(0), 1);
        // Pulled before the origin is known alive: held aside, not used, but handed on.
        assert_eq!(
            c.apply_verified(verified(&a, 1, 1, &["db"])),
            Applied::Stored
        );
        assert!(c.providers("db").is_empty());
        assert_eq!(c.signed_entries(&[], 10).len(), 1);
        assert!(c.set_live(a.node_id(), 1));
        assert_eq!(c.providers("db"), vec![a.node_id()]);
        // Older or equal versions are stale; a newer one replaces.
        assert_eq!(c.apply_verified(verified(&a, 1, 1, &["x"])), Applied::Stale);
        assert_eq!(
            c.apply_verified(verified(&a, 1, 2, &["web"])),
            Applied::Changed
        );
        assert!(c.providers("db").is_empty());
        // Declared down: everything it published goes.
        assert!(c.set_down(a.node_id()));
        assert!(c.providers("web").is_empty());
        assert_eq!(c.version_of(a.node_id()), None);
        // Back in a newer generation: a late copy of the old generation is not used.
        c.apply_verified(verified(&a, 1, 2, &["web"]));
        c.set_live(a.node_id(), 2);
        assert!(c.providers("web").is_empty());
        assert_eq!(
            c.apply_verified(verified(&a, 1, 3, &["web"])),
            Applied::Stale
        );
        assert_eq!(
            c.apply_verified(verified(&a, 2, 0, &["api"])),
            Applied::Changed
        );
        assert_eq!(c.providers("api"), vec![a.node_id()]);
    }

    #[test]
    fn own_id_cannot_be_spoken_for() {
        let mut c = Catalog::new(id(0), 1);
        assert!(!c.apply_remote(id(0), snap(9, 9, &["x"])));
        assert!(c.providers("x").is_empty());
    }

    #[test]
    fn local_publish_validates_and_versions() {
        let mut c = Catalog::new(id(0), 3);
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(
            c.publish("Bad Name", addr),
            Err(CatalogError::BadName("Bad Name".into()))
        );
        c.publish("echo", addr).unwrap();
        assert_eq!(
            c.publish("echo", addr),
            Err(CatalogError::Exists("echo".into()))
        );
        let s1 = c.snapshot();
        assert_eq!(s1.services, vec!["echo".to_string()]);
        assert!(c.unpublish("echo"));
        assert!(c.snapshot().version > s1.version);
        assert!(!c.unpublish("echo"));
    }
}
