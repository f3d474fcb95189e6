//! Authority-level tests: every refusal of the request path, with an injected clock.

use super::*;
use crate::identity::NodeId;

const T0: u64 = 1_800_000_000_000; // ms

fn id(b: u8) -> NodeId {
    data_encoding::BASE32_NOPAD
        .encode(&[b; 20])
        .to_ascii_lowercase()
        .parse()
        .unwrap()
}

fn caller(b: u8, name: &str) -> Caller {
    Caller {
        node_id: id(b),
        name: name.into(),
        groups: vec![],
    }
}

fn authority() -> Authority {
    Authority::new(
        id(0),
        &AuthSettings::default(),
        vec![],
        None,
        Arc::new(Stats::default()),
        T0,
    )
    .unwrap()
}

fn with_service(a: &mut Authority, name: &str, policy: Policy) -> SecretString {
    let (_, key) = a.add_service(name, None, T0).unwrap();
    a.set_policy(name, policy).unwrap();
    key
}

#[test]
fn token_issue_and_every_key_refusal() {
    let mut a = authority();
    let key = with_service(&mut a, "db", Policy::default());
    let c = caller(1, "web");
    let t = a
        .issue_token(&c, "db", key.expose(), "connect", T0)
        .unwrap();
    assert_eq!(t.claims.sub, id(1).to_string());
    assert_eq!(t.claims.iss, id(0).to_string());
    assert_eq!(a.verify_token(t.token.expose(), T0).unwrap(), t.claims);
    assert_eq!(a.stats().snapshot().tokens_issued, 1);

    // Wrong key (right id, wrong secret).
    let mut wrong = key.expose().to_owned();
    let last = wrong.pop().unwrap();
    wrong.push(if last == 'x' { 'y' } else { 'x' });
    let r = a.issue_token(&c, "db", &wrong, "connect", T0).unwrap_err();
    assert_eq!(r, Refusal::BadKey(KeyRefusal::WrongKey));
    assert_eq!(r.status(), 401);
    // Unknown key id: a key of another service.
    let other = with_service(&mut a, "web", Policy::default());
    let r = a
        .issue_token(&c, "db", other.expose(), "connect", T0)
        .unwrap_err();
    assert_eq!(r, Refusal::BadKey(KeyRefusal::UnknownKeyId));
    // Retired key: works through the overlap window, refused after.
    let kid = keys::parse_api_key(key.expose()).unwrap();
    a.retire_key("db", &kid, 60, T0).unwrap();
    let c2 = caller(2, "api");
    assert!(a
        .issue_token(&c2, "db", key.expose(), "connect", T0 + 59_000)
        .is_ok());
    let r = a
        .issue_token(&c2, "db", key.expose(), "connect", T0 + 60_000)
        .unwrap_err();
    assert_eq!(r, Refusal::BadKey(KeyRefusal::Retired));
    // Revoked key (immediately).
    let (kid2, key2) = a.create_key("db", T0).unwrap();
    assert!(a
        .issue_token(&c2, "db", key2.expose(), "connect", T0)
        .is_ok());
    assert_eq!(a.revoke_key(&kid2, T0 + 1000), Some("db".into()));
    let r = a
        .issue_token(&c2, "db", key2.expose(), "connect", T0 + 1000)
        .unwrap_err();
    assert_eq!(r, Refusal::BadKey(KeyRefusal::Retired));
    // Unknown service.
    let r = a
        .issue_token(&c2, "nope", key2.expose(), "connect", T0)
        .unwrap_err();
    assert_eq!(r.status(), 404);
    assert!(a.stats().snapshot().auth_failure >= 4);
}

#[test]
fn policy_denial_and_unknown_scope() {
    let mut a = authority();
    let policy: Policy = serde_json::from_value(serde_json::json!({
        "deny_by_default": true,
        "scopes": ["connect", "read"],
        "allow": [{"callers": ["name:web"], "scopes": ["connect"]}],
    }))
    .unwrap();
    let key = with_service(&mut a, "db", policy);
    let web = caller(1, "web");
    let batch = caller(2, "batch");
    assert!(a
        .issue_token(&web, "db", key.expose(), "connect", T0)
        .is_ok());
    let r = a
        .issue_token(&web, "db", key.expose(), "read", T0)
        .unwrap_err();
    assert_eq!(r, Refusal::Policy(PolicyRefusal::Denied));
    assert_eq!(r.status(), 403);
    let r = a
        .issue_token(&batch, "db", key.expose(), "connect", T0)
        .unwrap_err();
    assert_eq!(r, Refusal::Policy(PolicyRefusal::Denied));
    let r = a
        .issue_token(&web, "db", key.expose(), "write", T0)
        .unwrap_err();
    assert_eq!(r, Refusal::Policy(PolicyRefusal::UnknownScope));
    // Discovery applies the policy too.
    assert_eq!(
        a.discover(&web, "db", key.expose(), T0).unwrap().scopes,
        vec!["connect"]
    );
    assert_eq!(
        a.discover(&batch, "db", key.expose(), T0).unwrap_err(),
        Refusal::Policy(PolicyRefusal::Denied)
    );
    assert!(a.stats().snapshot().auth_policy_denied >= 3);
}

#[test]
fn token_refusals_through_the_authority() {
    let mut a = authority();
    let key = with_service(&mut a, "db", Policy::default());
    let c = caller(1, "web");
    let t = a
        .issue_token(&c, "db", key.expose(), "connect", T0)
        .unwrap();
    let tok = t.token.expose();
    // Expired, not yet valid.
    let ttl = a.tokens().settings().ttl_secs * 1000;
    let leeway = a.tokens().settings().leeway_secs * 1000;
    assert_eq!(
        a.verify_token(tok, T0 + ttl + leeway + 1000),
        Err(TokenRefusal::Expired)
    );
    assert_eq!(
        a.verify_token(tok, T0 - leeway - 1000),
        Err(TokenRefusal::NotYetValid)
    );
    // Wrong audience and wrong subject on forwarding.
    let _ = with_service(&mut a, "web", Policy::default());
    assert_eq!(
        a.authorize_forward(&c, "web", tok, T0),
        Err(Refusal::BadToken(TokenRefusal::WrongAudience))
    );
    assert_eq!(
        a.authorize_forward(&caller(9, "thief"), "db", tok, T0),
        Err(Refusal::BadToken(TokenRefusal::WrongSubject))
    );
    assert!(a.authorize_forward(&c, "db", tok, T0).is_ok());
    // Wrong issuer: a token from another node's authority.
    let mut b = authority();
    let bkey = with_service(&mut b, "db", Policy::default());
    let bt = b
        .issue_token(&c, "db", bkey.expose(), "connect", T0)
        .unwrap();
    assert_eq!(
        a.verify_token(bt.token.expose(), T0),
        Err(TokenRefusal::UnknownKid)
    );
    // Revoked jti: refused even though the verification is cached.
    a.revoke_jti(&t.claims.jti, T0).unwrap();
    assert_eq!(a.verify_token(tok, T0), Err(TokenRefusal::Revoked));
    assert_eq!(
        a.authorize_forward(&c, "db", tok, T0),
        Err(Refusal::BadToken(TokenRefusal::Revoked))
    );
    // Deregistration invalidates every token of the service, even after re-registration.
    let t2 = a
        .issue_token(&c, "db", key.expose(), "connect", T0)
        .unwrap();
    assert!(a.verify_token(t2.token.expose(), T0).is_ok());
    a.remove_service("db", T0);
    assert_eq!(
        a.verify_token(t2.token.expose(), T0),
        Err(TokenRefusal::Revoked)
    );
    let key3 = with_service(&mut a, "db", Policy::default());
    assert_eq!(
        a.verify_token(t2.token.expose(), T0 + 1000),
        Err(TokenRefusal::Revoked)
    );
    let t3 = a
        .issue_token(&c, "db", key3.expose(), "connect", T0 + 2000)
        .unwrap();
    assert!(a.verify_token(t3.token.expose(), T0 + 2000).is_ok());
    // The old key is gone with the old registration.
    assert_eq!(
        a.issue_token(&c, "db", key.expose(), "connect", T0 + 2000)
            .unwrap_err(),
        Refusal::BadKey(KeyRefusal::UnknownKeyId)
    );
}

#[test]
fn rate_limits_are_distinguishable_and_counted() {
    let mut a = authority();
    let key = with_service(&mut a, "db", Policy::default());
    let c = caller(1, "web");
    let burst = a.limits().settings().per_caller_service.burst;
    for _ in 0..burst {
        a.issue_token(&c, "db", key.expose(), "connect", T0)
            .unwrap();
    }
    let r = a
        .issue_token(&c, "db", key.expose(), "connect", T0)
        .unwrap_err();
    assert!(matches!(
        r,
        Refusal::RateLimited(LimitRefusal {
            kind: LimitKind::CallerService,
            ..
        })
    ));
    assert_eq!(r.status(), 429);
    assert!(r.retry_after_ms().unwrap() > 0);
    assert_eq!(a.stats().snapshot().rate_limited_caller_service, 1);
    // Another caller is not affected.
    assert!(a
        .issue_token(&caller(2, "x"), "db", key.expose(), "connect", T0)
        .is_ok());
    // A caller guessing keys is locked out, even with the right key afterwards.
    let g = caller(3, "guesser");
    let fails = a.limits().settings().failed_auth_per_caller.burst;
    for _ in 0..=fails {
        let _ = a.issue_token(&g, "db", "mk_aaaaaaaaaaaaaaaa_x", "connect", T0);
    }
    let r = a
        .issue_token(&g, "db", key.expose(), "connect", T0)
        .unwrap_err();
    assert!(matches!(
        r,
        Refusal::RateLimited(LimitRefusal {
            kind: LimitKind::FailedAuth,
            ..
        })
    ));
    assert!(a.stats().snapshot().rate_limited_failed_auth >= 1);
    // A little later it may try again.
    assert!(a
        .issue_token(&g, "db", key.expose(), "connect", T0 + 5_000)
        .is_ok());
}

#[test]
fn store_round_trip_and_restore_never_readmits_revoked() {
    let mut a = authority();
    let key = with_service(&mut a, "db", Policy::default());
    let (kid2, key2) = a.create_key("db", T0).unwrap();
    let backup = a.to_store();
    let json = serde_json::to_string(&backup).unwrap();
    // Only hashes: neither key's secret is in the store.
    assert!(!json.contains(&key.expose()[20..]));
    assert!(!json.contains(&key2.expose()[20..]));
    // Reload from the store: keys still check.
    let b = Authority::new(
        id(0),
        &AuthSettings::default(),
        vec![],
        Some(&backup),
        Arc::new(Stats::default()),
        T0,
    )
    .unwrap();
    assert!(b.check_key("db", key.expose(), T0).is_ok());
    // Revoke key2 after the backup, then restore the backup: key2 stays revoked.
    a.revoke_key(&kid2, T0 + 1000);
    let merged = store::merge_restore(&a.to_store(), &backup);
    a.restore(&merged, &AuthSettings::default(), T0 + 2000)
        .unwrap();
    assert_eq!(
        a.check_key("db", key2.expose(), T0 + 2000),
        Err(Refusal::BadKey(KeyRefusal::Retired))
    );
    assert!(a.check_key("db", key.expose(), T0 + 2000).is_ok());
    // Debug output never shows secrets.
    let dbg = format!("{a:?} {:?}", a.to_store());
    assert!(!dbg.contains(a.to_store().hmac_secret.expose()));
    // A store for another node is refused.
    assert!(Authority::new(
        id(7),
        &AuthSettings::default(),
        vec![],
        Some(&backup),
        Arc::new(Stats::default()),
        T0
    )
    .is_err());
}
