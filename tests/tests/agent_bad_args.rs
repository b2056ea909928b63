//! Bad arguments through `ddstor call`: unknown SR/VDI, malformed UUIDs, ids with `/` or `..`,
//! negative/zero/huge sizes, 1 MiB name labels, sm_config floods, wrong JSON types. Each is a
//! typed xapi error, and nothing on disk changes.

use ddstor_e2e::agent::{new_uuid, Agent, AgentOptions};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// Every file under `dir` (recursively) with its size and content hash.
fn tree(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            if p.is_dir() {
                out.insert(rel + "/", String::new());
                stack.push(p);
            } else if p.is_file() {
                let bytes = std::fs::read(&p).unwrap();
                out.insert(rel, hex::encode(Sha256::digest(&bytes)));
            }
        }
    }
    out
}

#[test]
fn bad_arguments_are_typed_errors_and_change_nothing_on_disk() {
    let root = tempfile::tempdir().unwrap();
    let agent = Agent::start(root.path(), &AgentOptions::default());
    let sr = new_uuid();
    agent.ok("SR.create", json!({"sr": sr}));
    agent.ok("SR.attach", json!({"sr": sr}));
    let vdi = agent.ok(
        "VDI.create",
        json!({"sr": sr, "vdi_info": {"name_label": "keep", "virtual_size": 4 << 20}}),
    )["vdi"]
        .as_str()
        .unwrap()
        .to_string();
    let before = tree(&agent.data_dir);

    let big_label = "x".repeat(1 << 20);
    let flood: BTreeMap<String, String> = (0..10_000)
        .map(|i| (format!("key{i}"), "v".repeat(16)))
        .collect();
    let unknown_sr = new_uuid();
    let unknown_vdi = new_uuid();
    // (method, args, expected xapi error name, expected Backend_error code if any)
    let cases: Vec<(&str, Value, &str, Option<&str>)> = vec![
        (
            "SR.scan",
            json!({"sr": unknown_sr}),
            "Sr_not_attached",
            None,
        ),
        (
            "SR.stat",
            json!({"sr": unknown_sr}),
            "Sr_not_attached",
            None,
        ),
        (
            "VDI.stat",
            json!({"sr": unknown_sr, "vdi": vdi}),
            "Sr_not_attached",
            None,
        ),
        (
            "VDI.stat",
            json!({"sr": sr, "vdi": unknown_vdi}),
            "Vdi_does_not_exist",
            None,
        ),
        (
            "VDI.destroy",
            json!({"sr": sr, "vdi": unknown_vdi}),
            "Vdi_does_not_exist",
            None,
        ),
        (
            "VDI.snapshot",
            json!({"sr": sr, "vdi_info": {"vdi": unknown_vdi}}),
            "Vdi_does_not_exist",
            None,
        ),
        (
            "VDI.clone",
            json!({"sr": sr, "vdi_info": {"vdi": unknown_vdi}}),
            "Vdi_does_not_exist",
            None,
        ),
        (
            "SR.attach",
            json!({"sr": "not-a-uuid"}),
            "Backend_error",
            Some("INVALID_ARGUMENT"),
        ),
        (
            "SR.create",
            json!({"sr": "../../etc"}),
            "Backend_error",
            Some("INVALID_ARGUMENT"),
        ),
        (
            "SR.create",
            json!({"sr": "a/b"}),
            "Backend_error",
            Some("INVALID_ARGUMENT"),
        ),
        (
            "VDI.stat",
            json!({"sr": sr, "vdi": "../x"}),
            "Backend_error",
            Some("INVALID_ARGUMENT"),
        ),
        (
            "VDI.stat",
            json!({"sr": sr, "vdi": format!("{}/..", &vdi[..33])}),
            "Backend_error",
            Some("INVALID_ARGUMENT"),
        ),
        (
            "VDI.destroy",
            json!({"sr": sr, "vdi": ".."}),
            "Backend_error",
            Some("INVALID_ARGUMENT"),
        ),
        (
            "VDI.create",
            json!({"sr": sr, "vdi_info": {"virtual_size": -1}}),
            "Backend_error",
            Some("INVALID_ARGUMENT"),
        ),
        (
            "VDI.create",
            json!({"sr": sr, "vdi_info": {"virtual_size": 0}}),
            "Backend_error",
            Some("INVALID_ARGUMENT"),
        ),
        (
            "VDI.create",
            json!({"sr": sr, "vdi_info": {"virtual_size": i64::MAX}}),
            "Backend_error",
            Some("INVALID_ARGUMENT"),
        ),
        (
            "VDI.create",
            json!({"sr": sr, "vdi_info": {"virtual_size": 1 << 20, "name_label": big_label}}),
            "Backend_error",
            Some("INVALID_ARGUMENT"),
        ),
        (
            "VDI.create",
            json!({"sr": sr, "vdi_info": {"virtual_size": 1 << 20, "sm_config": flood}}),
            "Backend_error",
            Some("INVALID_ARGUMENT"),
        ),
        (
            "VDI.set_name_label",
            json!({"sr": sr, "vdi": vdi, "new_name_label": big_label}),
            "Backend_error",
            Some("INVALID_ARGUMENT"),
        ),
        (
            "SR.set_name_label",
            json!({"sr": sr, "new_name_label": big_label}),
            "Backend_error",
            Some("INVALID_ARGUMENT"),
        ),
        (
            "VDI.snapshot",
            json!({"sr": sr, "vdi_info": {"vdi": vdi, "sm_config": flood}}),
            "Backend_error",
            Some("INVALID_ARGUMENT"),
        ),
        // Malformed calls never reach the engine.
        (
            "VDI.create",
            json!({"sr": sr, "vdi_info": {"virtual_size": "big"}}),
            "Backend_error",
            Some("BAD_REQUEST"),
        ),
        (
            "VDI.create",
            json!({"sr": sr, "vdi_info": {"virtual_size": 1.5}}),
            "Backend_error",
            Some("BAD_REQUEST"),
        ),
        (
            "VDI.stat",
            json!({"sr": sr}),
            "Backend_error",
            Some("BAD_REQUEST"),
        ),
        (
            "VDI.stat",
            json!({"sr": 7, "vdi": vdi}),
            "Backend_error",
            Some("BAD_REQUEST"),
        ),
        ("SR.nope", json!({}), "Backend_error", Some("BAD_REQUEST")),
    ];
    for (method, args, want, code) in cases {
        let (name, payload) = agent.err(method, args.clone());
        let shown: String = args.to_string().chars().take(200).collect();
        assert_eq!(name, want, "{method} {shown}: {payload}");
        if let Some(code) = code {
            assert_eq!(payload[0], json!(code), "{method} {shown}: {payload}");
            let params = payload[1].as_array().unwrap();
            assert!(
                params
                    .iter()
                    .any(|p| p.as_str().is_some_and(|s| s.len() > 10)),
                "{method}: the error explains itself: {payload}"
            );
        }
        assert_eq!(
            tree(&agent.data_dir),
            before,
            "{method} {shown} changed the disk"
        );
    }
    // Invalid JSON text (not an object) is refused by the CLI before anything is sent.
    let out = std::process::Command::new(ddstor_e2e::bin("ddstor"))
        .args([
            "call",
            "--unix",
            agent.socket.to_str().unwrap(),
            "VDI.stat",
            "{not json",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(e["error"][1][0], "BAD_REQUEST");
    // The VDI is untouched.
    assert_eq!(
        agent.ok("VDI.stat", json!({"sr": sr, "vdi": vdi}))["name_label"],
        "keep"
    );
}
