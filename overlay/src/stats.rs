//! Counters of one node, kept in a plain struct so that many nodes in one process (netsim)
//! do not share a global recorder; exported as Prometheus text through the `metrics` crate.

use std::sync::atomic::{AtomicU64, Ordering};

use metrics_exporter_prometheus::PrometheusBuilder;

macro_rules! stats {
    ($( $(#[$doc:meta])* $field:ident => $metric:literal, $help:literal, $kind:ident; )*) => {
        /// Counters and gauges of one node.
        #[derive(Debug, Default)]
        pub struct Stats {
            $( $(#[$doc])* pub $field: AtomicU64, )*
        }

        /// A point-in-time copy of [`Stats`].
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        pub struct StatsSnapshot {
            $( $(#[$doc])* pub $field: u64, )*
        }

        impl Stats {
            /// Copies every counter.
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $( $field: self.$field.load(Ordering::Relaxed), )* }
            }

            /// Renders Prometheus text exposition.
            pub fn render_prometheus(&self) -> String {
                let recorder = PrometheusBuilder::new().build_recorder();
                let handle = recorder.handle();
                let snap = self.snapshot();
                metrics::with_local_recorder(&recorder, || {
                    $(
                        metrics::describe_counter!($metric, $help);
                        stats!(@emit $kind, $metric, snap.$field);
                    )*
                });
                handle.render()
            }
        }
    };
    (@emit counter, $metric:literal, $v:expr) => { metrics::counter!($metric).absolute($v) };
    (@emit gauge, $metric:literal, $v:expr) => { metrics::gauge!($metric).set($v as f64) };
}

stats! {
    /// QUIC connections accepted and authenticated.
    connections_accepted => "meshd_connections_accepted_total", "Inbound QUIC connections accepted", counter;
    /// QUIC connections dialled and authenticated.
    connections_dialed => "meshd_connections_dialed_total", "Outbound QUIC connections established", counter;
    /// Connections refused (TLS or post-handshake identity check).
    connections_refused => "meshd_connections_refused_total", "Connections refused by authentication", counter;
    /// Connections currently open.
    connections_open => "meshd_connections_open", "Open QUIC connections", gauge;
    /// Handshakes completed (both directions).
    handshakes => "meshd_handshakes_total", "Completed QUIC handshakes", counter;
    /// Streams opened by this node.
    streams_opened => "meshd_streams_opened_total", "Streams opened", counter;
    /// Streams accepted from peers.
    streams_accepted => "meshd_streams_accepted_total", "Streams accepted", counter;
    /// Streams refused or reset because of an error.
    stream_errors => "meshd_stream_errors_total", "Streams ended by an error", counter;
    /// Forwarded bytes from local clients or backends into the overlay.
    bytes_sent => "meshd_forward_bytes_sent_total", "Forwarded bytes sent into the overlay", counter;
    /// Forwarded bytes from the overlay to local clients or backends.
    bytes_received => "meshd_forward_bytes_received_total", "Forwarded bytes received from the overlay", counter;
    /// Members that came up.
    members_up => "meshd_membership_up_total", "Membership: members up", counter;
    /// Members that went down.
    members_down => "meshd_membership_down_total", "Membership: members down", counter;
    /// Membership packets refused (bad identity, malformed).
    membership_refused => "meshd_membership_refused_total", "Membership packets refused", counter;
    /// Membership datagrams sent.
    membership_datagrams_sent => "meshd_membership_datagrams_sent_total", "Membership datagrams sent", counter;
    /// Membership datagrams received.
    membership_datagrams_received => "meshd_membership_datagrams_received_total", "Membership datagrams received", counter;
    /// Catalog snapshots applied.
    catalog_updates => "meshd_catalog_updates_total", "Catalog snapshots applied", counter;
}

/// Adds one to a counter.
pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Subtracts one from a gauge.
pub(crate) fn dec(c: &AtomicU64) {
    c.fetch_sub(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let s = Stats::default();
        inc(&s.handshakes);
        add(&s.bytes_sent, 42);
        let text = s.render_prometheus();
        assert!(text.contains("meshd_handshakes_total 1"), "{text}");
        assert!(text.contains("meshd_forward_bytes_sent_total 42"), "{text}");
        assert!(
            text.contains("# TYPE meshd_connections_open gauge"),
            "{text}"
        );
    }
}
