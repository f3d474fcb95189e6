//! `meshd predict eval`: replay request traces through the predictor's models and report how
//! well each would have pre-authenticated.
//!
//! Opens the trace files (CSV or gzipped CSV, header `ts_ms,client,service`), runs
//! [`predictor::eval`] on each with the online protocol (rank before seeing each event, then
//! learn), and prints a table or, with `--json`, an array of rows. This module only does the
//! file handling, timing and printing; all evaluation logic lives in the pure `predictor` crate.

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _};
use predictor::eval::{self, EvalConfig, EvalRow, Prepared};
use predictor::trace::{self, OnError};
use predictor::ModelKind;

/// Bad rows printed per trace before only counting them.
const MAX_PRINTED_ERRORS: usize = 20;

/// Arguments of `meshd predict eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// Trace files: CSV or gzipped CSV with header `ts_ms,client,service`.
    #[arg(required = true, value_name = "TRACE")]
    pub traces: Vec<PathBuf>,
    /// Size of the ranked set scored as hit@k (hit@1 and hit@3 are always reported).
    #[arg(long, default_value_t = 3, value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u16).range(1..=64), usize::from))]
    pub k: usize,
    /// Model to evaluate (repeatable). Default: the shipped model and every baseline.
    #[arg(long = "model", value_name = "NAME")]
    pub models: Vec<String>,
    /// Print a JSON array of result rows instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Stop at the first bad row (default: skip bad rows, reporting them on stderr).
    #[arg(long)]
    pub strict: bool,
    /// Budgets of warm services per client for the budget view.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 2, 3, 5])]
    pub budgets: Vec<usize>,
    /// Horizon of the second budget view (ranking by probability of use within it), ms.
    #[arg(long, default_value_t = eval::DEFAULT_HORIZON_MS)]
    pub horizon_ms: u64,
    /// Time a warm-up takes in the budget views, ms (a service is warm only this long after it
    /// enters the set; 0 = instantly).
    #[arg(long, default_value_t = 0)]
    pub warmup_ms: u64,
}

/// The models named in `names`, or all models (shipped last) if none.
fn select_models(names: &[String]) -> anyhow::Result<Vec<ModelKind>> {
    if names.is_empty() {
        return Ok(ModelKind::ALL.to_vec());
    }
    let mut kinds = Vec::new();
    for name in names {
        let Some(kind) = ModelKind::from_name(name) else {
            bail!(
                "unknown model `{name}`; valid models: {}",
                ModelKind::names()
            );
        };
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    Ok(kinds)
}

fn trace_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Runs the evaluation and prints the results to stdout.
pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    let kinds = select_models(&args.models)?;
    if args.budgets.contains(&0) {
        bail!("budgets must be at least 1");
    }
    let cfg = EvalConfig {
        k: args.k,
        budgets: args.budgets.clone(),
        horizon_ms: args.horizon_ms,
        warmup_ms: args.warmup_ms,
        ..EvalConfig::default()
    };
    let on_error = if args.strict {
        OnError::Stop
    } else {
        OnError::Skip
    };
    let mut rows: Vec<EvalRow> = Vec::new();
    let mut text = String::new();
    for path in &args.traces {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let t =
            trace::read(file, on_error).with_context(|| format!("reading {}", path.display()))?;
        for e in t.errors.iter().take(MAX_PRINTED_ERRORS) {
            eprintln!("{}: skipped {e}", path.display());
        }
        if t.bad_rows > MAX_PRINTED_ERRORS as u64 {
            eprintln!(
                "{}: ... {} bad rows skipped in all",
                path.display(),
                t.bad_rows
            );
        }
        let name = trace_name(path);
        let prepared = Prepared::new(&t.events, &cfg.groups);
        let mut timed = Vec::new();
        for &kind in &kinds {
            // A tool, not protocol logic: wall-clock time per event is only printed.
            #[allow(clippy::disallowed_methods)]
            let start = Instant::now();
            let row = eval::evaluate(&name, &prepared, kind, &cfg);
            let ns = start.elapsed().as_nanos() as f64 / prepared.len().max(1) as f64;
            timed.push((row, ns));
        }
        if !args.json {
            write_tables(&mut text, &name, &prepared, t.bad_rows, args.k, &timed)?;
        }
        rows.extend(timed.into_iter().map(|(r, _)| r));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{text}");
    }
    Ok(())
}

fn write_tables(
    out: &mut String,
    name: &str,
    p: &Prepared,
    bad_rows: u64,
    k: usize,
    rows: &[(EvalRow, f64)],
) -> std::fmt::Result {
    writeln!(
        out,
        "{name}: {} events, {} clients, {} services, {:.1}% first requests, {bad_rows} bad rows skipped",
        p.len(),
        p.clients(),
        p.services(),
        100.0 * p.first_request_share()
    )?;
    // hit@k and tail@k columns only when k is not already 1 or 3.
    let extra = k != 1 && k != 3;
    let mut head = format!("  {:<10} {:>7} {:>7}", "model", "hit@1", "hit@3");
    if extra {
        head += &format!(" {:>7}", format!("hit@{k}"));
    }
    head += &format!(" {:>8} {:>8}", "tail@1", "tail@3");
    if extra {
        head += &format!(" {:>8}", format!("tail@{k}"));
    }
    writeln!(
        out,
        "{head} {:>8} {:>9} {:>10} {:>9}",
        "pred/ev", "1st-req", "memory", "ns/event"
    )?;
    for (r, ns) in rows {
        let model = if r.shipped {
            format!("{}*", r.model)
        } else {
            r.model.clone()
        };
        let mut line = format!("  {model:<10} {:>7.4} {:>7.4}", r.hit_at_1, r.hit_at_3);
        if extra {
            line += &format!(" {:>7.4}", r.hit_at_k);
        }
        line += &format!(" {:>8.4} {:>8.4}", r.tail_hit_at_1, r.tail_hit_at_3);
        if extra {
            line += &format!(" {:>8.4}", r.tail_hit_at_k);
        }
        writeln!(
            out,
            "{line} {:>8.2} {:>8.1}% {:>10} {:>9.0}",
            r.predictions_per_event,
            100.0 * r.first_request_share,
            human_bytes(r.memory_bytes),
            ns
        )?;
    }
    let Some((first, _)) = rows.first() else {
        return writeln!(out);
    };
    let views: [(String, BudgetOf); 2] = [
        ("next-request ranking".to_owned(), |r| &r.budget),
        (
            format!("ranking by use within {} ms", first.horizon_ms),
            |r| &r.horizon_budget,
        ),
    ];
    for (view, budget) in views {
        writeln!(
            out,
            "  budget view, {view} (warm services per client, warm-up {} ms): hit rate / warm-ups per event / waste",
            first.warmup_ms
        )?;
        write!(out, "  {:<10}", "model")?;
        for b in budget(first) {
            write!(out, " {:>22}", format!("B={}", b.budget))?;
        }
        writeln!(out)?;
        for (r, _) in rows {
            let model = if r.shipped {
                format!("{}*", r.model)
            } else {
                r.model.clone()
            };
            write!(out, "  {model:<10}")?;
            for b in budget(r) {
                write!(
                    out,
                    " {:>22}",
                    format!(
                        "{:.3} / {:.3} / {:.2}",
                        b.hit_rate, b.warmups_per_event, b.waste
                    )
                )?;
            }
            writeln!(out)?;
        }
    }
    writeln!(
        out,
        "  (* = shipped model; tail = last 30% of events, models warmed on the first 70%)"
    )?;
    writeln!(out)
}

/// Which budget view of a row to print.
type BudgetOf = fn(&EvalRow) -> &[eval::BudgetRow];

fn human_bytes(b: u64) -> String {
    if b >= 10 << 20 {
        format!("{} MiB", b >> 20)
    } else if b >= 10 << 10 {
        format!("{} KiB", b >> 10)
    } else {
        format!("{b} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_model_lists_valid_names() {
        let err = select_models(&["nope".into()]).unwrap_err().to_string();
        assert!(
            err.contains("nope") && err.contains("blend") && err.contains("ppm"),
            "{err}"
        );
    }

    #[test]
    fn default_is_every_model_with_shipped() {
        let kinds = select_models(&[]).unwrap();
        assert_eq!(kinds.len(), ModelKind::ALL.len());
        assert!(kinds.contains(&ModelKind::SHIPPED));
    }
}
