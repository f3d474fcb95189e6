//! Peer configurations that `netsim compare` runs side by side. A mode changes each peer's
//! [`NodeConfig`] (the pre-authentication engine and its budget) and decides how a client
//! opens a request's stream. Every mode sends its requests through the same production call,
//! [`Node::open_for`], so the modes differ only in what each peer keeps warm:
//!
//! - `reactive`: nothing. Each request dials its own connection (full mTLS handshake), is
//!   served and closes it: the standard cold flow, every time.
//! - `pool`: the `preauth.budget` most recently used services of each client keep their
//!   connection open (a connection pool of that size); no tickets, no pre-opened streams.
//! - `predictive`: the shipped engine: the predictor's services for each client within the
//!   budget, each at the level its expected benefit pays for (token, 0-RTT ticket, connection,
//!   pre-opened stream).
//! - `oracle`: knows each client's next `budget` services (the simulator tells the engine
//!   before each request) and keeps them at the deepest level: the floor.
//! - `shared`: no engine at all: requests share one connection per provider peer, kept until
//!   the idle timeout (meshd's flow before pre-authentication).
//! - `routed`: no engine; each request goes through [`Node::exchange`]: the router picks the
//!   instance and the path (direct or through relays, end-to-end encrypted) and retries a
//!   request that got no byte on another instance or path when its own failed.

use std::collections::BTreeSet;
use std::time::Duration;

use overlay::node::{ForwardError, ServiceStream};
use overlay::preauth::{Policy, PreauthConfig};
use overlay::{Node, NodeConfig};

use crate::scenario::PreauthSection;

/// A peer configuration under comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// Every request pays the cold path (its own connection).
    Reactive,
    /// The B most recently used services stay connected.
    Pool,
    /// The predictor chooses what to warm, and how deep.
    Predictive,
    /// The next B services are known in advance.
    Oracle,
    /// One shared connection per provider, kept until idle (no engine).
    Shared,
    /// Requests through the router's exchange (instance and path choice, relays, retries).
    Routed,
}

/// A mode name that does not exist.
#[derive(Debug, thiserror::Error)]
#[error("unknown mode {name:?}; valid modes: {}", Mode::NAMES.join(", "))]
pub struct UnknownMode {
    /// The name given.
    pub name: String,
}

impl Mode {
    /// Every mode's name.
    pub const NAMES: &'static [&'static str] = &[
        "reactive",
        "pool",
        "predictive",
        "oracle",
        "shared",
        "routed",
    ];

    /// The mode called `name`.
    pub fn from_name(name: &str) -> Result<Mode, UnknownMode> {
        match name {
            "reactive" => Ok(Mode::Reactive),
            "pool" => Ok(Mode::Pool),
            "predictive" => Ok(Mode::Predictive),
            "oracle" => Ok(Mode::Oracle),
            "shared" => Ok(Mode::Shared),
            "routed" => Ok(Mode::Routed),
            _ => Err(UnknownMode {
                name: name.to_owned(),
            }),
        }
    }

    /// This mode's name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Reactive => "reactive",
            Mode::Pool => "pool",
            Mode::Predictive => "predictive",
            Mode::Oracle => "oracle",
            Mode::Shared => "shared",
            Mode::Routed => "routed",
        }
    }

    /// Whether the runner must tell the engine each client's next services.
    pub fn wants_hints(self) -> bool {
        self == Mode::Oracle
    }

    /// Adjusts a peer's configuration for this mode; `services` are every simulated service.
    pub fn configure(self, p: &PreauthSection, services: &[String], config: &mut NodeConfig) {
        if p.idempotent {
            config.preauth.idempotent = services.iter().cloned().collect::<BTreeSet<_>>();
        }
        let base = PreauthConfig {
            budget: p.budget,
            horizon: Duration::from_millis(p.horizon_ms),
            entry_ttl: Duration::from_millis(p.entry_ttl_ms),
            stream_deadline: Duration::from_millis(p.stream_deadline_ms),
            speculative_handshakes_per_s: p.speculative_per_s,
            // The simulated client peers stand for many callers each: no per-client cap
            // beyond the peer's (as in the recorded benchmark runs).
            speculative_handshakes_per_client_per_s: p.speculative_per_s,
            max_warm_connections: p.max_warm_connections,
            max_preopened_streams: p.max_preopened_streams,
            ..PreauthConfig::default()
        };
        config.preauth.engine = match self {
            Mode::Shared | Mode::Routed => None,
            Mode::Reactive => Some(PreauthConfig {
                policy: Policy::Off,
                budget: 0,
                zero_rtt: false,
                cache_tokens: false,
                ..base
            }),
            Mode::Pool => Some(PreauthConfig {
                policy: Policy::Recent,
                zero_rtt: false,
                ..base
            }),
            Mode::Predictive => Some(PreauthConfig {
                policy: Policy::Predictive,
                ..base
            }),
            Mode::Oracle => Some(PreauthConfig {
                policy: Policy::Hinted,
                ..base
            }),
        };
    }

    /// Opens the stream of one request attempt of local client `app` (the header is sent).
    pub async fn open(
        self,
        node: &Node,
        app: &str,
        service: &str,
    ) -> Result<ServiceStream, ForwardError> {
        node.open_for(app, service).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_lists_valid() {
        for n in Mode::NAMES {
            assert_eq!(Mode::from_name(n).unwrap().name(), *n);
        }
        let e = Mode::from_name("psychic").unwrap_err().to_string();
        assert!(e.contains("psychic") && e.contains("reactive"), "{e}");
    }
}
