//! Bounded memory: a stream of 1,000,000 distinct clients through the shipped predictor.

use predictor::{Predictor, PredictorConfig};

/// The full stream takes a few seconds optimised; unoptimised (debug) builds run
/// [`distinct_clients_stay_within_bounds_small`] instead and skip this one.
#[test]
#[cfg_attr(debug_assertions, ignore = "1,000,000 events: run with --release")]
fn million_distinct_clients_stay_within_bounds() {
    stream(1_000_000);
}

#[test]
fn distinct_clients_stay_within_bounds_small() {
    stream(20_000);
}

fn stream(n: u64) {
    let mut cfg = PredictorConfig::default();
    cfg.model.max_clients = 5_000;
    cfg.model.max_groups = 1_000;
    cfg.model.max_contexts = 20_000;
    cfg.max_services = 1_000;
    let mut p = Predictor::new(cfg.clone());
    let mut peak = 0usize;
    let mut at_half = 0usize;
    let mut name = String::new();
    let mut service = String::new();
    for i in 0u64..n {
        name.clear();
        // Half are pods (they form ever new groups), half plain hosts.
        if i % 2 == 0 {
            name.push_str(&format!("dep{}-6f6cfc45b-{:05}", i / 4, i));
        } else {
            name.push_str(&format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255));
        }
        service.clear();
        service.push_str(&format!("/path/{}", (i * 7919) % 5_000));
        p.observe_named(&name, &service, i);
        if i % 5_000 == 0 {
            let mem = p.memory_bytes();
            peak = peak.max(mem);
            if i == n / 2 {
                at_half = mem;
            }
            assert!(p.clients() <= cfg.model.max_clients);
            assert!(p.services() <= cfg.max_services);
        }
    }
    // Memory plateaus once the tables are full: the second half of the stream adds nothing
    // beyond table slack, and the total stays far below what unbounded tables would need.
    let end = p.memory_bytes();
    if n >= 200_000 {
        assert!(
            end <= at_half * 5 / 4,
            "{end} B at the end vs {at_half} B half way"
        );
    }
    assert!(peak < 16 << 20, "peak {peak} B");
    // The most recent clients are the ones kept; the first ones were dropped.
    let last = if (n - 1) % 2 == 0 {
        format!("dep{}-6f6cfc45b-{:05}", (n - 1) / 4, n - 1)
    } else {
        let i = n - 1;
        format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)
    };
    assert!(
        !p.predict_named(&last, n, 3).is_empty(),
        "latest client is known"
    );
    assert!(
        p.predict_named("dep0-6f6cfc45b-00000", n, 3).is_empty(),
        "first client was forgotten"
    );
}
