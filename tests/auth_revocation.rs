//! Node revocation: CA-signed records spread to every live peer within 5 s in a 10-peer
//! overlay, are enforced on fresh and resumed connections, drop live connections, refuse
//! forgeries, and survive a restore of an older backup.

use std::sync::Arc;
use std::time::Duration;

use meshd_suite::*;
use overlay::auth::revocation::{Revocation, RevocationSigner, RevocationTarget};
use overlay::identity::generate_ca;
use overlay::node::RevokeRequest;
use overlay::wire::{self, StreamHeader, StreamKind};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(20);

fn issuer_ca() -> (
    overlay::identity::CaMaterial,
    Arc<overlay::identity::CaMaterial>,
) {
    let ca = test_ca();
    let copy = overlay::identity::CaMaterial {
        cert_pem: ca.cert_pem.clone(),
        key_pem: ca.key_pem.clone(),
    };
    (ca, Arc::new(copy))
}

/// One CatalogPull round trip on `conn` (any stream operation the server answers).
async fn pull(conn: &quinn::Connection) -> Result<(), Box<dyn std::error::Error>> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&wire::encode_header(&StreamHeader {
        kind: StreamKind::CatalogPull,
        request_id: 1,
    }))
    .await?;
    send.finish()?;
    let _ = recv.read_to_end(1 << 16).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_node_is_refused_on_fresh_and_resumed_connections_and_live_ones_drop() {
    let (ca, issuer) = issuer_ca();
    let a = spawn_with(&ca, identity(&ca, "a"), &[], |c| {
        c.auth.issuer = Some(issuer)
    })
    .await;
    let x = identity(&ca, "x");
    let x_id = x.node_id();
    let (ep, cfg) = raw_client(&x);
    let name = overlay::tls::server_name_for(Some(a.node_id()));
    // Full handshake, then a live connection kept open.
    let first = ep
        .connect_with(cfg.clone(), a.addr(), &name)
        .unwrap()
        .await
        .unwrap();
    pull(&first).await.unwrap();
    let live = ep
        .connect_with(cfg.clone(), a.addr(), &name)
        .unwrap()
        .await
        .unwrap();
    pull(&live).await.unwrap();
    first.close(0u32.into(), b"");
    // Revoke x: the live connection is closed by a.
    a.revoke(RevokeRequest::Node(x_id), "test").await.unwrap();
    let reason = timeout(LIMIT, live.closed())
        .await
        .expect("live connection dropped");
    assert!(
        matches!(reason, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == 1u32.into()),
        "{reason:?}"
    );
    // A resumed connection (the verifier is skipped by TLS) is refused too.
    let connecting = ep.connect_with(cfg.clone(), a.addr(), &name).unwrap();
    let resumed = match connecting.into_0rtt() {
        Ok((conn, _)) => conn,
        Err(_) => panic!("the client holds a ticket from the first connection: it must resume"),
    };
    assert!(
        timeout(LIMIT, pull(&resumed)).await.unwrap().is_err(),
        "resumed refused"
    );
    // A fresh client (no ticket) is refused as well.
    let (ep2, cfg2) = raw_client(&x);
    let fresh = ep2.connect_with(cfg2, a.addr(), &name).unwrap();
    let r = timeout(LIMIT, async {
        let c = fresh.await?;
        pull(&c).await
    })
    .await
    .unwrap();
    assert!(r.is_err(), "fresh refused");
    assert!(a.stats().snapshot().connections_refused >= 2);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_spreads_to_ten_peers_within_five_seconds() {
    let (ca, issuer) = issuer_ca();
    let dir = tempfile::tempdir().unwrap();
    // Membership at memberlist's LAN timings: the test measures revocation, not failure
    // detection, and must not see false downs on a loaded 2-core machine.
    let lan = overlay::membership::MembershipConfig::default;
    let root = spawn_with(&ca, identity(&ca, "p0"), &[], |c| {
        c.membership = lan();
        c.auth.issuer = Some(issuer);
        c.auth.state_dir = Some(dir.path().to_owned());
    })
    .await;
    let mut peers = vec![root.clone()];
    for i in 1..10 {
        let n = spawn_with(&ca, identity(&ca, &format!("p{i}")), &[root.addr()], |c| {
            c.membership = lan()
        })
        .await;
        peers.push(n);
    }
    for p in &peers {
        timeout(Duration::from_secs(60), p.wait_members(|m| m == 9))
            .await
            .unwrap();
    }
    // Everyone talks to the victim, so live connections exist to be dropped.
    let victim = peers[9].clone();
    victim.publish("v", echo_server().await).unwrap();
    for p in &peers[..9] {
        timeout(LIMIT, p.wait_catalog(|s| s.iter().any(|e| e.name == "v")))
            .await
            .unwrap();
    }
    let backup = root.credential_store();
    let start = tokio::time::Instant::now();
    root.revoke(RevokeRequest::Node(victim.node_id()), "compromised")
        .await
        .unwrap();
    let vid = victim.node_id();
    wait_until(
        "every live peer enforces the revocation",
        Duration::from_secs(5),
        || {
            peers[..9]
                .iter()
                .all(|p| p.is_revoked(&vid) && p.providers("v").is_empty())
        },
    )
    .await;
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    eprintln!("revocation enforced by 9 peers in {took:?}");
    // The victim's connections were dropped by the others.
    wait_until("victim disconnected", LIMIT, || {
        victim.stats().snapshot().connections_open == 0
    })
    .await;
    // A record signed by anything but the CA is refused, by the API and by peers.
    let other = generate_ca(
        "rogue",
        overlay::identity::Validity::days_from(now(), 1).unwrap(),
    )
    .unwrap();
    let forged = RevocationSigner::from_pem(&other.key_pem)
        .unwrap()
        .sign(&Revocation {
            target: RevocationTarget::Node(peers[1].node_id()),
            issued_at: 1,
            reason: String::new(),
        })
        .unwrap();
    assert!(peers[2]
        .revoke(RevokeRequest::Signed(forged), "")
        .await
        .is_err());
    assert!(!peers[2].is_revoked(&peers[1].node_id()));
    // A peer without the CA key cannot sign one.
    assert!(peers[3]
        .revoke(RevokeRequest::Node(peers[1].node_id()), "")
        .await
        .is_err());
    // Restoring an older backup never re-admits the revoked node.
    root.restore_credentials(&backup).await.unwrap();
    assert!(root.is_revoked(&vid));
    assert_eq!(root.credential_store().revoked.nodes.len(), 1);
    for p in peers {
        p.shutdown().await;
    }
}
