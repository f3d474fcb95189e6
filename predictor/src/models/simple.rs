//! The baseline models, kept so benchmarks can show what the shipped model adds.
//!
//! All but [`Recent`] are the shared context engine with one scope/order setting and either a
//! single table or a PPM-C back-off chain. None of them mixes in anything else: a baseline with
//! no data for a client returns an empty ranking.

use crate::models::core::{Core, CLIENT, GLOBAL, GROUP, MAX_ORDER};
use crate::models::rank::{ppm_weights, Cands};
use crate::models::{Model, ModelConfig};
use crate::store::{Bounded, Stamped};
use crate::{ClientId, GroupId, Millis, Prediction, ServiceId};

#[derive(Debug, Clone, Copy)]
enum Combine {
    /// The client's own order-`n` table alone.
    Single(usize),
    /// Client scope, orders hi..=0, PPM-C back-off.
    ClientChain,
    /// Group then global scope at each order, from hi down to 0, PPM-C back-off.
    PooledChain,
}

/// Shared implementation of the counting baselines.
#[derive(Debug, Clone)]
struct Counting {
    name: &'static str,
    core: Core<()>,
    combine: Combine,
}

impl Counting {
    fn new(
        name: &'static str,
        cfg: &ModelConfig,
        scopes: [bool; 3],
        lo: usize,
        hi: usize,
        combine: Combine,
    ) -> Self {
        Self {
            name,
            core: Core::new(cfg, scopes, lo, hi),
            combine,
        }
    }

    fn observe_grouped(
        &mut self,
        client: ClientId,
        group: Option<GroupId>,
        service: ServiceId,
        at: Millis,
    ) {
        self.core.touch(client, group, at.0, || ());
        self.core.learn(client, service.0, at.0);
    }

    fn predict_into(&self, client: ClientId, at: Millis, k: usize, out: &mut Vec<Prediction>) {
        out.clear();
        let Some(c) = self.core.clients.get(&client) else {
            return;
        };
        let v = self.core.view(c);
        let mut cands = Cands::new();
        match self.combine {
            Combine::Single(order) => {
                if let Some(d) = v.d[CLIENT][order] {
                    if d.total > 0.0 {
                        cands.add_dist(d, 1.0 / d.total);
                    }
                }
            }
            Combine::ClientChain => {
                let mut chain = [None; MAX_ORDER + 1];
                for (i, slot) in chain.iter_mut().enumerate() {
                    *slot = v.d[CLIENT][MAX_ORDER - i];
                }
                let w = ppm_weights(&chain);
                for (d, w) in chain.iter().zip(w) {
                    if let Some(d) = d {
                        cands.add_dist(d, w);
                    }
                }
            }
            Combine::PooledChain => {
                let mut chain = [None; 2 * (MAX_ORDER + 1)];
                for i in 0..=MAX_ORDER {
                    chain[2 * i] = v.d[GROUP][MAX_ORDER - i];
                    chain[2 * i + 1] = v.d[GLOBAL][MAX_ORDER - i];
                }
                let w = ppm_weights(&chain);
                for (d, w) in chain.iter().zip(w) {
                    if let Some(d) = d {
                        cands.add_dist(d, w);
                    }
                }
            }
        }
        cands.finish(k, c.last_at, at, out);
    }
}

macro_rules! counting_model {
    ($(#[$doc:meta])* $ty:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $ty(Counting);

        impl Model for $ty {
            fn name(&self) -> &'static str {
                self.0.name
            }
            fn observe_grouped(&mut self, client: ClientId, group: Option<GroupId>, service: ServiceId, at: Millis) {
                self.0.observe_grouped(client, group, service, at);
            }
            fn predict_into(&self, client: ClientId, at: Millis, k: usize, out: &mut Vec<Prediction>) {
                self.0.predict_into(client, at, k, out);
            }
            fn forget_client(&mut self, client: ClientId) {
                self.0.core.forget_client(client);
            }
            fn forget_groups(&mut self, groups: &[GroupId]) {
                self.0.core.forget_groups(groups);
            }
            fn forget_services(&mut self, services: &[ServiceId]) {
                let ids: Vec<u32> = services.iter().map(|s| s.0).collect();
                self.0.core.forget_services(&ids);
            }
            fn memory_bytes(&self) -> usize {
                self.0.core.memory_bytes(|_| 0)
            }
            fn clients(&self) -> usize {
                self.0.core.clients.len()
            }
        }
    };
}

counting_model!(
    /// Baseline: the client's own most frequent services (time-decayed counts).
    Frequent
);
counting_model!(
    /// Baseline: first-order Markov chain over the client's own requests.
    Markov1
);
counting_model!(
    /// Baseline: the client's own variable-order context model (orders `max_order`..=0) with
    /// PPM-C back-off: each order keeps `n / (n + distinct)` of the mass, escapes the rest.
    Ppm
);
counting_model!(
    /// Baseline for cross-client learning: contexts of the client's history counted over its
    /// group and over all clients (never over the client alone), PPM-C back-off from
    /// group to global at each order, highest order first.
    Pooled
);

impl Frequent {
    /// A fresh model.
    pub fn new(cfg: &ModelConfig) -> Self {
        Self(Counting::new(
            "frequent",
            cfg,
            [true, false, false],
            0,
            0,
            Combine::Single(0),
        ))
    }
}

impl Markov1 {
    /// A fresh model.
    pub fn new(cfg: &ModelConfig) -> Self {
        Self(Counting::new(
            "markov1",
            cfg,
            [true, false, false],
            1,
            1,
            Combine::Single(1),
        ))
    }
}

impl Ppm {
    /// A fresh model.
    pub fn new(cfg: &ModelConfig) -> Self {
        Self(Counting::new(
            "ppm",
            cfg,
            [true, false, false],
            0,
            cfg.baseline_order.max(1),
            Combine::ClientChain,
        ))
    }
}

impl Pooled {
    /// A fresh model.
    pub fn new(cfg: &ModelConfig) -> Self {
        Self(Counting::new(
            "pooled",
            cfg,
            [false, true, true],
            0,
            cfg.baseline_order.max(1),
            Combine::PooledChain,
        ))
    }
}

/// Most recently used services remembered per client by [`Recent`].
const RECENT_LEN: usize = 16;

#[derive(Debug, Clone)]
struct RecentState {
    /// Most recent first, distinct.
    services: Vec<u32>,
    last_at: u64,
}

impl Stamped for RecentState {
    fn last_at(&self) -> u64 {
        self.last_at
    }
}

/// Baseline: the client's k most recently used distinct services, most recent first.
/// Probabilities are uniform over the remembered list.
#[derive(Debug, Clone)]
pub struct Recent {
    clients: Bounded<ClientId, RecentState>,
}

impl Recent {
    /// A fresh model.
    pub fn new(cfg: &ModelConfig) -> Self {
        Self {
            clients: Bounded::new(cfg.max_clients, cfg.idle_ttl_ms),
        }
    }
}

impl Model for Recent {
    fn name(&self) -> &'static str {
        "recent"
    }

    fn observe_grouped(
        &mut self,
        client: ClientId,
        _group: Option<GroupId>,
        service: ServiceId,
        at: Millis,
    ) {
        let (st, _) = self.clients.upsert(client, at.0, || RecentState {
            services: Vec::new(),
            last_at: at.0,
        });
        st.last_at = st.last_at.max(at.0);
        if let Some(i) = st.services.iter().position(|&s| s == service.0) {
            st.services[..=i].rotate_right(1);
        } else {
            if st.services.len() >= RECENT_LEN {
                st.services.pop();
            }
            st.services.insert(0, service.0);
        }
    }

    fn predict_into(&self, client: ClientId, _at: Millis, k: usize, out: &mut Vec<Prediction>) {
        out.clear();
        let Some(st) = self.clients.get(&client) else {
            return;
        };
        let p = 1.0 / st.services.len().max(1) as f64;
        out.extend(st.services.iter().take(k).map(|&s| Prediction {
            service: ServiceId(s),
            probability: p,
            expected_in_ms: 0,
        }));
    }

    fn forget_client(&mut self, client: ClientId) {
        self.clients.remove(&client);
    }

    fn forget_groups(&mut self, _groups: &[GroupId]) {}

    fn forget_services(&mut self, services: &[ServiceId]) {
        for st in self.clients.values_mut() {
            st.services.retain(|s| !services.iter().any(|g| g.0 == *s));
            // (A Recent list holds at most 16 services, so the linear scan is cheap.)
        }
    }

    fn memory_bytes(&self) -> usize {
        self.clients.bytes(|st| st.services.capacity() * 4)
    }

    fn clients(&self) -> usize {
        self.clients.len()
    }
}
