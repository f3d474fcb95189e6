//! Service authentication: API keys, tokens, policies, rate limits, revocations, the
//! credential store and the audit trail.
//!
//! Everything here is sans-IO and clock-free: [`Authority`] is fed the caller that mTLS
//! authenticated and `now` (Unix milliseconds) and answers with a decision; the driver
//! ([`crate::node`]) moves bytes, persists the store and reads the clock. See docs/AUTH.md for
//! the design and the formats.
//!
//! - [`keys`]: API keys (`mk_<id>_<secret>`), HMAC-SHA256 hashes, constant-time checks.
//! - [`tokens`]: JWTs (EdDSA default, HS256 optional), rotation, JWKS, `jti` deny-list.
//! - [`policy`]: who may obtain which scopes of a service.
//! - [`limits`]: governor rate limits on an injected clock.
//! - [`revocation`]: CA-signed node/certificate revocations.
//! - [`store`]: the persistent credential store, backup and restore.
//! - [`audit`]: audit events (log target `meshd::audit` and counters).
//! - [`secret`]: zeroizing, redacting secret types.

pub mod audit;
pub mod keys;
pub mod limits;
pub mod policy;
pub mod revocation;
pub mod secret;
pub mod store;
pub mod tokens;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::identity::{CaMaterial, NodeId};
use crate::stats::{self, Stats};
use audit::{AuditEvent, AuditKind};
use keys::{ApiKeyRecord, KeyHasher, KeyId, KeyRefusal};
use limits::{LimitKind, LimitRefusal, LimitSettings, Limiters};
use policy::{Caller, Policy, PolicyRefusal};
use revocation::{Revocation, RevocationError, RevocationSet, SignedRevocation, TextRevocation};
use secret::{SecretBytes, SecretString};
use store::{Revoked, ServiceRecord, StoreFile, STORE_VERSION};
use tokens::{Claims, IssuedToken, TokenAuthority, TokenRefusal, TokenSettings};

/// Most API keys per service.
pub const MAX_KEYS_PER_SERVICE: usize = 64;
/// Entries of the token verification cache (forwarding hot path); cleared when full.
pub const VERIFY_CACHE_SIZE: usize = 8192;

/// A registration step, for fault injection in tests (see [`AuthSettings`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegistrationStep {
    /// The service and its first API key are stored in memory.
    StoreCredentials,
    /// Its policy is set.
    SetPolicy,
    /// The credential store is written to disk.
    Persist,
    /// The catalog entry is published (before it is pushed to peers).
    Announce,
}

impl RegistrationStep {
    /// All steps, in order.
    pub const ALL: [RegistrationStep; 4] = [
        RegistrationStep::StoreCredentials,
        RegistrationStep::SetPolicy,
        RegistrationStep::Persist,
        RegistrationStep::Announce,
    ];
}

/// Hook called with a renewed certificate (PEM) so the daemon can write it to disk.
pub type CertSink = Arc<dyn Fn(&str) + Send + Sync>;

/// Authentication settings of a node.
#[derive(Clone)]
pub struct AuthSettings {
    /// Token lifetime, leeway and algorithms.
    pub tokens: TokenSettings,
    /// Rate limits.
    pub limits: LimitSettings,
    /// Where the credential store lives (None: in memory only, e.g. tests and the simulator).
    pub state_dir: Option<PathBuf>,
    /// Policies of services published from the configuration (default policy otherwise).
    pub service_policies: BTreeMap<String, Policy>,
    /// API keys used to obtain tokens for `[[upstream]]` services (and
    /// [`crate::Node::open_service_stream`]), by service name.
    pub upstream_keys: BTreeMap<String, SecretString>,
    /// Extra Ed25519 public keys (besides the overlay CA's) whose revocations are accepted.
    pub trusted_revokers: Vec<[u8; 32]>,
    /// The CA (certificate and key) if this node is an issuer: it can then sign revocations
    /// and renew its own certificate.
    pub issuer: Option<Arc<CaMaterial>>,
    /// Renew the node certificate once this fraction of its lifetime has passed. Default 0.7.
    pub renew_at_fraction: f64,
    /// How often the certificate's age is checked (tokio time). Default 1 h.
    pub renew_check_interval: std::time::Duration,
    /// Called with each renewed certificate (PEM).
    pub on_cert_renewed: Option<CertSink>,
    /// Default overlap window when an API key is retired, seconds. Default 3600.
    pub key_overlap_secs: u64,
    /// Testing only: make registrations fail right after this step (to prove rollback).
    pub test_fail_registration_after: Option<RegistrationStep>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            tokens: TokenSettings::default(),
            limits: LimitSettings::default(),
            state_dir: None,
            service_policies: BTreeMap::new(),
            upstream_keys: BTreeMap::new(),
            trusted_revokers: Vec::new(),
            issuer: None,
            renew_at_fraction: 0.7,
            renew_check_interval: std::time::Duration::from_secs(3600),
            on_cert_renewed: None,
            key_overlap_secs: 3600,
            test_fail_registration_after: None,
        }
    }
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSettings")
            .field("tokens", &self.tokens)
            .field("limits", &self.limits)
            .field("state_dir", &self.state_dir)
            .field("service_policies", &self.service_policies)
            .field(
                "upstream_keys",
                &self.upstream_keys.keys().collect::<Vec<_>>(),
            )
            .field("issuer", &self.issuer.is_some())
            .field("renew_at_fraction", &self.renew_at_fraction)
            .finish_non_exhaustive()
    }
}

/// Why a request was refused. Each maps to an HTTP status and a wire refusal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The service is not registered on this node.
    #[error("no such service here")]
    NotFound,
    /// The API key was refused.
    #[error("{0}")]
    BadKey(KeyRefusal),
    /// The token was refused.
    #[error("{0}")]
    BadToken(TokenRefusal),
    /// The policy refused.
    #[error("{0}")]
    Policy(PolicyRefusal),
    /// A rate limit refused.
    #[error("{0}")]
    RateLimited(LimitRefusal),
    /// Something failed locally (never the caller's fault).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Refusal {
    /// HTTP status: 404, 401, 403, 429 or 500.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::NotFound => 404,
            Refusal::BadKey(_) | Refusal::BadToken(_) => 401,
            Refusal::Policy(_) => 403,
            Refusal::RateLimited(_) => 429,
            Refusal::Internal(_) => 500,
        }
    }

    /// Milliseconds until a rate-limited caller may retry.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            Refusal::RateLimited(l) => Some(l.retry_after_ms),
            _ => None,
        }
    }
}

/// Errors of administrative changes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The service is already registered.
    #[error("service {0:?} is already registered")]
    Exists(String),
    /// The service is not registered.
    #[error("service {0:?} is not registered")]
    NoService(String),
    /// No such API key.
    #[error("no API key {0} on this service")]
    NoKey(String),
    /// Invalid input.
    #[error("{0}")]
    Invalid(String),
    /// A limit was reached.
    #[error("{0}")]
    Full(String),
    /// A failure injected by `test_fail_registration_after`, or a failed step.
    #[error("registration failed at {0}")]
    StepFailed(String),
}

/// A service's authentication state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAuth {
    /// Policy.
    pub policy: Policy,
    /// API keys (hashes).
    pub keys: Vec<ApiKeyRecord>,
    /// Registered at, Unix seconds.
    pub registered_at: u64,
    /// Backend, for services registered through the API (persisted).
    pub backend: Option<SocketAddr>,
}

/// The result of a successful discovery check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryGrant {
    /// Scopes the caller may obtain.
    pub scopes: Vec<String>,
    /// Whether forwarded streams need a token.
    pub require_token: bool,
}

/// The authentication core of one node. `&self` methods are the request path (callable
/// concurrently under a read lock); `&mut self` methods change state and must be followed by
/// persisting [`Authority::to_store`].
pub struct Authority {
    node_id: NodeId,
    stats: Arc<Stats>,
    hasher: KeyHasher,
    tokens: TokenAuthority,
    services: BTreeMap<String, ServiceAuth>,
    retired_keys: BTreeMap<KeyId, u64>,
    cutoffs: BTreeMap<String, u64>,
    revocations: RevocationSet,
    trusted: Vec<[u8; 32]>,
    limits: Limiters,
    verified: Mutex<HashMap<[u8; 32], Claims>>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("node_id", &self.node_id)
            .field("services", &self.services.keys().collect::<Vec<_>>())
            .field("tokens", &self.tokens)
            .field("revocations", &self.revocations.len())
            .finish_non_exhaustive()
    }
}

fn token_digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl Authority {
    /// A fresh authority (new HMAC key and signing key), or one restored from `store`.
    /// Revocation records in the store are re-verified against `trusted`.
    pub fn new(
        node_id: NodeId,
        settings: &AuthSettings,
        trusted: Vec<[u8; 32]>,
        store: Option<&StoreFile>,
        stats: Arc<Stats>,
        now_ms: u64,
    ) -> Result<Self, String> {
        let now = now_ms / 1000;
        let issuer = node_id.to_string();
        let limits = Limiters::new(settings.limits, now_ms);
        let l = &settings.limits;
        stats::set(
            &stats.limit_caller_service_rate,
            u64::from(l.per_caller_service.per_second),
        );
        stats::set(
            &stats.limit_caller_service_burst,
            u64::from(l.per_caller_service.burst),
        );
        stats::set(
            &stats.limit_service_rate,
            u64::from(l.per_service.per_second),
        );
        stats::set(&stats.limit_service_burst, u64::from(l.per_service.burst));
        stats::set(
            &stats.limit_failed_auth_rate,
            u64::from(l.failed_auth_per_caller.per_second),
        );
        stats::set(
            &stats.limit_failed_auth_burst,
            u64::from(l.failed_auth_per_caller.burst),
        );
        let mut me = match store {
            None => Self {
                node_id,
                stats,
                hasher: KeyHasher::generate(),
                tokens: TokenAuthority::new(issuer, settings.tokens.clone(), now)
                    .map_err(|e| e.to_string())?,
                services: BTreeMap::new(),
                retired_keys: BTreeMap::new(),
                cutoffs: BTreeMap::new(),
                revocations: RevocationSet::default(),
                trusted,
                limits,
                verified: Mutex::new(HashMap::new()),
            },
            Some(s) => {
                if s.node_id != issuer {
                    return Err(format!(
                        "credential store belongs to node {}, this node is {issuer}",
                        s.node_id
                    ));
                }
                let secret = SecretBytes::from_b64(s.hmac_secret.expose())
                    .filter(|b| b.expose().len() >= 32)
                    .ok_or("credential store: invalid hmac_secret")?;
                let mut tokens = TokenAuthority::from_stored(
                    issuer,
                    settings.tokens.clone(),
                    &s.signing_keys,
                    now,
                )
                .map_err(|e| e.to_string())?;
                for (jti, until) in &s.revoked.jtis {
                    tokens
                        .deny_jti(jti, *until, now)
                        .map_err(|e| e.to_string())?;
                }
                let mut revocations = RevocationSet::default();
                for r in &s.revoked.nodes {
                    match r.0.verify(&trusted) {
                        Ok(rev) => {
                            revocations.insert(rev, r.0.clone());
                        }
                        Err(e) => return Err(format!("credential store: revocation record: {e}")),
                    }
                }
                Self {
                    node_id,
                    stats,
                    hasher: KeyHasher::from_secret(secret),
                    tokens,
                    services: s
                        .services
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                ServiceAuth {
                                    policy: v.policy.clone(),
                                    keys: v.keys.clone(),
                                    registered_at: v.registered_at,
                                    backend: v.backend,
                                },
                            )
                        })
                        .collect(),
                    retired_keys: s.revoked.keys.clone(),
                    cutoffs: s.revoked.service_cutoffs.clone(),
                    revocations,
                    trusted,
                    limits,
                    verified: Mutex::new(HashMap::new()),
                }
            }
        };
        me.apply_key_retirements();
        Ok(me)
    }

    fn apply_key_retirements(&mut self) {
        for svc in self.services.values_mut() {
            for k in &mut svc.keys {
                if let Some(&t) = self.retired_keys.get(&k.key_id) {
                    k.not_after = Some(k.not_after.map_or(t, |x| x.min(t)));
                }
            }
        }
    }

    /// The store document for the current state.
    pub fn to_store(&self) -> StoreFile {
        StoreFile {
            version: STORE_VERSION,
            node_id: self.node_id.to_string(),
            hmac_secret: self.hasher.secret().to_b64(),
            signing_keys: self.tokens.stored(),
            services: self
                .services
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        ServiceRecord {
                            backend: v.backend,
                            policy: v.policy.clone(),
                            keys: v.keys.clone(),
                            registered_at: v.registered_at,
                        },
                    )
                })
                .collect(),
            revoked: Revoked {
                nodes: self
                    .revocations
                    .iter()
                    .map(|(_, s)| TextRevocation(s.clone()))
                    .collect(),
                jtis: self
                    .tokens
                    .denied_jtis()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect(),
                keys: self.retired_keys.clone(),
                service_cutoffs: self.cutoffs.clone(),
            },
        }
    }

    /// The stats this authority counts into.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The token authority (JWKS, settings).
    pub fn tokens(&self) -> &TokenAuthority {
        &self.tokens
    }

    /// The rate limiters.
    pub fn limits(&self) -> &Limiters {
        &self.limits
    }

    /// A registered service.
    pub fn service(&self, name: &str) -> Option<&ServiceAuth> {
        self.services.get(name)
    }

    /// Registered service names.
    pub fn service_names(&self) -> Vec<String> {
        self.services.keys().cloned().collect()
    }

    /// Verified revocations held.
    pub fn revocations(&self) -> &RevocationSet {
        &self.revocations
    }

    /// Trusted revocation signers.
    pub fn trusted_revokers(&self) -> &[[u8; 32]] {
        &self.trusted
    }

    fn audit(&self, kind: AuditKind, ev: AuditEvent<'_>) {
        audit::record(&self.stats, kind, ev);
    }

    fn limited(&self, caller: &Caller, service: &str, l: LimitRefusal) -> Refusal {
        stats::inc(match l.kind {
            LimitKind::CallerService => &self.stats.rate_limited_caller_service,
            LimitKind::Service => &self.stats.rate_limited_service,
            LimitKind::FailedAuth => &self.stats.rate_limited_failed_auth,
        });
        self.audit(
            AuditKind::RateLimited,
            AuditEvent {
                caller: Some(caller.node_id),
                service: Some(service),
                reason: Some(l.kind.as_str()),
                ..Default::default()
            },
        );
        Refusal::RateLimited(l)
    }

    fn failed(&self, caller: &Caller, service: &str, r: Refusal, now_ms: u64) -> Refusal {
        self.audit(
            AuditKind::AuthFailure,
            AuditEvent {
                caller: Some(caller.node_id),
                service: Some(service),
                reason: Some(&r.to_string()),
                ..Default::default()
            },
        );
        // The failure that spends the budget is still answered as what it was; the next
        // attempt meets the lockout.
        let _ = self.limits.record_failure(&caller.node_id, now_ms);
        r
    }

    /// Gate of every authenticated request: failure lockout, service exists, request limits.
    fn admit(&self, caller: &Caller, service: &str, now_ms: u64) -> Result<&ServiceAuth, Refusal> {
        if let Err(l) = self.limits.check_lockout(&caller.node_id, now_ms) {
            return Err(self.limited(caller, service, l));
        }
        let Some(svc) = self.services.get(service) else {
            return Err(self.failed(caller, service, Refusal::NotFound, now_ms));
        };
        if let Err(l) = self.limits.check_request(&caller.node_id, service, now_ms) {
            return Err(self.limited(caller, service, l));
        }
        Ok(svc)
    }

    fn check_key_of(
        &self,
        svc: &ServiceAuth,
        api_key: &str,
        now: u64,
    ) -> Result<KeyId, KeyRefusal> {
        keys::check(&self.hasher, &svc.keys, api_key, now)
    }

    /// Checks an API key of `service` (no limits, no audit; for the admin API's own use).
    pub fn check_key(&self, service: &str, api_key: &str, now_ms: u64) -> Result<KeyId, Refusal> {
        let svc = self.services.get(service).ok_or(Refusal::NotFound)?;
        self.check_key_of(svc, api_key, now_ms / 1000)
            .map_err(Refusal::BadKey)
    }

    /// `POST /v1/tokens` and the peer-to-peer token request: a token for `caller` to
    /// `service` with `scope`, given a valid API key of the service.
    pub fn issue_token(
        &self,
        caller: &Caller,
        service: &str,
        api_key: &str,
        scope: &str,
        now_ms: u64,
    ) -> Result<IssuedToken, Refusal> {
        let now = now_ms / 1000;
        let svc = self.admit(caller, service, now_ms)?;
        let key_id = match self.check_key_of(svc, api_key, now) {
            Ok(k) => k,
            Err(r) => return Err(self.failed(caller, service, Refusal::BadKey(r), now_ms)),
        };
        self.audit(
            AuditKind::AuthSuccess,
            AuditEvent {
                caller: Some(caller.node_id),
                service: Some(service),
                key_id: Some(key_id.as_str()),
                ..Default::default()
            },
        );
        if let Err(p) = svc.policy.decide(caller, scope) {
            self.audit(
                AuditKind::PolicyDenied,
                AuditEvent {
                    caller: Some(caller.node_id),
                    service: Some(service),
                    scope: Some(scope),
                    reason: Some(&p.to_string()),
                    ..Default::default()
                },
            );
            return Err(Refusal::Policy(p));
        }
        let t = self
            .tokens
            .issue(&caller.node_id.to_string(), service, scope, now)
            .map_err(|e| Refusal::Internal(e.to_string()))?;
        self.audit(
            AuditKind::TokenIssued,
            AuditEvent {
                caller: Some(caller.node_id),
                service: Some(service),
                key_id: Some(key_id.as_str()),
                jti: Some(&t.claims.jti),
                scope: Some(scope),
                reason: Some(&t.kid),
            },
        );
        Ok(t)
    }

    fn check_token_state(&self, c: &Claims) -> Result<(), TokenRefusal> {
        if !self.services.contains_key(&c.aud) {
            return Err(TokenRefusal::Revoked);
        }
        if self.cutoffs.get(&c.aud).is_some_and(|cut| c.iat < *cut) {
            return Err(TokenRefusal::Revoked);
        }
        if self.tokens.is_jti_denied(&c.jti) {
            return Err(TokenRefusal::Revoked);
        }
        Ok(())
    }

    /// `POST /v1/tokens/verify`: full verification of a token issued here (signature,
    /// algorithm, kid, iss, exp, nbf, deny-list, service still registered).
    pub fn verify_token(&self, token: &str, now_ms: u64) -> Result<Claims, TokenRefusal> {
        let c = self.tokens.verify(token, now_ms / 1000)?;
        self.check_token_state(&c)?;
        Ok(c)
    }

    /// Verification with a cache keyed by the token's SHA-256: signature checks happen once
    /// per token; expiry, deny-list and service state are re-checked on every hit.
    fn verify_cached(&self, token: &str, now_ms: u64) -> Result<(Claims, bool), TokenRefusal> {
        let now = now_ms / 1000;
        let digest = token_digest(token);
        let hit = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&digest)
            .cloned();
        if let Some(c) = hit {
            if now > c.exp.saturating_add(self.tokens.settings().leeway_secs) {
                return Err(TokenRefusal::Expired);
            }
            self.check_token_state(&c)?;
            return Ok((c, true));
        }
        let c = self.verify_token(token, now_ms)?;
        let mut cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= VERIFY_CACHE_SIZE {
            cache.clear();
        }
        cache.insert(digest, c.clone());
        Ok((c, false))
    }

    /// Checks the token of a forwarded stream: valid, for `service`, issued to `caller`,
    /// with scope `connect`. Cached (see [`VERIFY_CACHE_SIZE`]).
    pub fn authorize_forward(
        &self,
        caller: &Caller,
        service: &str,
        token: &str,
        now_ms: u64,
    ) -> Result<Claims, Refusal> {
        let r = self.verify_cached(token, now_ms).and_then(|(c, hit)| {
            if c.aud != service {
                return Err(TokenRefusal::WrongAudience);
            }
            if c.sub != caller.node_id.to_string() {
                return Err(TokenRefusal::WrongSubject);
            }
            Ok((c, hit))
        });
        match r {
            Ok((c, hit)) => {
                if c.scope != policy::SCOPE_CONNECT {
                    return Err(Refusal::Policy(PolicyRefusal::Denied));
                }
                if !hit {
                    self.audit(
                        AuditKind::AuthSuccess,
                        AuditEvent {
                            caller: Some(caller.node_id),
                            service: Some(service),
                            jti: Some(&c.jti),
                            scope: Some(&c.scope),
                            ..Default::default()
                        },
                    );
                }
                Ok(c)
            }
            Err(t) => Err(self.failed(caller, service, Refusal::BadToken(t), now_ms)),
        }
    }

    /// Authenticated discovery: `credential` is an API key of the service or a token for it
    /// issued to `caller`. Returns the scopes the caller may use.
    pub fn discover(
        &self,
        caller: &Caller,
        service: &str,
        credential: &str,
        now_ms: u64,
    ) -> Result<DiscoveryGrant, Refusal> {
        let now = now_ms / 1000;
        let svc = self.admit(caller, service, now_ms)?;
        let checked = if keys::looks_like_api_key(credential) {
            self.check_key_of(svc, credential, now)
                .map(|k| (Some(k), None))
                .map_err(Refusal::BadKey)
        } else {
            self.verify_token(credential, now_ms)
                .and_then(|c| {
                    if c.aud != service {
                        Err(TokenRefusal::WrongAudience)
                    } else if c.sub != caller.node_id.to_string() {
                        Err(TokenRefusal::WrongSubject)
                    } else {
                        Ok((None, Some(c.jti)))
                    }
                })
                .map_err(Refusal::BadToken)
        };
        let (key_id, jti) = match checked {
            Ok(x) => x,
            Err(r) => return Err(self.failed(caller, service, r, now_ms)),
        };
        self.audit(
            AuditKind::AuthSuccess,
            AuditEvent {
                caller: Some(caller.node_id),
                service: Some(service),
                key_id: key_id.as_ref().map(KeyId::as_str),
                jti: jti.as_deref(),
                reason: Some("discovery"),
                ..Default::default()
            },
        );
        let scopes = svc.policy.allowed_scopes(caller);
        if scopes.is_empty() {
            self.audit(
                AuditKind::PolicyDenied,
                AuditEvent {
                    caller: Some(caller.node_id),
                    service: Some(service),
                    reason: Some("discovery"),
                    ..Default::default()
                },
            );
            return Err(Refusal::Policy(PolicyRefusal::Denied));
        }
        Ok(DiscoveryGrant {
            scopes,
            require_token: svc.policy.require_token,
        })
    }

    /// Whether forwarded streams to `service` need a token.
    pub fn requires_token(&self, service: &str) -> bool {
        self.services
            .get(service)
            .is_some_and(|s| s.policy.require_token)
    }

    // -----------------------------------------------------------------------------------
    // Changes (the driver persists after each).

    /// Registration step 1: adds a service with a first API key and a deny-all policy
    /// (step 2 sets the real one). Returns the key, shown once.
    pub fn add_service(
        &mut self,
        name: &str,
        backend: Option<SocketAddr>,
        now_ms: u64,
    ) -> Result<(KeyId, SecretString), AdminError> {
        if !crate::identity::valid_name(name) {
            return Err(AdminError::Invalid(format!(
                "invalid service name {name:?}"
            )));
        }
        if self.services.contains_key(name) {
            return Err(AdminError::Exists(name.to_owned()));
        }
        if self.services.len() >= crate::wire::MAX_SERVICES_PER_PEER {
            return Err(AdminError::Full("too many services".into()));
        }
        let now = now_ms / 1000;
        let (key, rec) = keys::generate(&self.hasher, now);
        let id = rec.key_id.clone();
        self.services.insert(
            name.to_owned(),
            ServiceAuth {
                policy: Policy {
                    deny_by_default: true,
                    ..Policy::default()
                },
                keys: vec![rec],
                registered_at: now,
                backend,
            },
        );
        Ok((id, key))
    }

    /// Adds a service with no keys (published from the configuration), if absent; sets the
    /// policy either way.
    pub fn ensure_service(
        &mut self,
        name: &str,
        policy: Policy,
        now_ms: u64,
    ) -> Result<(), AdminError> {
        policy.validate().map_err(AdminError::Invalid)?;
        let now = now_ms / 1000;
        self.services
            .entry(name.to_owned())
            .and_modify(|s| s.policy = policy.clone())
            .or_insert(ServiceAuth {
                policy,
                keys: Vec::new(),
                registered_at: now,
                backend: None,
            });
        Ok(())
    }

    /// Registration step 2 (and policy updates): sets a service's policy.
    pub fn set_policy(&mut self, name: &str, policy: Policy) -> Result<(), AdminError> {
        policy.validate().map_err(AdminError::Invalid)?;
        let svc = self
            .services
            .get_mut(name)
            .ok_or_else(|| AdminError::NoService(name.to_owned()))?;
        svc.policy = policy;
        self.clear_verify_cache();
        Ok(())
    }

    /// Rollback of a failed registration: removes every trace of the service, as if it had
    /// never been added (no cutoff or key tombstones are needed: nothing was ever issued).
    pub fn rollback_service(&mut self, name: &str) {
        self.services.remove(name);
        self.limits.remove_service(name);
        self.clear_verify_cache();
    }

    /// Deregistration: removes the service, its keys (tombstoned, so a restore cannot bring
    /// them back), the validity of every token issued for it, and its limiter state.
    pub fn remove_service(&mut self, name: &str, now_ms: u64) -> Option<ServiceAuth> {
        let now = now_ms / 1000;
        let svc = self.services.remove(name)?;
        for k in &svc.keys {
            let e = self.retired_keys.entry(k.key_id.clone()).or_insert(now);
            *e = (*e).min(now);
        }
        self.cutoffs.insert(name.to_owned(), now + 1);
        self.limits.remove_service(name);
        self.clear_verify_cache();
        self.audit(
            AuditKind::Deregistered,
            AuditEvent {
                service: Some(name),
                ..Default::default()
            },
        );
        Some(svc)
    }

    /// A new API key for `service`; the key is returned once and only its hash is kept.
    pub fn create_key(
        &mut self,
        service: &str,
        now_ms: u64,
    ) -> Result<(KeyId, SecretString), AdminError> {
        let svc = self
            .services
            .get_mut(service)
            .ok_or_else(|| AdminError::NoService(service.to_owned()))?;
        let now = now_ms / 1000;
        svc.keys.retain(|k| k.is_active(now));
        if svc.keys.len() >= MAX_KEYS_PER_SERVICE {
            return Err(AdminError::Full(format!(
                "at most {MAX_KEYS_PER_SERVICE} active keys per service"
            )));
        }
        let (key, rec) = keys::generate(&self.hasher, now);
        let id = rec.key_id.clone();
        svc.keys.push(rec);
        self.audit(
            AuditKind::KeyCreated,
            AuditEvent {
                service: Some(service),
                key_id: Some(id.as_str()),
                ..Default::default()
            },
        );
        Ok((id, key))
    }

    /// Retires a key of `service`: it keeps working for `overlap_secs` (rotation), then never
    /// again. Returns when it stops working.
    pub fn retire_key(
        &mut self,
        service: &str,
        key_id: &KeyId,
        overlap_secs: u64,
        now_ms: u64,
    ) -> Result<u64, AdminError> {
        let now = now_ms / 1000;
        let svc = self
            .services
            .get_mut(service)
            .ok_or_else(|| AdminError::NoService(service.to_owned()))?;
        let rec = svc
            .keys
            .iter_mut()
            .find(|k| &k.key_id == key_id)
            .ok_or_else(|| AdminError::NoKey(key_id.to_string()))?;
        let until = now + overlap_secs;
        let until = rec.not_after.map_or(until, |t| t.min(until));
        rec.not_after = Some(until);
        let e = self.retired_keys.entry(key_id.clone()).or_insert(until);
        *e = (*e).min(until);
        self.audit(
            AuditKind::KeyRetired,
            AuditEvent {
                service: Some(service),
                key_id: Some(key_id.as_str()),
                reason: Some(if overlap_secs == 0 {
                    "revoked"
                } else {
                    "retired"
                }),
                ..Default::default()
            },
        );
        Ok(until)
    }

    /// Revokes an API key wherever it is (immediately). Remembered even if unknown, so a
    /// restore cannot re-admit it. Returns the service it belonged to.
    pub fn revoke_key(&mut self, key_id: &KeyId, now_ms: u64) -> Option<String> {
        let now = now_ms / 1000;
        let e = self.retired_keys.entry(key_id.clone()).or_insert(now);
        *e = (*e).min(now);
        let mut found = None;
        for (name, svc) in &mut self.services {
            if let Some(k) = svc.keys.iter_mut().find(|k| &k.key_id == key_id) {
                k.not_after = Some(now);
                found = Some(name.clone());
            }
        }
        self.audit(
            AuditKind::Revoked,
            AuditEvent {
                key_id: Some(key_id.as_str()),
                service: found.as_deref(),
                reason: Some("api_key"),
                ..Default::default()
            },
        );
        found
    }

    /// Revokes a token id until it would have expired anyway (`now + ttl + leeway` when the
    /// token itself is not known).
    pub fn revoke_jti(&mut self, jti: &str, now_ms: u64) -> Result<(), AdminError> {
        if jti.is_empty() || jti.len() > tokens::MAX_JTI_LEN {
            return Err(AdminError::Invalid("malformed jti".into()));
        }
        let now = now_ms / 1000;
        let s = self.tokens.settings();
        let until = now + s.ttl_secs + s.leeway_secs;
        self.tokens
            .deny_jti(jti, until, now)
            .map_err(|e| AdminError::Full(e.to_string()))?;
        self.audit(
            AuditKind::Revoked,
            AuditEvent {
                jti: Some(jti),
                reason: Some("token"),
                ..Default::default()
            },
        );
        Ok(())
    }

    /// Verifies and adds a node/certificate revocation; `Ok(Some)` if it is new.
    pub fn apply_revocation(
        &mut self,
        signed: &SignedRevocation,
    ) -> Result<Option<Revocation>, RevocationError> {
        let rev = match signed.verify(&self.trusted) {
            Ok(r) => r,
            Err(e) => {
                self.audit(
                    AuditKind::RevocationRefused,
                    AuditEvent {
                        reason: Some(&e.to_string()),
                        ..Default::default()
                    },
                );
                return Err(e);
            }
        };
        if !self.revocations.insert(rev.clone(), signed.clone()) {
            return Ok(None);
        }
        let target = rev.target.to_string();
        self.audit(
            AuditKind::Revoked,
            AuditEvent {
                reason: Some(&target),
                caller: match rev.target {
                    revocation::RevocationTarget::Node(id) => Some(id),
                    revocation::RevocationTarget::Serial(_) => None,
                },
                ..Default::default()
            },
        );
        Ok(Some(rev))
    }

    /// Rotates the JWT signing key; returns the new `kid`.
    pub fn rotate_signing_key(&mut self, now_ms: u64) -> Result<String, AdminError> {
        self.tokens
            .rotate(now_ms / 1000)
            .map_err(|e| AdminError::Invalid(e.to_string()))
    }

    /// Replaces state with a restored store (see [`store::merge_restore`]); revocations held
    /// now are kept whatever the backup says.
    pub fn restore(
        &mut self,
        merged: &StoreFile,
        settings: &AuthSettings,
        now_ms: u64,
    ) -> Result<(), String> {
        let mut fresh = Authority::new(
            self.node_id,
            settings,
            self.trusted.clone(),
            Some(merged),
            self.stats.clone(),
            now_ms,
        )?;
        for (rev, signed) in self.revocations.iter() {
            fresh.revocations.insert(rev.clone(), signed.clone());
        }
        for (jti, until) in self.tokens.denied_jtis() {
            let _ = fresh.tokens.deny_jti(jti, *until, now_ms / 1000);
        }
        for (k, t) in &self.retired_keys {
            let e = fresh.retired_keys.entry(k.clone()).or_insert(*t);
            *e = (*e).min(*t);
        }
        for (s, t) in &self.cutoffs {
            let e = fresh.cutoffs.entry(s.clone()).or_insert(*t);
            *e = (*e).max(*t);
        }
        fresh.apply_key_retirements();
        *self = fresh;
        self.audit(AuditKind::Restored, AuditEvent::default());
        Ok(())
    }

    /// Periodic housekeeping: prunes expired signing keys, deny-list entries, cutoffs, and
    /// idle limiter state.
    pub fn maintain(&mut self, now_ms: u64) {
        let now = now_ms / 1000;
        self.tokens.prune(now);
        let s = self.tokens.settings();
        let keep = s.ttl_secs + s.leeway_secs;
        self.cutoffs.retain(|_, t| now <= t.saturating_add(keep));
        self.limits.maintain(now_ms);
        let leeway = s.leeway_secs;
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, c| now <= c.exp.saturating_add(leeway));
    }

    fn clear_verify_cache(&self) {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

#[cfg(test)]
mod tests;
