//! `ddstor serve` as a process, driven through `ddstor call` over its unix socket and over
//! vchan-sim: every core and disk_differencing call the agent serves, success and failure
//! paths, with xapi's error variants; state survives a clean restart.

use ddstor_e2e::agent::{new_uuid, Agent, AgentOptions, Xenstored};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;

fn scan_ids(agent: &Agent, sr: &str) -> BTreeSet<String> {
    agent
        .ok("SR.scan", json!({"sr": sr}))
        .as_array()
        .expect("scan is a list")
        .iter()
        .map(|v| v["vdi"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_core_and_differencing_call_works_over_unix_and_state_survives_restart() {
    let root = tempfile::tempdir().unwrap();
    core_flow(root.path(), &AgentOptions::default());
}

/// The same flow with every call over vchan-sim (`ddstor call --vchan 1:ddstor`), the agent in
/// domain 1 and the ring's rendezvous in the test xenstored.
#[test]
fn every_core_and_differencing_call_works_over_vchan_sim_and_state_survives_restart() {
    let root = tempfile::tempdir().unwrap();
    let xsd = Xenstored::start(root.path(), &[1]);
    core_flow(root.path(), &AgentOptions::vchan(&xsd, 1));
}

fn core_flow(root: &std::path::Path, opts: &AgentOptions) {
    let mut agent = Agent::start(root, opts);

    // Query.
    let q = agent.ok("Query.query", json!({}));
    assert_eq!(q["driver"], "ddstor");
    let features: Vec<&str> = q["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    for f in [
        "SR_CREATE",
        "SR_ATTACH",
        "VDI_CREATE",
        "VDI_SNAPSHOT",
        "VDI_CLONE",
    ] {
        assert!(features.contains(&f), "{f} missing from {features:?}");
    }
    assert!(agent
        .ok("Query.diagnostics", json!({"dbg": "t"}))
        .is_string());

    // SR.create (default place: under the data dir), then calls before attach fail typed.
    let sr = new_uuid();
    let dc = agent.ok(
        "SR.create",
        json!({"sr": sr, "name_label": "e2e", "name_description": "d", "device_config": {}, "physical_size": 0}),
    );
    let sr_path = dc["path"].as_str().expect("device_config path").to_string();
    assert!(
        sr_path.starts_with(agent.data_dir.to_str().unwrap()),
        "{sr_path}"
    );
    let (name, _) = agent.err("SR.scan", json!({"sr": sr}));
    assert_eq!(name, "Sr_not_attached");
    let (name, _) = agent.err(
        "VDI.create",
        json!({"sr": sr, "vdi_info": {"virtual_size": 1}}),
    );
    assert_eq!(name, "Sr_not_attached");

    // SR.attach/list/stat/set_name_*.
    agent.ok("SR.attach", json!({"sr": sr, "device_config": {}}));
    agent.ok("SR.attach", json!({"sr": sr})); // idempotent
    let list = agent.ok("SR.list", json!({}));
    assert_eq!(list, json!([sr]));
    agent.ok(
        "SR.set_name_label",
        json!({"sr": sr, "new_name_label": "renamed"}),
    );
    agent.ok(
        "SR.set_name_description",
        json!({"sr": sr, "new_name_description": "desc"}),
    );
    let st = agent.ok("SR.stat", json!({"sr": sr}));
    assert_eq!(st["name_label"], "renamed");
    assert_eq!(st["name_description"], "desc");
    assert!(st["total_space"].as_i64().unwrap() > 0);
    assert!(st["free_space"].as_i64().unwrap() <= st["total_space"].as_i64().unwrap());
    assert_eq!(st["health"], "Healthy");

    // VDI.create: size rounded up to the 2 MiB block and returned; defaults filled.
    let v = agent.ok(
        "VDI.create",
        json!({"sr": sr, "vdi_info": {"name_label": "disk", "virtual_size": (3 << 20) + 1,
               "sm_config": {"k": "v"}}}),
    );
    let vdi = v["vdi"].as_str().unwrap().to_string();
    assert_eq!(v["virtual_size"], json!(4 << 20));
    assert_eq!(v["name_label"], "disk");
    assert_eq!(v["persistent"], true);
    assert_eq!(v["is_a_snapshot"], false);
    assert_eq!(v["ty"], "user");
    assert_eq!(v["sm_config"]["k"], "v");
    assert_eq!(agent.ok("VDI.stat", json!({"sr": sr, "vdi": vdi})), v);
    assert!(
        std::path::Path::new(&sr_path)
            .join(format!("{vdi}.vhd"))
            .exists(),
        "the VDI's VHD is <sr>/<uuid>.vhd"
    );

    // Setters.
    agent.ok(
        "VDI.set_name_label",
        json!({"sr": sr, "vdi": vdi, "new_name_label": "disk2"}),
    );
    agent.ok(
        "VDI.set_name_description",
        json!({"sr": sr, "vdi": vdi, "new_name_description": "about"}),
    );
    agent.ok(
        "VDI.set_content_id",
        json!({"sr": sr, "vdi": vdi, "content_id": "cid-1"}),
    );
    agent.ok(
        "VDI.set_persistent",
        json!({"sr": sr, "vdi": vdi, "persistent": false}),
    );
    let v = agent.ok("VDI.stat", json!({"sr": sr, "vdi": vdi}));
    assert_eq!(v["name_label"], "disk2");
    assert_eq!(v["name_description"], "about");
    assert_eq!(v["content_id"], "cid-1");
    assert_eq!(v["persistent"], false);
    agent.ok(
        "VDI.set_persistent",
        json!({"sr": sr, "vdi": vdi, "persistent": true}),
    );

    // Epochs.
    agent.ok(
        "VDI.epoch_begin",
        json!({"sr": sr, "vdi": vdi, "vm": "vm1", "persistent": true}),
    );
    agent.ok("VDI.epoch_end", json!({"sr": sr, "vdi": vdi, "vm": "vm1"}));

    // Snapshot and clone: new ids, content_id copied, the source keeps its id.
    let snap = agent.ok(
        "VDI.snapshot",
        json!({"sr": sr, "vdi_info": {"vdi": vdi, "name_label": "snap"}}),
    );
    let snap_id = snap["vdi"].as_str().unwrap().to_string();
    assert_ne!(snap_id, vdi);
    assert_eq!(snap["is_a_snapshot"], true);
    assert_eq!(snap["snapshot_of"], json!(vdi));
    assert_eq!(snap["read_only"], true);
    assert_eq!(snap["content_id"], "cid-1");
    assert_eq!(snap["virtual_size"], json!(4 << 20));
    assert_eq!(snap["name_label"], "snap");
    let clone = agent.ok("VDI.clone", json!({"sr": sr, "vdi_info": {"vdi": vdi}}));
    let clone_id = clone["vdi"].as_str().unwrap().to_string();
    assert_eq!(clone["is_a_snapshot"], false);
    assert_eq!(clone["read_only"], false);
    assert_eq!(clone["content_id"], "cid-1");
    let after = agent.ok("VDI.stat", json!({"sr": sr, "vdi": vdi}));
    assert_eq!(after["vdi"], json!(vdi));
    assert_eq!(after["virtual_size"], json!(4 << 20));
    // Hidden bases never show in a scan.
    assert_eq!(
        scan_ids(&agent, &sr),
        [vdi.clone(), snap_id.clone(), clone_id.clone()].into()
    );

    // Errors with xapi's variants.
    let missing = new_uuid();
    let (name, p) = agent.err("VDI.stat", json!({"sr": sr, "vdi": missing}));
    assert_eq!(name, "Vdi_does_not_exist", "{p}");
    let (name, p) = agent.err("VDI.destroy", json!({"sr": sr, "vdi": missing}));
    assert_eq!(name, "Vdi_does_not_exist", "{p}");
    let (name, p) = agent.err("SR.destroy", json!({"sr": sr}));
    assert_eq!(
        (name.as_str(), &p[0]),
        ("Backend_error", &json!("SR_NOT_EMPTY")),
        "{p}"
    );
    let (name, p) = agent.err("VDI.stat", json!({"sr": sr, "vdi": "not-a-uuid"}));
    assert_eq!(
        (name.as_str(), &p[0]),
        ("Backend_error", &json!("INVALID_ARGUMENT")),
        "{p}"
    );
    let (name, p) = agent.err("VDI.frobnicate", json!({}));
    assert_eq!(
        (name.as_str(), &p[0]),
        ("Backend_error", &json!("BAD_REQUEST")),
        "{p}"
    );

    // Restart cleanly: SIGTERM exits 0, records survive, attach brings the same VDIs back.
    let st = agent.terminate();
    assert!(st.success(), "exit status {st}; log:\n{}", agent.log_text());
    assert!(!agent.socket.exists(), "socket removed on shutdown");
    let agent = Agent::start(root, opts);
    assert_eq!(agent.ok("SR.list", json!({})), json!([]));
    agent.ok("SR.attach", json!({"sr": sr}));
    assert_eq!(
        scan_ids(&agent, &sr),
        [vdi.clone(), snap_id.clone(), clone_id.clone()].into()
    );
    assert_eq!(
        agent.ok("VDI.stat", json!({"sr": sr, "vdi": vdi}))["name_label"],
        "disk2"
    );

    // Destroy everything, then the SR.
    for id in [&snap_id, &clone_id, &vdi] {
        agent.ok("VDI.destroy", json!({"sr": sr, "vdi": id}));
    }
    assert_eq!(scan_ids(&agent, &sr), BTreeSet::new());
    let vhds = std::fs::read_dir(&sr_path)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("vhd".as_ref()))
        .count();
    assert_eq!(vhds, 0, "hidden bases without children are deleted");
    agent.ok("SR.detach", json!({"sr": sr}));
    let (name, _) = agent.err("SR.stat", json!({"sr": sr}));
    assert_eq!(name, "Sr_not_attached");
    agent.ok("SR.destroy", json!({"sr": sr}));
    assert!(!std::path::Path::new(&sr_path).join(".ddstor").exists());
}

#[test]
fn a_second_agent_cannot_attach_an_sr_another_agent_holds() {
    let root = tempfile::tempdir().unwrap();
    let a = Agent::start(root.path(), &AgentOptions::default());
    let sr = new_uuid();
    let sr_dir = root.path().join("shared-sr");
    a.ok(
        "SR.create",
        json!({"sr": sr, "device_config": {"path": sr_dir.to_str().unwrap()}}),
    );
    a.ok(
        "SR.attach",
        json!({"sr": sr, "device_config": {"path": sr_dir.to_str().unwrap()}}),
    );
    let root2 = tempfile::tempdir().unwrap();
    let b = Agent::start(root2.path(), &AgentOptions::default());
    let (name, p) = b.err(
        "SR.attach",
        json!({"sr": sr, "device_config": {"path": sr_dir.to_str().unwrap()}}),
    );
    assert_eq!(
        (name.as_str(), &p[0]),
        ("Backend_error", &json!("SR_LOCKED")),
        "{p}"
    );
    a.ok("SR.detach", json!({"sr": sr}));
    b.ok(
        "SR.attach",
        json!({"sr": sr, "device_config": {"path": sr_dir.to_str().unwrap()}}),
    );
}

#[test]
fn sigterm_finishes_in_flight_calls_then_exits_zero() {
    let root = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(root.path(), &AgentOptions::default());
    let sr = new_uuid();
    agent.ok("SR.create", json!({"sr": sr}));
    agent.ok("SR.attach", json!({"sr": sr}));
    // A burst of creates in flight while SIGTERM arrives: each either completed (and is in
    // the SR after restart) or was refused/cut off; none is half-made.
    let sock = agent.socket.clone();
    let srv = sr.clone();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let sock = sock.clone();
            let sr = srv.clone();
            std::thread::spawn(move || {
                let mut made = Vec::new();
                for _ in 0..20 {
                    let out = std::process::Command::new(ddstor_e2e::bin("ddstor"))
                        .args(["call", "--unix", sock.to_str().unwrap(), "VDI.create"])
                        .arg(json!({"sr": sr, "vdi_info": {"virtual_size": 1 << 20}}).to_string())
                        .output()
                        .unwrap();
                    if out.status.success() {
                        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                        made.push(v["vdi"].as_str().unwrap().to_string());
                    }
                }
                made
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let st = agent.terminate();
    assert!(st.success(), "exit status {st}; log:\n{}", agent.log_text());
    let made: BTreeSet<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(
        agent.log_text().contains("stopping"),
        "{}",
        agent.log_text()
    );
    let agent = Agent::start(root.path(), &AgentOptions::default());
    agent.ok("SR.attach", json!({"sr": sr}));
    let now = scan_ids(&agent, &sr);
    assert!(
        made.is_subset(&now),
        "acknowledged creates lost: {:?}",
        made.difference(&now)
    );
}
