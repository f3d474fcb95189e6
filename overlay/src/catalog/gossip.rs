//! Catalog gossip: which signed snapshots and hints still have to be handed on, and how
//! often. No I/O, no clock.
//!
//! Items ride next to SWIM packets (a second datagram on the same connection, kind 2), so
//! spreading a catalog change costs no connection of its own. Each item is sent
//! `max_transmissions` times (SWIM's λ·log n piggy-backing); the newest items go first. An item
//! for an origin replaces any older one for the same origin.
//!
//! Why not foca's custom broadcasts: foca fills a packet with membership updates first and
//! custom broadcasts only into what is left. During a join of hundreds of peers its update
//! backlog fills every packet for minutes, so catalog changes would starve exactly when they
//! are needed. Here they get their own datagram and their own budget.

use bytes::Bytes;

use crate::identity::NodeId;
use crate::wire::{self, CatalogVersion};

/// Most items waiting at once (older ones are dropped first; the periodic pull repairs).
pub const MAX_PENDING: usize = 1024;

#[derive(Debug)]
struct Item {
    origin: NodeId,
    version: CatalogVersion,
    encoded: Bytes,
    remaining: u32,
    /// Insertion order, to send newer items first among equals.
    order: u64,
}

/// The gossip backlog of one node.
#[derive(Debug)]
pub struct Gossip {
    items: Vec<Item>,
    max_transmissions: u32,
    next_order: u64,
}

/// SWIM's retransmission count for a cluster of `n`: 4·log10(n + 1), at least 3.
pub fn transmissions_for(n: usize) -> u32 {
    let t = 4.0 * ((n as f64) + 1.0).log10();
    (t.ceil() as u32).clamp(3, 64)
}

impl Gossip {
    /// An empty backlog; each item is sent `max_transmissions` times.
    pub fn new(max_transmissions: u32) -> Self {
        Self {
            items: Vec::new(),
            max_transmissions: max_transmissions.max(1),
            next_order: 0,
        }
    }

    /// Queues an encoded item for `origin` at `version`; replaces an older or equal one of the
    /// same origin. Returns false (and queues nothing) if a newer one is already queued.
    pub fn insert(&mut self, origin: NodeId, version: CatalogVersion, encoded: Bytes) -> bool {
        if encoded.is_empty() || encoded.len() > wire::MAX_GOSSIP_ITEM_LEN {
            return false;
        }
        if self
            .items
            .iter()
            .any(|i| i.origin == origin && i.version > version)
        {
            return false;
        }
        self.items.retain(|i| i.origin != origin);
        if self.items.len() >= MAX_PENDING {
            // Drop the item closest to done.
            if let Some(pos) = (0..self.items.len()).min_by_key(|&k| {
                let i = &self.items[k];
                (i.remaining, i.order)
            }) {
                self.items.swap_remove(pos);
            }
        }
        self.next_order += 1;
        self.items.push(Item {
            origin,
            version,
            encoded,
            remaining: self.max_transmissions,
            order: self.next_order,
        });
        true
    }

    /// Forgets every item of `origin` (it went down).
    pub fn remove(&mut self, origin: NodeId) {
        self.items.retain(|i| i.origin != origin);
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Number of items waiting.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// The payload of the next gossip datagram (after the kind byte), at most `max_len` bytes,
    /// or None when nothing waits. Items with the most transmissions left go first.
    pub fn poll_datagram(&mut self, max_len: usize) -> Option<Vec<u8>> {
        if self.items.is_empty() {
            return None;
        }
        self.items
            .sort_by_key(|i| std::cmp::Reverse((i.remaining, i.order)));
        let mut used = 0usize;
        let mut picked = Vec::new();
        for (k, it) in self.items.iter().enumerate() {
            if picked.len() == wire::MAX_GOSSIP_ITEMS {
                break;
            }
            let need = it.encoded.len() + 2;
            if used + need <= max_len {
                used += need;
                picked.push(k);
            }
        }
        if picked.is_empty() {
            return None;
        }
        let out = wire::encode_gossip_items(picked.iter().map(|&k| &self.items[k].encoded[..]));
        for &k in &picked {
            self.items[k].remaining -= 1;
        }
        self.items.retain(|i| i.remaining > 0);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId::from_spki(&[n])
    }
    fn v(seq: u64) -> CatalogVersion {
        CatalogVersion { generation: 1, seq }
    }

    #[test]
    fn items_are_sent_max_transmissions_times_newest_first() {
        let mut g = Gossip::new(2);
        assert!(g.poll_datagram(1200).is_none());
        assert!(g.insert(id(1), v(1), Bytes::from_static(b"one")));
        assert!(g.insert(id(2), v(1), Bytes::from_static(b"two")));
        // A newer item replaces the older one of its origin; an older one is refused.
        assert!(g.insert(id(1), v(2), Bytes::from_static(b"ONE")));
        assert!(!g.insert(id(1), v(1), Bytes::from_static(b"old")));
        assert_eq!(g.len(), 2);
        // Only room for one item: the newest goes first.
        let d = g.poll_datagram(6).unwrap();
        assert_eq!(d, [0, 3, b'O', b'N', b'E']);
        let d = g.poll_datagram(1200).unwrap();
        assert_eq!(d.len(), 10, "both items fit");
        // ONE went twice; two once so far.
        assert_eq!(g.poll_datagram(1200).unwrap(), [0, 3, b't', b'w', b'o']);
        assert!(g.poll_datagram(1200).is_none());
        assert!(g.is_empty());
    }

    #[test]
    fn backlog_is_bounded_and_origins_can_be_forgotten() {
        let mut g = Gossip::new(3);
        for n in 0..=u8::MAX {
            for k in 0..5u64 {
                let mut raw = [0u8; 20];
                raw[0] = n;
                raw[1] = k as u8;
                g.insert(NodeId::from_spki(&raw), v(1), Bytes::from_static(b"x"));
            }
        }
        assert_eq!(g.len(), MAX_PENDING);
        g.insert(id(9), v(1), Bytes::from_static(b"x"));
        g.remove(id(9));
        assert_eq!(g.len(), MAX_PENDING - 1);
        assert_eq!(transmissions_for(100), 9);
        assert_eq!(transmissions_for(1000), 13);
        assert_eq!(transmissions_for(1), 3);
    }
}
