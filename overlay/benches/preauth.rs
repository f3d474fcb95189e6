//! Pre-authentication decision cost: one request through the engine (`handle_request`, which
//! observes it in the predictor, ranks the client's next services, picks levels and plans the
//! warm set) plus draining its actions, on a replayed trace slice (Online Boutique) and on a
//! synthetic many-client workload.
//!
//! `cargo bench -p overlay --bench preauth`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::io::BufRead;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use overlay::preauth::{Engine, Policy, PreauthConfig, Served};
use tokio::time::Instant;

/// The first `n` rows of a `ts_ms,client,service` gzipped trace, or a synthetic cycle.
fn rows(n: usize) -> Vec<(u64, String, String)> {
    let path = "../../shared/data/traces/boutique.csv.gz";
    if let Ok(f) = std::fs::File::open(path) {
        let r = std::io::BufReader::new(flate2_reader(f));
        let mut out = Vec::with_capacity(n);
        let mut t0 = None;
        for line in r.lines().map_while(Result::ok).skip(1).take(n) {
            let mut it = line.split(',');
            let (Some(ts), Some(c), Some(s)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            let ts: u64 = ts.parse().unwrap_or(0);
            let t0 = *t0.get_or_insert(ts);
            out.push((ts - t0, c.to_owned(), s.to_owned()));
        }
        if !out.is_empty() {
            return out;
        }
    }
    synthetic(n, 3)
}

fn flate2_reader(f: std::fs::File) -> impl std::io::Read {
    flate2::read::GzDecoder::new(f)
}

/// `clients` clients, each cycling through 6 of 40 services, 5 ms apart.
fn synthetic(n: usize, clients: usize) -> Vec<(u64, String, String)> {
    (0..n)
        .map(|i| {
            let c = i % clients;
            let s = (c * 7 + (i / clients) % 6) % 40;
            (i as u64 * 5, format!("c{c}"), format!("s{s}"))
        })
        .collect()
}

fn run(c: &mut Criterion, name: &str, rows: &[(u64, String, String)]) {
    let cfg = PreauthConfig {
        policy: Policy::Predictive,
        ..PreauthConfig::default()
    };
    let t0 = Instant::now();
    // Warm the engine on the first half; measure the second half, cycling.
    let mut e = Engine::new(cfg, t0);
    let half = rows.len() / 2;
    for (ts, client, service) in &rows[..half] {
        e.handle_request(t0 + Duration::from_millis(*ts), client, service);
        e.handle_served(client, service, Served::Connection);
        while e.poll_action().is_some() {}
    }
    let mut i = half;
    c.bench_function(&format!("preauth/handle_request/{name}"), |b| {
        b.iter(|| {
            let (ts, client, service) = &rows[i];
            i = if i + 1 < rows.len() { i + 1 } else { half };
            let level = e.handle_request(t0 + Duration::from_millis(*ts), client, service);
            e.handle_served(client, service, Served::Connection);
            let mut n = 0;
            while e.poll_action().is_some() {
                n += 1;
            }
            (level, n)
        })
    });
}

fn benches(c: &mut Criterion) {
    let trace = rows(40_000);
    run(c, "boutique", &trace);
    run(c, "synthetic-300-clients", &synthetic(40_000, 300));
}

criterion_group!(preauth, benches);
criterion_main!(preauth);
