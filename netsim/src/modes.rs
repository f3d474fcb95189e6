//! Peer configurations that `netsim compare` runs side by side. A mode may change each peer's
//! [`NodeConfig`] and decides how a client opens a request's stream. Only `reactive` exists
//! today; the pre-authentication issue adds `pool`, `predictive` and `oracle` here.

use overlay::node::ForwardError;
use overlay::{Node, NodeConfig};

/// A peer configuration under comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// Each request opens a service stream on demand (`Node::open_service_stream`): it reuses
    /// an open connection to the provider if there is one, else pays a full handshake.
    Reactive,
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
    pub const NAMES: &'static [&'static str] = &["reactive"];

    /// The mode called `name`.
    pub fn from_name(name: &str) -> Result<Mode, UnknownMode> {
        match name {
            "reactive" => Ok(Mode::Reactive),
            _ => Err(UnknownMode {
                name: name.to_owned(),
            }),
        }
    }

    /// This mode's name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Reactive => "reactive",
        }
    }

    /// Adjusts peer `peer`'s configuration for this mode.
    pub fn configure(self, _peer: usize, _config: &mut NodeConfig) {
        match self {
            Mode::Reactive => {}
        }
    }

    /// Opens the stream of one request attempt (the stream header is sent).
    pub async fn open(
        self,
        node: &Node,
        service: &str,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), ForwardError> {
        match self {
            Mode::Reactive => node.open_service_stream(service).await,
        }
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
