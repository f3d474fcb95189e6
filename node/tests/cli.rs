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
