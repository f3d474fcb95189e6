//! netsim: a network simulator that runs the real `overlay` peer code.
//!
//! - [`link`]: the model of one link (latency, in-order jitter, Bernoulli and Gilbert–Elliott
//!   loss, bandwidth with a drop-tail queue, MTU); pure.
//! - [`topology`]: RTT between peers from a region matrix or coordinates; pure.
//! - [`net`]: [`net::SimNet`], the virtual network (event queue + driver task) and
//!   [`net::SimSocket`], quinn's `AsyncUdpSocket` over it; partitions, degradation, crashes.
//! - [`pki`]: reproducible overlay CA and node identities from a seed.
//! - [`scenario`]: the TOML scenario schema and `--set` overrides.
//! - [`workload`]: request schedules (Poisson/Zipf, Markov, script, trace replay); pure.
//! - [`modes`]: peer configurations compared side by side.
//! - [`runner`]: one run (virtual or real time) → [`report::Report`].
//! - [`report`]: percentiles, JSON, Markdown and SVG.
//! - [`calibrate`]: measures the handshake CPU cost charged in virtual time.
//! - [`mem`]: the older minimal in-memory network (instant delivery) kept for tests.
//!
//! What it does not do: touch kernel sockets, read the wall clock for anything but reporting
//! wall time, or depend on the `meshd` binary crate.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod calibrate;
pub mod link;
pub mod mem;
pub mod modes;
pub mod net;
pub mod pki;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod topology;
pub mod workload;

pub use modes::Mode;
pub use net::{SimNet, SimSocket};
pub use report::Report;
pub use runner::{run, RunOptions};
pub use scenario::Scenario;

/// Runs `sc` once per mode, on the same seed and workload.
pub fn compare(
    sc: &Scenario,
    modes: &[Mode],
    opts: RunOptions,
) -> Result<Vec<Report>, runner::RunError> {
    modes
        .iter()
        .map(|m| run(sc, *m, opts).map(|(r, _)| r))
        .collect()
}
