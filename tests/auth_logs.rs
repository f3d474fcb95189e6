//! Secrets never reach the logs: a full authenticated run (registration, keys, tokens over the
//! overlay, token-checked forwarding, discovery, verification, rotation, revocations, backup)
//! with every target logging at TRACE into a buffer, which must contain none of the run's
//! secrets (API keys, tokens, HMAC key, signing keys, CA key).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshd_suite::*;
use overlay::auth::policy::Policy;
use overlay::node::RevokeRequest;
use overlay::UpstreamConfig;
use tokio::time::timeout;

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const LIMIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_trace_logs_of_a_full_run() {
    let buf = Buf::default();
    let w = buf.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_writer(move || w.clone())
        .with_ansi(false)
        .try_init()
        .expect("this test owns the process's subscriber");

    let ca = test_ca();
    let issuer = Arc::new(overlay::identity::CaMaterial {
        cert_pem: ca.cert_pem.clone(),
        key_pem: ca.key_pem.clone(),
    });
    let dir = tempfile::tempdir().unwrap();
    let a = spawn_with(&ca, identity(&ca, "a"), &[], |c| {
        c.auth.issuer = Some(issuer);
        c.auth.state_dir = Some(dir.path().to_owned());
    })
    .await;
    let policy = Policy {
        require_token: true,
        ..Policy::default()
    };
    let reg = a
        .register_service("echo", echo_server().await, Some(policy))
        .await
        .unwrap();
    let mut secrets: Vec<String> = vec![reg.api_key.expose().to_owned()];
    let key = reg.api_key.clone();
    let b = spawn_with(&ca, identity(&ca, "b"), &[a.addr()], |c| {
        c.upstreams = vec![UpstreamConfig {
            service: "echo".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
        }];
        c.auth.upstream_keys.insert("echo".into(), key);
    })
    .await;
    let c = spawn_with(&ca, identity(&ca, "c"), &[a.addr()], |_| {}).await;
    timeout(
        LIMIT,
        b.wait_catalog(|s| s.iter().any(|e| e.name == "echo")),
    )
    .await
    .unwrap();
    // Forwarding with a token fetched over the overlay.
    let data = pattern(4096, 1);
    assert_eq!(
        echo_through(b.upstream_addrs()[0].1, &data).await.unwrap(),
        data
    );
    // Tokens, discovery, verification, refusals.
    let t = b
        .request_token("echo", reg.api_key.expose(), "connect")
        .await
        .unwrap();
    secrets.push(t.token.expose().to_owned());
    assert!(a.verify_token(t.token.expose()).is_ok());
    assert!(b.discover("echo", t.token.expose()).await.is_ok());
    assert!(b.discover("echo", reg.api_key.expose()).await.is_ok());
    let (kid, k2) = a.create_api_key("echo").await.unwrap();
    secrets.push(k2.expose().to_owned());
    let mut wrong = k2.expose().to_owned();
    let last = wrong.pop().unwrap();
    wrong.push(if last == 'Q' { 'R' } else { 'Q' });
    secrets.push(wrong.clone());
    assert!(b.request_token("echo", &wrong, "connect").await.is_err());
    assert!(c.discover("echo", &wrong).await.is_err());
    a.retire_api_key("echo", &kid, Some(0)).await.unwrap();
    assert!(b
        .request_token("echo", k2.expose(), "connect")
        .await
        .is_err());
    a.rotate_signing_key().await.unwrap();
    let t2 = b
        .request_token("echo", reg.api_key.expose(), "connect")
        .await
        .unwrap();
    secrets.push(t2.token.expose().to_owned());
    let claims = a.verify_token(t2.token.expose()).unwrap();
    a.revoke(RevokeRequest::Jti(claims.jti), "t").await.unwrap();
    assert!(a.verify_token(t2.token.expose()).is_err());
    a.revoke(RevokeRequest::Node(c.node_id()), "t")
        .await
        .unwrap();
    // The store's own secrets.
    let store = a.credential_store();
    secrets.push(store.hmac_secret.expose().to_owned());
    for k in &store.signing_keys {
        secrets.push(k.secret.expose().to_owned());
    }
    // CA key body lines.
    for line in ca.key_pem.lines().filter(|l| !l.starts_with("-----")) {
        secrets.push(line.to_owned());
    }
    wait_until("revocation reached b", LIMIT, || b.is_revoked(&c.node_id())).await;
    for n in [a, b, c] {
        n.shutdown().await;
    }

    let logs = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    assert!(logs.lines().count() > 200, "TRACE logs were captured");
    assert!(logs.contains("meshd::audit"), "audit events were logged");
    for s in &secrets {
        assert!(s.len() >= 20, "secret too short to search for");
        assert!(!logs.contains(s.as_str()), "a secret appears in the logs");
        // The secret part of API keys, and token signatures, on their own.
        if let Some(tail) = s.rsplit(['_', '.']).next().filter(|t| t.len() >= 20) {
            assert!(!logs.contains(tail), "part of a secret appears in the logs");
        }
    }
}
