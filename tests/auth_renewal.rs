//! Certificate renewal: a node past 70% of its certificate's lifetime renews it (same node id,
//! new serial and validity) when it has an issuer, without dropping open connections; without
//! an issuer it does not renew (and logs an error).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshd_suite::*;
use overlay::identity::{issue_node, NodeIdentity, Validity};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(15);

fn aged_identity(ca: &overlay::identity::CaMaterial, name: &str) -> NodeIdentity {
    // 90% of a 10-day lifetime has passed.
    let v = Validity {
        not_before: now() - time::Duration::days(9),
        not_after: now() + time::Duration::days(1),
    };
    let n = issue_node(ca, name, v).unwrap();
    NodeIdentity::from_pem(&ca.cert_pem, &n.cert_pem, &n.key_pem).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_the_node_id_and_open_connections() {
    let ca = test_ca();
    let b = spawn(&ca, "b", &[], vec![], vec![]).await;
    let issuer = Arc::new(overlay::identity::CaMaterial {
        cert_pem: ca.cert_pem.clone(),
        key_pem: ca.key_pem.clone(),
    });
    let written = Arc::new(Mutex::new(Vec::<String>::new()));
    let w = written.clone();
    let id = aged_identity(&ca, "a");
    let old = id.info.clone();
    // The renewal loop would only act past 95%: this test renews by hand once connected.
    let a = spawn_with(&ca, id, &[b.addr()], |c| {
        c.auth.issuer = Some(issuer);
        c.auth.renew_at_fraction = 0.95;
        c.auth.renew_check_interval = Duration::from_secs(3600);
        c.auth.on_cert_renewed = Some(Arc::new(move |pem: &str| {
            w.lock().unwrap().push(pem.to_owned())
        }));
    })
    .await;
    timeout(LIMIT, b.wait_members(|m| m == 1)).await.unwrap();
    timeout(LIMIT, a.wait_members(|m| m == 1)).await.unwrap();
    // Both have pulled the other's catalog on join (b's pull may race a's connection and dial
    // a second one): count connections once that is over.
    wait_until("join pulls", LIMIT, || {
        a.stats().snapshot().catalog_pulls >= 1 && b.stats().snapshot().catalog_pulls >= 1
    })
    .await;
    let dialed = a.stats().snapshot().connections_dialed + b.stats().snapshot().connections_dialed;
    let open_before = b.stats().snapshot().connections_open;
    assert!(open_before >= 1);
    let new = a.renew_certificate().unwrap();
    assert_eq!(new.node_id, old.node_id);
    assert_ne!(new.serial, old.serial);
    assert!(new.not_after_unix > old.not_after_unix + 5 * 86_400);
    assert_eq!(a.certificate(), new);
    assert_eq!(written.lock().unwrap().len(), 1);
    assert_eq!(a.stats().snapshot().cert_renewals, 1);
    // Connections were not dropped, and membership traffic still flows over them.
    b.publish("after-renewal", echo_server().await).unwrap();
    timeout(
        LIMIT,
        a.wait_catalog(|s| s.iter().any(|e| e.name == "after-renewal")),
    )
    .await
    .unwrap();
    assert_eq!(b.stats().snapshot().connections_open, open_before);
    assert_eq!(
        a.stats().snapshot().connections_dialed + b.stats().snapshot().connections_dialed,
        dialed,
        "no reconnection"
    );
    // A new peer handshakes with the renewed certificate.
    let c = spawn(&ca, "c", &[a.addr()], vec![], vec![]).await;
    timeout(LIMIT, c.wait_members(|m| m == 2)).await.unwrap();
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_renewal_loop_renews_when_due_and_only_with_an_issuer() {
    let ca = test_ca();
    let issuer = Arc::new(overlay::identity::CaMaterial {
        cert_pem: ca.cert_pem.clone(),
        key_pem: ca.key_pem.clone(),
    });
    let a = spawn_with(&ca, aged_identity(&ca, "a"), &[], |c| {
        c.auth.issuer = Some(issuer);
        c.auth.renew_check_interval = Duration::from_millis(50);
    })
    .await;
    let no_issuer = spawn_with(&ca, aged_identity(&ca, "n"), &[], |c| {
        c.auth.renew_check_interval = Duration::from_millis(50);
    })
    .await;
    wait_until("renewed", LIMIT, || a.stats().snapshot().cert_renewals == 1).await;
    // Renewed once, then no longer due.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.stats().snapshot().cert_renewals, 1);
    assert_eq!(no_issuer.stats().snapshot().cert_renewals, 0);
    assert!(no_issuer.stats().snapshot().cert_expires_in <= 86_400);
    assert!(no_issuer.renew_certificate().is_err());
    a.shutdown().await;
    no_issuer.shutdown().await;
}
