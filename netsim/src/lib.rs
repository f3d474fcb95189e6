//! netsim: a virtual network that runs the real `overlay` peer code.
//!
//! For now it holds [`mem`], an in-memory datagram network behind quinn's `AsyncUdpSocket`,
//! which proves that the peer runs on an injected socket. Latency, loss, bandwidth, partitions
//! and scenarios come next (see docs/ARCHITECTURE.md).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod mem;
