//! Development aid: evaluates the blend with parameters from the environment against `ppm`.
//!
//! `MODEL='{"max_order":3}' BLEND='{"forget":0.9}' HORIZON=1000 WARMUP=0 cargo run --release --example tune -- TRACE...`
//! prints hit@1 / hit@3 / tail hit@1 / tail hit@3, then the budget views (next-request ranking,
//! then within-HORIZON ranking) as hit rate / warm-ups per event / waste for each budget.

use predictor::eval::{evaluate, evaluate_model, EvalConfig, Prepared};
use predictor::models::{Blend, BlendParams, ModelConfig};
use predictor::trace::{read, OnError};
use predictor::ModelKind;

fn main() -> anyhow::Result<()> {
    let model: ModelConfig =
        serde_json::from_str(&std::env::var("MODEL").unwrap_or_else(|_| "{}".into()))?;
    let blend: BlendParams =
        serde_json::from_str(&std::env::var("BLEND").unwrap_or_else(|_| "{}".into()))?;
    let baselines: Vec<ModelKind> = std::env::var("BASE")
        .unwrap_or_default()
        .split(',')
        .filter_map(ModelKind::from_name)
        .collect();
    let mut cfg = EvalConfig {
        model,
        ..EvalConfig::default()
    };
    if let Ok(h) = std::env::var("HORIZON") {
        cfg.horizon_ms = h.parse()?;
    }
    if let Ok(w) = std::env::var("WARMUP") {
        cfg.warmup_ms = w.parse()?;
    }
    for path in std::env::args().skip(1) {
        let t = read(std::fs::File::open(&path)?, OnError::Skip)?;
        let p = Prepared::new(&t.events, &cfg.groups);
        let name = path.rsplit('/').next().unwrap_or(&path).to_owned();
        let mut rows = Vec::new();
        for &k in &baselines {
            rows.push(evaluate(&name, &p, k, &cfg));
        }
        let mut m = Blend::with_params(&cfg.model, blend);
        rows.push(evaluate_model(&name, &p, &mut m, true, &cfg));
        for r in rows {
            println!(
                "{:<20} {:<9} {:.4} {:.4} {:.4} {:.4}",
                r.trace, r.model, r.hit_at_1, r.hit_at_3, r.tail_hit_at_1, r.tail_hit_at_3
            );
            for (name, rows) in [("next", &r.budget), ("within", &r.horizon_budget)] {
                let cells: Vec<String> = rows
                    .iter()
                    .map(|b| {
                        format!(
                            "B={} {:.3}/{:.3}/{:.2}",
                            b.budget, b.hit_rate, b.warmups_per_event, b.waste
                        )
                    })
                    .collect();
                println!("    {name:<7} {}", cells.join("  "));
            }
        }
    }
    Ok(())
}
