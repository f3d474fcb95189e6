//! Cost of a routing decision on a 1,000-peer graph: `cargo bench -p overlay --bench routing`.
//!
//! The graph: 999 members with signed-summary content (16 links each to random others, every
//! peer a relay) and 50 measured links of our own; 3 providers of the service asked for.
//! - `choose/cached`: instance and path choice with the path tree already built (the common
//!   case: the tree is rebuilt only when the graph changes).
//! - `choose/rebuild`: the same after a graph change (the tree is rebuilt: petgraph CSR build
//!   plus the hop-bounded search with 2 relays). RTT changes rebuild at most every
//!   `REBUILD_EVERY` (250 ms); only structural changes rebuild at the next decision.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use overlay::identity::NodeId;
use overlay::routing::vivaldi::Coord;
use overlay::routing::{Router, RoutingConfig};
use overlay::wire::{CatalogVersion, LinkReport, LoadReport, RouteSummary};
use tokio::time::Instant;

fn id(i: u32) -> NodeId {
    NodeId::from_spki(&i.to_le_bytes())
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u32) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % u64::from(n)) as u32
    }
}

fn graph(n: u32) -> (Router, Vec<NodeId>, Instant) {
    let now = Instant::now();
    let me = id(0);
    // Summaries never age out while the bench's clock runs ahead.
    let cfg = RoutingConfig {
        summary_ttl: Duration::from_secs(1 << 40),
        ..RoutingConfig::default()
    };
    let mut r = Router::new(me, 1, cfg);
    let mut rng = Lcg(7);
    for i in 1..n {
        r.member_up(id(i));
    }
    for i in 1..=50 {
        r.on_quic_stats(
            id(i),
            Duration::from_micros(5_000 + u64::from(rng.next(80_000))),
            0,
            0,
            now,
        );
    }
    for i in 1..n {
        let links = (0..16)
            .map(|_| {
                let mut p = 1 + rng.next(n - 1);
                if p == i {
                    p = 1 + (p % (n - 1));
                }
                LinkReport {
                    peer: id(p),
                    rtt_us: 2_000 + rng.next(140_000),
                    loss_ppm: rng.next(20_000),
                }
            })
            .filter(|l| l.peer != id(i))
            .collect();
        r.on_summary(
            RouteSummary {
                node_id: id(i),
                version: CatalogVersion {
                    generation: 1,
                    seq: 1,
                },
                coord: Coord::default(),
                load: LoadReport {
                    serving: rng.next(20),
                    relaying: rng.next(5),
                    backend_us: 0,
                },
                relays: true,
                links,
            },
            now,
        );
    }
    let providers = vec![id(n - 1), id(n / 2), id(n / 3)];
    (r, providers, now)
}

fn bench(c: &mut Criterion) {
    let (mut r, providers, now) = graph(1000);
    let mut k = 0usize;
    assert!(r.choose(&providers, &[], now, |n| n - 1).is_some());
    c.bench_function("routing/choose/cached/1000", |b| {
        b.iter(|| {
            k = k.wrapping_add(1);
            r.choose(&providers, &[], now, |n| k % n)
        })
    });
    let mut flip = false;
    let mut t = now;
    let mut sent = 0u64;
    c.bench_function("routing/choose/rebuild/1000", |b| {
        b.iter(|| {
            // A measurement that moves by more than 10%, and the rebuild interval passed.
            flip = !flip;
            t += overlay::routing::REBUILD_EVERY;
            let rtt = if flip { 5 } else { 50 };
            sent += 2;
            r.on_quic_stats(id(1), Duration::from_millis(rtt), 0, sent, t);
            r.on_quic_stats(id(1), Duration::from_millis(rtt), 0, sent + 1, t);
            r.choose(&providers, &[], t, |n| n - 1)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
