//! `meshd key`, `meshd revoke`, `meshd backup`, `meshd restore`, and the admin token.
//!
//! Commands that change a running peer go through its admin API with the admin token read
//! from `state_dir/admin.token`; backup and restore also work offline on the store file.
//! Secrets are printed only where the command's purpose is to hand one out (`key new`).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use overlay::auth::revocation::{Revocation, RevocationSigner, RevocationTarget};
use overlay::auth::secret::{fill_random, SecretString};
use overlay::auth::store::{self, STORE_FILE};
use overlay::identity::{self, CaMaterial};

use crate::config;
use crate::http;

/// File name of the admin token inside `state_dir`.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Reads `state_dir/admin.token`, creating it (mode 0600) on first start.
pub fn ensure_admin_token(state_dir: &Path) -> anyhow::Result<SecretString> {
    let path = state_dir.join(ADMIN_TOKEN_FILE);
    if path.exists() {
        return read_admin_token(state_dir);
    }
    let mut raw = zeroize::Zeroizing::new([0u8; 32]);
    fill_random(&mut raw[..]);
    let token = SecretString::new(format!(
        "mat_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw[..])
    ));
    identity::write_private_file(&path, format!("{}\n", token.expose()).as_bytes(), false)?;
    Ok(token)
}

/// Reads the admin token; refuses a file readable by others.
pub fn read_admin_token(state_dir: &Path) -> anyhow::Result<SecretString> {
    let path = state_dir.join(ADMIN_TOKEN_FILE);
    let mode = std::fs::metadata(&path)
        .with_context(|| format!("admin token {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        bail!(
            "admin token {} is readable by others (mode {:o}); run: chmod 600 {}",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?,
    );
    Ok(SecretString::new(text.trim().to_owned()))
}

/// Loads the CA (certificate and key) for a node that is an issuer.
pub fn load_issuer(ca_cert: &Path, ca_key: &Path) -> anyhow::Result<CaMaterial> {
    let mode = std::fs::metadata(ca_key)
        .with_context(|| format!("ca_key {}", ca_key.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        bail!(
            "ca_key {} is readable by others (mode {:o}); run: chmod 600 {}",
            ca_key.display(),
            mode & 0o777,
            ca_key.display()
        );
    }
    Ok(CaMaterial {
        cert_pem: std::fs::read_to_string(ca_cert)
            .with_context(|| format!("ca_cert {}", ca_cert.display()))?,
        key_pem: std::fs::read_to_string(ca_key)
            .with_context(|| format!("ca_key {}", ca_key.display()))?,
    })
}

/// Where a running peer is: its admin address and state directory.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// The peer's configuration file (gives `admin` and `state_dir`).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Admin address (overrides the config's).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// State directory holding admin.token and credentials.json (overrides the config's).
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

impl Target {
    fn resolve(&self) -> anyhow::Result<(Option<SocketAddr>, PathBuf)> {
        let cfg = self.config.as_deref().map(config::load).transpose()?;
        let admin = self.admin.or(cfg.as_ref().map(|c| c.admin));
        let state_dir = self
            .state_dir
            .clone()
            .or(cfg.map(|c| c.state_dir))
            .context("give --config FILE or --state-dir DIR")?;
        Ok((admin, state_dir))
    }

    fn admin(&self) -> anyhow::Result<(SocketAddr, SecretString)> {
        let (admin, state_dir) = self.resolve()?;
        let admin = admin.context("give --config FILE or --admin ADDR")?;
        Ok((admin, read_admin_token(&state_dir)?))
    }
}

/// `meshd key ...`.
#[derive(Debug, clap::Subcommand)]
pub enum KeyCmd {
    /// Create an API key for a service; prints the key id and the key (shown only once).
    New {
        /// Service name.
        #[arg(long)]
        service: String,
        #[command(flatten)]
        target: Target,
    },
    /// Retire an API key (it keeps working for the overlap window).
    Retire {
        /// Service name.
        #[arg(long)]
        service: String,
        /// Key id.
        #[arg(long)]
        key_id: String,
        /// Seconds it keeps working (default: the node's key_overlap_secs; 0 = now).
        #[arg(long)]
        overlap_secs: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
}

fn check(code: u16, body: &str, what: &str) -> anyhow::Result<serde_json::Value> {
    if !(200..300).contains(&code) {
        let msg = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| body.chars().take(200).collect());
        bail!("{what}: HTTP {code}: {msg}");
    }
    serde_json::from_str(body).with_context(|| format!("{what}: bad JSON"))
}

/// Runs `meshd key`.
pub async fn key(cmd: KeyCmd) -> anyhow::Result<()> {
    match cmd {
        KeyCmd::New { service, target } => {
            let (addr, token) = target.admin()?;
            let (code, body) = http::request(
                addr,
                "POST",
                &format!("/v1/services/{service}/keys"),
                Some(token.expose()),
                None,
            )
            .await?;
            let body = zeroize::Zeroizing::new(body);
            let v = check(code, &body, "key new")?;
            let key = SecretString::new(v["api_key"].as_str().unwrap_or_default().to_owned());
            println!("key_id  {}", v["key_id"].as_str().unwrap_or_default());
            println!("api_key {}", key.expose());
            eprintln!("(the key is shown only once; meshd keeps only a keyed hash)");
            Ok(())
        }
        KeyCmd::Retire {
            service,
            key_id,
            overlap_secs,
            target,
        } => {
            let (addr, token) = target.admin()?;
            let q = overlap_secs
                .map(|s| format!("?overlap_secs={s}"))
                .unwrap_or_default();
            let (code, body) = http::request(
                addr,
                "DELETE",
                &format!("/v1/services/{service}/keys/{key_id}{q}"),
                Some(token.expose()),
                None,
            )
            .await?;
            let v = check(code, &body, "key retire")?;
            println!("key {key_id} stops working at {}", v["not_after"]);
            Ok(())
        }
    }
}

/// `meshd revoke`.
#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    /// CA directory (ca.crt, ca.key) to sign with.
    #[arg(long)]
    ca: PathBuf,
    /// Node id to revoke.
    #[arg(long, conflicts_with = "serial")]
    node_id: Option<String>,
    /// Certificate serial (hex) to revoke.
    #[arg(long)]
    serial: Option<String>,
    /// Reason (for operators).
    #[arg(long, default_value = "")]
    reason: String,
    /// Also submit it to a running peer (which spreads it overlay-wide).
    #[arg(long)]
    submit: bool,
    #[command(flatten)]
    target: Target,
}

#[allow(clippy::disallowed_methods)] // the CLI stamps the record with the wall clock
fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs `meshd revoke`: prints the signed record (text form) and optionally submits it.
pub async fn revoke(args: RevokeArgs) -> anyhow::Result<()> {
    let ca = identity::load_ca_dir(&args.ca)?;
    let signer = RevocationSigner::from_pem(&ca.key_pem)?;
    let target = match (&args.node_id, &args.serial) {
        (Some(id), None) => RevocationTarget::Node(id.parse()?),
        (None, Some(s)) => RevocationTarget::Serial(s.to_ascii_lowercase()),
        _ => bail!("give --node-id or --serial"),
    };
    let record = signer.sign(&Revocation {
        target,
        issued_at: now_secs(),
        reason: args.reason.clone(),
    })?;
    let text = record.to_text();
    println!("{text}");
    if args.submit {
        let (addr, token) = args.target.admin()?;
        let body = serde_json::json!({ "record": text, "reason": args.reason }).to_string();
        let (code, resp) = http::request(
            addr,
            "POST",
            "/v1/revocations",
            Some(token.expose()),
            Some(&body),
        )
        .await?;
        let v = check(code, &resp, "revoke")?;
        eprintln!("{}", v["revoked"].as_str().unwrap_or("submitted"));
    }
    Ok(())
}

/// `meshd backup`.
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// File to write (mode 0600, atomically).
    #[arg(long)]
    out: PathBuf,
    /// Overwrite an existing file.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    target: Target,
}

/// Runs `meshd backup`: asks the running peer if it answers, else copies the store file.
pub async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let (admin, state_dir) = args.target.resolve()?;
    let online = match admin {
        Some(addr) => match read_admin_token(&state_dir) {
            Ok(token) => http::request(addr, "GET", "/v1/backup", Some(token.expose()), None)
                .await
                .ok(),
            Err(_) => None,
        },
        None => None,
    };
    let bytes = zeroize::Zeroizing::new(match online {
        Some((200, body)) => body.into_bytes(),
        Some((code, body)) => {
            check(code, &body, "backup")?;
            unreachable!("check fails on non-2xx")
        }
        None => {
            let path = state_dir.join(STORE_FILE);
            let s = store::load(&path)?
                .with_context(|| format!("{} does not exist", path.display()))?;
            serde_json::to_vec_pretty(&s)?
        }
    });
    // Validate before writing.
    store::parse(&args.out, &bytes)?;
    identity::write_private_file(&args.out, &bytes, args.force)?;
    println!(
        "credential store backed up to {} (mode 0600; it contains secrets)",
        args.out.display()
    );
    Ok(())
}

/// `meshd restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// Backup file.
    file: PathBuf,
    #[command(flatten)]
    target: Target,
}

/// Runs `meshd restore`: through the running peer if it answers, else offline on the store
/// file. Either way revocations are a union and retired keys stay retired.
pub async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let backup = store::load(&args.file)?
        .with_context(|| format!("{} does not exist", args.file.display()))?;
    let (admin, state_dir) = args.target.resolve()?;
    if let Some(addr) = admin {
        if let Ok(token) = read_admin_token(&state_dir) {
            let body = zeroize::Zeroizing::new(serde_json::to_string(&backup)?);
            if let Ok((code, resp)) = http::request(
                addr,
                "POST",
                "/v1/restore",
                Some(token.expose()),
                Some(&body),
            )
            .await
            {
                check(code, &resp, "restore")?;
                println!("restored into the running peer at {addr}");
                return Ok(());
            }
        }
    }
    let path = state_dir.join(STORE_FILE);
    let current = store::load(&path)?.with_context(|| {
        format!(
            "{} does not exist: start the peer once so it creates its store",
            path.display()
        )
    })?;
    if current.node_id != backup.node_id {
        bail!(
            "backup is of node {}, this state directory belongs to {}",
            backup.node_id,
            current.node_id
        );
    }
    let merged = store::merge_restore(&current, &backup);
    store::save(&path, &merged)?;
    println!(
        "restored into {} (offline; revocations kept)",
        path.display()
    );
    Ok(())
}
