//! `predictor::trace::read` on arbitrary input (plain or, if it starts with `1f 8b`, gzip), in
//! both error modes: must return rows or an error, never panic; skip mode never keeps more
//! errors than it counts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use predictor::trace::{self, OnError};

fuzz_target!(|data: &[u8]| {
    for mode in [OnError::Skip, OnError::Stop] {
        if let Ok(t) = trace::read(data, mode) {
            assert!(t.errors.len() as u64 <= t.bad_rows);
            assert!(t.events.iter().all(|e| !e.client.is_empty() && !e.service.is_empty()));
        }
    }
});
