//! The credential store: one JSON document per node, `state_dir/credentials.json`, mode 0600,
//! written atomically (temporary file, fsync, rename) after every change, so a crash leaves
//! either the old or the new state, never a mix.
//!
//! It holds the node's HMAC key and JWT signing keys (secrets), the registered services with
//! their policies and API key hashes, and everything revoked. A backup is a copy of this
//! document; [`merge_restore`] applies one without ever re-admitting anything revoked or
//! retired since (revocations are a union, key retirements keep the earliest time).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::keys::{ApiKeyRecord, KeyId};
use super::policy::Policy;
use super::revocation::TextRevocation;
use super::secret::SecretString;
use super::tokens::StoredSigningKey;
use crate::identity::{write_private_file, IdentityError};

/// File name of the store inside `state_dir`.
pub const STORE_FILE: &str = "credentials.json";
/// Format version.
pub const STORE_VERSION: u32 = 1;
/// Largest store file read (refuses absurd files before parsing).
pub const MAX_STORE_LEN: u64 = 64 << 20;

/// The whole store.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    /// Format version (1).
    pub version: u32,
    /// Node id of the node this store belongs to.
    pub node_id: String,
    /// HMAC-SHA256 key for API key hashes, base64url. Secret.
    pub hmac_secret: SecretString,
    /// JWT signing keys, current last. Secret.
    pub signing_keys: Vec<StoredSigningKey>,
    /// Registered services.
    pub services: BTreeMap<String, ServiceRecord>,
    /// Everything revoked.
    #[serde(default)]
    pub revoked: Revoked,
}

/// A registered service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRecord {
    /// Backend (services registered through the API; None for services from the config file,
    /// whose backend the config gives).
    #[serde(default)]
    pub backend: Option<SocketAddr>,
    /// Policy.
    pub policy: Policy,
    /// API keys (hashes only).
    #[serde(default)]
    pub keys: Vec<ApiKeyRecord>,
    /// Registered at, Unix seconds.
    pub registered_at: u64,
}

/// Revocations and retirements; only ever grow (entries past all possible use are pruned).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoked {
    /// Signed node and certificate revocations.
    #[serde(default)]
    pub nodes: Vec<TextRevocationEq>,
    /// Denied token ids and until when (Unix seconds).
    #[serde(default)]
    pub jtis: BTreeMap<String, u64>,
    /// API keys retired or revoked, and when they stop(ped) working (Unix seconds).
    #[serde(default)]
    pub keys: BTreeMap<KeyId, u64>,
    /// Per service: tokens issued before this time (Unix seconds) are refused (deregistration).
    #[serde(default)]
    pub service_cutoffs: BTreeMap<String, u64>,
}

/// A text revocation compared by content (for set semantics in the store).
pub type TextRevocationEq = TextRevocation;

/// Errors reading or writing the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Reading or writing failed.
    #[error("{0}")]
    Io(String),
    /// The file does not parse (the message never quotes file contents).
    #[error("{path}: not a valid credential store ({msg})")]
    Parse {
        /// File.
        path: String,
        /// What is wrong (line and column).
        msg: String,
    },
    /// The file is for another node.
    #[error("credential store belongs to node {found}, this node is {expected}")]
    WrongNode {
        /// Node id of this node.
        expected: String,
        /// Node id in the file.
        found: String,
    },
    /// Unsupported version.
    #[error("credential store version {0} not supported (expected {STORE_VERSION})")]
    Version(u32),
}

impl From<IdentityError> for StoreError {
    fn from(e: IdentityError) -> Self {
        StoreError::Io(e.to_string())
    }
}

/// Reads a store file; `Ok(None)` if it does not exist.
pub fn load(path: &Path) -> Result<Option<StoreFile>, StoreError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::Io(format!("{}: {e}", path.display()))),
    };
    if meta.len() > MAX_STORE_LEN {
        return Err(StoreError::Io(format!(
            "{}: file too large",
            path.display()
        )));
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read(path).map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?,
    );
    parse(path, &text).map(Some)
}

/// Parses store bytes. Errors name the position only: the file holds secrets.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<StoreFile, StoreError> {
    let f: StoreFile = serde_json::from_slice(bytes).map_err(|e| StoreError::Parse {
        path: path.display().to_string(),
        msg: format!(
            "line {} column {}: {:?}",
            e.line(),
            e.column(),
            e.classify()
        ),
    })?;
    if f.version != STORE_VERSION {
        return Err(StoreError::Version(f.version));
    }
    Ok(f)
}

/// Writes a store file atomically with mode 0600.
pub fn save(path: &Path, store: &StoreFile) -> Result<(), StoreError> {
    let bytes = zeroize::Zeroizing::new(
        serde_json::to_vec_pretty(store).map_err(|e| StoreError::Io(e.to_string()))?,
    );
    write_private_file(path, &bytes, true)?;
    Ok(())
}

/// Applies a backup over the current store. Services, policies, keys and secrets come from
/// the backup (secrets and signing keys of both are kept, the current signing key stays
/// current); revocations are the union of both; every key retired or revoked in either keeps
/// its earliest end; service cutoffs keep the latest. Nothing revoked since the backup is
/// re-admitted.
pub fn merge_restore(current: &StoreFile, backup: &StoreFile) -> StoreFile {
    let mut out = backup.clone();
    out.node_id = current.node_id.clone();
    // Signing keys: the backup's, then the current ones (current key stays current).
    let mut keys: Vec<StoredSigningKey> = backup
        .signing_keys
        .iter()
        .filter(|k| !current.signing_keys.iter().any(|c| c.kid == k.kid))
        .cloned()
        .map(|mut k| {
            k.retired_at.get_or_insert(k.created_at);
            k
        })
        .collect();
    keys.extend(current.signing_keys.iter().cloned());
    out.signing_keys = keys;
    // The backup's HMAC key hashes the backup's API keys, so it must come with them. Keys
    // created since the backup are not in it and are gone (documented).
    // Revocations: union.
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut nodes = Vec::new();
    for r in current.revoked.nodes.iter().chain(&backup.revoked.nodes) {
        if seen.insert(r.0.to_text()) {
            nodes.push(r.clone());
        }
    }
    out.revoked.nodes = nodes;
    for (jti, until) in &current.revoked.jtis {
        let e = out.revoked.jtis.entry(jti.clone()).or_insert(*until);
        *e = (*e).max(*until);
    }
    for (k, t) in &current.revoked.keys {
        let e = out.revoked.keys.entry(k.clone()).or_insert(*t);
        *e = (*e).min(*t);
    }
    for (s, t) in &current.revoked.service_cutoffs {
        let e = out.revoked.service_cutoffs.entry(s.clone()).or_insert(*t);
        *e = (*e).max(*t);
    }
    // Apply key retirements to the restored keys.
    for svc in out.services.values_mut() {
        for k in &mut svc.keys {
            if let Some(&t) = out.revoked.keys.get(&k.key_id) {
                k.not_after = Some(k.not_after.map_or(t, |x| x.min(t)));
            }
        }
    }
    out
}
