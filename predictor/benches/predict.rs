//! Criterion benchmarks: cost of one event (`predict` then `observe`, as the daemon does per
//! request) for the shipped model and the context baselines, and memory per client.
//!
//! Uses the full traces in `../shared/data/traces/` when present (the numbers in
//! docs/BENCHMARKS.md), else the 2,000-row fixtures in `tests/fixtures/`.
//! Run: `cargo bench -p predictor --bench predict -- --measurement-time 3`

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use predictor::eval::Prepared;
use predictor::trace::{self, Event, OnError};
use predictor::{
    ClientId, GroupId, GroupRule, Millis, ModelKind, Predictor, PredictorConfig, ServiceId,
};

fn load(name: &str) -> Vec<Event> {
    try_load(name).unwrap_or_else(|| panic!("no trace or fixture for {name}"))
}

/// The full trace, else its fixture, else None (Boutique has no fixture).
fn try_load(name: &str) -> Option<Vec<Event>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let full = root.join(format!("../../shared/data/traces/{name}.csv.gz"));
    let fixture = root.join(format!("tests/fixtures/{name}-head2000.csv"));
    let path = [full, fixture].into_iter().find(|p| p.exists())?;
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Some(
        trace::read(file, OnError::Skip)
            .expect("trace reads")
            .events,
    )
}

/// `(at, client, group, service)` in time order, via the evaluator's interning.
fn events(evs: &[Event]) -> Vec<(Millis, ClientId, Option<GroupId>, ServiceId)> {
    let p = Prepared::new(evs, &GroupRule::default());
    p.iter().collect()
}

fn per_event(c: &mut Criterion) {
    let mut group = c.benchmark_group("observe_predict");
    group.throughput(Throughput::Elements(1));
    for name in ["trainticket", "boutique", "nasa-jul"] {
        let Some(trace) = try_load(name) else {
            continue;
        };
        let evs = events(&trace);
        let span = evs.last().map_or(1, |e| e.0 .0) - evs.first().map_or(0, |e| e.0 .0) + 1;
        let warm = evs.len() * 7 / 10;
        for kind in [
            ModelKind::Blend,
            ModelKind::Ppm,
            ModelKind::Pooled,
            ModelKind::Markov1,
        ] {
            let mut model = kind.build(&Default::default());
            for &(at, client, grp, service) in &evs[..warm] {
                model.observe_grouped(client, grp, service, at);
            }
            let mut i = warm;
            let mut lap = 0u64;
            let mut out = Vec::with_capacity(8);
            group.bench_function(BenchmarkId::new(kind.name(), name), |b| {
                b.iter(|| {
                    let (at, client, grp, service) = evs[i];
                    let at = Millis(at.0 + lap * span);
                    model.predict_into(client, at, 3, &mut out);
                    black_box(&out);
                    model.observe_grouped(client, grp, service, at);
                    i += 1;
                    if i == evs.len() {
                        i = warm;
                        lap += 1;
                    }
                })
            });
        }
    }
    group.finish();
}

/// Front-end cost with names (interning included), and memory per client after a stream of
/// distinct clients each replaying a slice of the TrainTicket trace.
fn named(c: &mut Criterion) {
    let evs = load("trainticket");
    let mut p = Predictor::new(PredictorConfig::default());
    for e in &evs {
        p.observe_named(&e.client, &e.service, e.ts_ms);
    }
    let mut i = 0usize;
    let mut lap = 0u64;
    let span = evs.last().map_or(1, |e| e.ts_ms) - evs.first().map_or(0, |e| e.ts_ms) + 1;
    let mut group = c.benchmark_group("named");
    group.throughput(Throughput::Elements(1));
    group.bench_function("observe_predict/trainticket", |b| {
        b.iter(|| {
            let e = &evs[i];
            let at = e.ts_ms + lap * span;
            let mut n = 0;
            p.predict_each(&e.client, at, 3, |_, _, _| n += 1);
            black_box(n);
            p.observe_named(&e.client, &e.service, at);
            i += 1;
            if i == evs.len() {
                i = 0;
                lap += 1;
            }
        })
    });
    group.finish();

    // Memory per client: 20,000 distinct clients, 20 requests each (services in TrainTicket's
    // order, 1 ms apart), divided by the number of clients held.
    let clients = 20_000usize;
    let mut p = Predictor::new(PredictorConfig::default());
    let empty = p.memory_bytes();
    for (n, e) in evs.iter().cycle().take(clients * 20).enumerate() {
        let client = format!("client-{}", n % clients);
        p.observe_named(&client, &e.service, n as u64);
    }
    let per = (p.memory_bytes() - empty) as f64 / p.clients() as f64;
    println!(
        "memory per client (blend, {} clients, 20 requests each): {per:.0} bytes",
        p.clients()
    );
}

criterion_group!(benches, per_event, named);
criterion_main!(benches);
