//! The driver side of service authentication: registration and deregistration (atomic, with
//! rollback), API keys, tokens and discovery (locally and peer to peer), token-checked
//! forwarding, revocation gossip and enforcement, the credential store, certificate renewal.
//!
//! Decisions are made by [`Authority`] (sans-IO); this module moves bytes, persists the
//! store, reads the wall clock (through [`now_unix_ms`]) and tells peers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::timeout;
use tracing::{debug, error, info, warn};
use zeroize::Zeroizing;

use super::{
    lock, now_unix, now_unix_ms, pick_provider, push_catalog, read, reset, write, ForwardError,
    Inner, Node, NodeError,
};
use crate::auth::audit::{self, AuditEvent, AuditKind};
use crate::auth::keys::KeyId;
use crate::auth::policy::{Caller, Policy};
use crate::auth::revocation::{
    ed25519_key_of_cert, Revocation, RevocationError, RevocationSigner, RevocationTarget,
    SignedRevocation,
};
use crate::auth::secret::SecretString;
use crate::auth::store::{self, StoreFile, STORE_FILE};
use crate::auth::tokens::{Claims, TokenRefusal};
use crate::auth::{AdminError, Authority, Refusal, RegistrationStep};
use crate::config::NodeConfig;
use crate::identity::{CertInfo, NodeId, NodeIdentity, Validity};
use crate::stats::{self, Stats};
use crate::tls::{self, DenySet};
use crate::wire::{
    self, code, DiscoverReply, DiscoverRequest, Instance, Refused, RevocationBatch, StreamHeader,
    StreamKind, TokenReply, TokenRequest, MAX_REVOCATIONS_PER_FRAME,
};

/// The answer to a successful registration: the service's first API key, shown once.
#[derive(Debug, Clone, Serialize)]
pub struct Registered {
    /// Service name.
    pub service: String,
    /// Public id of the key.
    pub key_id: String,
    /// The key (secret; only shown here).
    pub api_key: SecretString,
}

/// What a deregistration did, and what it could not do.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeregisterReport {
    /// Service name.
    pub service: String,
    /// It was withdrawn from the catalog (peers told).
    pub withdrawn: bool,
    /// Its keys, token validity and limiter state were removed.
    pub credentials_removed: bool,
    /// Steps that failed (the others went ahead).
    pub problems: Vec<String>,
}

/// What to revoke.
#[derive(Clone, Debug)]
pub enum RevokeRequest {
    /// A node id (this node must be an issuer, to sign).
    Node(NodeId),
    /// A certificate serial, lowercase hex (this node must be an issuer, to sign).
    Serial(String),
    /// A pre-signed node or serial revocation (e.g. from `meshd revoke`).
    Signed(SignedRevocation),
    /// A token id.
    Jti(String),
    /// An API key id.
    KeyId(KeyId),
}

/// A token obtained for a service.
#[derive(Debug, Clone, Serialize)]
pub struct TokenGrant {
    /// The JWT (secret).
    pub token: SecretString,
    /// Its `exp`, Unix seconds.
    pub expires_at: u64,
}

fn refused_of(r: &Refusal) -> Refused {
    Refused {
        status: r.status(),
        reason: r.to_string(),
        retry_after_ms: r.retry_after_ms(),
    }
}

fn unreachable(e: impl std::fmt::Display) -> Refused {
    Refused {
        status: 502,
        reason: format!("provider unreachable: {e}"),
        retry_after_ms: None,
    }
}

/// The most telling of several refusals (rate limit, then policy, then credentials...).
fn best(refusals: Vec<Refused>, service: &str) -> Refused {
    let rank = |s: u16| match s {
        429 => 0,
        403 => 1,
        401 => 2,
        500 => 3,
        502 => 4,
        _ => 5,
    };
    refusals
        .into_iter()
        .min_by_key(|r| rank(r.status))
        .unwrap_or(Refused {
            status: 404,
            reason: format!("no live peer offers service {service:?}"),
            retry_after_ms: None,
        })
}

// -----------------------------------------------------------------------------------------
// Start-up and persistence

/// The authority, the deny-set rebuilt from stored revocations, and the services registered
/// through the API before (to publish again).
pub(super) type BuiltAuthority = (Authority, DenySet, Vec<(String, SocketAddr)>);

/// Builds the authority at start: loads the store (if any), registers the configured
/// services' policies, rebuilds the deny-set from stored revocations, and returns services
/// registered through the API earlier (to publish again).
pub(super) fn build_authority(
    identity: &NodeIdentity,
    config: &NodeConfig,
    stats: Arc<Stats>,
) -> Result<BuiltAuthority, NodeError> {
    let settings = &config.auth;
    let mut trusted: Vec<[u8; 32]> = identity
        .ca
        .iter()
        .filter_map(|c| ed25519_key_of_cert(c))
        .collect();
    trusted.extend(settings.trusted_revokers.iter().copied());
    let stored = match &settings.state_dir {
        Some(dir) => store::load(&dir.join(STORE_FILE))
            .map_err(|e| NodeError::Config(format!("credential store: {e}")))?,
        None => None,
    };
    let now = now_unix_ms();
    let mut authority = Authority::new(
        identity.node_id(),
        settings,
        trusted,
        stored.as_ref(),
        stats,
        now,
    )
    .map_err(NodeError::Config)?;
    for s in &config.services {
        let policy = settings
            .service_policies
            .get(&s.name)
            .cloned()
            .unwrap_or_default();
        authority
            .ensure_service(&s.name, policy, now)
            .map_err(|e| NodeError::Config(format!("service {}: {e}", s.name)))?;
    }
    let deny = DenySet::default();
    for (rev, _) in authority.revocations().iter() {
        match &rev.target {
            RevocationTarget::Node(id) => deny.deny_node(*id),
            RevocationTarget::Serial(s) => deny.deny_serial(s),
        }
    }
    let restored = authority
        .service_names()
        .into_iter()
        .filter(|n| !config.services.iter().any(|s| &s.name == n))
        .filter_map(|n| {
            let b = authority.service(&n)?.backend?;
            Some((n, b))
        })
        .collect();
    if let Some(dir) = &settings.state_dir {
        store::save(&dir.join(STORE_FILE), &authority.to_store())
            .map_err(|e| NodeError::Config(format!("credential store: {e}")))?;
    }
    Ok((authority, deny, restored))
}

/// Writes the credential store (no-op without a state directory).
fn persist(inner: &Inner) -> Result<(), String> {
    let Some(dir) = &inner.auth_settings.state_dir else {
        return Ok(());
    };
    let _g = lock(&inner.persist_lock);
    let doc = read(&inner.auth).to_store();
    store::save(&dir.join(STORE_FILE), &doc).map_err(|e| e.to_string())
}

fn my_caller(inner: &Inner) -> Caller {
    Caller::from(&read(&inner.identity).info)
}

// -----------------------------------------------------------------------------------------
// Public API

impl Node {
    /// Registers a service atomically: its first API key is stored, its policy set, the store
    /// written, and the catalog entry announced. If any step fails, the earlier ones are
    /// undone and nothing of the service remains (`test_fail_registration_after` injects a
    /// failure after a chosen step).
    pub async fn register_service(
        &self,
        name: &str,
        backend: SocketAddr,
        policy: Option<Policy>,
    ) -> Result<Registered, AdminError> {
        let inner = &self.inner;
        let _g = inner.admin_lock.lock().await;
        let policy = policy.unwrap_or_default();
        policy.validate().map_err(AdminError::Invalid)?;
        if read(&inner.catalog).backend(name).is_some() || read(&inner.auth).service(name).is_some()
        {
            return Err(AdminError::Exists(name.to_owned()));
        }
        let now = now_unix_ms();
        let inject = inner.auth_settings.test_fail_registration_after;
        let check = |step: RegistrationStep| match inject {
            Some(s) if s == step => Err(AdminError::StepFailed(format!("{step:?} (injected)"))),
            _ => Ok(()),
        };
        let mut done: Vec<RegistrationStep> = Vec::new();
        let result: Result<(KeyId, SecretString), AdminError> = (|| {
            let (kid, key) = write(&inner.auth).add_service(name, Some(backend), now)?;
            done.push(RegistrationStep::StoreCredentials);
            check(RegistrationStep::StoreCredentials)?;
            write(&inner.auth).set_policy(name, policy)?;
            done.push(RegistrationStep::SetPolicy);
            check(RegistrationStep::SetPolicy)?;
            persist(inner).map_err(|e| AdminError::StepFailed(format!("persist: {e}")))?;
            done.push(RegistrationStep::Persist);
            check(RegistrationStep::Persist)?;
            write(&inner.catalog)
                .publish(name, backend)
                .map_err(|e| AdminError::StepFailed(format!("announce: {e}")))?;
            done.push(RegistrationStep::Announce);
            check(RegistrationStep::Announce)?;
            Ok((kid, key))
        })();
        match result {
            Ok((kid, key)) => {
                push_catalog_to_all_and_wait(inner).await;
                audit::record(
                    &inner.stats,
                    AuditKind::Registered,
                    AuditEvent {
                        service: Some(name),
                        key_id: Some(kid.as_str()),
                        ..Default::default()
                    },
                );
                info!(service = name, "service registered");
                Ok(Registered {
                    service: name.to_owned(),
                    key_id: kid.to_string(),
                    api_key: key,
                })
            }
            Err(e) => {
                // Roll back in reverse order.
                if done.contains(&RegistrationStep::Announce) {
                    write(&inner.catalog).unpublish(name);
                    inner.catalog_version.send_modify(|v| *v += 1);
                }
                if done.contains(&RegistrationStep::StoreCredentials) {
                    write(&inner.auth).rollback_service(name);
                }
                if done.contains(&RegistrationStep::Persist) {
                    if let Err(pe) = persist(inner) {
                        error!(service = name, error = %pe,
                            "rollback could not rewrite the credential store; it lists a service that is not registered (fixed by the next successful write)");
                    }
                }
                audit::record(
                    &inner.stats,
                    AuditKind::RegistrationFailed,
                    AuditEvent {
                        service: Some(name),
                        reason: Some(&e.to_string()),
                        ..Default::default()
                    },
                );
                Err(e)
            }
        }
    }

    /// Deregisters a service: withdraws it overlay-wide, removes its keys, the validity of its
    /// tokens and its limiter state. Carries on past failures and reports them.
    pub async fn deregister_service(&self, name: &str) -> Result<DeregisterReport, AdminError> {
        let inner = &self.inner;
        let _g = inner.admin_lock.lock().await;
        let mut report = DeregisterReport {
            service: name.to_owned(),
            ..Default::default()
        };
        report.withdrawn = write(&inner.catalog).unpublish(name);
        report.credentials_removed = write(&inner.auth)
            .remove_service(name, now_unix_ms())
            .is_some();
        if !report.withdrawn && !report.credentials_removed {
            return Err(AdminError::NoService(name.to_owned()));
        }
        if let Err(e) = persist(inner) {
            report
                .problems
                .push(format!("credential store not written: {e}"));
        }
        if report.withdrawn {
            info!(service = name, "service withdrawn");
            for (peer, e) in push_catalog_to_all_and_wait(inner).await {
                report.problems.push(format!(
                    "peer {peer} not told ({e}); it will learn within one catalog refresh"
                ));
            }
        }
        Ok(report)
    }

    /// A new API key for a local service (shown once).
    pub async fn create_api_key(&self, service: &str) -> Result<(KeyId, SecretString), AdminError> {
        let inner = &self.inner;
        let _g = inner.admin_lock.lock().await;
        let now = now_unix_ms();
        let (kid, key) = write(&inner.auth).create_key(service, now)?;
        if let Err(e) = persist(inner) {
            // Do not hand out a key that would not survive a restart.
            let _ = write(&inner.auth).retire_key(service, &kid, 0, now);
            return Err(AdminError::StepFailed(format!("persist: {e}")));
        }
        Ok((kid, key))
    }

    /// Retires an API key: it keeps working for `overlap_secs` (default from the settings),
    /// then never again. Returns when it stops working (Unix seconds).
    pub async fn retire_api_key(
        &self,
        service: &str,
        key_id: &KeyId,
        overlap_secs: Option<u64>,
    ) -> Result<u64, AdminError> {
        let inner = &self.inner;
        let _g = inner.admin_lock.lock().await;
        let overlap = overlap_secs.unwrap_or(inner.auth_settings.key_overlap_secs);
        let until = write(&inner.auth).retire_key(service, key_id, overlap, now_unix_ms())?;
        persist(inner).map_err(|e| AdminError::StepFailed(format!("persist: {e}")))?;
        Ok(until)
    }

    /// Obtains a token for `service`: from this node if it hosts the service, otherwise from
    /// a provider over the overlay (the caller is this node).
    pub async fn request_token(
        &self,
        service: &str,
        api_key: &str,
        scope: &str,
    ) -> Result<TokenGrant, Refused> {
        let inner = &self.inner;
        if read(&inner.auth).service(service).is_some() {
            let caller = my_caller(inner);
            return read(&inner.auth)
                .issue_token(&caller, service, api_key, scope, now_unix_ms())
                .map(|t| TokenGrant {
                    expires_at: t.claims.exp,
                    token: t.token,
                })
                .map_err(|r| refused_of(&r));
        }
        let providers = live_providers(inner, service);
        let mut refusals = Vec::new();
        for p in providers {
            match remote_token(inner, p, service, api_key, scope).await {
                Ok(g) => return Ok(g),
                Err(r) => refusals.push(r),
            }
        }
        Err(best(refusals, service))
    }

    /// Verifies a token issued by this node.
    pub fn verify_token(&self, token: &str) -> Result<Claims, TokenRefusal> {
        read(&self.inner.auth).verify_token(token, now_unix_ms())
    }

    /// This node's token verification keys as a JWKS.
    pub fn jwks(&self) -> serde_json::Value {
        read(&self.inner.auth).tokens().jwks()
    }

    /// Rotates the token signing key (old keys verify until their tokens expire).
    pub async fn rotate_signing_key(&self) -> Result<String, AdminError> {
        let _g = self.inner.admin_lock.lock().await;
        let kid = write(&self.inner.auth).rotate_signing_key(now_unix_ms())?;
        persist(&self.inner).map_err(|e| AdminError::StepFailed(format!("persist: {e}")))?;
        Ok(kid)
    }

    /// Authenticated discovery: the instances of `service` this node may use, given an API
    /// key or token. Local registration and every live provider are asked (concurrently).
    pub async fn discover(
        &self,
        service: &str,
        credential: &str,
    ) -> Result<Vec<Instance>, Refused> {
        let inner = &self.inner;
        let mut instances = Vec::new();
        let mut refusals = Vec::new();
        if read(&inner.auth).service(service).is_some() {
            let caller = my_caller(inner);
            match read(&inner.auth).discover(&caller, service, credential, now_unix_ms()) {
                Ok(g) => instances.push(Instance {
                    node_id: inner.info.node_id,
                    name: inner.info.name.clone(),
                    addr: inner.me.addr,
                    scopes: g.scopes,
                    require_token: g.require_token,
                }),
                Err(r) => refusals.push(refused_of(&r)),
            }
        }
        // A token names its issuer: ask only that node.
        let mut providers = live_providers(inner, service);
        if let Some(c) = crate::auth::tokens::insecure_peek_claims(credential) {
            providers.retain(|p| p.to_string() == c.iss);
        }
        let asks = providers.into_iter().map(|p| {
            let inner = inner.clone();
            let req = DiscoverRequest {
                service: service.to_owned(),
                credential: credential.to_owned(),
            };
            async move {
                let r = request_frame(&inner, p, StreamKind::Discover, &req).await;
                drop(Zeroizing::new(req.credential));
                r.and_then(|b| wire::decode_discover_reply(&b).map_err(|e| e.to_string()))
            }
        });
        for r in futures::future::join_all(asks).await {
            match r {
                Ok(DiscoverReply::Instance(i)) => instances.push(i),
                Ok(DiscoverReply::Refused(x)) => refusals.push(x),
                Err(e) => refusals.push(unreachable(e)),
            }
        }
        if instances.is_empty() {
            return Err(best(refusals, service));
        }
        instances.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(instances)
    }

    /// Revokes a node, certificate, token or API key. Node and certificate revocations are
    /// signed (by this node's CA key if it is an issuer, or pre-signed), enforced at once,
    /// persisted and spread to every live member.
    pub async fn revoke(&self, req: RevokeRequest, reason: &str) -> Result<String, AdminError> {
        let inner = &self.inner;
        let now = now_unix_ms();
        let signed = match req {
            RevokeRequest::Jti(jti) => {
                let _g = inner.admin_lock.lock().await;
                write(&inner.auth).revoke_jti(&jti, now)?;
                persist(inner).map_err(|e| AdminError::StepFailed(format!("persist: {e}")))?;
                return Ok(format!("token {jti} revoked"));
            }
            RevokeRequest::KeyId(k) => {
                let _g = inner.admin_lock.lock().await;
                let svc = write(&inner.auth).revoke_key(&k, now);
                persist(inner).map_err(|e| AdminError::StepFailed(format!("persist: {e}")))?;
                return Ok(match svc {
                    Some(s) => format!("API key {k} of service {s} revoked"),
                    None => format!("API key {k} revoked (not known here; remembered)"),
                });
            }
            RevokeRequest::Signed(s) => s,
            RevokeRequest::Node(id) => self.sign_revocation(RevocationTarget::Node(id), reason)?,
            RevokeRequest::Serial(s) => {
                let s = s.to_ascii_lowercase();
                if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(AdminError::Invalid("serial must be hex".into()));
                }
                self.sign_revocation(RevocationTarget::Serial(s), reason)?
            }
        };
        match apply_signed(inner, &signed, None) {
            Ok(Some(rev)) => Ok(format!("{} revoked", rev.target)),
            Ok(None) => Ok("already revoked".into()),
            Err(e) => Err(AdminError::Invalid(e.to_string())),
        }
    }

    fn sign_revocation(
        &self,
        target: RevocationTarget,
        reason: &str,
    ) -> Result<SignedRevocation, AdminError> {
        let ca = self.inner.auth_settings.issuer.as_ref().ok_or_else(|| {
            AdminError::Invalid(
                "this node has no CA key (ca_key): pass a signed record (meshd revoke --ca DIR ...)"
                    .into(),
            )
        })?;
        let signer = RevocationSigner::from_pem(&ca.key_pem)
            .map_err(|e| AdminError::Invalid(e.to_string()))?;
        signer
            .sign(&Revocation {
                target,
                issued_at: now_unix_ms() / 1000,
                reason: reason.to_owned(),
            })
            .map_err(|e| AdminError::Invalid(e.to_string()))
    }

    /// Number of verified node/certificate revocations held.
    pub fn revocation_count(&self) -> usize {
        read(&self.inner.auth).revocations().len()
    }

    /// Whether a node id is revoked here.
    pub fn is_revoked(&self, id: &NodeId) -> bool {
        self.inner.deny.is_node_denied(id)
    }

    /// The credential store document (for backups; contains secrets).
    pub fn credential_store(&self) -> StoreFile {
        read(&self.inner.auth).to_store()
    }

    /// Restores a backup (see [`store::merge_restore`]): nothing revoked now is re-admitted,
    /// and revocations in the backup are applied too.
    pub async fn restore_credentials(&self, backup: &StoreFile) -> Result<(), AdminError> {
        let inner = &self.inner;
        let _g = inner.admin_lock.lock().await;
        let now = now_unix_ms();
        let current = read(&inner.auth).to_store();
        let merged = store::merge_restore(&current, backup);
        write(&inner.auth)
            .restore(&merged, &inner.auth_settings, now)
            .map_err(AdminError::Invalid)?;
        let revs: Vec<Revocation> = read(&inner.auth)
            .revocations()
            .iter()
            .map(|(r, _)| r.clone())
            .collect();
        for r in &revs {
            enforce(inner, r);
        }
        let local: Vec<String> = read(&inner.catalog).snapshot().services;
        {
            let mut a = write(&inner.auth);
            for s in &local {
                if a.service(s).is_none() {
                    let _ = a.ensure_service(s, Policy::default(), now);
                }
            }
        }
        let mut published = false;
        for name in read(&inner.auth).service_names() {
            let backend = read(&inner.auth).service(&name).and_then(|s| s.backend);
            if let Some(b) = backend {
                if read(&inner.catalog).backend(&name).is_none()
                    && write(&inner.catalog).publish(&name, b).is_ok()
                {
                    published = true;
                }
            }
        }
        persist(inner).map_err(|e| AdminError::StepFailed(format!("persist: {e}")))?;
        if published {
            push_catalog_to_all_and_wait(inner).await;
        }
        Ok(())
    }

    /// The current certificate of this node (changes on renewal).
    pub fn certificate(&self) -> CertInfo {
        read(&self.inner.identity).info.clone()
    }

    /// Renews this node's certificate now (needs an issuer). Open connections stay up.
    pub fn renew_certificate(&self) -> Result<CertInfo, String> {
        renew(&self.inner)
    }
}

pub(super) fn live_providers(inner: &Inner, service: &str) -> Vec<NodeId> {
    let providers = read(&inner.catalog).providers(service);
    let alive = read(&inner.alive);
    providers
        .into_iter()
        .filter(|p| alive.contains_key(p) && !inner.deny.is_node_denied(p))
        .collect()
}

/// Opens a stream to `peer`, sends a header and one framed message, reads one frame back.
async fn request_frame<T: Serialize>(
    inner: &Arc<Inner>,
    peer: NodeId,
    kind: StreamKind,
    msg: &T,
) -> Result<Vec<u8>, String> {
    let conn = inner.conn_to(peer).await.map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    stats::inc(&inner.stats.streams_opened);
    let header = wire::encode_header(&StreamHeader {
        kind,
        request_id: inner
            .next_request_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    });
    let frame = Zeroizing::new(wire::encode_frame(msg).map_err(|e| e.to_string())?);
    send.write_all(&header).await.map_err(|e| e.to_string())?;
    send.write_all(&frame).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    timeout(
        inner.transport.header_timeout,
        wire::io::read_frame(&mut recv),
    )
    .await
    .map_err(|_| "timed out".to_string())?
    .map_err(|e| e.to_string())
}

async fn remote_token(
    inner: &Arc<Inner>,
    peer: NodeId,
    service: &str,
    api_key: &str,
    scope: &str,
) -> Result<TokenGrant, Refused> {
    let req = TokenRequest {
        service: service.to_owned(),
        api_key: api_key.to_owned(),
        scope: scope.to_owned(),
    };
    let r = request_frame(inner, peer, StreamKind::TokenRequest, &req).await;
    drop(Zeroizing::new(req.api_key));
    let body = Zeroizing::new(r.map_err(unreachable)?);
    match wire::decode_token_reply(&body).map_err(unreachable)? {
        TokenReply::Granted { token, expires_at } => Ok(TokenGrant {
            token: SecretString::new(token),
            expires_at,
        }),
        TokenReply::Refused(r) => Err(r),
    }
}

/// The token for `service` at `peer`: with `cache`, the cached one until 80% of its lifetime,
/// else one fetched with the configured API key and cached (pre-authentication fetches it ahead
/// of use through this too); without, a fresh one, not cached.
pub(super) async fn token_for(
    inner: &Arc<Inner>,
    peer: NodeId,
    service: &str,
    cache: bool,
) -> Result<SecretString, String> {
    let Some(api_key) = inner.upstream_key(service) else {
        return Err(format!("no API key configured for {service:?}"));
    };
    let token = if cache {
        cached_or_fetch(inner, peer, service, &api_key).await
    } else {
        let scope = crate::auth::policy::SCOPE_CONNECT;
        remote_token(inner, peer, service, api_key.expose(), scope)
            .await
            .map(|g| g.token)
    };
    token.map_err(|r| r.to_string())
}

async fn cached_or_fetch(
    inner: &Arc<Inner>,
    peer: NodeId,
    service: &str,
    api_key: &SecretString,
) -> Result<SecretString, Refused> {
    let now = now_unix_ms() / 1000;
    let cached = lock(&inner.upstream_tokens)
        .get(&(peer, service.to_owned()))
        .filter(|(_, refresh_at)| now < *refresh_at)
        .map(|(t, _)| t.clone());
    if let Some(t) = cached {
        return Ok(t);
    }
    let g = remote_token(
        inner,
        peer,
        service,
        api_key.expose(),
        crate::auth::policy::SCOPE_CONNECT,
    )
    .await?;
    let life = g.expires_at.saturating_sub(now);
    let refresh_at = now + life * 4 / 5;
    lock(&inner.upstream_tokens).insert((peer, service.to_owned()), (g.token.clone(), refresh_at));
    Ok(g.token)
}

/// Forwarding with a token: picks providers in turn, fetching (and caching until 80% of its
/// lifetime) a token from each with the configured API key, until one accepts.
pub(super) async fn open_service_stream_with_token(
    inner: &Arc<Inner>,
    service: &str,
) -> Result<(quinn::SendStream, quinn::RecvStream), ForwardError> {
    let Some(api_key) = inner.upstream_key(service) else {
        return Err(ForwardError::NoProvider(service.into()));
    };
    let first =
        pick_provider(inner, service).ok_or_else(|| ForwardError::NoProvider(service.into()))?;
    let mut order = live_providers(inner, service);
    order.sort();
    if let Some(i) = order.iter().position(|p| *p == first) {
        order.rotate_left(i);
    }
    let mut last = String::from("no provider");
    for peer in order {
        let token = match cached_or_fetch(inner, peer, service, &api_key).await {
            Ok(t) => t,
            Err(r) => {
                debug!(peer = %peer.fmt_short(), service, reason = %r, "token refused");
                last = r.to_string();
                continue;
            }
        };
        let conn = match inner.conn_to(peer).await {
            Ok(c) => c,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        let kind = StreamKind::ForwardAuth {
            service: service.to_owned(),
            token: token.expose().to_owned(),
        };
        return super::open_stream(inner, &conn, peer, kind).await;
    }
    Err(ForwardError::Unauthorized {
        service: service.to_owned(),
        reason: last,
    })
}

// -----------------------------------------------------------------------------------------
// Serving peers

async fn read_request(
    inner: &Arc<Inner>,
    peer: &CertInfo,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Option<Zeroizing<Vec<u8>>> {
    match timeout(inner.transport.header_timeout, wire::io::read_frame(recv)).await {
        Ok(Ok(b)) => Some(Zeroizing::new(b)),
        Ok(Err(e)) => {
            stats::inc(&inner.stats.stream_errors);
            warn!(peer = %peer.node_id.fmt_short(), error = %e, "bad request frame");
            reset(send, recv, e.code());
            None
        }
        Err(_) => {
            stats::inc(&inner.stats.stream_errors);
            reset(send, recv, code::HEADER_TIMEOUT);
            None
        }
    }
}

/// Reads one request frame and decodes it; on failure resets the stream (with the decoder's
/// code) and returns None.
async fn read_decoded<T>(
    inner: &Arc<Inner>,
    peer: &CertInfo,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    decode: impl FnOnce(&[u8]) -> Result<T, wire::WireError>,
    what: &str,
) -> Option<T> {
    let body = read_request(inner, peer, send, recv).await?;
    match decode(&body) {
        Ok(v) => Some(v),
        Err(e) => {
            stats::inc(&inner.stats.stream_errors);
            warn!(peer = %peer.node_id.fmt_short(), error = %e, "bad {what}");
            reset(send, recv, e.code());
            None
        }
    }
}

async fn reply<T: Serialize>(send: &mut quinn::SendStream, msg: &T) {
    match wire::encode_frame(msg) {
        Ok(frame) => {
            let frame = Zeroizing::new(frame);
            if send.write_all(&frame).await.is_ok() {
                let _ = send.finish();
            }
        }
        Err(e) => warn!(error = %e, "reply too large"),
    }
}

pub(super) async fn serve_token_request(
    inner: &Arc<Inner>,
    peer: &CertInfo,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let Some(req) = read_decoded(
        inner,
        peer,
        &mut send,
        &mut recv,
        wire::decode_token_request,
        "token request",
    )
    .await
    else {
        return;
    };
    let api_key = Zeroizing::new(req.api_key);
    let caller = Caller::from(peer);
    let r =
        read(&inner.auth).issue_token(&caller, &req.service, &api_key, &req.scope, now_unix_ms());
    let answer = match r {
        Ok(t) => TokenReply::Granted {
            token: t.token.expose().to_owned(),
            expires_at: t.claims.exp,
        },
        Err(r) => TokenReply::Refused(refused_of(&r)),
    };
    reply(&mut send, &answer).await;
    if let TokenReply::Granted { token, .. } = answer {
        drop(Zeroizing::new(token));
    }
}

pub(super) async fn serve_discover(
    inner: &Arc<Inner>,
    peer: &CertInfo,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let Some(req) = read_decoded(
        inner,
        peer,
        &mut send,
        &mut recv,
        wire::decode_discover_request,
        "discovery request",
    )
    .await
    else {
        return;
    };
    let credential = Zeroizing::new(req.credential);
    let caller = Caller::from(peer);
    let r = read(&inner.auth).discover(&caller, &req.service, &credential, now_unix_ms());
    let answer = match r {
        Ok(g) => DiscoverReply::Instance(Instance {
            node_id: inner.info.node_id,
            name: inner.info.name.clone(),
            addr: inner.me.addr,
            scopes: g.scopes,
            require_token: g.require_token,
        }),
        Err(r) => DiscoverReply::Refused(refused_of(&r)),
    };
    reply(&mut send, &answer).await;
}

pub(super) async fn serve_revocations(
    inner: &Arc<Inner>,
    peer: &CertInfo,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let Some(batch) = read_decoded(
        inner,
        peer,
        &mut send,
        &mut recv,
        wire::decode_revocations,
        "revocation batch",
    )
    .await
    else {
        return;
    };
    let _ = send.finish();
    let mut fresh = Vec::new();
    for r in &batch.records {
        match apply_one(inner, r) {
            Ok(Some(_)) => fresh.push(r.clone()),
            Ok(None) => {}
            Err(e) => warn!(peer = %peer.node_id.fmt_short(), error = %e, "revocation refused"),
        }
    }
    if !fresh.is_empty() {
        if let Err(e) = persist(inner) {
            error!(error = %e, "revocation not persisted");
        }
        gossip(inner, fresh, Some(peer.node_id));
    }
}

// -----------------------------------------------------------------------------------------
// Revocation

/// Verifies and applies one record; enforces it if new (no persistence, no gossip).
fn apply_one(
    inner: &Arc<Inner>,
    signed: &SignedRevocation,
) -> Result<Option<Revocation>, RevocationError> {
    let r = write(&inner.auth).apply_revocation(signed)?;
    if let Some(rev) = &r {
        enforce(inner, rev);
    }
    Ok(r)
}

/// Applies a record, persists and spreads it if it was new.
fn apply_signed(
    inner: &Arc<Inner>,
    signed: &SignedRevocation,
    from: Option<NodeId>,
) -> Result<Option<Revocation>, RevocationError> {
    let r = apply_one(inner, signed)?;
    if r.is_some() {
        if let Err(e) = persist(inner) {
            error!(error = %e, "revocation not persisted");
        }
        gossip(inner, vec![signed.clone()], from);
    }
    Ok(r)
}

/// Enforces a revocation: deny-set, close live connections, forget the node.
fn enforce(inner: &Arc<Inner>, rev: &Revocation) {
    match &rev.target {
        RevocationTarget::Node(id) => inner.deny.deny_node(*id),
        RevocationTarget::Serial(s) => inner.deny.deny_serial(s),
    }
    let victims: Vec<(quinn::Connection, CertInfo)> = lock(&inner.all_conns)
        .values()
        .filter(|(_, info)| rev.target.covers(info))
        .cloned()
        .collect();
    let mut ids: Vec<NodeId> = victims.iter().map(|(_, i)| i.node_id).collect();
    for (c, info) in victims {
        info!(peer = %info.node_id.fmt_short(), "closing connection of a revoked peer");
        c.close(quinn::VarInt::from_u32(code::AUTH_FAILED), b"revoked");
    }
    if let RevocationTarget::Node(id) = &rev.target {
        ids.push(*id);
    }
    ids.sort();
    ids.dedup();
    for id in ids {
        if id == inner.info.node_id {
            error!("this node's own certificate was revoked");
            continue;
        }
        lock(&inner.conns).remove(&id);
        let was = write(&inner.alive).remove(&id).is_some();
        if write(&inner.catalog).remove_peer(id) {
            inner.catalog_version.send_modify(|v| *v += 1);
        }
        if was {
            let n = read(&inner.alive).len();
            inner.members.send_replace(n);
        }
        lock(&inner.upstream_tokens).retain(|(p, _), _| *p != id);
    }
}

/// Sends records to every live member (except `except`), in frames of at most
/// [`MAX_REVOCATIONS_PER_FRAME`].
fn gossip(inner: &Arc<Inner>, records: Vec<SignedRevocation>, except: Option<NodeId>) {
    let members: Vec<NodeId> = read(&inner.alive)
        .keys()
        .copied()
        .filter(|m| Some(*m) != except)
        .collect();
    for m in members {
        push_revocations(inner, m, records.clone());
    }
}

fn push_revocations(inner: &Arc<Inner>, to: NodeId, records: Vec<SignedRevocation>) {
    if records.is_empty() || inner.deny.is_node_denied(&to) {
        return;
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        for chunk in records.chunks(MAX_REVOCATIONS_PER_FRAME) {
            let batch = RevocationBatch {
                records: chunk.to_vec(),
            };
            let r = async {
                let conn = inner.conn_to(to).await.map_err(|e| e.to_string())?;
                let (mut send, _recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                let header = wire::encode_header(&StreamHeader {
                    kind: StreamKind::Revocations,
                    request_id: inner
                        .next_request_id
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                });
                let frame = wire::encode_frame(&batch).map_err(|e| e.to_string())?;
                send.write_all(&header).await.map_err(|e| e.to_string())?;
                send.write_all(&frame).await.map_err(|e| e.to_string())?;
                let _ = send.finish();
                let _ = send.stopped().await;
                Ok::<(), String>(())
            };
            if let Err(e) = r.await {
                debug!(peer = %to.fmt_short(), error = %e, "revocation push failed");
            }
        }
    });
}

/// A member came up: give it every revocation we hold (it does the same for us).
pub(super) fn on_member_up(inner: &Arc<Inner>, id: NodeId) {
    let records: Vec<SignedRevocation> = read(&inner.auth)
        .revocations()
        .iter()
        .map(|(_, s)| s.clone())
        .collect();
    push_revocations(inner, id, records);
}

// -----------------------------------------------------------------------------------------
// Catalog push that waits (deregistration reports who was not told)

async fn push_catalog_to_all_and_wait(inner: &Arc<Inner>) -> Vec<(NodeId, String)> {
    // Gossip the signed snapshot too: only signed entries are handed on to joiners.
    super::catalog_sync::announce_own(inner);
    let snap = read(&inner.catalog).snapshot();
    let frame = match wire::encode_frame(&snap) {
        Ok(f) => Arc::new(f),
        Err(e) => return vec![(inner.info.node_id, e.to_string())],
    };
    let members: Vec<NodeId> = read(&inner.alive).keys().copied().collect();
    let pushes = members.into_iter().map(|m| {
        let inner = inner.clone();
        let frame = frame.clone();
        async move {
            let r = timeout(Duration::from_secs(3), push_catalog(&inner, m, frame)).await;
            match r {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some((m, e)),
                Err(_) => Some((m, "timed out".to_string())),
            }
        }
    });
    futures::future::join_all(pushes)
        .await
        .into_iter()
        .flatten()
        .collect()
}

// -----------------------------------------------------------------------------------------
// Housekeeping and certificate renewal

pub(super) async fn housekeeping(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = now_unix_ms();
        write(&inner.auth).maintain(now);
        let secs = now / 1000;
        lock(&inner.upstream_tokens).retain(|_, (_, refresh_at)| secs < *refresh_at);
    }
}

fn lifetime_fraction(info: &CertInfo, now: i64) -> f64 {
    let total = (info.not_after_unix - info.not_before_unix).max(1) as f64;
    ((now - info.not_before_unix) as f64 / total).clamp(0.0, 2.0)
}

pub(super) async fn renewal_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(inner.auth_settings.renew_check_interval);
    loop {
        tick.tick().await;
        let info = read(&inner.identity).info.clone();
        let now = now_unix();
        stats::set(
            &inner.stats.cert_expires_in,
            (info.not_after_unix - now).max(0) as u64,
        );
        if lifetime_fraction(&info, now) < inner.auth_settings.renew_at_fraction {
            continue;
        }
        if inner.auth_settings.issuer.is_none() {
            let hours = (info.not_after_unix - now) / 3600;
            error!(
                expires_in_hours = hours,
                serial = %info.serial,
                "node certificate is past {:.0}% of its lifetime and this node has no issuer (ca_key) to renew it: issue a new certificate (meshd ca issue) and restart before it expires",
                inner.auth_settings.renew_at_fraction * 100.0
            );
            continue;
        }
        match renew(&inner) {
            Ok(new) => {
                info!(serial = %new.serial, not_after = new.not_after_unix, "node certificate renewed")
            }
            Err(e) => error!(error = %e, "node certificate renewal failed; will retry"),
        }
    }
}

/// Issues a new certificate for the node's key and swaps the TLS configs. Existing
/// connections are not touched; new handshakes present the new certificate.
fn renew(inner: &Arc<Inner>) -> Result<CertInfo, String> {
    let ca = inner
        .auth_settings
        .issuer
        .as_ref()
        .ok_or("no issuer (ca_key) configured")?;
    let old = read(&inner.identity).clone();
    let days =
        ((old.info.not_after_unix - old.info.not_before_unix) / 86_400).clamp(1, 36_500) as u32;
    let now = time::OffsetDateTime::from_unix_timestamp(now_unix()).map_err(|e| e.to_string())?;
    let validity = Validity::days_from(now, days).map_err(|e| e.to_string())?;
    let pem = crate::identity::renew_node_cert_der(
        ca,
        old.key.secret_der(),
        &old.info.name,
        &old.info.groups,
        validity,
    )
    .map_err(|e| e.to_string())?;
    let chain = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let leaf = chain.first().ok_or("renewed certificate missing")?;
    let info = crate::identity::parse_node_cert(leaf).map_err(|e| e.to_string())?;
    if info.node_id != old.info.node_id {
        return Err("renewed certificate has another node id".into());
    }
    let new_identity = NodeIdentity {
        chain,
        key: old.key.clone_key(),
        info: info.clone(),
        ca: old.ca.clone(),
    };
    let server_tls =
        tls::server_config(&new_identity, inner.tls_settings.clone()).map_err(|e| e.to_string())?;
    let quic_server =
        quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).map_err(|e| e.to_string())?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_server));
    server_config.transport_config(inner.transport_config.clone());
    let client_tls =
        tls::client_config(&new_identity, inner.tls_settings.clone()).map_err(|e| e.to_string())?;
    let quic_client =
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).map_err(|e| e.to_string())?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(quic_client));
    client_config.transport_config(inner.transport_config.clone());
    inner.endpoint.set_server_config(Some(server_config));
    *write(&inner.client_config) = client_config;
    *write(&inner.identity) = new_identity;
    stats::inc(&inner.stats.cert_renewals);
    if let Some(sink) = &inner.auth_settings.on_cert_renewed {
        sink(&pem);
    }
    Ok(info)
}
