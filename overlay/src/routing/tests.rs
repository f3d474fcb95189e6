use std::time::Duration;

use tokio::time::Instant;

use super::*;

fn id(i: u8) -> NodeId {
    NodeId::from_spki(&[i, 0x5a, i])
}

fn summary(origin: NodeId, seq: u64, links: &[(NodeId, f64)]) -> RouteSummary {
    RouteSummary {
        node_id: origin,
        version: CatalogVersion { generation: 1, seq },
        coord: Coord::default(),
        load: LoadReport::default(),
        relays: true,
        links: links
            .iter()
            .map(|(p, ms)| LinkReport {
                peer: *p,
                rtt_us: (ms * 1000.0) as u32,
                loss_ppm: 0,
            })
            .collect(),
    }
}

/// A router for `me` that measured `rtts` on its own links (via QUIC stats samples).
fn router(me: NodeId, members: &[NodeId], rtts: &[(NodeId, f64)], now: Instant) -> Router {
    let mut r = Router::new(me, 1, RoutingConfig::default());
    for m in members {
        r.member_up(*m);
    }
    for (p, ms) in rtts {
        r.on_quic_stats(*p, Duration::from_secs_f64(ms / 1000.0), 0, 0, now);
    }
    r
}

#[test]
fn slow_direct_link_goes_through_the_fast_relay_and_back_with_hysteresis() {
    let now = Instant::now();
    let (a, b, c) = (id(1), id(2), id(3));
    let mut r = router(a, &[b, c], &[(b, 10.0), (c, 200.0)], now);
    assert!(r.on_summary(summary(b, 1, &[(c, 10.0), (a, 10.0)]), now));
    let p = r.route(c, now).expect("path");
    assert_eq!(p.relays, vec![b]);
    assert!((p.cost_ms - 21.0).abs() < 1e-6, "{p:?}");

    // Direct gets better, but not by enough: stay (21 · 0.8 = 16.8).
    let now = now + REBUILD_EVERY;
    for i in 1..=60 {
        r.on_quic_stats(c, Duration::from_millis(18), 0, i, now);
    }
    assert_eq!(r.route(c, now).unwrap().relays, vec![b]);
    // Clearly better: switch back to direct — once the tree is rebuilt (RTT moves are
    // batched for REBUILD_EVERY).
    for i in 61..=120 {
        r.on_quic_stats(c, Duration::from_millis(12), 0, i, now);
    }
    assert_eq!(r.route(c, now).unwrap().relays, vec![b], "not rebuilt yet");
    let now = now + REBUILD_EVERY;
    let p = r.route(c, now).unwrap();
    assert!(p.relays.is_empty(), "{p:?}");
    assert_eq!(r.switches(), 1);
}

#[test]
fn unanswered_probes_mark_the_link_down_and_traffic_goes_around() {
    let t0 = Instant::now();
    let (a, b, c) = (id(1), id(2), id(3));
    let mut r = router(a, &[b, c], &[(b, 10.0), (c, 5.0)], t0);
    r.on_summary(summary(b, 1, &[(c, 10.0)]), t0);
    r.touch(c, t0);
    assert!(r.route(c, t0).unwrap().relays.is_empty());
    let mut t = t0;
    let mut downs = Vec::new();
    for _ in 0..10 {
        let tick = r.tick(t);
        // b answers, c does not.
        for p in &tick.probes {
            if p.peer == b {
                r.on_probe_ack(b, p.nonce, Coord::default(), t + Duration::from_millis(10));
            }
        }
        downs.extend(tick.down);
        t += r.config().probe_interval;
    }
    assert_eq!(downs, vec![c]);
    assert!(r.link_down(&c));
    assert_eq!(r.route(c, t).unwrap().relays, vec![b]);
    // An answer brings it back; the peer is scored with the recovery ramp.
    let tick = r.tick(t);
    let probe = tick
        .probes
        .iter()
        .find(|p| p.peer == c)
        .expect("c still probed");
    r.on_probe_ack(
        c,
        probe.nonce,
        Coord::default(),
        t + Duration::from_millis(5),
    );
    assert!(!r.link_down(&c));
    assert!(r.ramp(&c, t + Duration::from_millis(5)) > 3.0);
    assert_eq!(r.ramp(&c, t + Duration::from_secs(11)), 1.0);
}

#[test]
fn a_link_counts_at_the_worse_of_its_two_reports() {
    let now = Instant::now();
    let (a, b, c) = (id(1), id(2), id(3));
    let mut r = router(a, &[b, c], &[(b, 10.0)], now);
    r.on_link_down_for_test(c);
    // b claims 1 ms to c; c says 50 ms to b.
    r.on_summary(summary(b, 1, &[(c, 1.0)]), now);
    r.on_summary(summary(c, 1, &[(b, 50.0)]), now);
    let p = r.route(c, now).unwrap();
    assert_eq!(p.relays, vec![b]);
    assert!((p.cost_ms - 61.0).abs() < 1e-6, "{p:?}");
}

#[test]
fn stale_summaries_and_non_members_are_ignored() {
    let now = Instant::now();
    let (a, b, x) = (id(1), id(2), id(9));
    let mut r = router(a, &[b], &[], now);
    assert!(r.on_summary(summary(b, 2, &[]), now));
    assert!(!r.on_summary(summary(b, 1, &[]), now), "older version");
    assert!(!r.on_summary(summary(b, 2, &[]), now), "same version");
    assert!(!r.on_summary(summary(x, 1, &[]), now), "not a member");
    assert!(!r.on_summary(summary(a, 1, &[]), now), "our own");
}

#[test]
fn a_resent_summary_stays_fresh_and_a_flood_of_versions_is_damped() {
    let t0 = Instant::now();
    let (a, b, c) = (id(1), id(2), id(3));
    let secs = |s: u64| t0 + Duration::from_secs(s);
    let relays = |r: &mut Router, at| r.route(c, at).map(|p| p.relays).unwrap_or_default();
    // a measures b at 10 ms, its link to c is down; b reports 1 ms to c.
    let setup = || {
        let mut r = router(a, &[b, c], &[(b, 10.0)], t0);
        r.on_link_down_for_test(c);
        assert!(r.on_summary(summary(b, 1, &[(c, 1.0)]), t0));
        r
    };
    let mut stale = setup();
    assert_eq!(relays(&mut stale, t0), vec![b]);
    // Not received again for longer than the TTL: b's link to c is no longer known.
    stale.on_quic_stats(b, Duration::from_millis(10), 0, 0, secs(31));
    assert!(relays(&mut stale, secs(31)).is_empty());
    // The same version received again at 20 s refreshes it: still routed through b at 31 s.
    let mut fresh = setup();
    assert!(!fresh.on_summary(summary(b, 1, &[(c, 1.0)]), secs(20)));
    fresh.on_quic_stats(b, Duration::from_millis(10), 0, 0, secs(31));
    assert_eq!(relays(&mut fresh, secs(31)), vec![b]);
    // A newer version 100 ms after the last new one is dropped; 500 ms after, it applies.
    let t = secs(40);
    assert!(fresh.on_summary(summary(b, 2, &[(c, 1.0)]), t));
    let soon = t + Duration::from_millis(100);
    assert!(!fresh.on_summary(summary(b, 3, &[(c, 1.0)]), soon));
    assert!(fresh.on_summary(summary(b, 4, &[(c, 1.0)]), t + MIN_SUMMARY_GAP));
}

#[test]
fn paths_never_exceed_the_relay_limit() {
    let now = Instant::now();
    // A chain a - b - c - d - e - f with fast links, every direct link from a slow.
    let ids: Vec<NodeId> = (1..=6).map(id).collect();
    let rtts: Vec<(NodeId, f64)> = ids[1..]
        .iter()
        .enumerate()
        .map(|(i, p)| (*p, if i == 0 { 1.0 } else { 500.0 }))
        .collect();
    let mut r = router(ids[0], &ids[1..], &rtts, now);
    for w in ids[1..].windows(3) {
        r.on_summary(summary(w[1], 1, &[(w[0], 1.0), (w[2], 1.0)]), now);
    }
    r.on_summary(summary(ids[5], 1, &[(ids[4], 1.0)]), now);
    for max in 0..=3 {
        r.cfg.max_relays = max;
        r.invalidate();
        let p = r.route(ids[5], now).unwrap();
        assert!(p.relays.len() <= max, "{max}: {p:?}");
        assert!(!p.relays.contains(&ids[0]) && !p.relays.contains(&ids[5]));
    }
}

#[test]
fn two_choices_avoid_the_loaded_and_the_suspect_instance() {
    let now = Instant::now();
    let (a, p1, p2) = (id(1), id(2), id(3));
    let mut r = router(a, &[p1, p2], &[(p1, 10.0), (p2, 10.0)], now);
    // p1 answers slowly: its peak-EWMA service time jumps.
    r.request_started(p1);
    r.request_ended(p1, 10.0, Some(Duration::from_millis(200)), now);
    r.request_started(p2);
    r.request_ended(p2, 10.0, Some(Duration::from_millis(12)), now);
    let c = r.choose(&[p1, p2], &[], now, |n| n - 1).unwrap();
    assert_eq!(c.provider, p2);
    // Many outstanding requests on p2 make p1 the better one.
    for _ in 0..30 {
        r.request_started(p2);
    }
    assert_eq!(r.choose(&[p1, p2], &[], now, |_| 0).unwrap().provider, p1);
    // A suspect instance is used only when nothing else is left.
    r.on_request_failed(p1);
    assert_eq!(r.choose(&[p1, p2], &[], now, |_| 0).unwrap().provider, p2);
    assert_eq!(r.choose(&[p1, p2], &[p2], now, |_| 0).unwrap().provider, p1);
    assert!(r.choose(&[p1, p2], &[p1, p2], now, |_| 0).is_none());
}

#[test]
fn a_down_member_leaves_every_path() {
    let now = Instant::now();
    let (a, b, c) = (id(1), id(2), id(3));
    let mut r = router(a, &[b, c], &[(b, 10.0), (c, 200.0)], now);
    r.on_summary(summary(b, 1, &[(c, 10.0)]), now);
    assert_eq!(r.route(c, now).unwrap().relays, vec![b]);
    r.member_down(b);
    let p = r.route(c, now).unwrap();
    assert!(p.relays.is_empty());
    assert!(r.route(b, now).is_none());
}

#[test]
fn local_summary_reports_only_live_measured_links_within_the_limit() {
    let now = Instant::now();
    let me = id(1);
    let peers: Vec<NodeId> = (2..40).map(id).collect();
    let rtts: Vec<(NodeId, f64)> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| (*p, 1.0 + i as f64))
        .collect();
    let mut r = router(me, &peers, &rtts, now);
    r.on_request_failed(peers[0]);
    let s = r.local_summary();
    assert_eq!(s.links.len(), MAX_ROUTE_LINKS);
    assert!(s.links.iter().all(|l| l.peer != peers[0]));
    assert_eq!(s.links[0].peer, peers[1]);
    assert!(r.local_summary().version > s.version);
}

impl Router {
    fn on_link_down_for_test(&mut self, peer: NodeId) {
        self.links.entry(peer).or_insert_with(LocalLink::new);
        self.on_request_failed(peer);
    }
}

#[test]
fn an_unmeasured_direct_link_is_not_relayed_around() {
    let now = Instant::now();
    let (a, b, c) = (id(1), id(2), id(3));
    // a measured b only; b reports a fast link to c; a knows nothing of a–c.
    let mut r = router(a, &[b, c], &[(b, 1.0)], now);
    r.on_summary(summary(b, 1, &[(c, 1.0)]), now);
    let p = r.route(c, now).unwrap();
    assert!(p.relays.is_empty() && p.estimated, "{p:?}");
    // Once the direct link is measured slow, the relay wins.
    r.on_quic_stats(c, Duration::from_millis(100), 0, 1, now);
    assert_eq!(r.route(c, now).unwrap().relays, vec![b]);
}
