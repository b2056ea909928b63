//! Crash injection: for EVERY failpoint the engine lists (`ddstor serve --list-failpoints`),
//! run a workload of create/snapshot/clone/destroy (and one datapath's attach/activate/
//! deactivate/detach) against `ddstor serve` with that failpoint
//! armed (the agent SIGKILLs itself there), restart the agent, attach the SR and check:
//! - the interrupted call took effect fully or not at all (scan = state before or after it);
//! - no half-made node: every VHD file is a visible VDI or an ancestor of one, every VDI's
//!   chain passes `vhd::check` and opens;
//! - no existing VDI lost data (read back through the vhd crate and through libvhdi's
//!   `vhdimount`);
//! - the SR stays usable.

use ddstor_e2e::agent::{read_with_vhdimount, Agent, AgentOptions};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SIZE: u64 = 8 << 20;

fn failpoints() -> Vec<String> {
    let out = std::process::Command::new(ddstor_e2e::bin("ddstor"))
        .args(["serve", "--list-failpoints"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Where the pattern lives in the existing VDI, and what is there.
fn expected_disk(seed: u8) -> Vec<u8> {
    let mut d = vec![0u8; SIZE as usize];
    d[..65536].copy_from_slice(&pattern(seed, 65536));
    let off = 5 << 20;
    d[off..off + 65536].copy_from_slice(&pattern(seed ^ 0x5a, 65536));
    d
}

fn chain_bytes(sr: &Path, vdi: &str) -> Vec<u8> {
    let c = vhd::Chain::open(&sr.join(format!("{vdi}.vhd")), &vhd::ChainOptions::new(sr))
        .unwrap_or_else(|e| panic!("opening the chain of {vdi}: {e}"));
    let mut buf = vec![0u8; SIZE as usize];
    c.read_at(&mut buf, 0).unwrap();
    buf
}

fn scan(agent: &Agent, sr: &str) -> BTreeSet<String> {
    agent
        .ok("SR.scan", json!({"sr": sr}))
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vdi"].as_str().unwrap().to_string())
        .collect()
}

/// One workload step: the call, and how the visible set changes if it takes effect.
enum Effect {
    None,
    Adds,
    Removes(String),
}

struct Outcome {
    /// Visible VDIs before the interrupted call.
    before: BTreeSet<String>,
    effect: Effect,
    step: String,
}

/// Runs the workload until the agent dies; returns what was interrupted, or None if the
/// workload completed (the failpoint was never reached).
fn workload(agent: &Agent, sr: &str, v0: &str) -> Option<Outcome> {
    let mut visible: BTreeSet<String> = [v0.to_string()].into();
    let mut run = |method: &str, args: Value, effect: Effect| -> Result<Value, Outcome> {
        let before = visible.clone();
        match agent.call_or_died(method, args.clone()) {
            None => Err(Outcome {
                before,
                effect,
                step: format!("{method} {args}"),
            }),
            Some(Err(e)) => panic!("{method} {args} failed: {e}\n{}", agent.log_text()),
            Some(Ok(v)) => {
                match &effect {
                    Effect::Adds => {
                        visible.insert(v["vdi"].as_str().unwrap().to_string());
                    }
                    Effect::Removes(id) => {
                        visible.remove(id);
                    }
                    Effect::None => {}
                }
                Ok(v)
            }
        }
    };
    let mut steps = || -> Result<(), Outcome> {
        run("SR.attach", json!({"sr": sr}), Effect::None)?;
        let x = run(
            "VDI.create",
            json!({"sr": sr, "vdi_info": {"name_label": "x", "virtual_size": SIZE}}),
            Effect::Adds,
        )?;
        let x = x["vdi"].as_str().unwrap().to_string();
        let s = run(
            "VDI.snapshot",
            json!({"sr": sr, "vdi_info": {"vdi": v0}}),
            Effect::Adds,
        )?;
        let s = s["vdi"].as_str().unwrap().to_string();
        let c = run(
            "VDI.clone",
            json!({"sr": sr, "vdi_info": {"vdi": v0}}),
            Effect::Adds,
        )?;
        let c = c["vdi"].as_str().unwrap().to_string();
        run(
            "VDI.destroy",
            json!({"sr": sr, "vdi": s}),
            Effect::Removes(s.clone()),
        )?;
        run(
            "VDI.destroy",
            json!({"sr": sr, "vdi": c}),
            Effect::Removes(c.clone()),
        )?;
        let sx = run(
            "VDI.snapshot",
            json!({"sr": sr, "vdi_info": {"vdi": x}}),
            Effect::Adds,
        )?;
        let sx = sx["vdi"].as_str().unwrap().to_string();
        run(
            "VDI.destroy",
            json!({"sr": sr, "vdi": x}),
            Effect::Removes(x.clone()),
        )?;
        run(
            "VDI.destroy",
            json!({"sr": sr, "vdi": sx}),
            Effect::Removes(sx.clone()),
        )?;
        run(
            "VDI.set_name_label",
            json!({"sr": sr, "vdi": v0, "new_name_label": "v0b"}),
            Effect::None,
        )?;
        run(
            "SR.set_name_label",
            json!({"sr": sr, "new_name_label": "sr2"}),
            Effect::None,
        )?;
        // A datapath's life (failpoints `datapath.*`): nothing it does changes the VDI set.
        let dp = |extra: Value| {
            let mut a = json!({"sr": sr, "vdi": v0, "dp": "crash-dp", "vm": "vm0"});
            if let Value::Object(m) = extra {
                a.as_object_mut().unwrap().extend(m);
            }
            a
        };
        run("VDI.attach3", dp(json!({"read_write": true})), Effect::None)?;
        run("VDI.activate3", dp(json!({})), Effect::None)?;
        run("VDI.deactivate", dp(json!({})), Effect::None)?;
        run("VDI.detach", dp(json!({})), Effect::None)?;
        Ok(())
    };
    steps().err()
}

/// Every `*.vhd` in the SR is a visible VDI or an ancestor of one; every chain checks clean.
fn assert_no_orphans_and_chains_check(sr_dir: &Path, visible: &BTreeSet<String>, fp: &str) {
    let mut needed: BTreeSet<PathBuf> = BTreeSet::new();
    for v in visible {
        let leaf = sr_dir.join(format!("{v}.vhd"));
        assert!(leaf.exists(), "{fp}: visible VDI {v} has no VHD");
        let c = vhd::Chain::open(&leaf, &vhd::ChainOptions::new(sr_dir))
            .unwrap_or_else(|e| panic!("{fp}: chain of {v} does not open: {e}"));
        for p in c.paths() {
            let r = vhd::check(p).unwrap_or_else(|e| panic!("{fp}: check {}: {e}", p.display()));
            assert!(
                r.is_ok(),
                "{fp}: {} has problems: {:?}",
                p.display(),
                r.problems
            );
            needed.insert(p.canonicalize().unwrap());
        }
    }
    for e in std::fs::read_dir(sr_dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension() == Some("vhd".as_ref()) {
            assert!(
                needed.contains(&p.canonicalize().unwrap()),
                "{fp}: orphaned node {} (not a visible VDI nor an ancestor of one)",
                p.display()
            );
        }
    }
}

fn crash_at(fp: &str, seed: u8) {
    let root = tempfile::tempdir().unwrap();
    // Set-up without failpoints: an SR with one VDI holding known data.
    let mut a = Agent::start(root.path(), &AgentOptions::default());
    let (sr, sr_dir) = a.create_attached_sr();
    let v0 = a.create_vdi(&sr, "v0", SIZE);
    assert!(a.terminate().success());
    {
        let c = vhd::Chain::open(
            &sr_dir.join(format!("{v0}.vhd")),
            &vhd::ChainOptions::new(&sr_dir).writable(true),
        )
        .unwrap();
        let want = expected_disk(seed);
        c.write_at(&want[..65536], 0).unwrap();
        c.write_at(&want[5 << 20..(5 << 20) + 65536], 5 << 20)
            .unwrap();
        c.flush().unwrap();
    }

    // The crash.
    let mut b = Agent::start(
        root.path(),
        &AgentOptions {
            env: vec![("DDSTOR_FAILPOINT".into(), fp.into())],
            ..Default::default()
        },
    );
    let outcome = workload(&b, &sr, &v0)
        .unwrap_or_else(|| panic!("failpoint {fp} was never reached by the workload"));
    let st = b
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{fp}: agent unreachable but still running"));
    assert_eq!(
        st.signal(),
        Some(9),
        "{fp}: agent did not die by SIGKILL: {st}"
    );

    // Recovery.
    let c = Agent::start(root.path(), &AgentOptions::default());
    c.ok("SR.attach", json!({"sr": sr}));
    let now = scan(&c, &sr);
    let ok = match &outcome.effect {
        Effect::None => now == outcome.before,
        Effect::Adds => {
            now == outcome.before
                || (now.is_superset(&outcome.before) && now.len() == outcome.before.len() + 1)
        }
        Effect::Removes(id) => {
            let mut after = outcome.before.clone();
            after.remove(id);
            now == outcome.before || now == after
        }
    };
    assert!(
        ok,
        "{fp} during {}: scan {now:?} is neither before {:?} nor after",
        outcome.step, outcome.before
    );
    eprintln!(
        "{fp}: killed during {} -> recovered to {}",
        outcome.step.split(' ').next().unwrap_or(""),
        if now == outcome.before {
            "before"
        } else {
            "after"
        }
    );
    for v in &now {
        c.ok("VDI.stat", json!({"sr": sr, "vdi": v}));
    }
    assert_no_orphans_and_chains_check(&sr_dir, &now, fp);
    let want = expected_disk(seed);
    assert!(
        chain_bytes(&sr_dir, &v0) == want,
        "{fp}: VDI v0 lost data (vhd crate)"
    );
    assert!(
        read_with_vhdimount(&sr_dir.join(format!("{v0}.vhd")), SIZE as usize) == want,
        "{fp}: VDI v0 lost data (libvhdi)"
    );
    // The SR stays usable.
    let n = c.ok(
        "VDI.create",
        json!({"sr": sr, "vdi_info": {"virtual_size": SIZE}}),
    );
    c.ok(
        "VDI.snapshot",
        json!({"sr": sr, "vdi_info": {"vdi": n["vdi"]}}),
    );
}

#[test]
fn a_crash_at_every_failpoint_recovers_to_before_or_after_the_operation() {
    // Coalescing (`gc.*`, `gc_leaf.*`) and compose (`compose.*`) run outside this workload;
    // their failpoints are driven by tests/tests/gc_*.rs and the differencing unit tests.
    // Every other listed failpoint must be reached.
    let (background, fps): (Vec<String>, Vec<String>) = failpoints()
        .into_iter()
        .partition(|f| f.starts_with("gc") || f.starts_with("compose."));
    eprintln!("not driven here (background coalescing): {background:?}");
    assert!(fps.len() >= 10, "too few failpoints listed: {fps:?}");
    // Independent runs, a few at a time.
    let queue = std::sync::Mutex::new(fps.iter().cloned().enumerate().collect::<Vec<_>>());
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| loop {
                let Some((i, fp)) = queue.lock().unwrap().pop() else {
                    return;
                };
                crash_at(&fp, i as u8);
            });
        }
    });
}
