//! The NBD server under resource pressure, as a process: an agent out of file descriptors
//! keeps its NBD listener (accept errors are retried, not fatal), and a burst of thousands of
//! concurrent connections gives its memory back once they are closed.

use ddstor_e2e::agent::{new_uuid, Agent, AgentOptions};
use ddstor_e2e::nbd::run_ok;
use ddstor_e2e::require_tool;
use serde_json::json;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Descriptors the process `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("reading /proc/<pid>/fd")
        .count()
}

/// Sets the open-file limits (soft, hard) of process `pid` with util-linux's `prlimit`.
fn set_nofile(pid: u32, (soft, hard): (u64, u64)) {
    run_ok(
        Command::new(require_tool("prlimit", "util-linux"))
            .arg(format!("--pid={pid}"))
            .arg(format!("--nofile={soft}:{hard}")),
    );
}

/// The open-file limits (soft, hard) of process `pid`, from `/proc/<pid>/limits`.
fn nofile(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (v[0], v[1])
}

/// Connects to `socket` and waits up to `wait` for the NBD greeting: true if it came.
fn greeted(socket: &Path, wait: Duration) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    s.set_read_timeout(Some(wait)).unwrap();
    let mut g = [0u8; 8];
    s.read_exact(&mut g).is_ok() && &g == b"NBDMAGIC"
}

/// `nbd:unix:<sock>:exportname=<name>` (qemu's form) → libnbd's `nbd+unix:///<name>?socket=<sock>`.
fn libnbd_uri(uri: &str) -> String {
    let rest = uri.strip_prefix("nbd:unix:").expect("nbd:unix: URI");
    let (sock, name) = rest.split_once(":exportname=").expect("exportname");
    format!("nbd+unix:///{name}?socket={sock}")
}

#[test]
fn an_nbd_listener_out_of_descriptors_serves_again_once_they_are_released() {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let root = tempfile::tempdir().unwrap();
    let agent = Agent::start(root.path(), &AgentOptions::default());
    let sr = new_uuid();
    agent.ok("SR.create", json!({"sr": sr, "device_config": {}}));
    agent.ok("SR.attach", json!({"sr": sr, "device_config": {}}));
    let vdi = agent.create_vdi(&sr, "disk", 4 << 20);
    let args = json!({"dp": "dp1", "sr": sr, "vdi": vdi, "vm": "vm1", "read_write": true});
    let b = agent.ok("VDI.attach3", args.clone());
    let uri = b["implementations"][0][1]["uri"]
        .as_str()
        .unwrap()
        .to_string();
    agent.ok("VDI.activate3", args);
    let socket = agent.data_dir.join("nbd.sock");
    let pid = agent.pid();
    assert!(
        greeted(&socket, Duration::from_secs(10)),
        "NBD serves before"
    );

    // Leave the agent a few descriptors only, and take them with idle NBD connections: once
    // they are gone, accept fails (EMFILE) and a new client is not served.
    let limits = nofile(pid);
    // (The soft limit only: raising it back needs no privilege.)
    set_nofile(pid, (open_fds(pid) as u64 + 8, limits.1));
    let mut idle = Vec::new();
    let t0 = Instant::now();
    loop {
        idle.push(UnixStream::connect(&socket).expect("connect"));
        if idle.len() > 16 && !greeted(&socket, Duration::from_millis(300)) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the agent never ran out of descriptors ({} connections)",
            idle.len()
        );
    }
    assert!(
        agent.log_text().contains("Too many open files"),
        "the failed accept is logged; log:\n{}",
        agent.log_text()
    );

    // Released: the same listener serves again (a real client reads the export).
    drop(idle);
    set_nofile(pid, limits);
    let out = run_ok(Command::new(&nbdinfo).arg("--size").arg(libnbd_uri(&uri)));
    assert_eq!(
        out.trim(),
        (4u64 << 20).to_string(),
        "nbdinfo after the release"
    );
    let diag = agent.ok("Query.diagnostics", json!({}));
    let diag = diag
        .as_str()
        .map(str::to_string)
        .unwrap_or(diag.to_string());
    assert!(
        diag.contains("nbd") && diag.contains("accept errors"),
        "diagnostics report the listener's accept errors:\n{diag}"
    );
}
