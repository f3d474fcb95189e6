//! The `meshd` binary: certificate tooling, config errors, and two daemons joining.

#![allow(clippy::disallowed_methods)] // polls a child process against a wall-clock deadline

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn meshd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshd"))
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn ca_init_and_issue_write_private_keys_and_refuse_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    ok(meshd().args(["ca", "init", "--dir"]).arg(&ca));
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
    let before = std::fs::read(ca.join("ca.key")).unwrap();
    let out = meshd()
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(!out.status.success(), "second init refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_eq!(
        std::fs::read(ca.join("ca.key")).unwrap(),
        before,
        "CA key untouched"
    );

    let n1 = dir.path().join("n1");
    let id = ok(meshd()
        .args(["ca", "issue", "--ca"])
        .arg(&ca)
        .args(["--name", "node-1", "--out"])
        .arg(&n1));
    let id = id.trim();
    assert_eq!(id.len(), 32, "node id printed: {id:?}");
    assert_eq!(mode(&n1.join("node.key")), 0o600);
    let out = meshd()
        .args(["ca", "issue", "--ca"])
        .arg(&ca)
        .args(["--name", "node-1", "--out"])
        .arg(&n1)
        .output()
        .unwrap();
    assert!(!out.status.success(), "existing node key not overwritten");
    let again = ok(meshd()
        .args(["ca", "issue", "--force", "--ca"])
        .arg(&ca)
        .args(["--name", "node-1", "--out"])
        .arg(&n1));
    assert_ne!(again.trim(), id, "a new key gives a new node id");

    let out = meshd()
        .args(["ca", "issue", "--ca"])
        .arg(&ca)
        .args(["--name", "Bad Name", "--out"])
        .arg(dir.path().join("bad"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid node name"));
}

#[test]
fn bad_config_exits_non_zero_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "name = \"a\"\nlisten = \"not-an-address\"\nca_cert = \"c\"\ncert = \"c\"\nkey = \"k\"\nadmin = \"127.0.0.1:1\"\nstate_dir = \"s\"\n",
    )
    .unwrap();
    let out = meshd()
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("`listen`"),
        "{err}"
    );

    let out = meshd()
        .args(["run", "--config", "/nonexistent/meshd.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/meshd.toml"));

    let out = meshd().args(["run"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "usage error");
}

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port(udp: bool) -> u16 {
    if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}

#[test]
fn two_daemons_join_and_status_lists_them() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    ok(meshd().args(["ca", "init", "--dir"]).arg(&ca));
    let mut daemons = Vec::new();
    let mut admins = Vec::new();
    let mut first_udp = 0;
    for name in ["one", "two"] {
        let out = dir.path().join(name);
        ok(meshd()
            .args(["ca", "issue", "--ca"])
            .arg(&ca)
            .args(["--name", name, "--out"])
            .arg(&out));
        let udp = free_port(true);
        let admin = free_port(false);
        if first_udp == 0 {
            first_udp = udp;
        }
        let cfg = format!(
            "name = \"{name}\"\nlisten = \"127.0.0.1:{udp}\"\nbootstrap = [\"127.0.0.1:{first_udp}\"]\n\
             ca_cert = \"{ca}/ca.crt\"\ncert = \"{out}/node.crt\"\nkey = \"{out}/node.key\"\n\
             admin = \"127.0.0.1:{admin}\"\nstate_dir = \"{out}/state\"\n\
             [membership]\nprobe_period_ms = 200\nprobe_timeout_ms = 100\nsuspect_timeout_ms = 1000\n",
            ca = ca.display(),
            out = out.display()
        );
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, cfg).unwrap();
        let child = meshd()
            .arg("run")
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        daemons.push(Daemon(child));
        admins.push(admin);
    }
    // Poll `meshd status` until `one` lists `two` as alive (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = meshd()
            .args(["status", "--json", "--admin"])
            .arg(format!("127.0.0.1:{}", admins[0]))
            .output()
            .unwrap();
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let peers = v["peers"].as_array().unwrap();
            if peers
                .iter()
                .any(|p| p["name"] == "two" && p["state"] == "alive")
            {
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "two never joined one");
        std::thread::sleep(Duration::from_millis(50));
    }
    let table = ok(meshd()
        .args(["status", "--admin"])
        .arg(format!("127.0.0.1:{}", admins[1])));
    assert!(table.contains("one") && table.contains("alive"), "{table}");
}

/// One HTTP/1.1 request to the admin API; returns (status, body).
fn http(
    admin: u16,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", admin)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    if let Some(b) = bearer {
        req.push_str(&format!("Authorization: Bearer {b}\r\n"));
    }
    let body = body.unwrap_or("");
    req.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_owned();
    (code, body)
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

#[test]
fn admin_api_keys_tokens_revocation_backup_and_no_secret_in_trace_logs() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    ok(meshd().args(["ca", "init", "--dir"]).arg(&ca));
    let out = dir.path().join("one");
    ok(meshd()
        .args(["ca", "issue", "--ca"])
        .arg(&ca)
        .args(["--name", "one", "--group", "ops", "--out"])
        .arg(&out));
    let victim = ok(meshd()
        .args(["ca", "issue", "--ca"])
        .arg(&ca)
        .args(["--name", "victim", "--out"])
        .arg(dir.path().join("victim")));
    let (udp, admin, nobody) = (free_port(true), free_port(false), free_port(true));
    let state = out.join("state");
    // A bootstrap address nobody answers: the daemon keeps dialling, so QUIC logs at TRACE.
    let cfg = format!(
        "name = \"one\"\nlisten = \"127.0.0.1:{udp}\"\nbootstrap = [\"127.0.0.1:{nobody}\"]\nca_cert = \"{ca}/ca.crt\"\n\
         cert = \"{out}/node.crt\"\nkey = \"{out}/node.key\"\nadmin = \"127.0.0.1:{admin}\"\n\
         state_dir = \"{state}\"\n[auth]\nca_key = \"{ca}/ca.key\"\n",
        ca = ca.display(),
        out = out.display(),
        state = state.display()
    );
    let cfg_path = dir.path().join("one.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let log = dir.path().join("trace.log");
    let child = meshd()
        .args(["run", "--config"])
        .arg(&cfg_path)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let daemon = Daemon(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", admin)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "admin API never came up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let token_file = state.join("admin.token");
    assert_eq!(mode(&token_file), 0o600);
    let admin_token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_owned();
    let mut secrets = vec![admin_token.clone()];

    // Mutating calls need the admin token.
    let reg = r#"{"name":"db","backend":"127.0.0.1:9","policy":{"deny_by_default":true,"allow":[{"callers":["group:ops"]}]}}"#;
    assert_eq!(http(admin, "POST", "/v1/services", None, Some(reg)).0, 401);
    assert_eq!(
        http(admin, "POST", "/v1/services", Some("mat_wrong"), Some(reg)).0,
        401
    );
    let (code, body) = http(admin, "POST", "/v1/services", Some(&admin_token), Some(reg));
    assert_eq!(code, 201, "{body}");
    let key = json(&body)["api_key"].as_str().unwrap().to_owned();
    secrets.push(key.clone());
    // `meshd key new` from the command line.
    let printed = ok(meshd()
        .args(["key", "new", "--service", "db", "--config"])
        .arg(&cfg_path));
    let key2 = printed
        .lines()
        .find_map(|l| l.strip_prefix("api_key "))
        .unwrap()
        .trim()
        .to_owned();
    secrets.push(key2.clone());
    // Tokens: 401 bad key, 200 good key (caller = this node, group ops), verify, JWKS.
    let req = |k: &str| format!(r#"{{"service":"db","api_key":"{k}","scope":"connect"}}"#);
    let mut bad = key.clone();
    let last = bad.pop().unwrap();
    bad.push(if last == 'Z' { 'Y' } else { 'Z' });
    assert_eq!(
        http(admin, "POST", "/v1/tokens", None, Some(&req(&bad))).0,
        401
    );
    let (code, body) = http(admin, "POST", "/v1/tokens", None, Some(&req(&key2)));
    assert_eq!(code, 200, "{body}");
    let token = json(&body)["token"].as_str().unwrap().to_owned();
    secrets.push(token.clone());
    let (code, body) = http(
        admin,
        "POST",
        "/v1/tokens/verify",
        None,
        Some(&format!(r#"{{"token":"{token}"}}"#)),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["aud"], "db");
    assert_eq!(http(admin, "GET", "/v1/jwks", None, None).0, 200);
    // Discovery needs a credential.
    assert_eq!(http(admin, "GET", "/v1/services/db", None, None).0, 401);
    let (code, body) = http(admin, "GET", "/v1/services/db", Some(&token), None);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["instances"][0]["name"], "one");
    // Revoke the token, a key, and a node (signed with ca_key).
    let jti = json(
        &http(
            admin,
            "POST",
            "/v1/tokens/verify",
            None,
            Some(&format!(r#"{{"token":"{token}"}}"#)),
        )
        .1,
    )["jti"]
        .as_str()
        .unwrap()
        .to_owned();
    let rv = |b: String| {
        http(
            admin,
            "POST",
            "/v1/revocations",
            Some(&admin_token),
            Some(&b),
        )
    };
    assert_eq!(rv(format!(r#"{{"jti":"{jti}"}}"#)).0, 200);
    assert_eq!(
        http(
            admin,
            "POST",
            "/v1/tokens/verify",
            None,
            Some(&format!(r#"{{"token":"{token}"}}"#))
        )
        .0,
        401
    );
    assert_eq!(rv(format!(r#"{{"node_id":"{}"}}"#, victim.trim())).0, 200);
    // Backup through the running peer, then restore it: the revocation stays.
    let backup = dir.path().join("backup.json");
    ok(meshd()
        .args(["backup", "--config"])
        .arg(&cfg_path)
        .arg("--out")
        .arg(&backup));
    assert_eq!(mode(&backup), 0o600);
    let store = json(&std::fs::read_to_string(&backup).unwrap());
    secrets.push(store["hmac_secret"].as_str().unwrap().to_owned());
    for k in store["signing_keys"].as_array().unwrap() {
        secrets.push(k["secret"].as_str().unwrap().to_owned());
    }
    ok(meshd()
        .args(["restore", "--config"])
        .arg(&cfg_path)
        .arg(&backup));
    let (_, m) = http(admin, "GET", "/metrics", None, None);
    assert!(m.contains("meshd_revocations_total"), "{m}");
    // Deregister.
    let (code, body) = http(admin, "DELETE", "/v1/services/db", Some(&admin_token), None);
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        http(admin, "POST", "/v1/tokens", None, Some(&req(&key2))).0,
        404
    );
    drop(daemon);

    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(
        logs.contains("TRACE"),
        "trace logging was on: {}",
        &logs[..logs.len().min(2000)]
    );
    assert!(logs.contains("meshd::audit"));
    for s in &secrets {
        assert!(s.len() >= 20);
        assert!(
            !logs.contains(s.as_str()),
            "a secret appears in the TRACE logs"
        );
    }
}
