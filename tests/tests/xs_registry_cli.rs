//! `ddstor xs list|lookup|register` across processes against `ddstor xenstored`, and Debian's
//! `xenstore-watch` seeing an agent's registration.

use ddstor_e2e::{bin, require_tool};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn xenstored(dir: &Path, domains: &[&str]) -> (Proc, PathBuf) {
    let socket = dir.join("xs.sock");
    let mut cmd = Command::new(bin("ddstor"));
    cmd.arg("xenstored").arg("--socket").arg(&socket);
    for d in domains {
        cmd.args(["--domain", d]);
    }
    let p = Proc(cmd.spawn().expect("spawn ddstor xenstored"));
    wait_for("xenstored socket", || socket.exists());
    (p, socket)
}

fn xs(socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("ddstor"))
        .env("XENSTORED_PATH", socket)
        .arg("xs")
        .args(args)
        .output()
        .expect("ddstor xs")
}

/// Registers an agent as domain `dom` (through `<socket>.<dom>`); returns once it is ready.
fn register(socket: &Path, dom: u16, srs: &[&str], load: u32) -> Proc {
    let dsock = PathBuf::from(format!("{}.{dom}", socket.display()));
    let mut cmd = Command::new(bin("ddstor"));
    cmd.env("XENSTORED_PATH", &dsock)
        .args(["xs", "register", "--load", &load.to_string()]);
    for s in srs {
        cmd.args(["--sr", s]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .expect("ddstor xs register");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("registered /local/domain/"), "{line}");
    Proc(child)
}

#[test]
fn cli_lists_and_looks_up_registered_agents() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, sock) = xenstored(dir.path(), &["5", "6"]);
    let _a5 = register(&sock, 5, &["sr-1", "sr-2"], 4);
    let _a6 = register(&sock, 6, &["sr-1"], 1);
    let out = xs(&sock, &["list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let doms: Vec<u64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["domid"].as_u64().unwrap())
        .collect();
    assert_eq!(doms, vec![5, 6]);
    assert!(v[0]["live"].as_bool().unwrap());
    let out = xs(&sock, &["lookup", "sr-1", "--json"]);
    assert!(out.status.success());
    let a: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(a["domid"], 6, "least loaded");
    let out = xs(&sock, &["lookup", "sr-2"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("domid=5 "));
    let out = xs(&sock, &["lookup", "sr-unknown"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no live, ready agent serves SR sr-unknown"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one-line reason: {err}");
}

#[test]
fn xenstore_watch_sees_registration_and_deregistration() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, sock) = xenstored(dir.path(), &["5"]);
    let watch = require_tool("xenstore-watch", "xenstore-utils");
    let stdbuf = require_tool("stdbuf", "coreutils");
    // xenstore-watch's stdout is block-buffered into a pipe: make it line-buffered.
    let mut w = Proc(
        Command::new(stdbuf)
            .arg("-oL")
            .arg(watch)
            .env("XENSTORED_PATH", &sock)
            .arg("/local/domain/5/data/ddstor")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let out = w.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut seen: Vec<String> = Vec::new();
    let until = |seen: &mut Vec<String>, what: &str, pred: &dyn Fn(&[String]) -> bool| {
        let t0 = Instant::now();
        while !pred(seen) {
            let left = Duration::from_secs(15).saturating_sub(t0.elapsed());
            match rx.recv_timeout(left) {
                Ok(l) => seen.push(l),
                Err(_) => panic!("xenstore-watch: timed out waiting for {what}; saw {seen:?}"),
            }
        }
    };
    let base = "/local/domain/5/data/ddstor";
    until(&mut seen, "the initial event", &|s| !s.is_empty());
    assert_eq!(seen[0], base, "initial event");
    let agent = register(&sock, 5, &["sr-1"], 0);
    let state = format!("{base}/state");
    let sr = format!("{base}/srs/sr-1");
    until(
        &mut seen,
        "state written twice (starting, ready) and the SR",
        &|s| s.iter().filter(|l| **l == state).count() >= 2 && s.contains(&sr),
    );
    // Stopping the agent (SIGTERM) writes state=stopping first, then removes the subtree.
    let n = seen.len();
    // SAFETY: kill(2) on a child process this test spawned and still owns.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    until(&mut seen, "the subtree's removal", &|s| {
        s[n..].iter().any(|l| l == base)
    });
    let tail: Vec<&String> = seen[n..]
        .iter()
        .filter(|l| !l.ends_with("/heartbeat"))
        .collect();
    assert_eq!(tail, vec![&state, &base.to_string()], "{seen:?}");
    drop(agent);
}
