//! Development aid: a digest of every prediction a model makes on a trace (the next-request
//! ranking with k = 8 and the 1 s horizon ranking with k = 5, before each event is learned, as
//! in the online evaluation), and of the shipped front's snapshot after the whole trace
//! (`Predictor::observe_named`), so that a speed change can be checked to leave every output
//! bit-identical, not only the hit rates.
//!
//! `cargo run -p predictor --release --example digest -- TRACE... [--model NAME]`
//! (default: the shipped model).

use std::hash::Hasher;

use predictor::eval::Prepared;
use predictor::trace::{read, OnError};
use predictor::{GroupRule, ModelKind, Predictor, PredictorConfig};

/// FNV-1a, 64 bits: stable across runs and platforms.
struct Fnv(u64);

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

fn main() -> anyhow::Result<()> {
    let mut kind = ModelKind::SHIPPED;
    let mut paths = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--model" {
            let name = args.next().unwrap_or_default();
            kind = ModelKind::from_name(&name)
                .ok_or_else(|| anyhow::anyhow!("unknown model {name}: {}", ModelKind::names()))?;
        } else {
            paths.push(a);
        }
    }
    for path in paths {
        let t = read(std::fs::File::open(&path)?, OnError::Skip)?;
        let evs: Vec<_> = Prepared::new(&t.events, &GroupRule::default())
            .iter()
            .collect();
        let mut model = kind.build(&Default::default());
        let (mut next, mut within) = (Fnv(0xcbf2_9ce4_8422_2325), Fnv(0xcbf2_9ce4_8422_2325));
        let mut out = Vec::new();
        for &(at, client, group, service) in &evs {
            model.predict_into(client, at, 8, &mut out);
            for p in &out {
                next.write_u32(p.service.0);
                next.write_u64(p.probability.to_bits());
                next.write_u64(p.expected_in_ms);
            }
            next.write_u8(0xff);
            model.predict_within_into(client, at, 1000, 5, &mut out);
            for p in &out {
                within.write_u32(p.service.0);
                within.write_u64(p.probability.to_bits());
                within.write_u64(p.expected_in_ms);
            }
            within.write_u8(0xff);
            model.observe_grouped(client, group, service, at);
        }
        let mut front = Predictor::new(PredictorConfig::default());
        for e in &t.events {
            front.observe_named(&e.client, &e.service, e.ts_ms);
        }
        let mut snap = Fnv(0xcbf2_9ce4_8422_2325);
        snap.write(&front.snapshot());
        println!(
            "{path} {}: next {:016x} within {:016x} snapshot {:016x} ({} events)",
            kind.name(),
            next.finish(),
            within.finish(),
            snap.finish(),
            evs.len()
        );
    }
    Ok(())
}
