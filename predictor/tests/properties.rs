//! Property tests: determinism, snapshot round trips, and no panics on arbitrary input.

use predictor::trace::{self, OnError};
use predictor::{ClientId, Millis, ModelKind, Predictor, PredictorConfig, ServiceId};
use proptest::prelude::*;

/// A small random workload: (client, service, time step) with a few clients and services so
/// that contexts repeat; client names include Kubernetes-like pods so groups form.
fn events() -> impl Strategy<Value = Vec<(u8, u8, u16)>> {
    prop::collection::vec((0u8..12, 0u8..10, 0u16..2000), 0..300)
}

fn client_name(c: u8) -> String {
    // Clients 0..6 are pods of two deployments, the rest plain hosts.
    match c {
        0..=2 => format!("web-6f6cfc45b-d9p{}v", ["n", "q", "z"][c as usize]),
        3..=5 => format!("api-579b9bff58-t2d{}m", ["b", "c", "d"][(c - 3) as usize]),
        _ => format!("host{c}.example.org"),
    }
}

fn small_config() -> PredictorConfig {
    let mut cfg = PredictorConfig::default();
    cfg.model.max_clients = 8;
    cfg.model.max_contexts = 64;
    cfg.model.max_groups = 4;
    cfg.max_services = 8;
    cfg
}

fn replay(p: &mut Predictor, evs: &[(u8, u8, u16)]) -> Vec<Vec<(String, f64, u64)>> {
    let mut at = 0u64;
    let mut out = Vec::new();
    for &(c, s, dt) in evs {
        at += u64::from(dt);
        let client = client_name(c);
        out.push(p.predict_named(&client, at, 5));
        out.push(p.predict_within_named(&client, at, 250, 5));
        p.observe_named(&client, &format!("svc-{s}"), at);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn same_input_same_output(evs in events(), small in any::<bool>()) {
        let cfg = if small { small_config() } else { PredictorConfig::default() };
        let (mut a, mut b) = (Predictor::new(cfg.clone()), Predictor::new(cfg));
        prop_assert_eq!(replay(&mut a, &evs), replay(&mut b, &evs));
        prop_assert_eq!(a.snapshot(), b.snapshot());
    }

    #[test]
    fn snapshot_round_trip(evs in events(), more in events(), small in any::<bool>()) {
        let cfg = if small { small_config() } else { PredictorConfig::default() };
        let mut a = Predictor::new(cfg);
        replay(&mut a, &evs);
        let bytes = a.snapshot();
        let mut b = Predictor::restore(&bytes).expect("own snapshot restores");
        prop_assert_eq!(b.snapshot(), bytes, "restore then snapshot is the identity");
        // The restored predictor behaves exactly like the original from here on.
        prop_assert_eq!(replay(&mut a, &more), replay(&mut b, &more));
        prop_assert_eq!(a.snapshot(), b.snapshot());
    }

    #[test]
    fn bounded_tables_hold(evs in events()) {
        let cfg = small_config();
        let mut p = Predictor::new(cfg.clone());
        replay(&mut p, &evs);
        prop_assert!(p.clients() <= cfg.model.max_clients);
        prop_assert!(p.services() <= cfg.max_services);
    }

    #[test]
    fn rankings_are_well_formed(evs in prop::collection::vec((0u32..20, 0u32..30, any::<u64>()), 0..200), k in 0usize..8) {
        // Arbitrary (even decreasing or huge) times must not break any model.
        for kind in ModelKind::ALL {
            let mut m = kind.build(&Default::default());
            for &(c, s, at) in &evs {
                let preds = m.predict(ClientId(c), Millis(at), k);
                prop_assert!(preds.len() <= k);
                for w in preds.windows(2) {
                    prop_assert!(w[0].probability >= w[1].probability, "{}: ranked best first", kind.name());
                }
                let total: f64 = preds.iter().map(|p| p.probability).sum();
                prop_assert!(total <= 1.0 + 1e-3, "{}: probabilities sum to {total}", kind.name());
                let mut ids: Vec<u32> = preds.iter().map(|p| p.service.0).collect();
                ids.sort_unstable();
                ids.dedup();
                prop_assert_eq!(ids.len(), preds.len(), "no service twice");
                let within = m.predict_within(ClientId(c), Millis(at), at % 5000, k);
                prop_assert!(within.len() <= k);
                for w in within.windows(2) {
                    prop_assert!(w[0].probability >= w[1].probability, "{}: within, best first", kind.name());
                }
                prop_assert!(within.iter().all(|p| (0.0..=1.0).contains(&p.probability)));
                let mut ids: Vec<u32> = within.iter().map(|p| p.service.0).collect();
                ids.sort_unstable();
                ids.dedup();
                prop_assert_eq!(ids.len(), within.len(), "within: no service twice");
                m.observe(ClientId(c), ServiceId(s), Millis(at));
            }
        }
    }

    #[test]
    fn restore_never_panics_on_garbage(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Predictor::restore(&bytes);
    }

    #[test]
    fn restore_never_panics_on_corrupted_snapshot(evs in events(), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut p = Predictor::new(small_config());
        replay(&mut p, &evs);
        let mut bytes = p.snapshot();
        for (i, x) in flips {
            if !bytes.is_empty() {
                let n = bytes.len();
                bytes[i % n] ^= x | 1;
            }
        }
        if let Ok(mut q) = Predictor::restore(&bytes) {
            // Whatever decoded must still be usable.
            replay(&mut q, &evs);
        }
    }

    #[test]
    fn trace_reader_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512), strict in any::<bool>()) {
        let mut input = b"ts_ms,client,service\n".to_vec();
        input.extend(bytes);
        let mode = if strict { OnError::Stop } else { OnError::Skip };
        if let Ok(t) = trace::read(&input[..], mode) {
            prop_assert!(t.errors.len() as u64 <= t.bad_rows);
        }
    }
}
