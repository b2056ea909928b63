//! `ddstor vhd` on a chain made by Xen's own tools (blktap 3.55's vhd-util and libvhd, the
//! vectors in `vhd/tests/vectors/vhd-util/`), and blktap's structures in every file it writes:
//! `check` passes on each vhd-util file and reads its batmap, `read` gives libvhd's content,
//! and files made and written here (dynamic, snapshot children, merged parents) carry a batmap
//! that `check` verifies against their bitmaps. blktap's own `vhd-util` is not packaged in
//! Debian, so it cannot be run here as a peer; the vectors are its recorded answers.

use ddstor_e2e::bin;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ddstor(args: &[&str]) -> Output {
    let out = Command::new(bin("ddstor"))
        .args(args)
        .output()
        .expect("spawn ddstor");
    assert!(
        out.status.success(),
        "ddstor {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn vectors() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../vhd/tests/vectors/vhd-util")
}

#[test]
fn vhd_util_files_check_and_read_as_libvhd_reads_them() {
    let want: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vectors().join("expected.json")).unwrap()).unwrap();
    let d = tempfile::tempdir().unwrap();
    for f in ["base.vhd", "mid.vhd", "leaf.vhd"] {
        std::fs::copy(vectors().join(f), d.path().join(f)).unwrap();
        let out =
            String::from_utf8(ddstor(&["vhd", "check", s(&d.path().join(f))]).stdout).unwrap();
        assert!(out.contains(": ok"), "{f}: {out}");
        let info: serde_json::Value = serde_json::from_slice(
            &ddstor(&["vhd", "info", "--json", s(&d.path().join(f))]).stdout,
        )
        .unwrap();
        assert_eq!(info["batmap"], true, "{f}");
    }
    let size = want["virtual_size"].as_u64().unwrap().to_string();
    let flat = ddstor(&[
        "vhd",
        "read",
        s(&d.path().join("leaf.vhd")),
        "--offset",
        "0",
        "--length",
        &size,
    ])
    .stdout;
    assert_eq!(
        hex::encode(Sha256::digest(&flat)),
        want["flattened_sha256"].as_str().unwrap()
    );
}

#[test]
fn files_written_here_carry_a_batmap_that_check_verifies() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.vhd");
    ddstor(&["vhd", "create", s(&base), "--size", "8M"]);
    let input = d.path().join("in");
    std::fs::write(&input, vec![0x5A; 3 << 20]).unwrap();
    ddstor(&[
        "vhd",
        "write",
        s(&base),
        "--offset",
        "0",
        "--input",
        s(&input),
    ]);
    let child = d.path().join("child.vhd");
    ddstor(&["vhd", "snapshot", s(&base), s(&child)]);
    std::fs::write(&input, vec![0xC3; 2 << 20]).unwrap();
    // A whole block (block 3) and part of another (block 1).
    ddstor(&[
        "vhd",
        "write",
        s(&child),
        "--offset",
        "6M",
        "--input",
        s(&input),
    ]);
    std::fs::write(&input, vec![0x3C; 4096]).unwrap();
    ddstor(&[
        "vhd",
        "write",
        s(&child),
        "--offset",
        "2M",
        "--input",
        s(&input),
    ]);
    let grandchild = d.path().join("gc.vhd");
    ddstor(&["vhd", "snapshot", s(&child), s(&grandchild)]);
    for f in [&base, &child, &grandchild] {
        let info: serde_json::Value =
            serde_json::from_slice(&ddstor(&["vhd", "info", "--json", s(f)]).stdout).unwrap();
        assert_eq!(info["batmap"], true, "{}", f.display());
        ddstor(&["vhd", "check", s(f)]);
    }
    // Merging the child into the base keeps the base's batmap true.
    ddstor(&["vhd", "coalesce", s(&child)]);
    ddstor(&["vhd", "check", s(&base)]);
    // And check sees a batmap that lies: claim the child's partly written block 1 full.
    let raw = std::fs::read(&child).unwrap();
    let map_off = u64::from_be_bytes(raw[2048 + 8..2048 + 16].try_into().unwrap()) as usize;
    let mut bad = raw.clone();
    bad[map_off] |= 0x40;
    let sum: u32 = bad[map_off..map_off + 512].iter().map(|&b| b as u32).sum();
    bad[2048 + 24..2048 + 28].copy_from_slice(&(!sum).to_be_bytes());
    std::fs::write(&child, bad).unwrap();
    let out = Command::new(bin("ddstor"))
        .args(["vhd", "check", s(&child)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("batmap bit 1"), "{text}");
}
