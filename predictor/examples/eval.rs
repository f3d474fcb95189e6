//! Runs `meshd predict eval` without building the daemon: the same CLI module, compiled here.
//!
//! `cargo run -p predictor --release --example eval -- TRACE... [--k 3] [--model NAME]... [--json]`

#[path = "../../node/src/predict_eval.rs"]
mod predict_eval;

use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: predict_eval::EvalArgs,
}

fn main() -> anyhow::Result<()> {
    predict_eval::run(&Cli::parse().args)
}
