//! `meshd`: the overlay daemon and its tools.
//!
//! Thin by design: parse the command line, start logging, load and validate the config, build
//! the overlay peer, run until Ctrl-C or SIGTERM, then leave the overlay and drain.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 usage error, 78 configuration error.

mod admin;
mod cli_auth;
mod config;
mod demo;
mod http;
mod predict_eval;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use overlay::identity::{self, Validity, DEFAULT_CA_VALIDITY_DAYS, DEFAULT_NODE_VALIDITY_DAYS};
use overlay::{Node, NodeIdentity};
use tracing::{error, info};

/// Exit code for configuration errors (sysexits EX_CONFIG).
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "meshd",
    version,
    about = "QUIC overlay network daemon with predictive pre-authentication"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Overlay certificate authority.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Run a peer.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show a running peer's members and services.
    Status {
        /// The peer's admin address.
        #[arg(long, default_value = "127.0.0.1:7100")]
        admin: SocketAddr,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// Also show the routing view: each member's link, load and chosen path.
        #[arg(long)]
        routes: bool,
    },
    /// Start a small overlay on loopback, send requests through it, print what happened.
    Demo(demo::DemoArgs),
    /// Request predictor tools.
    Predict {
        #[command(subcommand)]
        cmd: PredictCmd,
    },
    /// Service API keys (through a running peer's admin API).
    Key {
        #[command(subcommand)]
        cmd: cli_auth::KeyCmd,
    },
    /// Sign a node or certificate revocation with the CA key (and optionally submit it).
    Revoke(cli_auth::RevokeArgs),
    /// Back up the node's credential store (keys, hashes, policies, revocations; secret).
    Backup(cli_auth::BackupArgs),
    /// Restore a credential store backup; never re-admits anything revoked since.
    Restore(cli_auth::RestoreArgs),
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create the overlay CA: DIR/ca.crt and DIR/ca.key (mode 0600).
    Init {
        /// Directory to write to.
        #[arg(long)]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = DEFAULT_CA_VALIDITY_DAYS)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a node certificate: OUT/node.crt and OUT/node.key (mode 0600); prints the node id.
    Issue {
        /// CA directory (with ca.crt and ca.key).
        #[arg(long)]
        ca: PathBuf,
        /// Node name (certificate common name).
        #[arg(long)]
        name: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Group the node belongs to (repeatable); service policies can match groups.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = DEFAULT_NODE_VALIDITY_DAYS)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum PredictCmd {
    /// Replay traces through the predictor's models and report hit rates.
    Eval(predict_eval::EvalArgs),
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo and the tools print their own report; the daemon logs its lifecycle.
    init_tracing(match cli.cmd {
        Cmd::Run { .. } => "info",
        _ => "warn",
    });
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(dispatch(cli.cmd));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshd: {e:#}");
            if e.downcast_ref::<config::ConfigError>().is_some() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

#[allow(clippy::disallowed_methods)] // the CLI reads the wall clock for certificate validity
fn wall_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

async fn dispatch(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Ca {
            cmd: CaCmd::Init { dir, days, force },
        } => {
            identity::init_ca_dir(&dir, Validity::days_from(wall_now(), days)?, force)?;
            println!(
                "CA written: {} and {} (mode 0600)",
                dir.join(identity::CA_CERT_FILE).display(),
                dir.join(identity::CA_KEY_FILE).display()
            );
            Ok(())
        }
        Cmd::Ca {
            cmd:
                CaCmd::Issue {
                    ca,
                    name,
                    out,
                    groups,
                    days,
                    force,
                },
        } => {
            let ca = identity::load_ca_dir(&ca)?;
            let node = identity::issue_node_dir_with_groups(
                &ca,
                &name,
                &groups,
                &out,
                Validity::days_from(wall_now(), days)?,
                force,
            )?;
            println!("{}", node.node_id);
            Ok(())
        }
        Cmd::Run { config } => run(config).await,
        Cmd::Status {
            admin,
            json,
            routes,
        } => status(admin, json, routes).await,
        Cmd::Demo(args) => demo::run(&args).await,
        Cmd::Predict {
            cmd: PredictCmd::Eval(args),
        } => predict_eval::run(&args),
        Cmd::Key { cmd } => cli_auth::key(cmd).await,
        Cmd::Revoke(args) => cli_auth::revoke(args).await,
        Cmd::Backup(args) => cli_auth::backup(args).await,
        Cmd::Restore(args) => cli_auth::restore(args).await,
    }
}

#[allow(clippy::disallowed_methods)] // the generation of a run is wall-clock milliseconds
fn generation_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1)
}

async fn run(path: PathBuf) -> anyhow::Result<()> {
    let cfg = config::load(&path)?;
    let key_mode = std::fs::metadata(&cfg.key)
        .with_context(|| format!("key file {}", cfg.key.display()))?
        .permissions()
        .mode();
    if key_mode & 0o077 != 0 {
        anyhow::bail!(
            "key file {} is readable by others (mode {:o}); run: chmod 600 {}",
            cfg.key.display(),
            key_mode & 0o777,
            cfg.key.display()
        );
    }
    let id = NodeIdentity::load(&cfg.ca_cert, &cfg.cert, &cfg.key)?;
    if id.info.name != cfg.name {
        return Err(config::ConfigError {
            file: path.clone(),
            msg: format!(
                "key `name`: {:?} differs from the certificate's name {:?}",
                cfg.name, id.info.name
            ),
        }
        .into());
    }
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("state_dir {}", cfg.state_dir.display()))?;
    std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("state_dir {}", cfg.state_dir.display()))?;
    let admin_token = cli_auth::ensure_admin_token(&cfg.state_dir)?;
    let mut node_cfg = cfg.node.clone();
    if let Some(ca_key) = &cfg.ca_key {
        node_cfg.auth.issuer = Some(std::sync::Arc::new(cli_auth::load_issuer(
            &cfg.ca_cert,
            ca_key,
        )?));
        let cert_path = cfg.cert.clone();
        node_cfg.auth.on_cert_renewed = Some(std::sync::Arc::new(move |pem: &str| {
            if let Err(e) = identity::write_public_file(&cert_path, pem.as_bytes(), true) {
                error!(error = %e, "renewed certificate not written to disk");
            }
        }));
    }
    node_cfg.generation = generation_now();
    if node_cfg.seed == 0 {
        node_cfg.seed = node_cfg.generation;
    }
    let admin = tokio::net::TcpListener::bind(cfg.admin)
        .await
        .with_context(|| format!("admin address {}", cfg.admin))?;
    let node = Node::bind(cfg.listen, id, node_cfg).await?;
    info!(admin = %cfg.admin, "admin API listening");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let admin_task = tokio::spawn(admin::serve(
        admin,
        node.clone(),
        Some(admin_token),
        async {
            let _ = stop_rx.await;
        },
    ));
    wait_for_signal().await;
    info!("shutting down");
    node.shutdown().await;
    let _ = stop_tx.send(());
    match admin_task.await {
        Ok(Err(e)) => error!(error = %e, "admin API failed"),
        Err(e) => error!(error = %e, "admin API task failed"),
        Ok(Ok(())) => {}
    }
    Ok(())
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn status(admin: SocketAddr, json: bool, with_routes: bool) -> anyhow::Result<()> {
    let me = http::get(admin, "/v1/status").await?;
    let peers = http::get(admin, "/v1/peers").await?;
    let services = http::get(admin, "/v1/services").await?;
    let routes = if with_routes {
        Some(http::get(admin, "/v1/routes").await?)
    } else {
        None
    };
    if json {
        match &routes {
            Some(r) => println!(
                "{{\"status\":{me},\"peers\":{peers},\"services\":{services},\"routes\":{r}}}"
            ),
            None => println!("{{\"status\":{me},\"peers\":{peers},\"services\":{services}}}"),
        }
        return Ok(());
    }
    let me: serde_json::Value = serde_json::from_str(&me).context("status JSON")?;
    let peers: Vec<serde_json::Value> = serde_json::from_str(&peers).context("peers JSON")?;
    let services: Vec<serde_json::Value> =
        serde_json::from_str(&services).context("services JSON")?;
    let s = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("").to_owned();
    println!(
        "node {} ({}) at {}",
        s(&me, "name"),
        s(&me, "node_id"),
        s(&me, "addr")
    );
    println!();
    println!("{:<20} {:<34} {:<22} STATE", "PEER", "NODE ID", "ADDR");
    for p in &peers {
        println!(
            "{:<20} {:<34} {:<22} {}",
            s(p, "name"),
            s(p, "node_id"),
            s(p, "addr"),
            s(p, "state")
        );
    }
    println!();
    println!("{:<24} {:<34} LOCAL", "SERVICE", "NODE ID");
    for e in &services {
        println!(
            "{:<24} {:<34} {}",
            s(e, "name"),
            s(e, "node_id"),
            if e["local"].as_bool().unwrap_or(false) {
                "yes"
            } else {
                ""
            }
        );
    }
    if let Some(r) = routes {
        let r: serde_json::Value = serde_json::from_str(&r).context("routes JSON")?;
        let names: std::collections::HashMap<String, String> = peers
            .iter()
            .map(|p| (s(p, "node_id"), s(p, "name")))
            .collect();
        println!();
        print!("{}", routes_table(&r, &names));
    }
    Ok(())
}

/// The `status --routes` table: one row per member with its measured link, reported load and
/// the path in use (names where known).
fn routes_table(
    r: &serde_json::Value,
    names: &std::collections::HashMap<String, String>,
) -> String {
    use std::fmt::Write as _;
    let name = |id: &str| {
        names
            .get(id)
            .cloned()
            .unwrap_or_else(|| id.chars().take(10).collect())
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:>9} {:>7} {:>5} {:>9} {:>6} {:<24} {:>9}",
        "PEER", "RTT ms", "LOSS", "LINK", "EST ms", "LOAD", "PATH", "COST ms"
    );
    for p in r["peers"].as_array().into_iter().flatten() {
        let id = p["node_id"].as_str().unwrap_or("");
        let rtt = p["rtt_ms"]
            .as_f64()
            .map(|v| format!("{v:.1}"))
            .unwrap_or_else(|| "-".into());
        let load = p["load"]
            .as_object()
            .map(|l| {
                (l.get("serving").and_then(|v| v.as_u64()).unwrap_or(0)
                    + l.get("relaying").and_then(|v| v.as_u64()).unwrap_or(0))
                .to_string()
            })
            .unwrap_or_else(|| "-".into());
        let (path, cost) = match p["best"].as_object() {
            Some(b) => {
                let via: Vec<String> = b["via"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(&name))
                    .collect();
                let path = if via.is_empty() {
                    "direct".to_owned()
                } else {
                    format!("via {}", via.join(" > "))
                };
                let est = if b["estimated"].as_bool().unwrap_or(false) {
                    "~"
                } else {
                    ""
                };
                (
                    path,
                    format!("{est}{:.1}", b["cost_ms"].as_f64().unwrap_or(0.0)),
                )
            }
            None => ("unreachable".to_owned(), "-".to_owned()),
        };
        let _ = writeln!(
            out,
            "{:<20} {:>9} {:>6.1}% {:>5} {:>9.1} {:>6} {:<24} {:>9}",
            name(id),
            rtt,
            p["loss"].as_f64().unwrap_or(0.0) * 100.0,
            if p["link_down"].as_bool().unwrap_or(false) {
                "down"
            } else {
                "up"
            },
            p["estimated_rtt_ms"].as_f64().unwrap_or(0.0),
            load,
            path,
            cost
        );
    }
    let _ = writeln!(
        out,
        "relays for others: {}   max relays per path: {}   path switches: {}",
        r["relays"].as_bool().unwrap_or(false),
        r["max_relays"].as_u64().unwrap_or(0),
        r["switches"].as_u64().unwrap_or(0)
    );
    out
}

#[cfg(test)]
mod routes_tests {
    use super::*;

    #[test]
    fn routes_table_names_peers_and_paths() {
        let r = serde_json::json!({
            "relays": true, "max_relays": 2, "switches": 1,
            "peers": [
                {"node_id": "aaa", "rtt_ms": 10.04, "loss": 0.01, "link_down": false,
                 "estimated_rtt_ms": 10.0, "load": {"serving": 2, "relaying": 1},
                 "best": {"via": [], "cost_ms": 11.0, "estimated": false}},
                {"node_id": "bbb", "rtt_ms": null, "loss": 0.0, "link_down": true,
                 "estimated_rtt_ms": 100.0, "load": null,
                 "best": {"via": ["aaa"], "cost_ms": 21.0, "estimated": true}},
                {"node_id": "ccc", "rtt_ms": null, "loss": 0.0, "link_down": true,
                 "estimated_rtt_ms": 100.0, "load": null, "best": null}
            ]
        });
        let names = [("aaa".to_string(), "alpha".to_string())]
            .into_iter()
            .collect();
        let t = routes_table(&r, &names);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[1].starts_with("alpha") && lines[1].contains("direct") && lines[1].contains("3")
        );
        assert!(
            lines[2].starts_with("bbb")
                && lines[2].contains("via alpha")
                && lines[2].contains("~21.0")
        );
        assert!(lines[2].contains("down"));
        assert!(lines[3].contains("unreachable"));
        assert!(lines[4].contains("path switches: 1"));
    }
}
