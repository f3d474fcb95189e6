//! Development aid: the per-event workload of `benches/predict.rs` (warm on the first 70% of a
//! trace, then `predict_into` (k = 3) + `observe` over the last 30%, looping) as a plain binary,
//! for profilers (`perf record`, `valgrind --tool=callgrind`), which count it without
//! criterion's own work.
//!
//! `cargo run -p predictor --release --example profile -- TRACE [MODEL] [EVENTS]`
//! (MODEL defaults to the shipped one, EVENTS to 1,000,000; `BLEND='{"top":8}'` sets the
//! blend's parameters).

use std::hint::black_box;

use predictor::eval::Prepared;
use predictor::trace::{read, OnError};
use predictor::{GroupRule, Millis, ModelKind};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: TRACE [MODEL] [EVENTS]"))?;
    let kind = match args.next() {
        Some(name) => ModelKind::from_name(&name)
            .ok_or_else(|| anyhow::anyhow!("unknown model {name}: {}", ModelKind::names()))?,
        None => ModelKind::SHIPPED,
    };
    let n: usize = args.next().map_or(Ok(1_000_000), |s| s.parse())?;
    let t = read(std::fs::File::open(&path)?, OnError::Skip)?;
    let evs: Vec<_> = Prepared::new(&t.events, &GroupRule::default())
        .iter()
        .collect();
    anyhow::ensure!(evs.len() >= 2, "trace too short");
    let span = evs[evs.len() - 1].0 .0 - evs[0].0 .0 + 1;
    let warm = evs.len() * 7 / 10;
    // `BLEND='{...}'` (JSON `BlendParams`) profiles the blend with other parameters.
    let mut model = match std::env::var("BLEND") {
        Ok(json) if kind == ModelKind::Blend => Box::new(predictor::models::Blend::with_params(
            &Default::default(),
            serde_json::from_str(&json)?,
        )),
        _ => kind.build(&Default::default()),
    };
    for &(at, client, group, service) in &evs[..warm] {
        model.observe_grouped(client, group, service, at);
    }
    let (mut i, mut lap) = (warm, 0u64);
    let mut out = Vec::with_capacity(8);
    for _ in 0..n {
        let (at, client, group, service) = evs[i];
        let at = Millis(at.0 + lap * span);
        model.predict_into(client, at, 3, &mut out);
        black_box(&out);
        model.observe_grouped(client, group, service, at);
        i += 1;
        if i == evs.len() {
            i = warm;
            lap += 1;
        }
    }
    println!("{} events of {} on {path}", n, kind.name());
    Ok(())
}
