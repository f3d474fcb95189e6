//! The service catalog: which peers publish which services. No I/O.
//!
//! Local services keep their backend address here and never send it anywhere; peers learn only
//! names. A remote entry is keyed by the node id that mTLS authenticated for the connection the
//! snapshot came on — never by a field the peer wrote — so a peer can only speak for itself.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;

use serde::Serialize;

use crate::identity::{valid_name, NodeId, NodeIdStr};
use crate::wire::{CatalogSnapshot, CatalogVersion, MAX_SERVICES_PER_PEER};

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

/// Local and remote service registrations.
#[derive(Debug)]
pub struct Catalog {
    me: NodeId,
    local: BTreeMap<String, SocketAddr>,
    version: CatalogVersion,
    remote: HashMap<NodeId, (CatalogVersion, BTreeSet<String>)>,
    by_service: BTreeMap<String, BTreeSet<NodeId>>,
}

impl Catalog {
    /// An empty catalog for node `me` in generation `generation`.
    pub fn new(me: NodeId, generation: u64) -> Self {
        Self {
            me,
            local: BTreeMap::new(),
            version: CatalogVersion { generation, seq: 0 },
            remote: HashMap::new(),
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
        Ok(())
    }

    /// Withdraws a local service; returns whether it existed.
    pub fn unpublish(&mut self, name: &str) -> bool {
        let existed = self.local.remove(name).is_some();
        if existed {
            self.version.seq += 1;
        }
        existed
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

    /// Applies a snapshot received from authenticated node `from`; returns whether it changed
    /// anything. Older or equal versions are ignored.
    pub fn apply_remote(&mut self, from: NodeId, snap: CatalogSnapshot) -> bool {
        if from == self.me {
            return false;
        }
        if let Some((v, _)) = self.remote.get(&from) {
            if *v >= snap.version {
                return false;
            }
        }
        let new: BTreeSet<String> = snap.services.into_iter().collect();
        let old = self
            .remote
            .insert(from, (snap.version, new.clone()))
            .map(|(_, s)| s)
            .unwrap_or_default();
        for gone in old.difference(&new) {
            self.unindex(gone, from);
        }
        for added in new.difference(&old) {
            self.by_service
                .entry(added.clone())
                .or_default()
                .insert(from);
        }
        old != new
    }

    /// Removes everything node `from` published (it left or died); returns whether it had any.
    pub fn remove_peer(&mut self, from: NodeId) -> bool {
        match self.remote.remove(&from) {
            Some((_, services)) => {
                for s in &services {
                    self.unindex(s, from);
                }
                !services.is_empty()
            }
            None => false,
        }
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
