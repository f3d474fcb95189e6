//! `Predictor::restore` on arbitrary bytes: must return an error or a usable predictor, never
//! panic, and a restored predictor must snapshot to bytes that restore to the same state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use predictor::Predictor;

fuzz_target!(|data: &[u8]| {
    let Ok(mut p) = Predictor::restore(data) else {
        return;
    };
    // Whatever decoded must still be usable, and round-trip.
    for (i, client) in ["web-6f6cfc45b-d9pnv", "host1.example.org"].iter().enumerate() {
        let _ = p.predict_named(client, i as u64, 5);
        let _ = p.predict_within_named(client, i as u64, 1000, 5);
        p.observe_named(client, "svc", i as u64);
    }
    let bytes = p.snapshot();
    let q = Predictor::restore(&bytes).expect("own snapshot restores");
    assert_eq!(q.snapshot(), bytes);
});
