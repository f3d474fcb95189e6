//! Service authentication end to end over loopback: tokens and discovery peer to peer, every
//! refusal, token-checked forwarding, atomic registration and deregistration.

use std::time::Duration;

use meshd_suite::*;
use overlay::auth::policy::Policy;
use overlay::auth::{AdminError, RegistrationStep};
use overlay::{Node, UpstreamConfig};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(15);

async fn pair(ca: &overlay::identity::CaMaterial) -> (Node, Node, Node) {
    let a = spawn_with(ca, identity(ca, "a"), &[], |_| {}).await;
    let b = spawn_with(
        ca,
        identity_in_groups(ca, "b", &["ops"]),
        &[a.addr()],
        |_| {},
    )
    .await;
    let c = spawn_with(ca, identity(ca, "c"), &[a.addr()], |_| {}).await;
    for n in [&a, &b, &c] {
        timeout(LIMIT, n.wait_members(|m| m == 2)).await.unwrap();
    }
    (a, b, c)
}

fn ops_only() -> Policy {
    serde_json::from_value(serde_json::json!({
        "deny_by_default": true,
        "scopes": ["connect", "read"],
        "allow": [{"callers": ["group:ops"], "scopes": ["connect"]}],
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_discovery_over_the_overlay_with_every_refusal() {
    let ca = test_ca();
    let (a, b, c) = pair(&ca).await;
    let backend = echo_server().await;
    let reg = a
        .register_service("db", backend, Some(ops_only()))
        .await
        .unwrap();
    let key = reg.api_key.expose().to_owned();
    timeout(LIMIT, b.wait_catalog(|s| s.iter().any(|e| e.name == "db")))
        .await
        .unwrap();
    timeout(LIMIT, c.wait_catalog(|s| s.iter().any(|e| e.name == "db")))
        .await
        .unwrap();

    // b (group ops) obtains a token from a, over the overlay; a verifies it.
    let t = b.request_token("db", &key, "connect").await.unwrap();
    let claims = a.verify_token(t.token.expose()).unwrap();
    assert_eq!(claims.sub, b.node_id().to_string());
    assert_eq!(claims.iss, a.node_id().to_string());
    assert_eq!(claims.aud, "db");
    // JWKS verifies it with a standard library.
    let jwks = a.jwks();
    let k = &jwks["keys"][0];
    assert_eq!(
        (k["kty"].as_str(), k["crv"].as_str()),
        (Some("OKP"), Some("Ed25519"))
    );
    assert_eq!(k["alg"], "EdDSA");

    // Discovery: with the key and with the token.
    let inst = b.discover("db", &key).await.unwrap();
    assert_eq!(inst.len(), 1);
    assert_eq!(inst[0].node_id, a.node_id());
    assert_eq!(inst[0].scopes, vec!["connect"]);
    assert_eq!(b.discover("db", t.token.expose()).await.unwrap().len(), 1);

    // Refusals, each with its status.
    let mut wrong = key.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == 'x' { 'y' } else { 'x' });
    assert_eq!(
        b.request_token("db", &wrong, "connect")
            .await
            .unwrap_err()
            .status,
        401
    );
    assert_eq!(b.discover("db", &wrong).await.unwrap_err().status, 401);
    // Policy: c is not in group ops; an unknown scope is refused too.
    assert_eq!(
        c.request_token("db", &key, "connect")
            .await
            .unwrap_err()
            .status,
        403
    );
    assert_eq!(c.discover("db", &key).await.unwrap_err().status, 403);
    let r = b.request_token("db", &key, "admin").await.unwrap_err();
    assert_eq!(r.status, 403);
    assert!(r.reason.contains("unknown scope"), "{r:?}");
    // A token for c presented by b (wrong subject) is refused in discovery.
    assert_eq!(
        c.discover("db", t.token.expose()).await.unwrap_err().status,
        401
    );
    // Unknown key id, retired key.
    let (kid2, key2) = a.create_api_key("db").await.unwrap();
    assert!(b
        .request_token("db", key2.expose(), "connect")
        .await
        .is_ok());
    a.retire_api_key("db", &kid2, Some(0)).await.unwrap();
    let r = b
        .request_token("db", key2.expose(), "connect")
        .await
        .unwrap_err();
    assert_eq!(r.status, 401);
    assert!(r.reason.contains("retired"), "{r:?}");
    let other = a.register_service("web", backend, None).await.unwrap();
    let r = b
        .request_token("db", other.api_key.expose(), "connect")
        .await
        .unwrap_err();
    assert!(r.reason.contains("unknown API key id"), "{r:?}");
    // Revoked jti.
    a.revoke(
        overlay::node::RevokeRequest::Jti(claims.jti.clone()),
        "test",
    )
    .await
    .unwrap();
    assert_eq!(
        a.verify_token(t.token.expose()).unwrap_err(),
        overlay::auth::tokens::TokenRefusal::Revoked
    );
    let s = a.stats().snapshot();
    assert!(
        s.auth_failure >= 4 && s.auth_policy_denied >= 3 && s.tokens_issued >= 2,
        "{s:?}"
    );
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_refuse_with_429_and_show_in_metrics() {
    let ca = test_ca();
    let a = spawn_with(&ca, identity(&ca, "a"), &[], |c| {
        c.auth.limits.per_caller_service = overlay::auth::limits::Rate {
            per_second: 1,
            burst: 3,
        };
    })
    .await;
    let b = spawn_with(&ca, identity(&ca, "b"), &[a.addr()], |_| {}).await;
    timeout(LIMIT, b.wait_members(|m| m == 1)).await.unwrap();
    let reg = a
        .register_service("db", echo_server().await, None)
        .await
        .unwrap();
    timeout(LIMIT, b.wait_catalog(|s| s.iter().any(|e| e.name == "db")))
        .await
        .unwrap();
    let key = reg.api_key.expose();
    let mut refused = None;
    for _ in 0..10 {
        if let Err(r) = b.request_token("db", key, "connect").await {
            refused = Some(r);
            break;
        }
    }
    let r = refused.expect("the burst of 3 runs out");
    assert_eq!(r.status, 429);
    assert!(r.reason.contains("caller_service"), "{r:?}");
    assert!(r.retry_after_ms.unwrap() > 0);
    let m = a.render_metrics();
    assert!(
        m.contains("meshd_rate_limited_caller_service_total 1"),
        "{m}"
    );
    assert!(m.contains("meshd_limit_caller_service_burst 3"), "{m}");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_requires_a_token_when_the_policy_says_so() {
    let ca = test_ca();
    let a = spawn_with(&ca, identity(&ca, "a"), &[], |_| {}).await;
    let backend = echo_server().await;
    let reg = a
        .register_service(
            "echo",
            backend,
            Some(Policy {
                require_token: true,
                ..Policy::default()
            }),
        )
        .await
        .unwrap();
    let up = |c: &mut overlay::NodeConfig| {
        c.upstreams = vec![UpstreamConfig {
            service: "echo".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
        }]
    };
    let key = reg.api_key.clone();
    let b = spawn_with(&ca, identity(&ca, "b"), &[a.addr()], |c| {
        up(c);
        c.auth.upstream_keys.insert("echo".into(), key);
    })
    .await;
    let c = spawn_with(&ca, identity(&ca, "c"), &[a.addr()], up).await;
    for n in [&b, &c] {
        timeout(
            LIMIT,
            n.wait_catalog(|s| s.iter().any(|e| e.name == "echo")),
        )
        .await
        .unwrap();
    }
    // b has the API key: it fetches a token from a and forwards with it (twice: cached).
    for i in 0..2 {
        let data = pattern(10_000, i);
        let back = echo_through(b.upstream_addrs()[0].1, &data).await.unwrap();
        assert_eq!(back, data);
    }
    assert_eq!(a.stats().snapshot().tokens_issued, 1, "token cached");
    // c has none: the stream is refused (UNAUTHORIZED) and nothing is echoed.
    let back = echo_through(c.upstream_addrs()[0].1, b"hello")
        .await
        .unwrap_or_default();
    assert!(back.is_empty());
    // open_service_stream on b is token-aware too.
    let (mut send, mut recv) = b.open_service_stream("echo").await.unwrap();
    send.write_all(b"ping").await.unwrap();
    send.finish().unwrap();
    let got = recv.read_to_end(100).await.unwrap();
    assert_eq!(got, b"ping");
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_at_each_registration_step_leaves_nothing_behind() {
    let ca = test_ca();
    let observer = spawn_with(&ca, identity(&ca, "observer"), &[], |_| {}).await;
    for (i, step) in RegistrationStep::ALL.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("host-{i}");
        let a = spawn_with(&ca, identity(&ca, &name), &[observer.addr()], |c| {
            c.auth.state_dir = Some(dir.path().to_owned());
            c.auth.test_fail_registration_after = Some(step);
        })
        .await;
        timeout(LIMIT, a.wait_members(|m| m == 1)).await.unwrap();
        let r = a.register_service("db", echo_server().await, None).await;
        assert!(
            matches!(r, Err(AdminError::StepFailed(_))),
            "{step:?}: {r:?}"
        );
        // Nothing locally: catalog, credentials in memory, credentials on disk.
        assert!(a.services().iter().all(|e| e.name != "db"), "{step:?}");
        assert!(a.credential_store().services.is_empty(), "{step:?}");
        let disk = overlay::auth::store::load(&dir.path().join("credentials.json"))
            .unwrap()
            .unwrap();
        assert!(disk.services.is_empty(), "{step:?}: on disk");
        assert_eq!(a.stats().snapshot().registrations_failed, 1);
        // Nothing remotely: publish a marker and wait until the observer has a's latest
        // catalog; it must not list `db`.
        a.publish("marker", echo_server().await).unwrap();
        let id = a.node_id();
        timeout(
            LIMIT,
            observer.wait_catalog(|s| s.iter().any(|e| e.name == "marker" && e.node_id.0 == id)),
        )
        .await
        .unwrap();
        assert!(observer.providers("db").is_empty(), "{step:?}: remote");
        // The name is free again: a registration without the fault succeeds elsewhere.
        a.shutdown().await;
        timeout(LIMIT, observer.wait_members(|m| m == 0))
            .await
            .unwrap();
    }
    observer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistration_withdraws_everywhere_and_kills_keys_and_tokens() {
    let ca = test_ca();
    let dir = tempfile::tempdir().unwrap();
    let a = spawn_with(&ca, identity(&ca, "a"), &[], |c| {
        c.auth.state_dir = Some(dir.path().to_owned());
    })
    .await;
    let b = spawn_with(&ca, identity(&ca, "b"), &[a.addr()], |_| {}).await;
    timeout(LIMIT, b.wait_members(|m| m == 1)).await.unwrap();
    let reg = a
        .register_service("db", echo_server().await, None)
        .await
        .unwrap();
    timeout(LIMIT, b.wait_catalog(|s| s.iter().any(|e| e.name == "db")))
        .await
        .unwrap();
    let t = b
        .request_token("db", reg.api_key.expose(), "connect")
        .await
        .unwrap();
    assert!(a.verify_token(t.token.expose()).is_ok());
    let report = a.deregister_service("db").await.unwrap();
    assert!(report.withdrawn && report.credentials_removed, "{report:?}");
    assert!(report.problems.is_empty(), "{report:?}");
    // Withdrawn overlay-wide (the push was awaited).
    assert!(b.providers("db").is_empty());
    assert!(a.verify_token(t.token.expose()).is_err());
    assert!(a.credential_store().services.is_empty());
    // Registering the name again gives a fresh service; old key and token stay dead.
    let reg2 = a
        .register_service("db", echo_server().await, None)
        .await
        .unwrap();
    assert!(a.verify_token(t.token.expose()).is_err());
    timeout(LIMIT, b.wait_catalog(|s| s.iter().any(|e| e.name == "db")))
        .await
        .unwrap();
    assert_eq!(
        b.request_token("db", reg.api_key.expose(), "connect")
            .await
            .unwrap_err()
            .status,
        401
    );
    assert!(b
        .request_token("db", reg2.api_key.expose(), "connect")
        .await
        .is_ok());
    assert!(matches!(
        a.deregister_service("nope").await,
        Err(AdminError::NoService(_))
    ));
    a.shutdown().await;
    b.shutdown().await;
}
