//! The NBD server under resource pressure, as a process: an agent out of file descriptors
//! keeps its NBD listener (accept errors are retried, not fatal), and a burst of thousands of
//! concurrent connections gives its memory back once they are closed.

use ddstor_e2e::agent::{new_uuid, Agent, AgentOptions};
use ddstor_e2e::nbd::{run_ok, NbdServe};
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

/// Resident memory of process `pid` in KiB (`VmRSS` of `/proc/<pid>/status`).
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// One client: connect (retrying while the listen backlog is full), handshake (fixed
/// newstyle, NBD_OPT_GO on the default export), then one 4 KiB read at `offset`; the
/// connection is returned open.
async fn connect_and_read(socket: &Path, offset: u64) -> tokio::net::UnixStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t0 = Instant::now();
    let mut s = loop {
        match tokio::net::UnixStream::connect(socket).await {
            Ok(s) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(t0.elapsed() < Duration::from_secs(30), "connect: {e}");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(e) => panic!("connect: {e}"),
        }
    };
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.expect("greeting");
    assert_eq!(&g[..8], b"NBDMAGIC");
    let mut m = 3u32.to_be_bytes().to_vec(); // FIXED_NEWSTYLE | NO_ZEROES
    m.extend_from_slice(b"IHAVEOPT");
    m.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    m.extend_from_slice(&6u32.to_be_bytes());
    m.extend_from_slice(&[0; 6]); // empty name, no info requests
    s.write_all(&m).await.unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await.expect("option reply");
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        s.read_exact(&mut d).await.unwrap();
        if kind == 1 {
            break; // NBD_REP_ACK
        }
        assert_eq!(kind, 3, "NBD_OPT_GO answered {kind:#x}");
    }
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&0u16.to_be_bytes()); // flags
    r.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
    r.extend_from_slice(&1u64.to_be_bytes()); // cookie
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&4096u32.to_be_bytes());
    s.write_all(&r).await.unwrap();
    let mut reply = [0u8; 16 + 4096];
    s.read_exact(&mut reply).await.expect("read reply");
    assert_eq!(&reply[4..8], &[0; 4], "the read failed");
    s
}

#[test]
fn memory_taken_by_a_burst_of_2000_connections_is_given_back_once_they_close() {
    const N: usize = 2000;
    // This process holds N client sockets: use the hard open-file limit.
    let me = std::process::id();
    let (_, hard) = nofile(me);
    set_nofile(me, (hard, hard));
    assert!(
        hard as usize > N + 100,
        "the open-file hard limit {hard} is too low for {N} clients"
    );

    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, vec![0x5au8; 64 << 20]).unwrap();
    let srv = NbdServe::start(&img, &["--format=raw", "--max-connections=4096"]);
    let pid = srv.pid();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let socket = srv.socket.clone();
    let burst = |n: usize| {
        let socket = socket.clone();
        rt.block_on(async move {
            // At most 256 handshakes at a time (the listen backlog), all connections kept open.
            let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
            let tasks: Vec<_> = (0..n)
                .map(|i| {
                    let (socket, gate) = (socket.clone(), gate.clone());
                    tokio::spawn(async move {
                        let _p = gate.acquire().await.unwrap();
                        connect_and_read(&socket, (i as u64 * 4096 * 7) % (64 << 20)).await
                    })
                })
                .collect();
            let mut open = Vec::with_capacity(n);
            for t in tasks {
                open.push(t.await.unwrap());
            }
            open
        })
    };
    let fds_idle = open_fds(pid);
    let settle = |what: &str| {
        // Closed connections are torn down by the server's tasks: wait until their sockets
        // are closed, then a moment for what frees after them.
        let t0 = Instant::now();
        while open_fds(pid) > fds_idle + 2 {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{what}: connections not closed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    drop(burst(1));
    settle("warm-up");
    let before = rss_kib(pid);
    let open = burst(N);
    let peak = rss_kib(pid);
    drop(open);
    settle("burst");
    // The server gives freed memory back within about a second of the last close.
    let t0 = Instant::now();
    let mut after = rss_kib(pid);
    while after * 2 > before * 3 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
        after = rss_kib(pid);
    }
    eprintln!(
        "ddstor nbd serve RSS: {before} KiB before, {peak} KiB with {N} connections open, \
         {after} KiB {:?} after they closed",
        t0.elapsed()
    );
    assert!(
        after * 2 <= before * 3,
        "RSS after the burst ({after} KiB) is more than 1.5x the RSS before ({before} KiB; \
         {peak} KiB with {N} connections open)"
    );
}
