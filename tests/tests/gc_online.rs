//! The agent's GC and compose, end to end through `ddstor serve`:
//! - GC under load: a client keeps writing and reading (checksummed) through the NBD export
//!   of an activated VDI while 200 snapshots are taken and deleted; the background GC and
//!   `ddstor sr gc UUID` (online) bring the chain back to one layer; no request failed; the
//!   kept snapshots and the VDI read what they should (ddstor, the NBD export, libvhdi).
//! - xapi's storage-migration sequence: receive into a leaf, copy the base into a clone of a
//!   similar VDI (found with VDI.similar_content), VDI.compose; verified through the NBD export
//!   and libvhdi; bad composes refused.
//! - SIGKILL at every step of compose and of an online leaf merge (DDSTOR_FAILPOINT), restart,
//!   SR.attach: data intact, the work completed or undone, and the GC then finishes it.

use ddstor_e2e::agent::{Agent, AgentOptions};
use ddstor_e2e::bin;
use ddstor_e2e::nbd::RawClient;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SIZE: u64 = 8 << 20;

fn config(root: &Path, background: bool, interval: u64) -> PathBuf {
    let p = root.join(format!("agent-{background}.toml"));
    std::fs::write(
        &p,
        format!(
            "[gc]\nenabled = {background}\ninterval_secs = {interval}\nrate_limit = 0\nleaf_merge = true\nfreeze_above = 1048576\n"
        ),
    )
    .unwrap();
    p
}

fn start(root: &Path, cfg: &Path, env: Vec<(String, String)>) -> Agent {
    Agent::start(
        root,
        &AgentOptions {
            args: vec!["--config".into(), cfg.display().to_string()],
            env,
            ..Default::default()
        },
    )
}

fn new_sr(a: &Agent) -> String {
    a.create_attached_sr().0
}

fn create(a: &Agent, sr: &str) -> String {
    a.create_vdi(sr, "d", SIZE)
}

fn derive(a: &Agent, sr: &str, vdi: &str, method: &str) -> String {
    a.ok(method, json!({"sr": sr, "vdi_info": {"vdi": vdi}}))["vdi"]
        .as_str()
        .unwrap()
        .to_string()
}

/// An NBD connection to the export of an attached VDI (`VDI.attach3` + `VDI.activate3`).
struct Nbd {
    c: RawClient,
    cookie: u64,
}

impl Nbd {
    fn open(a: &Agent, sr: &str, vdi: &str, dp: &str, rw: bool) -> Nbd {
        let r = a.ok(
            "VDI.attach3",
            json!({"dp": dp, "sr": sr, "vdi": vdi, "vm": "vm", "read_write": rw}),
        );
        a.ok(
            "VDI.activate3",
            json!({"dp": dp, "sr": sr, "vdi": vdi, "vm": "vm"}),
        );
        let uri = r.to_string();
        let start = uri.find("nbd:unix:").expect("an NBD uri") + "nbd:unix:".len();
        let rest = &uri[start..];
        let (sock, rest) = rest.split_once(":exportname=").unwrap();
        let name = &rest[..rest.find('"').unwrap()];
        let mut c = RawClient::connect(Path::new(sock));
        // Requests may wait at the pause gate (snapshots, leaf switches): never fail.
        c.s.set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        c.go(name);
        Nbd { c, cookie: 0 }
    }

    fn write(&mut self, off: u64, data: &[u8]) -> u32 {
        self.cookie += 1;
        self.c
            .request(0, 1, self.cookie, off, data.len() as u32, data);
        self.c.simple_reply(0).expect("write reply").0
    }

    fn read(&mut self, off: u64, len: usize) -> Result<Vec<u8>, u32> {
        self.cookie += 1;
        self.c.request(0, 0, self.cookie, off, len as u32, &[]);
        let (err, _, d) = self.c.simple_reply(len).expect("read reply");
        if err == 0 {
            Ok(d)
        } else {
            Err(err)
        }
    }

    fn flush(&mut self) -> u32 {
        self.cookie += 1;
        self.c.request(0, 3, self.cookie, 0, 0, &[]);
        self.c.simple_reply(0).expect("flush reply").0
    }

    fn read_all(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for off in (0..SIZE).step_by(1 << 20) {
            out.extend(self.read(off, 1 << 20).expect("read"));
        }
        out
    }
}

fn close(a: &Agent, sr: &str, vdi: &str, dp: &str) {
    a.ok(
        "VDI.deactivate",
        json!({"dp": dp, "sr": sr, "vdi": vdi, "vm": "vm"}),
    );
    a.ok(
        "VDI.detach",
        json!({"dp": dp, "sr": sr, "vdi": vdi, "vm": "vm"}),
    );
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as u8) ^ (i as u8).wrapping_mul(37) ^ ((i >> 12) as u8))
        .collect()
}

fn read_file_chain(sr_dir: &Path, vdi: &str) -> Vec<u8> {
    let c = vhd::Chain::open(
        &sr_dir.join(format!("{vdi}.vhd")),
        &vhd::ChainOptions::new(sr_dir),
    )
    .unwrap();
    let mut v = vec![0u8; SIZE as usize];
    c.read_at(&mut v, 0).unwrap();
    v
}

/// The flattened disk of the chain whose leaf is `leaf`, read by libvhdi's `vhdimount`.
fn libvhdi(leaf: &Path) -> Vec<u8> {
    ddstor_e2e::agent::read_with_vhdimount(leaf, SIZE as usize)
}

fn chain_len(a: &Agent, vdi: &str) -> usize {
    let d = a.ok("Query.diagnostics", json!({}));
    let text = d.as_str().unwrap_or_default().to_string();
    let line = text
        .lines()
        .find(|l| l.contains(&format!("VDI {vdi}")))
        .unwrap_or_else(|| panic!("VDI {vdi} not in diagnostics:\n{text}"));
    let chain = &line[line.find("chain [").unwrap() + 7..];
    chain[..chain.find(']').unwrap()].matches(',').count() + 1
}

#[test]
fn gc_under_load_keeps_chains_short_through_200_snapshots_and_no_request_fails() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), true, 1);

    let a = start(dir.path(), &cfg, vec![]);
    let sr = new_sr(&a);
    let sr_dir = a.data_dir.join(&sr);
    let vdi = create(&a, &sr);
    let mut nbd = Nbd::open(&a, &sr, &vdi, "dp-guest", true);
    // The guest: checksummed writes and reads, stopped between requests while a snapshot whose
    // content is checked later is taken (so its content is known exactly).
    let model = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));
    let gate = Arc::new(Mutex::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let guest = {
        let (model, gate, stop, ops) = (model.clone(), gate.clone(), stop.clone(), ops.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            let mut worst = (Duration::ZERO, String::new());
            while !stop.load(Ordering::SeqCst) {
                let _g = gate.lock().unwrap();
                let t = Instant::now();
                let off = (i * 7919 % 2000) * 4096;
                let data = pattern(i, 16384);
                assert_eq!(nbd.write(off, &data), 0, "write {i} failed");
                model.lock().unwrap()[off as usize..off as usize + 16384].copy_from_slice(&data);
                let roff = (i * 104_729 % 1900) * 4096;
                let got = nbd
                    .read(roff, 65536)
                    .unwrap_or_else(|e| panic!("read {i} failed: {e}"));
                let m = model.lock().unwrap();
                assert!(
                    got[..] == m[roff as usize..roff as usize + 65536],
                    "read {i} at {roff}: wrong data"
                );
                drop(m);
                if i % 64 == 0 {
                    assert_eq!(nbd.flush(), 0, "flush failed");
                }
                if t.elapsed() > worst.0 {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap();
                    worst = (
                        t.elapsed(),
                        format!("ending at unix time {:.3}", now.as_secs_f64()),
                    );
                }
                ops.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            (nbd, worst)
        })
    };
    let mut kept: Vec<(String, Vec<u8>)> = Vec::new();
    let mut max_depth = 0;
    let mut depths = Vec::new();
    for i in 0..200 {
        if i % 50 == 25 {
            let _g = gate.lock().unwrap();
            let s = derive(&a, &sr, &vdi, "VDI.snapshot");
            kept.push((s, model.lock().unwrap().clone()));
        } else {
            let s = derive(&a, &sr, &vdi, "VDI.snapshot");
            a.ok("VDI.destroy", json!({"sr": sr, "vdi": s}));
        }
        if i % 20 == 19 {
            let d = chain_len(&a, &vdi);
            max_depth = max_depth.max(d);
            depths.push(d);
        }
    }
    // On demand, online, as an operator would: `ddstor sr gc UUID` with the agent running.
    let out = Command::new(bin("ddstor"))
        .args([
            "sr",
            "--unix",
            a.socket.to_str().unwrap(),
            "gc",
            &sr,
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ddstor sr gc {sr}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let (mut nbd, worst) = guest
        .join()
        .expect("the guest saw a failed or wrong request");
    eprintln!("slowest guest request+read pair: {:?} {}", worst.0, worst.1);
    let n = ops.load(Ordering::Relaxed);
    eprintln!(
        "guest requests: {n}; chain depth every 20 snapshots: {depths:?}; gc report {report}; {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(n > 200, "the guest made too little progress: {n}");
    let want = model.lock().unwrap().clone();
    assert!(nbd.read_all() == want, "the export reads every write");
    // Chains are short again: one layer per kept snapshot (each is a branch point) plus one.
    assert_eq!(
        chain_len(&a, &vdi),
        kept.len() + 1,
        "report {report}\n{}",
        a.ok("Query.diagnostics", json!({}))
    );
    for (k, (s, _)) in kept.iter().enumerate() {
        assert_eq!(chain_len(&a, s), k + 2, "snapshot {s}");
    }
    assert!(
        max_depth < 30,
        "chains never grew near xapi's cap: {depths:?}"
    );
    let diag = a.ok("Query.diagnostics", json!({}));
    assert!(
        diag.as_str().unwrap().contains("leaf merges"),
        "GC visible in diagnostics"
    );
    drop(nbd);
    close(&a, &sr, &vdi, "dp-guest");
    assert!(read_file_chain(&sr_dir, &vdi) == want);
    assert!(
        libvhdi(&sr_dir.join(format!("{vdi}.vhd"))) == want,
        "libvhdi reads the VDI"
    );
    for (s, content) in &kept {
        assert!(read_file_chain(&sr_dir, s) == *content, "snapshot {s}");
        let mut c = Nbd::open(&a, &sr, s, "dp-check", false);
        assert!(c.read_all() == *content, "snapshot {s} through NBD");
        drop(c);
        close(&a, &sr, s, "dp-check");
    }
    let log = a.log_text();
    assert!(log.contains("gc: leaf merged"), "GC visible in the log");
}

/// The storage-migration sequence; returns (agent dir guard, agent, sr, parent, leaf, expected).
fn migration(a: &Agent, sr: &str) -> (String, String, Vec<u8>) {
    let base = pattern(3, SIZE as usize);
    let mut expect = base.clone();
    // Receive: a clone of an empty VDI takes the mirrored writes (whole 4 KiB pages).
    let empty = create(a, sr);
    let leaf = derive(a, sr, &empty, "VDI.clone");
    let mut n = Nbd::open(a, sr, &leaf, "dp-rx", true);
    for (i, off) in [4096u64, 1 << 20, 5 << 20, (8 << 20) - 8192]
        .iter()
        .enumerate()
    {
        let d = pattern(100 + i as u64, 8192);
        assert_eq!(n.write(*off, &d), 0);
        expect[*off as usize..*off as usize + 8192].copy_from_slice(&d);
    }
    assert_eq!(n.flush(), 0);
    drop(n);
    close(a, sr, &leaf, "dp-rx");
    // A similar VDI (an older copy of the base), found through similar_content by content_id.
    let old = create(a, sr);
    let mut n = Nbd::open(a, sr, &old, "dp-old", true);
    assert_eq!(n.write(0, &base[..(SIZE / 2) as usize]), 0);
    drop(n);
    close(a, sr, &old, "dp-old");
    a.ok(
        "VDI.set_content_id",
        json!({"sr": sr, "vdi": old, "content_id": "disk-A"}),
    );
    a.ok(
        "VDI.set_content_id",
        json!({"sr": sr, "vdi": leaf, "content_id": "disk-A"}),
    );
    let similar = a.ok("VDI.similar_content", json!({"sr": sr, "vdi": leaf}));
    let names: Vec<&str> = similar
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vdi"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec![empty.as_str(), old.as_str()], "nearest first");
    let parent = derive(a, sr, &old, "VDI.clone");
    let mut n = Nbd::open(a, sr, &parent, "dp-copy", true);
    // Copy only what differs from the similar disk (the second half).
    assert_eq!(n.write(SIZE / 2, &base[(SIZE / 2) as usize..]), 0);
    drop(n);
    close(a, sr, &parent, "dp-copy");
    (parent, leaf, expect)
}

#[test]
fn storage_migration_sequence_composes_the_received_leaf_onto_the_copied_base() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), false, 3600);
    let a = start(dir.path(), &cfg, vec![]);
    let sr = new_sr(&a);
    let sr_dir = a.data_dir.join(&sr);
    let (parent, leaf, expect) = migration(&a, &sr);
    a.ok(
        "VDI.compose",
        json!({"sr": sr, "vdi1": parent, "vdi2": leaf}),
    );
    let mut n = Nbd::open(&a, &sr, &leaf, "dp-check", false);
    assert!(n.read_all() == expect, "composed leaf through NBD");
    drop(n);
    close(&a, &sr, &leaf, "dp-check");
    assert!(
        libvhdi(&sr_dir.join(format!("{leaf}.vhd"))) == expect,
        "composed leaf through libvhdi"
    );
    let q = a.ok("Query.query", json!({}));
    assert!(q["features"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "VDI_COMPOSE"));
    // Bad calls: with itself, across SRs, sizes that differ, unrelated disks.
    let (e, p) = a.err("VDI.compose", json!({"sr": sr, "vdi1": leaf, "vdi2": leaf}));
    assert_eq!(e, "Backend_error");
    assert_eq!(p[0], "COMPOSE_SAME_VDI", "{p}");
    let sr2 = new_sr(&a);
    let elsewhere = create(&a, &sr2);
    let (_, p) = a.err(
        "VDI.compose",
        json!({"sr": sr, "vdi1": elsewhere, "vdi2": leaf}),
    );
    assert_eq!(p[0], "COMPOSE_ACROSS_SRS", "{p}");
    let small = a.create_vdi(&sr, "", 2 << 20);
    let (_, p) = a.err(
        "VDI.compose",
        json!({"sr": sr, "vdi1": parent, "vdi2": small}),
    );
    assert_eq!(p[0], "COMPOSE_SIZE_MISMATCH", "{p}");
    let other = create(&a, &sr);
    let mut n = Nbd::open(&a, &sr, &other, "dp-o", true);
    assert_eq!(n.write(0, &[9; 4096]), 0);
    drop(n);
    close(&a, &sr, &other, "dp-o");
    let other_clone = derive(&a, &sr, &other, "VDI.clone");
    let (_, p) = a.err(
        "VDI.compose",
        json!({"sr": sr, "vdi1": parent, "vdi2": other_clone}),
    );
    assert_eq!(p[0], "COMPOSE_UNRELATED", "{p}");
}

/// One crash: the agent dies at `fp` during `trigger`; restarted, the SR attaches, the data
/// is intact, and the GC finishes the job.
fn crash_at(fp: &str) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), false, 3600);
    let (sr, sr_dir, parent, leaf, expect, parent_before);
    {
        let a = start(dir.path(), &cfg, vec![]);
        sr = new_sr(&a);
        sr_dir = a.data_dir.join(&sr);
        (parent, leaf, expect) = migration(&a, &sr);
        parent_before = read_file_chain(&sr_dir, &parent);
        if fp.starts_with("gc") {
            // Leave the leaf with a single-child hidden parent and hidden bases to merge.
            a.ok(
                "VDI.compose",
                json!({"sr": sr, "vdi1": parent, "vdi2": leaf}),
            );
            for _ in 0..2 {
                let s = derive(&a, &sr, &leaf, "VDI.snapshot");
                a.ok("VDI.destroy", json!({"sr": sr, "vdi": s}));
            }
            // More than `freeze_above` in the leaf, so the merge freezes it first (same bytes).
            let mut n = Nbd::open(&a, &sr, &leaf, "dp-w", true);
            assert_eq!(n.write(0, &expect[..3 << 20]), 0);
            drop(n);
            close(&a, &sr, &leaf, "dp-w");
        }
    }
    let mut a = start(
        dir.path(),
        &cfg,
        vec![("DDSTOR_FAILPOINT".into(), fp.into())],
    );
    a.ok("SR.attach", json!({"sr": sr}));
    let r = if fp.starts_with("compose.") {
        a.call_or_died(
            "VDI.compose",
            json!({"sr": sr, "vdi1": parent, "vdi2": leaf}),
        )
    } else {
        a.call_or_died("SR.gc", json!({"sr": sr}))
    };
    assert!(r.is_none(), "{fp}: the agent did not die: {r:?}");
    assert!(a.wait_exit(Duration::from_secs(10)).is_some(), "{fp}");
    let a = start(dir.path(), &cfg, vec![]);
    a.ok("SR.attach", json!({"sr": sr}));
    let now = read_file_chain(&sr_dir, &leaf);
    if fp.starts_with("compose.") {
        let undone = fp == "compose.journal_written";
        if !undone {
            assert!(now == expect, "{fp}: compose not completed");
        } else {
            assert!(now != expect, "{fp}: compose should have been undone");
            a.ok(
                "VDI.compose",
                json!({"sr": sr, "vdi1": parent, "vdi2": leaf}),
            );
        }
    } else {
        assert!(now == expect, "{fp}: data changed by the crash");
    }
    assert!(
        read_file_chain(&sr_dir, &parent) == parent_before,
        "{fp}: parent changed"
    );
    a.ok("SR.gc", json!({"sr": sr}));
    assert!(read_file_chain(&sr_dir, &leaf) == expect, "{fp}: after GC");
    assert!(
        libvhdi(&sr_dir.join(format!("{leaf}.vhd"))) == expect,
        "{fp}: libvhdi"
    );
    // leaf → composed base (P's old leaf) → the similar VDI's base.
    assert_eq!(
        chain_len(&a, &leaf),
        3,
        "{fp}: leaf merged into the composed base"
    );
}

#[test]
fn sigkill_at_every_compose_and_merge_step_then_restart_keeps_data_and_finishes_the_work() {
    let out = Command::new(bin("ddstor"))
        .args(["serve", "--list-failpoints"])
        .output()
        .unwrap();
    let fps: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("compose.") || l.starts_with("gc"))
        .map(str::to_string)
        .collect();
    assert!(fps.len() >= 15, "{fps:?}");
    let queue = Mutex::new(fps);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| loop {
                let Some(fp) = queue.lock().unwrap().pop() else {
                    return;
                };
                crash_at(&fp);
            });
        }
    });
}
