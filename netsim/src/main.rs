//! `netsim`: run scenarios over the virtual network and report.
//!
//! ```text
//! netsim run SCENARIO [--seed N] [--set KEY=VALUE]... [--mode NAME] [--json FILE] [--md FILE] [--svg DIR]
//! netsim compare SCENARIO --mode NAME... [--seed N] [--set KEY=VALUE]... [--json FILE] [--md FILE] [--svg DIR]
//! netsim calibrate [--handshakes N]
//! ```
//!
//! Exit codes: 0 success, 1 run failure, 2 usage error (clap), 64 bad scenario or mode.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use netsim::report::{markdown_table, write_svgs, Report};
use netsim::{Mode, RunOptions, Scenario};

#[derive(Parser)]
#[command(
    name = "netsim",
    about = "Network simulator running the real meshd peer code"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct Common {
    /// Scenario file (TOML), e.g. netsim/scenarios/small.toml.
    scenario: PathBuf,
    /// Seed (overrides the scenario's).
    #[arg(long)]
    seed: Option<u64>,
    /// Override a scenario key, e.g. --set links.rtt_ms=80 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the Markdown table here.
    #[arg(long)]
    md: Option<PathBuf>,
    /// Write SVG plots (latency CDF, failures/reroutes over time) into this directory.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Stop after this many wall-clock seconds and report what was measured (truncated).
    #[arg(long)]
    max_wall_s: Option<f64>,
    /// Stop when the process's resident memory reaches this many MiB (protects a shared
    /// machine; the report is marked truncated).
    #[arg(long, default_value_t = 12288.0)]
    max_rss_mib: f64,
}

impl Common {
    fn options(&self) -> RunOptions {
        RunOptions {
            progress: !self.quiet && std::io::stderr().is_terminal(),
            max_wall: self
                .max_wall_s
                .map(|s| std::time::Duration::from_secs_f64(s.max(0.0))),
            max_rss_mib: (self.max_rss_mib > 0.0).then_some(self.max_rss_mib),
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one scenario.
    Run {
        #[command(flatten)]
        common: Common,
        /// Peer configuration mode (default: the scenario's `mode`, else shared — the daemon
        /// without pre-authentication).
        #[arg(long)]
        mode: Option<String>,
        /// Also write every request record as JSON lines here.
        #[arg(long)]
        records: Option<PathBuf>,
    },
    /// Run one scenario under several modes on the same seed and workload.
    Compare {
        #[command(flatten)]
        common: Common,
        /// Modes to compare (repeatable).
        #[arg(long = "mode", required = true)]
        modes: Vec<String>,
    },
    /// Measure the CPU cost of a handshake on this machine.
    Calibrate {
        /// Handshakes per measurement.
        #[arg(long, default_value_t = 300)]
        handshakes: u32,
    },
}

fn load(c: &Common) -> Result<Scenario, netsim::scenario::ScenarioError> {
    let mut sets = c.sets.clone();
    if let Some(seed) = c.seed {
        sets.push(format!("seed={seed}"));
    }
    Scenario::load(&c.scenario, &sets)
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn outputs(c: &Common, reports: &[Report], json: &impl serde::Serialize) -> anyhow::Result<()> {
    let md = markdown_table(reports);
    print!("{md}");
    if let Some(p) = &c.json {
        write(p, &(serde_json::to_string_pretty(json)? + "\n"))?;
    }
    if let Some(p) = &c.md {
        write(p, &md)?;
    }
    if let Some(d) = &c.svg {
        write_svgs(reports, d)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let usage = |e: &dyn std::fmt::Display| {
        eprintln!("netsim: {e}");
        ExitCode::from(64)
    };
    let result = match cli.cmd {
        Cmd::Run {
            common,
            mode,
            records,
        } => {
            let sc = match load(&common) {
                Ok(sc) => sc,
                Err(e) => return usage(&e),
            };
            let mode = match Mode::from_name(mode.as_deref().unwrap_or(&sc.mode)) {
                Ok(m) => m,
                Err(e) => return usage(&e),
            };
            let opts = common.options();
            netsim::run(&sc, mode, opts)
                .map_err(anyhow::Error::from)
                .and_then(|(report, recs)| {
                    if let Some(p) = &records {
                        let mut s = String::new();
                        for r in &recs {
                            s += &serde_json::to_string(r)?;
                            s.push('\n');
                        }
                        write(p, &s)?;
                    }
                    outputs(&common, std::slice::from_ref(&report), &report)
                })
        }
        Cmd::Compare { common, modes } => {
            let sc = match load(&common) {
                Ok(sc) => sc,
                Err(e) => return usage(&e),
            };
            let modes = match modes
                .iter()
                .map(|m| Mode::from_name(m))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(m) => m,
                Err(e) => return usage(&e),
            };
            let opts = common.options();
            netsim::compare(&sc, &modes, opts)
                .map_err(anyhow::Error::from)
                .and_then(|reports| {
                    #[derive(serde::Serialize)]
                    struct Modes<'a> {
                        modes: &'a [Report],
                    }
                    outputs(&common, &reports, &Modes { modes: &reports })
                })
        }
        Cmd::Calibrate { handshakes } => {
            netsim::calibrate::calibrate(handshakes.max(1)).and_then(|c| {
                println!("{}", serde_json::to_string_pretty(&c)?);
                Ok(())
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netsim: {e:#}");
            ExitCode::FAILURE
        }
    }
}
