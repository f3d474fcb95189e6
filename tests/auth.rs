//! Refusals: a peer is never admitted, nor listed, unless its certificate chains to the overlay
//! CA, is within its validity, carries a SAN node id matching its key, and speaks for itself.

use std::time::Duration;

use meshd_suite::*;
use overlay::identity::{generate_ca, issue_node, CaMaterial, NodeIdentity, Validity};
use overlay::membership::{Membership, MembershipConfig, PeerIdentity};
use overlay::{Node, NodeId};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(10);

/// An identity whose certificate is `cert_pem`/`key_pem` but which trusts `trust`'s CA.
fn bad_identity(trust: &CaMaterial, cert_pem: &str, key_pem: &str) -> NodeIdentity {
    NodeIdentity::from_pem(&trust.cert_pem, cert_pem, key_pem).unwrap()
}

fn with_validity(ca: &CaMaterial, name: &str, from_days: i64, to_days: i64) -> (String, String) {
    let now = now();
    let v = Validity {
        not_before: now + time::Duration::days(from_days),
        not_after: now + time::Duration::days(to_days),
    };
    let n = issue_node(ca, name, v).unwrap();
    (n.cert_pem, n.key_pem)
}

fn self_signed(name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    use rcgen::PublicKeyData;
    let id = NodeId::from_spki(&key.subject_public_key_info());
    let mut p = rcgen::CertificateParams::new(vec![id.san()]).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.not_before = now() - time::Duration::days(1);
    p.not_after = now() + time::Duration::days(30);
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = p.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Tries to join `target` with `who`; asserts the connection is refused and `who` never listed.
async fn assert_refused(target: &Node, who: NodeIdentity, case: &str) {
    let before = target.stats().snapshot().connections_refused;
    let bad_id = who.info.node_id;
    let (ep, cfg) = raw_client(&who);
    let outcome = async {
        let conn = ep
            .connect_with(cfg, target.addr(), &overlay::tls::server_name_for(None))?
            .await?;
        // The client may believe it is connected before the server checked its certificate:
        // the refusal shows on the first stream operation.
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(b"x").await?;
        let mut buf = [0u8; 1];
        recv.read_exact(&mut buf).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    let r = timeout(LIMIT, outcome).await.expect("refusal is prompt");
    assert!(r.is_err(), "{case}: connection must fail");
    wait_until(case, LIMIT, || {
        target.stats().snapshot().connections_refused > before
    })
    .await;
    assert!(
        !target.peers().await.iter().any(|p| p.node_id.0 == bad_id),
        "{case}: never listed"
    );
    ep.close(0u32.into(), b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_are_refused_and_never_listed() {
    let ca = test_ca();
    let a = spawn(&ca, "a", &[], vec![], vec![]).await;
    let other = generate_ca("other", Validity::days_from(now(), 30).unwrap()).unwrap();

    let n = issue_node(&other, "foreign", Validity::days_from(now(), 30).unwrap()).unwrap();
    assert_refused(&a, bad_identity(&ca, &n.cert_pem, &n.key_pem), "other CA").await;

    let (c, k) = with_validity(&ca, "expired", -10, -1);
    assert_refused(&a, bad_identity(&ca, &c, &k), "expired").await;

    let (c, k) = with_validity(&ca, "future", 1, 10);
    assert_refused(&a, bad_identity(&ca, &c, &k), "not yet valid").await;

    let (c, k) = self_signed("selfie");
    assert_refused(&a, bad_identity(&ca, &c, &k), "self-signed").await;

    // No client certificate at all.
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        for c in &identity(&ca, "x").ca {
            r.add(c.clone()).unwrap();
        }
        r
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(overlay::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![overlay::tls::ALPN.to_vec()];
    let before = a.stats().snapshot().connections_refused;
    let (ep, cfg) = raw_client_with(tls);
    // Server name: a's SAN, so the client side accepts a's certificate.
    let r = timeout(LIMIT, async {
        let conn = ep.connect_with(cfg, a.addr(), &a.node_id().san())?.await?;
        let (mut s, mut r) = conn.open_bi().await?;
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        r.read_exact(&mut b).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })
    .await
    .unwrap();
    assert!(r.is_err(), "no client certificate: refused");
    wait_until("no-cert refusal", LIMIT, || {
        a.stats().snapshot().connections_refused > before
    })
    .await;
    assert!(a.peers().await.is_empty());
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_a_bad_certificate_is_refused_by_the_dialler() {
    let ca = test_ca();
    let (c, k) = with_validity(&ca, "expired", -10, -1);
    let bad = Node::bind(
        "127.0.0.1:0".parse().unwrap(),
        bad_identity(&ca, &c, &k),
        config(&[], 1),
    )
    .await
    .unwrap();
    let good = identity(&ca, "good");
    let (ep, cfg) = raw_client(&good);
    let r = timeout(LIMIT, async {
        ep.connect_with(cfg, bad.addr(), &overlay::tls::server_name_for(None))
            .unwrap()
            .await
    })
    .await
    .unwrap();
    assert!(
        r.is_err(),
        "expired server certificate refused by the client"
    );
    // Dialling a node under the wrong expected id is refused too.
    let other = spawn(&ca, "other", &[], vec![], vec![]).await;
    let (ep, cfg) = raw_client(&good);
    let wrong = identity(&ca, "someone").node_id();
    let r = timeout(LIMIT, async {
        ep.connect_with(cfg, other.addr(), &wrong.san())
            .unwrap()
            .await
    })
    .await
    .unwrap();
    assert!(r.is_err(), "peer is not the node dialled");
    bad.shutdown().await;
    other.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_identity_must_match_the_certificate() {
    let ca = test_ca();
    let a = spawn(&ca, "a", &[], vec![], vec![]).await;
    let liar = identity(&ca, "liar");
    let (ep, cfg) = raw_client(&liar);
    let conn = ep
        .connect_with(cfg, a.addr(), &a.node_id().san())
        .unwrap()
        .await
        .unwrap();
    // Claim to be some other node, from a connection authenticated as `liar`.
    let claimed = identity(&ca, "victim").node_id();
    let spoof = PeerIdentity {
        node_id: claimed,
        addr: ep.local_addr().unwrap(),
        generation: 1,
        name: "liar".into(),
    };
    let mut m = Membership::new(spoof, &MembershipConfig::default(), 1);
    m.announce(PeerIdentity {
        node_id: a.node_id(),
        addr: a.addr(),
        generation: 0,
        name: "a".into(),
    });
    let (_, packet) = m.poll_transmit().unwrap();
    let mut d = vec![overlay::wire::DATAGRAM_MEMBERSHIP];
    d.extend_from_slice(&packet);
    conn.send_datagram(d.into()).unwrap();
    wait_until("spoofed membership refused", LIMIT, || {
        a.stats().snapshot().membership_refused >= 1
    })
    .await;
    let peers = a.peers().await;
    assert!(
        !peers
            .iter()
            .any(|p| p.node_id.0 == claimed || p.node_id.0 == liar.node_id()),
        "neither the claimed nor the real identity is listed: {peers:?}"
    );
    a.shutdown().await;
}
