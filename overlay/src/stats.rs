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
    /// Membership-channel inits sent (first contacts, PROTOCOL.md §8).
    membership_inits_sent => "meshd_membership_inits_sent_total", "Membership channel: inits sent", counter;
    /// Membership-channel inits taken (certificate good).
    membership_inits_received => "meshd_membership_inits_received_total", "Membership channel: inits taken", counter;
    /// Membership-channel hellos sent (authenticated by the pair key, PROTOCOL.md §8).
    membership_hellos_sent => "meshd_membership_hellos_sent_total", "Membership channel: hellos sent", counter;
    /// Membership-channel hellos accepted.
    membership_hellos_received => "meshd_membership_hellos_received_total", "Membership channel: hellos accepted", counter;
    /// Membership-channel sessions set up.
    membership_sessions => "meshd_membership_sessions_total", "Membership channel: sessions set up", counter;
    /// Certificate chains verified by the membership channel (cache misses).
    membership_chains_verified => "meshd_membership_chains_verified_total", "Membership channel: certificate chains verified", counter;
    /// Membership-channel packets dropped (forged, tampered, replayed, revoked, malformed, unknown session).
    membership_channel_dropped => "meshd_membership_channel_dropped_total", "Membership channel: packets dropped", counter;
    /// Catalog snapshots applied.
    catalog_updates => "meshd_catalog_updates_total", "Catalog snapshots applied", counter;
    /// Catalog gossip datagrams sent.
    catalog_gossip_sent => "meshd_catalog_gossip_sent_total", "Catalog gossip datagrams sent", counter;
    /// Catalog gossip datagrams received.
    catalog_gossip_received => "meshd_catalog_gossip_received_total", "Catalog gossip datagrams received", counter;
    /// Catalog entries, gossip or requests refused (bad signature, malformed, over a limit).
    catalog_refused => "meshd_catalog_refused_total", "Catalog entries or messages refused", counter;
    /// Catalog pulls completed (join, repair, hint).
    catalog_pulls => "meshd_catalog_pulls_total", "Catalog pulls completed", counter;
    /// Catalog pulls served to peers.
    catalog_served => "meshd_catalog_served_total", "Catalog pulls served", counter;
    /// Audit events recorded (every kind).
    audit_events => "meshd_audit_events_total", "Audit events recorded", counter;
    /// Successful authentications (API key or token accepted).
    auth_success => "meshd_auth_success_total", "Authentications accepted", counter;
    /// Failed authentications (bad key, bad token).
    auth_failure => "meshd_auth_failure_total", "Authentications refused", counter;
    /// Requests refused by a service policy.
    auth_policy_denied => "meshd_auth_policy_denied_total", "Requests refused by policy", counter;
    /// Tokens issued.
    tokens_issued => "meshd_tokens_issued_total", "Tokens issued", counter;
    /// Service registrations committed.
    registrations => "meshd_service_registrations_total", "Service registrations", counter;
    /// Service registrations rolled back.
    registrations_failed => "meshd_service_registrations_failed_total", "Service registrations rolled back", counter;
    /// Service deregistrations.
    deregistrations => "meshd_service_deregistrations_total", "Service deregistrations", counter;
    /// API keys created.
    keys_created => "meshd_api_keys_created_total", "API keys created", counter;
    /// API keys retired or revoked.
    keys_retired => "meshd_api_keys_retired_total", "API keys retired or revoked", counter;
    /// Revocations applied (nodes, serials, tokens, keys).
    revocations => "meshd_revocations_total", "Revocations applied", counter;
    /// Revocation records refused (bad signature, untrusted signer).
    revocations_refused => "meshd_revocations_refused_total", "Revocation records refused", counter;
    /// Requests refused by the per-caller-per-service limit.
    rate_limited_caller_service => "meshd_rate_limited_caller_service_total", "Refused: per caller per service limit", counter;
    /// Requests refused by the per-service limit.
    rate_limited_service => "meshd_rate_limited_service_total", "Refused: per service limit", counter;
    /// Requests refused because the caller failed authentication too often.
    rate_limited_failed_auth => "meshd_rate_limited_failed_auth_total", "Refused: failed authentication limit", counter;
    /// Configured per-caller-per-service rate (requests per second).
    limit_caller_service_rate => "meshd_limit_caller_service_per_second", "Limit: requests per second per caller per service", gauge;
    /// Configured per-caller-per-service burst.
    limit_caller_service_burst => "meshd_limit_caller_service_burst", "Limit: burst per caller per service", gauge;
    /// Configured per-service rate (requests per second).
    limit_service_rate => "meshd_limit_service_per_second", "Limit: requests per second per service", gauge;
    /// Configured per-service burst.
    limit_service_burst => "meshd_limit_service_burst", "Limit: burst per service", gauge;
    /// Configured failed-authentication rate per caller (per second).
    limit_failed_auth_rate => "meshd_limit_failed_auth_per_second", "Limit: failed authentications per second per caller", gauge;
    /// Configured failed-authentication burst per caller.
    limit_failed_auth_burst => "meshd_limit_failed_auth_burst", "Limit: failed authentication burst per caller", gauge;
    /// Certificate renewals done.
    cert_renewals => "meshd_cert_renewals_total", "Certificate renewals", counter;
    /// Seconds until this node's certificate expires (at the last check).
    cert_expires_in => "meshd_cert_expires_in_seconds", "Seconds until the node certificate expires", gauge;
    /// Pre-authentication: requests of local clients seen by the engine.
    preauth_requests => "meshd_preauth_requests_total", "Pre-authentication: requests seen", counter;
    /// Pre-authentication: warm entries chosen (predictions acted on).
    preauth_predictions => "meshd_preauth_predictions_total", "Pre-authentication: predictions", counter;
    /// Requests served on a pre-opened stream.
    preauth_hits_stream => "meshd_preauth_hits_stream_total", "Pre-authentication: hits on a pre-opened stream", counter;
    /// Requests served on a warm connection.
    preauth_hits_connection => "meshd_preauth_hits_connection_total", "Pre-authentication: hits on a warm connection", counter;
    /// Requests sent in 0-RTT data with a held ticket.
    preauth_hits_ticket => "meshd_preauth_hits_ticket_total", "Pre-authentication: hits with a 0-RTT ticket", counter;
    /// Requests that took the cold path.
    preauth_misses => "meshd_preauth_misses_total", "Pre-authentication: misses", counter;
    /// Warm entries prepared.
    preauth_prepared => "meshd_preauth_prepared_total", "Pre-authentication: entries prepared", counter;
    /// Warm entries dropped without having been used.
    preauth_waste => "meshd_preauth_waste_total", "Pre-authentication: entries prepared and never used", counter;
    /// Speculative handshakes started.
    preauth_speculative_handshakes => "meshd_preauth_speculative_handshakes_total", "Pre-authentication: speculative handshakes", counter;
    /// Tokens fetched ahead of use.
    preauth_tokens_prefetched => "meshd_preauth_tokens_prefetched_total", "Pre-authentication: tokens fetched ahead", counter;
    /// Streams pre-opened.
    preauth_streams_preopened => "meshd_preauth_streams_preopened_total", "Pre-authentication: streams pre-opened", counter;
    /// Pre-opened streams closed unused (ours or a peer's), backend released.
    preauth_streams_expired => "meshd_preauth_streams_expired_total", "Pre-authentication: pre-opened streams closed unused", counter;
    /// Speculative work refused by providers, or shed by this peer.
    preauth_shed => "meshd_preauth_shed_total", "Pre-authentication: speculative work shed", counter;
    /// Bytes of speculative work (pre-open headers, token requests ahead).
    preauth_bytes => "meshd_preauth_bytes_total", "Pre-authentication: bytes spent on speculative work", counter;
    /// Pre-opened streams currently held for peers (server side).
    preopened_inbound => "meshd_preopened_inbound", "Pre-opened streams held for peers", gauge;
    /// Connections dialled with 0-RTT data (client side).
    zero_rtt_connections => "meshd_zero_rtt_connections_total", "Connections dialled with 0-RTT data", counter;
    /// Inbound connections resumed from a ticket (server side; early data possible).
    resumed_connections => "meshd_resumed_connections_total", "Inbound connections resumed from a ticket", counter;
    /// 0-RTT attempts the server refused (request then retried at 1-RTT).
    zero_rtt_rejected => "meshd_zero_rtt_rejected_total", "0-RTT attempts rejected", counter;
    /// Requests refused as replays (request id already executed from early data).
    replays_refused => "meshd_replays_refused_total", "Replayed requests refused", counter;
    /// Routing: probes sent.
    route_probes_sent => "meshd_route_probes_sent_total", "Routing: link probes sent", counter;
    /// Routing: links marked down (probes unanswered or a request's path failed).
    route_links_down => "meshd_route_links_down_total", "Routing: links marked down", counter;
    /// Routing: our summaries signed and queued for gossip.
    route_summaries_published => "meshd_route_summaries_published_total", "Routing: summaries published", counter;
    /// Routing: other peers' summaries applied.
    route_summaries_applied => "meshd_route_summaries_applied_total", "Routing: summaries applied", counter;
    /// Routing: summaries or probes refused (bad signature, malformed, not the origin's).
    route_summaries_refused => "meshd_route_summaries_refused_total", "Routing: summaries refused", counter;
    /// Routing: route summary datagrams sent (to probers).
    route_gossip_sent => "meshd_route_gossip_sent_total", "Routing: summary datagrams sent to probers", counter;
    /// Requests retried on another instance or path before any response byte.
    requests_retried => "meshd_requests_retried_total", "Requests retried before the first byte", counter;
    /// Relayed streams this peer opened as origin.
    relayed_streams_opened => "meshd_relayed_streams_opened_total", "Relayed streams opened as origin", counter;
    /// Streams this peer relayed for others.
    relayed_streams => "meshd_relayed_streams_total", "Streams relayed for others", counter;
    /// Bytes relayed for others (both ways).
    relayed_bytes => "meshd_relayed_bytes_total", "Bytes relayed for others", counter;
    /// Relay requests refused (path, loop, hop limit, quota, policy).
    relay_refused => "meshd_relay_refused_total", "Relay requests refused", counter;
    /// Relayed streams served as destination.
    e2e_streams_served => "meshd_e2e_streams_served_total", "Relayed streams served end to end", counter;
    /// Relayed streams refused as destination (TLS failed, wrong origin, bad header).
    e2e_refused => "meshd_e2e_refused_total", "Relayed streams refused at the destination", counter;
    /// Early requests for non-idempotent services held until the handshake completed.
    early_data_held => "meshd_early_data_held_total", "Non-idempotent early requests held until handshake completion", counter;
}

/// Adds one to a counter.
pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Sets a gauge.
pub(crate) fn set(c: &AtomicU64, v: u64) {
    c.store(v, Ordering::Relaxed);
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
