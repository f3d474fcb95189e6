//! meshd overlay: the peer library.
//!
//! - [`identity`]: the overlay CA, node certificates and node ids.
//! - [`tls`]: TLS 1.3 mutual authentication, checked on every connection.
//! - [`chain_cache`]: verified certificate chains, checked once while valid ([`memo`]).
//! - [`wire`]: versioned stream headers, frames and datagrams (pure encode/decode).
//! - [`membership`]: SWIM membership (foca), sans-IO.
//! - [`channel`]: authenticated membership datagrams beside QUIC (no handshake per target), sans-IO.
//! - [`demux`]: the socket wrapper that hands membership datagrams to the channel before quinn.
//! - [`catalog`]: which peers publish which services, sans-IO.
//! - [`auth`]: service API keys, tokens, policies, rate limits, revocations, audit (sans-IO).
//! - [`preauth`]: predictive pre-authentication decisions (the warm set per client), sans-IO.
//! - [`node`]: the driver that owns sockets, connections, timers and tasks.
//!
//! The socket and runtime are injected so the network simulator runs this same code.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod auth;
pub mod backend;
pub mod catalog;
pub mod chain_cache;
pub mod channel;
pub mod config;
pub mod demux;
pub mod identity;
pub mod membership;
pub mod memo;
pub mod node;
pub mod preauth;
pub mod routing;
pub mod stats;
pub mod tls;
pub mod wire;

pub use config::{NodeConfig, PreauthSettings, ServiceConfig, TransportSettings, UpstreamConfig};
pub use identity::{NodeId, NodeIdentity};
pub use node::{Node, NodeError, PeerView};
