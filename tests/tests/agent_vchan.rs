//! `ddstor serve --xen sim` with the test xenstored, driven by `ddstor call` as dom0 over vchan
//! (`--vchan DOMID:PORT`) and through the registry (`--sr UUID`): the core flow, typed errors,
//! clients of one domain taking turns on the one vchan, lookup failures as transport errors,
//! per-transport counters in Query.diagnostics, and a clean SIGTERM that removes the ring's
//! rendezvous and the registration.

use ddstor_e2e::agent::{new_uuid, Agent, AgentOptions, Xenstored, VCHAN_PORT};
use serde_json::{json, Value};
use std::process::Command;
use xs_registry::client::Xs;
use xs_registry::registry::Registry;

const DOM: u16 = 1;

#[test]
fn the_core_flow_works_through_an_sr_lookup_over_vchan() {
    let root = tempfile::tempdir().unwrap();
    let xsd = Xenstored::start(root.path(), &[DOM]);
    let mut agent = Agent::start(root.path(), &AgentOptions::vchan(&xsd, DOM));
    let sr = new_uuid();
    agent.ok("SR.create", json!({"sr": sr, "name_label": "vchan"}));
    agent.ok("SR.attach", json!({"sr": sr}));

    // From now on every call finds the agent through xenstore: a different domain, so vchan.
    agent.via = xsd.via_sr(&sr);
    let stat = agent.ok("SR.stat", json!({"sr": sr}));
    assert_eq!(stat["name_label"], "vchan");
    let vdi = agent.ok(
        "VDI.create",
        json!({"sr": sr, "vdi_info": {"name_label": "d", "virtual_size": 1_000_000}}),
    );
    let id = vdi["vdi"].as_str().unwrap().to_string();
    assert_eq!(vdi["virtual_size"], 2 << 20, "rounded up to the block size");
    let snap = agent.ok(
        "VDI.snapshot",
        json!({"sr": sr, "vdi_info": {"vdi": id, "name_label": "s"}}),
    );
    assert_eq!(snap["is_a_snapshot"], true);
    assert_eq!(snap["snapshot_of"], id.as_str());
    let clone = agent.ok(
        "VDI.clone",
        json!({"sr": sr, "vdi_info": {"vdi": id, "name_label": "c"}}),
    );
    assert_eq!(clone["read_only"], false);
    let scan = agent.ok("SR.scan", json!({"sr": sr}));
    assert_eq!(scan.as_array().unwrap().len(), 3, "{scan}");
    let (name, _) = agent.err("VDI.stat", json!({"sr": sr, "vdi": new_uuid()}));
    assert_eq!(name, "Vdi_does_not_exist");
    let (name, _) = agent.err("VDI.stat", json!({"sr": new_uuid(), "vdi": id}));
    assert_eq!(name, "Sr_not_attached");

    // Several dom0 clients at once take turns on the domain's one vchan; all get answers.
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| agent.ok("VDI.stat", json!({"sr": sr, "vdi": id}))))
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap()["vdi"], id.as_str());
        }
    });
    for v in [&snap["vdi"], &clone["vdi"], &json!(id)] {
        agent.ok("VDI.destroy", json!({"sr": sr, "vdi": v}));
    }
    assert_eq!(agent.ok("SR.scan", json!({"sr": sr})), json!([]));

    // The server counted those calls under vchan; the unix socket saw only readiness probes.
    let diag = agent.ok("Query.diagnostics", json!({}));
    let diag = diag.as_str().unwrap();
    let vchan_line = diag
        .lines()
        .find(|l| l.trim_start().starts_with("vchan:"))
        .unwrap_or_else(|| panic!("no vchan counters in diagnostics:\n{diag}"));
    let calls: u64 = vchan_line
        .split("calls ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{vchan_line}"));
    assert!(calls >= 15, "{vchan_line}");
    assert!(
        agent.log_text().contains("transport=\"vchan\""),
        "calls logged with their transport"
    );
    let st = agent.terminate();
    assert!(st.success(), "{st}\n{}", agent.log_text());
}

fn raw_call(xsd: &Xenstored, args: &[&str]) -> (Option<i32>, Value) {
    let out = Command::new(ddstor_e2e::bin("ddstor"))
        .arg("call")
        .args(args)
        .envs(xsd.client_env())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v = serde_json::from_str(stderr.trim()).unwrap_or(Value::Null);
    (out.status.code(), v)
}

#[test]
fn an_unknown_sr_or_an_absent_vchan_is_a_transport_error_naming_the_target() {
    let root = tempfile::tempdir().unwrap();
    let xsd = Xenstored::start(root.path(), &[DOM]);
    let sr = new_uuid();
    let (code, err) = raw_call(&xsd, &["--sr", &sr, "Query.query"]);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err["error"], "transport");
    let msg = err["message"].as_str().unwrap();
    assert!(msg.contains(&sr) && msg.contains("no live agent"), "{msg}");

    let (code, err) = raw_call(
        &xsd,
        &[
            "--vchan",
            "7:nobody",
            "--connect-timeout",
            "1",
            "Query.query",
        ],
    );
    assert_eq!(code, Some(2), "{err}");
    let msg = err["message"].as_str().unwrap();
    assert!(msg.contains("vchan 7:nobody"), "{msg}");

    let (code, err) = raw_call(&xsd, &["--vchan", "seven:x", "Query.query"]);
    assert_eq!(code, Some(2), "a malformed address is refused: {err}");
}

#[test]
fn sigterm_removes_the_vchan_rendezvous_and_the_registration() {
    let root = tempfile::tempdir().unwrap();
    let xsd = Xenstored::start(root.path(), &[DOM]);
    let mut agent = Agent::start(root.path(), &AgentOptions::vchan(&xsd, DOM));
    agent.ok("Query.query", json!({}));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = format!("/local/domain/{DOM}/data/vchan/0/{VCHAN_PORT}/ring-ref");
    let xs = rt.block_on(Xs::connect(&xsd.socket)).unwrap();
    // The agent re-publishes a ring for the next client once the last one left.
    let t0 = std::time::Instant::now();
    while rt.block_on(xs.read_opt(&key)).unwrap().is_none() {
        assert!(t0.elapsed().as_secs() < 10, "no ring published at {key}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let reg = rt.block_on(Registry::new(xs.clone()).list()).unwrap();
    let me = reg.iter().find(|r| r.domid.0 == DOM).expect("registered");
    assert_eq!(me.vchan_port, VCHAN_PORT);

    let st = agent.terminate();
    assert!(st.success(), "{st}\n{}", agent.log_text());
    assert_eq!(
        rt.block_on(xs.read_opt(&key)).unwrap(),
        None,
        "rendezvous left behind"
    );
    let reg = rt.block_on(Registry::new(xs).list()).unwrap();
    assert!(reg.iter().all(|r| r.domid.0 != DOM), "{reg:?}");
    let leftovers: Vec<_> = std::fs::read_dir(&xsd.sim_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        // Clients' turn locks (.vchan-*.lock) stay; grants and ports must not.
        .filter(|n| !n.starts_with(".vchan-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "grants/ports left in the sim dir: {leftovers:?}"
    );
}
