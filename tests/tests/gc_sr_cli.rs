//! `ddstor sr gc` on an SR built by a real agent: snapshot/delete churn through `ddstor serve`
//! leaves a long chain of hidden bases; the offline GC collapses it, every VDI reads what it
//! should (ddstor's reader and libvhdi's), and the agent attaches the result.

use ddstor_e2e::agent::{Agent, AgentOptions};
use ddstor_e2e::{bin, require_tool};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

const SIZE: u64 = 8 << 20;

fn chain(sr_dir: &Path, vdi: &str, writable: bool) -> vhd::Chain {
    vhd::Chain::open(
        &sr_dir.join(format!("{vdi}.vhd")),
        &vhd::ChainOptions::new(sr_dir).writable(writable),
    )
    .unwrap()
}

fn read_all(sr_dir: &Path, vdi: &str) -> Vec<u8> {
    let c = chain(sr_dir, vdi, false);
    let mut v = vec![0u8; SIZE as usize];
    c.read_at(&mut v, 0).unwrap();
    v
}

/// The leaf's flattened view through libvhdi.
fn libvhdi(leaf: &Path) -> Vec<u8> {
    ddstor_e2e::agent::read_with_vhdimount(leaf, SIZE as usize)
}

fn gc(sr_dir: &Path) -> Value {
    let out = Command::new(bin("ddstor"))
        .args(["sr", "gc", sr_dir.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ddstor sr gc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn sr_gc_collapses_snapshot_churn_and_every_vdi_reads_as_before_in_libvhdi() {
    require_tool("vhdimount", "libvhdi-utils");
    let root = tempfile::tempdir().unwrap();
    // No background GC: this test measures the chain the snapshots leave, then GC offline.
    let mut a = Agent::start(
        root.path(),
        &AgentOptions {
            args: vec!["--gc".into(), "off".into()],
            ..Default::default()
        },
    );
    let (sr, sr_dir) = a.create_attached_sr();
    let v = a.create_vdi(&sr, "v", SIZE);
    let mut kept = Vec::new();
    for i in 0..10u64 {
        let c = chain(&sr_dir, &v, true);
        let data: Vec<u8> = (0..262_144u32)
            .map(|x| (x as u8) ^ (i as u8).wrapping_mul(37))
            .collect();
        c.write_at(&data, (i * 700_000) & !4095).unwrap();
        c.flush().unwrap();
        drop(c);
        let s = a.ok("VDI.snapshot", json!({"sr": sr, "vdi_info": {"vdi": v}}))["vdi"]
            .as_str()
            .unwrap()
            .to_string();
        if i == 4 {
            kept.push((s.clone(), read_all(&sr_dir, &v)));
        } else {
            a.ok("VDI.destroy", json!({"sr": sr, "vdi": s}));
        }
    }
    let want = read_all(&sr_dir, &v);
    a.ok("SR.detach", json!({"sr": sr}));
    assert!(a.terminate().success());
    assert_eq!(chain(&sr_dir, &v, false).depth(), 11);

    let r = gc(&sr_dir);
    assert_eq!(r["depth_before"], 11, "{r}");
    assert_eq!(r["depth_after"], 3, "{r}");
    assert_eq!(chain(&sr_dir, &v, false).depth(), 3);
    assert!(read_all(&sr_dir, &v) == want, "the VDI reads as before");
    assert!(
        libvhdi(&sr_dir.join(format!("{v}.vhd"))) == want,
        "libvhdi agrees"
    );
    for (s, w) in &kept {
        assert!(read_all(&sr_dir, s) == *w, "kept snapshot reads as before");
        assert!(
            libvhdi(&sr_dir.join(format!("{s}.vhd"))) == *w,
            "libvhdi agrees"
        );
    }
    let r2 = gc(&sr_dir);
    assert_eq!(
        r2["merged"].as_array().unwrap().len(),
        0,
        "nothing left: {r2}"
    );
    // The agent attaches the collected SR and serves the VDI.
    let a = Agent::start(root.path(), &AgentOptions::default());
    a.ok("SR.attach", json!({"sr": sr}));
    a.ok("VDI.stat", json!({"sr": sr, "vdi": v}));
}
