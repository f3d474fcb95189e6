//! The audit trail: every authentication success and failure, token issue, registration,
//! deregistration, key change, revocation and rate-limit refusal is one structured event on
//! the tracing target `meshd::audit` and one increment of a counter in [`Stats`].
//!
//! Events carry only public identifiers (node ids, service names, key ids, `jti`s, `kid`s) —
//! never an API key, a token, or any secret. Logged at `info` (successes) and `warn`
//! (refusals), so an operator can route the target to its own sink.

use crate::identity::NodeId;
use crate::stats::{self, Stats};

/// Tracing target of audit events.
pub const TARGET: &str = "meshd::audit";

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuditKind {
    /// An API key or token was accepted.
    AuthSuccess,
    /// An API key or token was refused.
    AuthFailure,
    /// A policy refused the caller or scope.
    PolicyDenied,
    /// A token was issued.
    TokenIssued,
    /// A service was registered (committed).
    Registered,
    /// A registration failed and was rolled back.
    RegistrationFailed,
    /// A service was deregistered.
    Deregistered,
    /// An API key was created.
    KeyCreated,
    /// An API key was retired (with its overlap window) or revoked.
    KeyRetired,
    /// A node, certificate, token or key was revoked.
    Revoked,
    /// A revocation record was refused.
    RevocationRefused,
    /// A rate limit refused a request.
    RateLimited,
    /// The credential store was restored from a backup.
    Restored,
}

impl AuditKind {
    /// Stable name (the `event` field).
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::AuthSuccess => "auth_success",
            AuditKind::AuthFailure => "auth_failure",
            AuditKind::PolicyDenied => "policy_denied",
            AuditKind::TokenIssued => "token_issued",
            AuditKind::Registered => "registered",
            AuditKind::RegistrationFailed => "registration_failed",
            AuditKind::Deregistered => "deregistered",
            AuditKind::KeyCreated => "key_created",
            AuditKind::KeyRetired => "key_retired",
            AuditKind::Revoked => "revoked",
            AuditKind::RevocationRefused => "revocation_refused",
            AuditKind::RateLimited => "rate_limited",
            AuditKind::Restored => "restored",
        }
    }

    fn is_refusal(self) -> bool {
        matches!(
            self,
            AuditKind::AuthFailure
                | AuditKind::PolicyDenied
                | AuditKind::RegistrationFailed
                | AuditKind::RevocationRefused
                | AuditKind::RateLimited
        )
    }
}

/// One audit event. Every field is public information.
#[derive(Clone, Debug, Default)]
pub struct AuditEvent<'a> {
    /// Calling node (authenticated by mTLS), if any.
    pub caller: Option<NodeId>,
    /// Service concerned.
    pub service: Option<&'a str>,
    /// API key id.
    pub key_id: Option<&'a str>,
    /// Token id.
    pub jti: Option<&'a str>,
    /// Scope.
    pub scope: Option<&'a str>,
    /// Why (refusal reason, revocation target, limit name).
    pub reason: Option<&'a str>,
}

/// Records `kind` with its details: one log line on [`TARGET`] and the counters.
pub fn record(stats: &Stats, kind: AuditKind, ev: AuditEvent<'_>) {
    stats::inc(&stats.audit_events);
    let counter = match kind {
        AuditKind::AuthSuccess => Some(&stats.auth_success),
        AuditKind::AuthFailure => Some(&stats.auth_failure),
        AuditKind::PolicyDenied => Some(&stats.auth_policy_denied),
        AuditKind::TokenIssued => Some(&stats.tokens_issued),
        AuditKind::Registered => Some(&stats.registrations),
        AuditKind::RegistrationFailed => Some(&stats.registrations_failed),
        AuditKind::Deregistered => Some(&stats.deregistrations),
        AuditKind::KeyCreated => Some(&stats.keys_created),
        AuditKind::KeyRetired => Some(&stats.keys_retired),
        AuditKind::Revoked => Some(&stats.revocations),
        AuditKind::RevocationRefused => Some(&stats.revocations_refused),
        // Rate-limit counters are per limit; the caller counts them (see `Authority`).
        AuditKind::RateLimited | AuditKind::Restored => None,
    };
    if let Some(c) = counter {
        stats::inc(c);
    }
    let caller = ev.caller.map(|c| c.to_string());
    let dash = "-";
    macro_rules! emit {
        ($lvl:ident) => {
            tracing::$lvl!(
                target: TARGET,
                event = kind.as_str(),
                caller = caller.as_deref().unwrap_or(dash),
                service = ev.service.unwrap_or(dash),
                key_id = ev.key_id.unwrap_or(dash),
                jti = ev.jti.unwrap_or(dash),
                scope = ev.scope.unwrap_or(dash),
                reason = ev.reason.unwrap_or(dash),
                "audit"
            )
        };
    }
    if kind.is_refusal() {
        emit!(warn);
    } else {
        emit!(info);
    }
}
