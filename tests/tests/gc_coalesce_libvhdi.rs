//! `ddstor vhd coalesce` checked with libvhdi (vhdimount) as the independent reader: the merged
//! parent reads exactly as the pre-merge child did, relinked grandchildren read unchanged, and a
//! merge killed with SIGKILL resumes from its journal to the same result.
//!
//! Writes are 4 KiB-aligned (libvhdi 20210425 mis-reads pages a child holds only partly; see
//! vhd_libvhdi.rs).

use ddstor_e2e::libvhdi::VhdiMount;
use ddstor_e2e::{bin, require_tool};
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

fn ddstor(args: &[&str]) -> Output {
    let out = Command::new(bin("ddstor"))
        .args(args)
        .output()
        .expect("spawn ddstor");
    assert!(
        out.status.success(),
        "ddstor {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// What libvhdi reads from the chain whose leaf is `image`.
fn libvhdi_read(image: &Path, scratch: &Path) -> Vec<u8> {
    VhdiMount::new(image, scratch).read_leaf()
}

/// Writes `n` random 4 KiB-aligned extents of up to `max` bytes into `image` via the CLI.
fn scribble(image: &Path, dir: &Path, rng: &mut rand::rngs::StdRng, size: u64, n: usize, max: u64) {
    for i in 0..n {
        let len = rng.gen_range(1..=max / 4096) * 4096;
        let off = rng.gen_range(0..(size - len) / 4096) * 4096;
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let input = dir.join(format!("in{i}"));
        std::fs::write(&input, &data).unwrap();
        ddstor(&[
            "vhd",
            "write",
            image.to_str().unwrap(),
            "--offset",
            &off.to_string(),
            "--input",
            input.to_str().unwrap(),
        ]);
    }
}

/// Asserts equality, reporting the first differing byte rather than dumping megabytes.
fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (got {:#04x}, want {:#04x})",
            got[i], want[i]
        );
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn merged_parent_and_relinked_grandchild_read_in_libvhdi_as_before_the_merge() {
    require_tool("vhdimount", "libvhdi-utils");
    require_tool("fusermount3", "fuse3");
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);
    let size = 16u64 << 20;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    ddstor(&[
        "vhd",
        "create",
        s(&p("b.vhd")),
        "--size",
        "16M",
        "--block-size",
        "512K",
    ]);
    scribble(&p("b.vhd"), d.path(), &mut rng, size, 6, 1 << 20);
    ddstor(&["vhd", "snapshot", s(&p("b.vhd")), s(&p("c.vhd"))]);
    scribble(&p("c.vhd"), d.path(), &mut rng, size, 8, 700 << 10);
    ddstor(&["vhd", "snapshot", s(&p("c.vhd")), s(&p("g.vhd"))]);
    scribble(&p("g.vhd"), d.path(), &mut rng, size, 4, 300 << 10);
    let want_c = libvhdi_read(&p("c.vhd"), &p("m1"));
    let want_g = libvhdi_read(&p("g.vhd"), &p("m2"));
    assert_eq!(want_c.len() as u64, size);

    // Deleting while g still names c as parent is refused, after the (idempotent) merge.
    let out = Command::new(bin("ddstor"))
        .args(["vhd", "coalesce", s(&p("c.vhd")), "--delete"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("still name it as parent"), "{err}");
    assert!(p("c.vhd").exists());

    let out = ddstor(&[
        "vhd",
        "coalesce",
        s(&p("c.vhd")),
        "--relink",
        s(&p("g.vhd")),
        "--delete",
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["bytes_copied"].as_u64().unwrap() > 0, "{r}");
    assert!(!p("c.vhd").exists(), "merged child removed");
    same(
        &libvhdi_read(&p("b.vhd"), &p("m3")),
        &want_c,
        "merged parent",
    );
    same(
        &libvhdi_read(&p("g.vhd"), &p("m4")),
        &want_g,
        "relinked grandchild",
    );
    ddstor(&["vhd", "check", s(&p("b.vhd"))]);
    ddstor(&["vhd", "check", s(&p("g.vhd"))]);
}

#[test]
fn a_merge_killed_mid_copy_resumes_from_its_journal_and_libvhdi_reads_the_child_view() {
    require_tool("vhdimount", "libvhdi-utils");
    require_tool("fusermount3", "fuse3");
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);
    let size = 16u64 << 20;
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    ddstor(&[
        "vhd",
        "create",
        s(&p("b.vhd")),
        "--size",
        "16M",
        "--block-size",
        "256K",
    ]);
    scribble(&p("b.vhd"), d.path(), &mut rng, size, 4, 2 << 20);
    ddstor(&["vhd", "snapshot", s(&p("b.vhd")), s(&p("c.vhd"))]);
    scribble(&p("c.vhd"), d.path(), &mut rng, size, 10, 1 << 20);
    let want = libvhdi_read(&p("c.vhd"), &p("m1"));
    // 2 MiB/s with 256 KiB checkpoints: killed after ~1.2 s, several checkpoints are durable.
    let mut child = Command::new(bin("ddstor"))
        .args([
            "vhd",
            "coalesce",
            s(&p("c.vhd")),
            "--rate-limit",
            "2M",
            "--checkpoint",
            "256K",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    child.kill().unwrap(); // SIGKILL
    let st = child.wait().unwrap();
    assert!(!st.success(), "the merge should still have been running");
    assert!(
        p(".b.vhd.coalesce").exists(),
        "journal left by the killed merge"
    );
    // Mid-merge, the child still reads exactly as before.
    same(
        &libvhdi_read(&p("c.vhd"), &p("m2")),
        &want,
        "child view mid-merge",
    );
    let out = ddstor(&["vhd", "coalesce", s(&p("c.vhd")), "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["resumed_from_block"].as_u64().unwrap() > 0, "{r}");
    assert!(!p(".b.vhd.coalesce").exists(), "journal removed when done");
    same(&libvhdi_read(&p("b.vhd"), &p("m3")), &want, "merged parent");
    ddstor(&["vhd", "check", s(&p("b.vhd"))]);
}
