//! Authentication costs: token issue and verify (EdDSA, HS256), API key check, the full
//! token request decision, the cached forward check, and discovery / token requests over the
//! overlay (two peers on loopback).
//!
//! `cargo bench -p overlay --bench auth`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use overlay::auth::keys::{self, KeyHasher};
use overlay::auth::limits::{LimitSettings, Rate};
use overlay::auth::policy::{Caller, Policy};
use overlay::auth::tokens::{TokenAlg, TokenAuthority, TokenSettings};
use overlay::auth::{AuthSettings, Authority};
use overlay::identity::{generate_ca, NodeIdentity, Validity};
use overlay::stats::Stats;
use overlay::{Node, NodeConfig};

const NOW: u64 = 1_800_000_000;

fn authority(alg: TokenAlg) -> TokenAuthority {
    TokenAuthority::new(
        "iss".into(),
        TokenSettings {
            alg,
            accept: vec![alg],
            ..TokenSettings::default()
        },
        NOW,
    )
    .unwrap()
}

fn tokens(c: &mut Criterion) {
    for alg in [TokenAlg::EdDSA, TokenAlg::HS256] {
        let a = authority(alg);
        c.bench_function(&format!("token issue {alg:?}"), |b| {
            b.iter(|| a.issue("caller-node-id", "db", "connect", NOW).unwrap())
        });
        let t = a.issue("caller-node-id", "db", "connect", NOW).unwrap();
        c.bench_function(&format!("token verify {alg:?}"), |b| {
            b.iter(|| a.verify_for(t.token.expose(), "db", None, NOW).unwrap())
        });
    }
}

fn key_check(c: &mut Criterion) {
    let h = KeyHasher::generate();
    let (key, rec) = keys::generate(&h, NOW);
    let recs = vec![rec];
    c.bench_function("api key check (HMAC-SHA256 + ct compare)", |b| {
        b.iter(|| keys::check(&h, &recs, key.expose(), NOW).unwrap())
    });
}

fn id(b: u8) -> overlay::NodeId {
    data_encoding::BASE32_NOPAD
        .encode(&[b; 20])
        .to_ascii_lowercase()
        .parse()
        .unwrap()
}

fn unlimited() -> LimitSettings {
    let r = Rate {
        per_second: 1_000_000_000,
        burst: 1_000_000_000,
    };
    LimitSettings {
        per_caller_service: r,
        per_service: r,
        failed_auth_per_caller: r,
        max_tracked: 10_000,
    }
}

fn authority_paths(c: &mut Criterion) {
    let settings = AuthSettings {
        limits: unlimited(),
        ..AuthSettings::default()
    };
    let mut a = Authority::new(
        id(0),
        &settings,
        vec![],
        None,
        Arc::new(Stats::default()),
        NOW * 1000,
    )
    .unwrap();
    let (_, key) = a.add_service("db", None, NOW * 1000).unwrap();
    a.set_policy("db", Policy::default()).unwrap();
    let caller = Caller {
        node_id: id(1),
        name: "web".into(),
        groups: vec![],
    };
    c.bench_function(
        "authority issue_token (limits + key + policy + EdDSA sign + audit)",
        |b| {
            b.iter(|| {
                a.issue_token(&caller, "db", key.expose(), "connect", NOW * 1000)
                    .unwrap()
            })
        },
    );
    let t = a
        .issue_token(&caller, "db", key.expose(), "connect", NOW * 1000)
        .unwrap();
    c.bench_function("authority authorize_forward (cached verify)", |b| {
        b.iter(|| {
            a.authorize_forward(&caller, "db", t.token.expose(), NOW * 1000)
                .unwrap()
        })
    });
}

fn overlay_paths(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let ca = generate_ca("bench", Validity::days_from(now, 1).unwrap()).unwrap();
    let ident =
        |n: &str| NodeIdentity::issue(&ca, n, Validity::days_from(now, 1).unwrap()).unwrap();
    let cfg = |bootstrap: Vec<std::net::SocketAddr>| NodeConfig {
        bootstrap,
        auth: AuthSettings {
            limits: unlimited(),
            ..AuthSettings::default()
        },
        ..NodeConfig::default()
    };
    let (a, b, key) = rt.block_on(async {
        let a = Node::bind("127.0.0.1:0".parse().unwrap(), ident("a"), cfg(vec![]))
            .await
            .unwrap();
        let b = Node::bind(
            "127.0.0.1:0".parse().unwrap(),
            ident("b"),
            cfg(vec![a.addr()]),
        )
        .await
        .unwrap();
        let reg = a
            .register_service("db", "127.0.0.1:9".parse().unwrap(), None)
            .await
            .unwrap();
        tokio::time::timeout(
            Duration::from_secs(15),
            b.wait_catalog(|s| s.iter().any(|e| e.name == "db")),
        )
        .await
        .unwrap();
        // Warm the connection.
        b.discover("db", reg.api_key.expose()).await.unwrap();
        (a, b, reg.api_key)
    });
    c.bench_function(
        "discovery over the overlay (API key, open connection)",
        |bch| bch.iter(|| rt.block_on(b.discover("db", key.expose())).unwrap()),
    );
    c.bench_function("token request over the overlay (open connection)", |bch| {
        bch.iter(|| {
            rt.block_on(b.request_token("db", key.expose(), "connect"))
                .unwrap()
        })
    });
    rt.block_on(async {
        b.shutdown().await;
        a.shutdown().await;
    });
}

criterion_group!(
    name = benches;
    config = Criterion::default()
        .sample_size(50)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    targets = tokens, key_check, authority_paths, overlay_paths
);
criterion_main!(benches);
