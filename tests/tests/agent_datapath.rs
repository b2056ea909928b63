//! The agent's datapath end to end: `ddstor serve` as a process, driven by `ddstor call`
//! (VDI.attach3/activate3/deactivate/detach, DP.*, snapshots, epochs), with real NBD clients
//! (qemu-io, nbdinfo, nbdcopy) on the URI that VDI.attach3 returns, and libvhdi (`vhdimount`)
//! as the independent reader of what reached the VHD files.

use ddstor_e2e::agent::{new_uuid, read_with_vhdimount, Agent, AgentOptions};
use ddstor_e2e::nbd::{run_fail, run_ok, RawClient};
use ddstor_e2e::require_tool;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// An agent with one attached SR.
struct Setup {
    root: tempfile::TempDir,
    agent: Agent,
    sr: String,
}

impl Setup {
    fn new() -> Setup {
        let root = tempfile::tempdir().unwrap();
        let agent = Agent::start(root.path(), &AgentOptions::default());
        let sr = new_uuid();
        agent.ok(
            "SR.create",
            json!({"sr": sr, "name_label": "dp", "device_config": {}}),
        );
        agent.ok("SR.attach", json!({"sr": sr, "device_config": {}}));
        Setup { root, agent, sr }
    }

    /// Restarts the agent after a SIGKILL (same data directory).
    fn kill_and_restart(&mut self) {
        self.agent.kill();
        self.agent = Agent::start(self.root.path(), &AgentOptions::default());
    }

    fn vdi(&self, size: u64) -> String {
        let v = self.agent.ok(
            "VDI.create",
            json!({"sr": self.sr, "vdi_info": {"name_label": "disk", "virtual_size": size}}),
        );
        v["vdi"].as_str().unwrap().to_string()
    }

    fn args(&self, vdi: &str, dp: &str) -> Value {
        json!({"dp": dp, "sr": self.sr, "vdi": vdi, "vm": "vm1"})
    }

    /// VDI.attach3; returns the NBD URI among the backend implementations.
    fn attach(&self, vdi: &str, dp: &str, rw: bool) -> String {
        let mut a = self.args(vdi, dp);
        a["read_write"] = json!(rw);
        let b = self.agent.ok("VDI.attach3", a);
        let imp = &b["implementations"][0];
        assert_eq!(imp[0], "Nbd", "{b}");
        imp[1]["uri"].as_str().unwrap().to_string()
    }

    /// VDI.attach3 read-write, then VDI.activate3; returns the NBD URI.
    fn activate_rw(&self, vdi: &str, dp: &str) -> String {
        let uri = self.attach(vdi, dp, true);
        self.call("VDI.activate3", vdi, dp);
        uri
    }

    fn call(&self, method: &str, vdi: &str, dp: &str) -> Value {
        self.agent.ok(method, self.args(vdi, dp))
    }

    fn superstate(&self, vdi: &str) -> Value {
        self.agent
            .ok("DP.stat_vdi", json!({"sr": self.sr, "vdi": vdi}))["superstate"]
            .clone()
    }

    fn leaf(&self, vdi: &str) -> PathBuf {
        self.agent
            .data_dir
            .join(&self.sr)
            .join(format!("{vdi}.vhd"))
    }

    fn socket(&self) -> PathBuf {
        self.agent.data_dir.join("nbd.sock")
    }
}

/// `nbd:unix:<sock>:exportname=<name>` (qemu's form) → `nbd+unix:///<name>?socket=<sock>` (libnbd's).
fn libnbd_uri(uri: &str) -> String {
    let rest = uri.strip_prefix("nbd:unix:").expect("nbd:unix: URI");
    let (sock, name) = rest.split_once(":exportname=").expect("exportname");
    format!("nbd+unix:///{name}?socket={sock}")
}

fn export_name(uri: &str) -> String {
    uri.split_once(":exportname=").unwrap().1.to_string()
}

fn qemu_io_cmd(uri: &str, cmds: &[String]) -> Command {
    let mut c = Command::new(require_tool("qemu-io", "qemu-utils"));
    c.arg("-f").arg("raw");
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(uri);
    c
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let cmds: Vec<String> = cmds.iter().map(|s| s.to_string()).collect();
    check_qemu_io(run_ok(&mut qemu_io_cmd(uri, &cmds)))
}

/// qemu-io opening the export read-only (`-r`): qemu refuses to open a read-only export
/// read-write.
fn qemu_io_ro(uri: &str, cmds: &[&str]) -> String {
    let cmds: Vec<String> = cmds.iter().map(|s| s.to_string()).collect();
    let mut c = qemu_io_cmd(uri, &cmds);
    c.arg("-r");
    check_qemu_io(run_ok(&mut c))
}

fn check_qemu_io(out: String) -> String {
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

fn nbdcopy(from: &str, to: &str) {
    run_ok(Command::new(require_tool("nbdcopy", "libnbd-bin")).args([from, to]));
}

/// Data ranges (merged) of a JSON listing, from `start`/`offset` + `length` entries.
fn merge_ranges(items: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, len) in items {
        match out.last_mut() {
            Some((s, l)) if *s + *l == start => *l += len,
            _ => out.push((start, len)),
        }
    }
    out
}

/// Random bytes (from /dev/urandom: a debug-built PRNG is slow for megabytes).
fn random_bytes(len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut d = vec![0u8; len];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut d))
        .expect("reading /dev/urandom");
    d
}

/// Whether two files hold the same bytes (a debug-built SHA-256 is slow for megabytes).
fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

fn wait_child(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            panic!("child still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn writes_wait_for_activate_and_deactivate_flushes_them_to_the_leaf_read_by_libvhdi() {
    let s = Setup::new();
    let vdi = s.vdi(16 * MIB);
    s.agent.ok(
        "VDI.set_content_id",
        json!({"sr": s.sr, "vdi": vdi, "content_id": "before"}),
    );
    let uri = s.attach(&vdi, "dp1", true);
    assert_eq!(
        uri,
        format!(
            "nbd:unix:{}:exportname={}/{vdi}",
            s.socket().display(),
            s.sr
        )
    );
    assert_eq!(s.superstate(&vdi), json!(["Attached", "RW"]));
    // Attached, not activated: the write waits (it does not fail).
    let mut w = qemu_io_cmd(&uri, &["write -P 0x5a 0 1M".to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        w.try_wait().unwrap().is_none(),
        "a write completed before VDI.activate3"
    );
    s.call("VDI.activate3", &vdi, "dp1");
    let st = wait_child(&mut w, Duration::from_secs(30));
    let out = w.wait_with_output().unwrap();
    assert!(
        st.success(),
        "qemu-io write after activate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // xapi clears content_id on a read-write activation.
    let info = s.agent.ok("VDI.stat", json!({"sr": s.sr, "vdi": vdi}));
    assert_eq!(info["content_id"], "");
    assert_eq!(s.superstate(&vdi), json!(["Activated", "RW"]));
    s.call("VDI.deactivate", &vdi, "dp1");
    // Deactivated: flushed to the leaf, as an independent reader sees it.
    assert_eq!(
        read_with_vhdimount(&s.leaf(&vdi), MIB as usize),
        vec![0x5a; MIB as usize]
    );
    s.call("VDI.detach", &vdi, "dp1");
    assert_eq!(s.superstate(&vdi), json!("Detached"));
    // The export is gone.
    run_fail(&mut qemu_io_cmd(&uri, &["read 0 512".to_string()]));
}

#[test]
fn writes_through_a_read_only_datapath_fail_with_eperm_and_reads_work() {
    let s = Setup::new();
    let vdi = s.vdi(8 * MIB);
    let uri = s.attach(&vdi, "rw", true);
    s.call("VDI.activate3", &vdi, "rw");
    qemu_io(&uri, &["write -P 0x42 0 64k", "flush"]);
    s.call("VDI.deactivate", &vdi, "rw");
    s.call("VDI.detach", &vdi, "rw");

    let uri = s.attach(&vdi, "ro", false);
    s.call("VDI.activate_readonly", &vdi, "ro");
    assert_eq!(s.superstate(&vdi), json!(["Activated", "RO"]));
    qemu_io_ro(&uri, &["read -P 0x42 0 64k"]);
    // qemu sees the export's read-only flag and refuses to open it for writing.
    let out = run_fail(&mut qemu_io_cmd(&uri, &["write -P 1 0 4k".to_string()]));
    assert!(out.contains("Permission denied"), "{out}");
    // On the wire: the server itself answers EPERM (1), whatever the client believes.
    let mut c = RawClient::connect(&s.socket());
    c.go(&export_name(&uri));
    c.request(0, 1, 7, 0, 512, &[9u8; 512]);
    let (err, cookie, _) = c.simple_reply(0).unwrap();
    assert_eq!((err, cookie), (1, 7), "write through a RO datapath");
    c.request(0, 0, 8, 0, 512, &[]);
    assert_eq!(c.simple_reply(512).unwrap(), (0, 8, vec![0x42; 512]));
}

#[test]
fn reads_never_fail_while_an_activated_vdi_is_snapshotted_and_cloned() {
    let s = Setup::new();
    let vdi = s.vdi(8 * MIB);
    let uri = s.activate_rw(&vdi, "dp");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, random_bytes((8 * MIB) as usize)).unwrap();
    nbdcopy(src.to_str().unwrap(), &libnbd_uri(&uri));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|i| {
            let (uri, stop, src) = (uri.clone(), stop.clone(), src.clone());
            std::thread::spawn(move || {
                let mut rounds = 0;
                while !stop.load(Ordering::SeqCst) {
                    let out = dirname_out(&src, i, rounds);
                    nbdcopy(&libnbd_uri(&uri), out.to_str().unwrap());
                    assert!(
                        same_file(&out, &src),
                        "a read during snapshot/clone returned other data"
                    );
                    std::fs::remove_file(&out).unwrap();
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    let mut made = Vec::new();
    for i in 0..6 {
        let m = if i % 2 == 0 {
            "VDI.snapshot"
        } else {
            "VDI.clone"
        };
        let v = s.agent.ok(m, json!({"sr": s.sr, "vdi_info": {"vdi": vdi}}));
        made.push(v["vdi"].as_str().unwrap().to_string());
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        assert!(r.join().expect("reader panicked") > 0);
    }
    // Writes after the switches go to the VDI, not into the snapshots.
    qemu_io(&uri, &["write -P 0x77 0 64k", "flush"]);
    let snap = &made[0];
    let snap_leaf = s.leaf(snap);
    assert_eq!(
        read_with_vhdimount(&snap_leaf, 4096),
        std::fs::read(&src).unwrap()[..4096].to_vec()
    );
    qemu_io(&uri, &["read -P 0x77 0 64k"]);
}

fn dirname_out(src: &Path, i: usize, round: usize) -> PathBuf {
    src.with_file_name(format!("out-{i}-{round}.raw"))
}

#[test]
fn a_killed_agent_restarted_re_exports_its_datapaths_on_sr_attach_with_data_intact() {
    let mut s = Setup::new();
    let vdi = s.vdi(8 * MIB);
    let ro = s.vdi(8 * MIB);
    let uri = s.activate_rw(&vdi, "dp");
    qemu_io(&uri, &["write -P 0x31 1M 1M", "flush"]);
    let ro_uri = s.attach(&ro, "dp2", false);
    s.kill_and_restart();
    // Nothing is exported until dom0 re-attaches the SR.
    run_fail(&mut qemu_io_cmd(&uri, &["read 0 512".to_string()]));
    s.agent
        .ok("SR.attach", json!({"sr": s.sr, "device_config": {}}));
    assert_eq!(s.superstate(&vdi), json!(["Activated", "RW"]));
    assert_eq!(s.superstate(&ro), json!(["Attached", "RO"]));
    qemu_io(&uri, &["read -P 0x31 1M 1M", "read -P 0 0 1M"]);
    // The attached (not activated) one is back too, with I/O paused until activate.
    let mut r = qemu_io_cmd(&ro_uri, &["read -P 0 0 4k".to_string()])
        .arg("-r")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(r.try_wait().unwrap().is_none(), "read before activate");
    s.call("VDI.activate_readonly", &ro, "dp2");
    assert!(wait_child(&mut r, Duration::from_secs(30)).success());
    s.call("VDI.deactivate", &vdi, "dp");
    s.call("VDI.detach", &vdi, "dp");
    s.agent.ok("VDI.destroy", json!({"sr": s.sr, "vdi": vdi}));
}

#[test]
fn vdi_destroy_deactivates_and_detaches_every_datapath_and_deletes_the_epoch_layer() {
    let s = Setup::new();
    let vdi = s.vdi(8 * MIB);
    let keep = s.vdi(8 * MIB);
    s.agent.ok(
        "VDI.set_persistent",
        json!({"sr": s.sr, "vdi": vdi, "persistent": false}),
    );
    s.agent.ok(
        "VDI.epoch_begin",
        json!({"sr": s.sr, "vdi": vdi, "vm": "vm1", "persistent": false}),
    );
    let uri = s.attach(&vdi, "dp1", true);
    s.call("VDI.activate3", &vdi, "dp1");
    assert_eq!(s.attach(&vdi, "dp2", true), uri);
    let other = s.attach(&keep, "dp1", true);
    s.call("VDI.activate3", &keep, "dp1");
    qemu_io(&uri, &["write -P 0x12 0 64k", "flush"]);
    let epoch_layer = s.leaf(&vdi).with_file_name(format!(".{vdi}.epoch.vhd"));
    assert!(epoch_layer.exists(), "{}", epoch_layer.display());

    s.agent.ok("VDI.destroy", json!({"sr": s.sr, "vdi": vdi}));
    // Both datapaths are gone with the export, and so are the leaf and the epoch layer.
    run_fail(&mut qemu_io_cmd(&uri, &["read 0 512".to_string()]));
    assert!(!s.leaf(&vdi).exists());
    assert!(
        !epoch_layer.exists(),
        "{} left behind",
        epoch_layer.display()
    );
    let (err, _) = s.agent.err("VDI.stat", json!({"sr": s.sr, "vdi": vdi}));
    assert_eq!(err, "Vdi_does_not_exist");
    // The other VDI's datapath is untouched.
    assert_eq!(s.superstate(&keep), json!(["Activated", "RW"]));
    qemu_io(&other, &["write -P 0x34 0 4k", "read -P 0x34 0 4k"]);
    // dp1 now only holds `keep`: DP.destroy tears that down.
    s.agent
        .ok("DP.destroy", json!({"dp": "dp1", "allow_leak": false}));
    assert_eq!(s.superstate(&keep), json!("Detached"));
}

#[test]
fn sr_detach_and_dp_destroy_tear_exports_down() {
    let s = Setup::new();
    let vdi = s.vdi(8 * MIB);
    let uri = s.activate_rw(&vdi, "dp");
    qemu_io(&uri, &["write -P 0x12 0 4k"]);
    s.agent.ok("SR.detach", json!({"sr": s.sr}));
    run_fail(&mut qemu_io_cmd(&uri, &["read 0 512".to_string()]));
    s.agent
        .ok("SR.attach", json!({"sr": s.sr, "device_config": {}}));
    qemu_io(&uri, &["read -P 0x12 0 4k"]);
    s.agent
        .ok("DP.destroy", json!({"dp": "dp", "allow_leak": false}));
    assert_eq!(s.superstate(&vdi), json!("Detached"));
    run_fail(&mut qemu_io_cmd(&uri, &["read 0 512".to_string()]));
    s.agent.ok("VDI.destroy", json!({"sr": s.sr, "vdi": vdi}));
}

#[test]
fn nbdinfo_map_matches_ddstor_vhd_map_and_nbdcopy_round_trips_both_ways() {
    let s = Setup::new();
    let vdi = s.vdi(16 * MIB);
    let uri = s.activate_rw(&vdi, "dp");
    // Two layers: the first writes end up in the hidden base of a snapshot, the last in the
    // VDI's new leaf; both maps show the chain's merged allocation.
    write_then_snapshot(&s, &uri, &vdi, &["write -P 1 0 64k", "write -P 2 5M 4k"]);
    qemu_io(&uri, &["write -P 3 11M 1M", "write -P 4 5M 4k", "flush"]);
    s.call("VDI.deactivate", &vdi, "dp");
    let vhd_map: Value = serde_json::from_str(&run_ok(
        Command::new(ddstor_e2e::bin("ddstor"))
            .args(["vhd", "map", "--json"])
            .arg(s.leaf(&vdi)),
    ))
    .unwrap();
    let want = merge_ranges(
        vhd_map["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|b| b["extents"].as_array().unwrap().iter())
            .filter(|e| !e["layer"].is_null())
            .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap())),
    );
    assert!(!want.is_empty());
    s.call("VDI.activate3", &vdi, "dp");
    let nbd_map: Value = serde_json::from_str(&run_ok(
        Command::new(require_tool("nbdinfo", "libnbd-bin"))
            .args(["--map", "--json"])
            .arg(libnbd_uri(&uri)),
    ))
    .unwrap();
    let got = merge_ranges(
        nbd_map
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"].as_u64().unwrap() & 1 == 0)
            .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap())),
    );
    assert_eq!(got, want, "nbdinfo --map vs ddstor vhd map");
    // nbdcopy in, then out: same bytes.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let out = dir.path().join("out.raw");
    std::fs::write(&src, random_bytes((16 * MIB) as usize)).unwrap();
    nbdcopy(src.to_str().unwrap(), &libnbd_uri(&uri));
    nbdcopy(&libnbd_uri(&uri), out.to_str().unwrap());
    assert!(
        same_file(&out, &src),
        "nbdcopy out differs from what nbdcopy wrote in"
    );
}

#[test]
fn several_clients_at_once_each_see_their_writes_and_everyone_elses() {
    let s = Setup::new();
    let vdi = s.vdi(8 * MIB);
    let uri = s.activate_rw(&vdi, "dp");
    let clients: Vec<_> = (0..4u64)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let base = i * 2 * MIB;
                let p = 0x10 + i;
                let cmds: Vec<String> = (0..16)
                    .map(|k| format!("aio_write -P {p} {} 64k", base + k * 64 * 1024))
                    .chain(["aio_flush".to_string()])
                    .chain((0..16).map(|k| format!("read -P {p} {} 64k", base + k * 64 * 1024)))
                    .collect();
                let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
                qemu_io(&uri, &refs);
            })
        })
        .collect();
    for c in clients {
        c.join().expect("a client failed");
    }
    let checks: Vec<String> = (0..4u64)
        .map(|i| format!("read -P {} {} 1M", 0x10 + i, i * 2 * MIB))
        .collect();
    let refs: Vec<&str> = checks.iter().map(String::as_str).collect();
    qemu_io(&uri, &refs);
}

#[test]
fn nothing_written_in_a_non_persistent_epoch_survives_its_end() {
    let s = Setup::new();
    let vdi = s.vdi(8 * MIB);
    let uri = s.activate_rw(&vdi, "dp");
    qemu_io(&uri, &["write -P 0x61 0 128k", "flush"]);
    s.call("VDI.deactivate", &vdi, "dp");
    s.call("VDI.detach", &vdi, "dp");
    s.agent.ok(
        "VDI.set_persistent",
        json!({"sr": s.sr, "vdi": vdi, "persistent": false}),
    );
    for boot in 0..2 {
        s.agent.ok(
            "VDI.epoch_begin",
            json!({"sr": s.sr, "vdi": vdi, "vm": "vm1", "persistent": false}),
        );
        let uri = s.activate_rw(&vdi, "dp");
        // A fresh epoch sees the persistent content, never the previous epoch's writes.
        qemu_io(&uri, &["read -P 0x61 0 128k", "read -P 0 1M 64k"]);
        qemu_io(
            &uri,
            &[
                &format!("write -P {} 0 64k", 0x70 + boot),
                "write -P 0x71 1M 64k",
                "flush",
            ],
        );
        qemu_io(&uri, &[&format!("read -P {} 0 64k", 0x70 + boot)]);
        s.call("VDI.deactivate", &vdi, "dp");
        s.call("VDI.detach", &vdi, "dp");
        s.agent.ok(
            "VDI.epoch_end",
            json!({"sr": s.sr, "vdi": vdi, "vm": "vm1"}),
        );
    }
    assert_eq!(
        read_with_vhdimount(&s.leaf(&vdi), 128 * 1024),
        vec![0x61; 128 * 1024]
    );
    let uri = s.activate_rw(&vdi, "dp");
    qemu_io(&uri, &["read -P 0x61 0 128k", "read -P 0 1M 64k"]);
}

/// Writes `cmds` through qemu-io, snapshots the VDI (its chain grows a layer under the export),
/// and returns the snapshot's uuid.
fn write_then_snapshot(s: &Setup, uri: &str, vdi: &str, cmds: &[&str]) -> String {
    qemu_io(uri, cmds);
    let v = s.agent.ok(
        "VDI.snapshot",
        json!({"sr": s.sr, "vdi_info": {"vdi": vdi}}),
    );
    v["vdi"].as_str().unwrap().to_string()
}

#[test]
fn qemu_img_info_convert_and_compare_see_a_snapshotted_vdi_as_libvhdi_reads_its_chain() {
    let s = Setup::new();
    let size = 16 * MIB;
    let vdi = s.vdi(size);
    let uri = s.activate_rw(&vdi, "dp");
    write_then_snapshot(
        &s,
        &uri,
        &vdi,
        &["write -P 0x21 0 2M", "write -P 0x22 6M 64k"],
    );
    qemu_io(
        &uri,
        &["write -P 0x23 1M 64k", "write -P 0x24 12M 1M", "flush"],
    );
    let qimg = require_tool("qemu-img", "qemu-utils");
    let info: Value = serde_json::from_str(&run_ok(
        Command::new(&qimg)
            .args(["info", "--output=json", "-f", "raw"])
            .arg(&uri),
    ))
    .unwrap();
    assert_eq!(info["virtual-size"].as_u64(), Some(size), "{info}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    run_ok(
        Command::new(&qimg)
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&out),
    );
    // What qemu copied out of the export is what libvhdi reads from the chain's files.
    s.call("VDI.deactivate", &vdi, "dp");
    let flat = read_with_vhdimount(&s.leaf(&vdi), size as usize);
    assert!(
        std::fs::read(&out).unwrap() == flat,
        "qemu-img convert of the export differs from libvhdi's reading of the chain"
    );
    let mut want = vec![0u8; size as usize];
    want[..2 << 20].fill(0x21);
    want[1 << 20..(1 << 20) + (64 << 10)].fill(0x23);
    want[6 << 20..(6 << 20) + (64 << 10)].fill(0x22);
    want[12 << 20..13 << 20].fill(0x24);
    assert!(flat == want, "the chain does not hold what was written");
    s.call("VDI.activate3", &vdi, "dp");
    run_ok(
        Command::new(&qimg)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&uri)
            .arg(&out),
    );
    // compare really compares: one changed byte is found.
    let mut bad = want;
    bad[(12 << 20) + 4095] ^= 0xff;
    let bad_file = dir.path().join("bad.raw");
    std::fs::write(&bad_file, bad).unwrap();
    let text = run_fail(
        Command::new(&qimg)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&uri)
            .arg(&bad_file),
    );
    // qemu names the first differing 512-byte sector.
    let at: u64 = text
        .split("mismatch at offset ")
        .nth(1)
        .and_then(|t| t.split('!').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("qemu-img compare: {text}"));
    assert_eq!(
        at,
        (12 << 20) + 4095 / 512 * 512,
        "qemu-img compare: {text}"
    );
}

#[test]
fn qemu_io_aio_write_write_zeroes_and_discard_on_a_snapshotted_vdi_land_in_its_leaf() {
    let s = Setup::new();
    let size = 8 * MIB;
    let vdi = s.vdi(size);
    let uri = s.activate_rw(&vdi, "dp");
    // The parent layer (after the snapshot) holds 0x41 over the first 4 MiB.
    let snap = write_then_snapshot(&s, &uri, &vdi, &["write -P 0x41 0 4M", "flush"]);
    qemu_io(
        &uri,
        &[
            "aio_write -P 0x51 64k 64k",
            "aio_write -P 0x52 1M 128k",
            "aio_write -P 0x53 5M 64k",
            "aio_flush",
            // Zeroes over the parent's data must read as zeroes (the leaf masks the parent)…
            "write -z 2M 256k",
            // …and over a hole they stay zeroes.
            "write -z 6M 64k",
            // Discard is advisory: the export accepts it; VHD keeps the bytes.
            "discard 3M 64k",
            "read -P 0 2M 256k",
            "read -P 0x52 1M 128k",
            "read -P 0x41 0 64k",
            "flush",
        ],
    );
    s.call("VDI.deactivate", &vdi, "dp");
    let mut want = vec![0u8; size as usize];
    want[..4 << 20].fill(0x41);
    want[64 << 10..128 << 10].fill(0x51);
    want[1 << 20..(1 << 20) + (128 << 10)].fill(0x52);
    want[5 << 20..(5 << 20) + (64 << 10)].fill(0x53);
    want[2 << 20..(2 << 20) + (256 << 10)].fill(0);
    let flat = read_with_vhdimount(&s.leaf(&vdi), size as usize);
    // The discarded range reads as either its old bytes or zeroes (NBD leaves it unspecified).
    let d = (3 << 20)..(3 << 20) + (64 << 10);
    assert!(
        flat[d.clone()].iter().all(|&b| b == 0x41) || flat[d.clone()].iter().all(|&b| b == 0),
        "the discarded range holds other bytes"
    );
    want[d.clone()].copy_from_slice(&flat[d]);
    assert!(flat == want, "libvhdi reads other bytes from the chain");
    // The snapshot kept the parent's content only.
    assert_eq!(
        read_with_vhdimount(&s.leaf(&snap), 4 << 20),
        vec![0x41; 4 << 20]
    );
    let check = run_ok(
        Command::new(ddstor_e2e::bin("ddstor"))
            .args(["vhd", "check"])
            .arg(s.leaf(&vdi)),
    );
    assert!(!check.to_lowercase().contains("error"), "{check}");
}

#[test]
fn hostile_clients_of_a_vdi_export_hold_up_neither_activate_snapshot_deactivate_nor_detach() {
    let s = Setup::new();
    let vdi = s.vdi(8 * MIB);
    let uri = s.attach(&vdi, "dp", true);
    let name = export_name(&uri);
    // While paused: one client leaves in the middle of a write's payload, another leaves
    // with a whole write waiting at the gate.
    let mut mid = RawClient::connect(&s.socket());
    mid.go(&name);
    mid.request(0, 1, 1, 0, 64 << 10, &[0xee; 100]);
    drop(mid);
    let mut gone = RawClient::connect(&s.socket());
    gone.go(&name);
    gone.request(0, 1, 2, MIB, 4096, &[0xdd; 4096]);
    drop(gone);
    call_within(
        &s,
        Duration::from_secs(30),
        "VDI.activate3",
        s.args(&vdi, "dp"),
    );
    // One that floods reads and never reads a reply, and one with a bad request magic.
    let mut flood = RawClient::connect(&s.socket());
    flood.go(&name);
    flood.s.set_nonblocking(true).unwrap();
    let mut sent = 0;
    for i in 0..4096u64 {
        let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&[0, 0, 0, 0]);
        m.extend_from_slice(&i.to_be_bytes());
        m.extend_from_slice(&0u64.to_be_bytes());
        m.extend_from_slice(&(1u32 << 20).to_be_bytes());
        match std::io::Write::write(&mut flood.s, &m) {
            Ok(n) if n == m.len() => sent += 1,
            _ => break,
        }
    }
    assert!(sent > 100, "only {sent} requests went out");
    let mut bad = RawClient::connect(&s.socket());
    bad.go(&name);
    std::io::Write::write_all(&mut bad.s, &[0xffu8; 28]).unwrap();
    assert!(
        bad.is_closed(),
        "a bad request magic left the connection open"
    );
    // A well-behaved client works meanwhile, across a snapshot (pause, switch, resume).
    qemu_io(&uri, &["write -P 0x66 2M 64k", "read -P 0x66 2M 64k"]);
    let snap = json!({"sr": s.sr, "vdi_info": {"vdi": vdi}});
    call_within(&s, Duration::from_secs(60), "VDI.snapshot", snap);
    qemu_io(&uri, &["read -P 0x66 2M 64k", "read -P 0 4M 64k"]);
    call_within(
        &s,
        Duration::from_secs(60),
        "VDI.deactivate",
        s.args(&vdi, "dp"),
    );
    call_within(
        &s,
        Duration::from_secs(60),
        "VDI.detach",
        s.args(&vdi, "dp"),
    );
    assert_eq!(s.superstate(&vdi), json!("Detached"));
    drop(flood);
    // The agent serves on; what the good client wrote is in the VHD.
    assert_eq!(
        read_with_vhdimount(&s.leaf(&vdi), 3 * MIB as usize)[2 * MIB as usize..][..64 << 10],
        vec![0x66; 64 << 10]
    );
    let uri = s.activate_rw(&vdi, "dp");
    qemu_io(&uri, &["read -P 0x66 2M 64k"]);
}

/// `method` on the agent through `ddstor call`, which must succeed within `limit` (the call is
/// killed and the test fails otherwise, instead of hanging).
fn call_within(s: &Setup, limit: Duration, method: &str, args: Value) {
    let mut c = Command::new(ddstor_e2e::bin("ddstor"))
        .arg("call")
        .arg("--unix")
        .arg(&s.agent.socket)
        .arg(method)
        .arg(args.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let st = wait_child(&mut c, limit);
    let out = c.wait_with_output().unwrap();
    assert!(
        st.success(),
        "{method} {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ddstor vdi … ARGS` against the setup's agent and SR.
fn vdi_cli(s: &Setup, args: &[&str]) -> Command {
    let mut c = Command::new(ddstor_e2e::bin("ddstor"));
    c.arg("vdi")
        .arg("--unix")
        .arg(&s.agent.socket)
        .arg("--sr")
        .arg(&s.sr)
        .args(args);
    c
}

#[test]
fn the_vdi_cli_drives_a_datapath_through_attach_activate_deactivate_and_detach() {
    let s = Setup::new();
    let vdi = s.vdi(4 * MIB);
    let out = run_ok(&mut vdi_cli(&s, &["attach", &vdi, "--dp", "cli"]));
    let uri = out
        .lines()
        .next()
        .expect("attach prints the NBD URI")
        .to_string();
    assert!(
        uri.starts_with("nbd:unix:") && uri.ends_with(&format!(":exportname={}/{vdi}", s.sr)),
        "{out}"
    );
    let table = run_ok(&mut vdi_cli(&s, &["datapaths", &vdi]));
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("cli ") && l.ends_with("attached-rw")),
        "{table}"
    );
    run_ok(&mut vdi_cli(&s, &["activate", &vdi, "--dp", "cli"]));
    qemu_io(&uri, &["write -P 0x3c 1M 64k", "read -P 0x3c 1M 64k"]);
    // The automaton's refusals reach the operator as xapi errors (exit status 1).
    let err = run_fail(&mut vdi_cli(&s, &["detach", &vdi, "--dp", "cli"]));
    assert!(err.contains("Illegal_transition"), "{err}");
    // A second, read-only datapath beside it.
    run_ok(&mut vdi_cli(
        &s,
        &["attach", &vdi, "--dp", "ro", "--read-only"],
    ));
    let table = run_ok(&mut vdi_cli(&s, &["datapaths", &vdi]));
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("ro ") && l.ends_with("attached-ro")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("(overall)") && l.ends_with("activated-rw")),
        "{table}"
    );
    run_ok(&mut vdi_cli(&s, &["deactivate", &vdi, "--dp", "cli"]));
    run_ok(&mut vdi_cli(&s, &["detach", &vdi, "--dp", "cli"]));
    run_ok(&mut vdi_cli(&s, &["dp-destroy", "ro"]));
    let json: Value =
        serde_json::from_str(&run_ok(&mut vdi_cli(&s, &["datapaths", &vdi, "--json"]))).unwrap();
    assert_eq!(json["dps"], json!({}), "{json}");
    // What was written reached the VDI's leaf.
    let data = read_with_vhdimount(&s.leaf(&vdi), (2 * MIB) as usize);
    assert!(data[MIB as usize..(MIB + 65536) as usize]
        .iter()
        .all(|&b| b == 0x3c));
}
