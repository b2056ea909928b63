//! `ddstor vhd` as scripts use it: exit codes, one-line errors (never a panic) on hostile
//! files, root confinement, cycles, hidden flag, JSON output.

use ddstor_e2e::bin;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

fn ddstor(args: &[&str]) -> Output {
    Command::new(bin("ddstor"))
        .args(args)
        .output()
        .expect("spawn ddstor")
}

fn ok_bytes(args: &[&str]) -> Vec<u8> {
    let out = ddstor(args);
    assert!(
        out.status.success(),
        "ddstor {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn ok(args: &[&str]) -> String {
    String::from_utf8_lossy(&ok_bytes(args)).into_owned()
}

/// Runs a command that must fail; returns its one-line reason.
fn fails(args: &[&str]) -> String {
    let out = ddstor(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "ddstor {args:?} succeeded");
    assert!(!err.contains("panicked"), "ddstor {args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("ddstor:")).collect();
    assert_eq!(lines.len(), 1, "want one error line, got: {err}");
    lines[0].to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn poke(p: &Path, off: u64, bytes: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .write_all_at(bytes, off)
        .unwrap();
}

fn disk_with_data(dir: &Path, name: &str) -> std::path::PathBuf {
    let f = dir.join(name);
    ok(&[
        "vhd",
        "create",
        s(&f),
        "--size",
        "8M",
        "--block-size",
        "64K",
    ]);
    let input = dir.join(format!("{name}.in"));
    std::fs::write(&input, vec![0x5A; 200_000]).unwrap();
    ok(&[
        "vhd",
        "write",
        s(&f),
        "--offset",
        "70000",
        "--input",
        s(&input),
    ]);
    f
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        "create",
        "snapshot",
        "info",
        "check",
        "map",
        "read",
        "write",
        "convert",
        "set-hidden",
    ] {
        let out = ok(&["vhd", sub, "--help"]);
        assert!(out.contains("Usage"), "{sub}: {out}");
    }
}

#[test]
fn read_write_info_map_and_hidden_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let base = disk_with_data(d.path(), "base.vhd");
    let child = d.path().join("child.vhd");
    ok(&["vhd", "snapshot", s(&base), s(&child)]);
    let out = Command::new(bin("ddstor"))
        .args(["vhd", "write", s(&child), "--offset", "69632"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"child!")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success());
    let r = Command::new(bin("ddstor"))
        .args([
            "vhd",
            "read",
            s(&child),
            "--offset",
            "69630",
            "--length",
            "380",
        ])
        .output()
        .unwrap();
    // 69630..69632 zero, 69632..69638 the child's bytes, 69638..70000 zero, then the base's.
    let mut want = vec![0u8; 2];
    want.extend_from_slice(b"child!");
    want.extend(vec![0u8; 362]);
    want.extend(vec![0x5A; 10]);
    assert_eq!(r.stdout, want);
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["vhd", "info", "--json", s(&child)])).unwrap();
    assert_eq!(info["disk_type"], "differencing");
    assert_eq!(info["virtual_size"], 8 << 20);
    assert_eq!(info["parent_name"], "base.vhd");
    let map: serde_json::Value =
        serde_json::from_str(&ok(&["vhd", "map", "--json", s(&child)])).unwrap();
    assert_eq!(map["layers"].as_array().unwrap().len(), 2);
    let b1 = &map["blocks"][1]["extents"];
    assert!(
        b1.as_array().unwrap().iter().any(|e| e["layer"] == 0),
        "{b1}"
    );
    assert!(
        b1.as_array().unwrap().iter().any(|e| e["layer"] == 1),
        "{b1}"
    );
    assert!(map["blocks"][100]["extents"][0]["layer"].is_null());
    ok(&["vhd", "set-hidden", s(&base), "on"]);
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["vhd", "info", "--json", s(&base)])).unwrap();
    assert_eq!(info["hidden"], true);
    ok(&["vhd", "check", s(&base)]);
    ok(&["vhd", "check", s(&child)]);
}

#[test]
fn hostile_files_give_one_clear_line_and_nonzero_exit() {
    let d = tempfile::tempdir().unwrap();
    // Truncated.
    let f = disk_with_data(d.path(), "trunc.vhd");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 4096)
        .unwrap();
    let e = fails(&["vhd", "read", s(&f), "--offset", "0", "--length", "512"]);
    assert!(e.contains("past the end"), "{e}");
    let e = fails(&["vhd", "check", s(&f)]);
    assert!(e.contains("problem"), "{e}");
    // Bad header checksum.
    let f = disk_with_data(d.path(), "cksum.vhd");
    poke(&f, 512 + 200, b"x");
    let e = fails(&["vhd", "info", s(&f)]);
    assert!(
        e.contains("checksum") && e.contains("dynamic header"),
        "{e}"
    );
    // BAT entry past EOF.
    let f = disk_with_data(d.path(), "bat.vhd");
    poke(&f, 1536 + 4, &0x7000_0000u32.to_be_bytes());
    let e = fails(&["vhd", "map", s(&f)]);
    assert!(e.contains("BAT entry 1"), "{e}");
    // Overlapping BAT entries.
    let f = disk_with_data(d.path(), "overlap.vhd");
    let mut e2 = [0u8; 4];
    std::fs::File::open(&f)
        .unwrap()
        .read_exact_at(&mut e2, 1536 + 4)
        .unwrap();
    poke(&f, 1536 + 8, &e2);
    let e = fails(&["vhd", "read", s(&f), "--offset", "0", "--length", "1"]);
    assert!(e.contains("overlap"), "{e}");
    // Not a VHD at all.
    let f = d.path().join("junk.vhd");
    std::fs::write(&f, vec![7u8; 4096]).unwrap();
    let e = fails(&["vhd", "info", s(&f)]);
    assert!(e.contains("footer cookie"), "{e}");
    // Absurd size argument.
    let e = fails(&[
        "vhd",
        "create",
        s(&d.path().join("big.vhd")),
        "--size",
        "3T",
    ]);
    assert!(e.contains("2040 GiB"), "{e}");
    // Reads past the end.
    let f = disk_with_data(d.path(), "range.vhd");
    let e = fails(&["vhd", "read", s(&f), "--offset", "8M", "--length", "1"]);
    assert!(e.contains("past the virtual size"), "{e}");
}

#[test]
fn parents_outside_the_root_symlinks_out_and_cycles_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let sr = d.path().join("sr");
    std::fs::create_dir(&sr).unwrap();
    // Parent in the directory above the leaf's (locator "../p.vhd").
    let p = disk_with_data(d.path(), "p.vhd");
    let c = sr.join("c.vhd");
    ok(&["vhd", "snapshot", s(&p), s(&c)]);
    let e = fails(&["vhd", "read", s(&c), "--offset", "0", "--length", "1"]);
    assert!(e.contains("outside the root"), "{e}");
    // --root widens it.
    ok(&[
        "vhd",
        "read",
        s(&c),
        "--offset",
        "0",
        "--length",
        "1",
        "--root",
        s(d.path()),
    ]);
    // A symlink inside the root whose target is outside it.
    let link = sr.join("link.vhd");
    std::os::unix::fs::symlink(&p, &link).unwrap();
    let e = fails(&["vhd", "read", s(&link), "--offset", "0", "--length", "1"]);
    assert!(e.contains("outside the root"), "{e}");
    // Cycle: c2 -> b -> c2 (b re-pointed at its own child through the library).
    let a = disk_with_data(&sr, "a.vhd");
    let b = sr.join("b.vhd");
    ok(&["vhd", "snapshot", s(&a), s(&b)]);
    let c2 = sr.join("c2.vhd");
    ok(&["vhd", "snapshot", s(&b), s(&c2)]);
    vhd::set_parent(&b, &c2).unwrap();
    let e = fails(&["vhd", "read", s(&c2), "--offset", "0", "--length", "1"]);
    assert!(e.contains("cycle"), "{e}");
    // Depth limit.
    let e = fails(&["vhd", "map", s(&b), "--max-depth", "1"]);
    assert!(e.contains("deeper than the limit"), "{e}");
}

#[test]
fn convert_chain_to_raw_and_raw_back_round_trips() {
    let d = tempfile::tempdir().unwrap();
    let base = disk_with_data(d.path(), "base.vhd");
    let raw = d.path().join("out.raw");
    ok(&["vhd", "convert", s(&base), s(&raw)]);
    let bytes = std::fs::read(&raw).unwrap();
    assert_eq!(bytes.len(), 8 << 20);
    assert!(bytes[70_000..270_000].iter().all(|&b| b == 0x5A));
    let back = d.path().join("back.vhd");
    ok(&["vhd", "convert", s(&raw), s(&back)]);
    let raw2 = d.path().join("out2.raw");
    ok(&["vhd", "convert", s(&back), s(&raw2), "--to", "raw"]);
    assert!(std::fs::read(&raw2).unwrap() == bytes);
    let e = fails(&["vhd", "convert", s(&base), s(&raw)]);
    assert!(e.contains("must not exist"), "{e}");
}

#[test]
fn coalesce_merges_a_child_into_its_parent_and_bench_runs() {
    let d = tempfile::tempdir().unwrap();
    let base = disk_with_data(d.path(), "base.vhd");
    let child = d.path().join("child.vhd");
    ok(&["vhd", "snapshot", s(&base), s(&child)]);
    let input = d.path().join("in");
    std::fs::write(&input, vec![0xC3; 8192]).unwrap();
    ok(&[
        "vhd",
        "write",
        s(&child),
        "--offset",
        "65536",
        "--input",
        s(&input),
    ]);
    let want = ok_bytes(&["vhd", "read", s(&child), "--offset", "0", "--length", "1M"]);
    let out = ok(&["vhd", "coalesce", s(&child)]);
    assert!(out.contains("8192 bytes"), "{out}"); // only the child's sectors are copied
    assert!(ok_bytes(&["vhd", "read", s(&base), "--offset", "0", "--length", "1M"]) == want);
    let e = fails(&["vhd", "coalesce", s(&base)]);
    assert!(e.contains("has no parent"), "{e}");
    let j: serde_json::Value =
        serde_json::from_str(&ok(&["vhd", "bench", s(&base), "--size", "64K", "--json"])).unwrap();
    assert_eq!(j["ops"], 128);
    ok(&[
        "vhd",
        "bench",
        s(&child),
        "--write",
        "--pattern",
        "rand",
        "--size",
        "4K",
        "--count",
        "50",
    ]);
}

/// Runs `ddstor args`, killing it (and failing) if it has not exited within 10 s: a tool that
/// blocks on a FIFO must not hang the test run.
fn run_guarded(args: &[&str]) -> Output {
    let mut child = Command::new(bin("ddstor"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ddstor");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ddstor {args:?} hung");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn fails_guarded(args: &[&str]) -> String {
    let out = run_guarded(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "ddstor {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!err.contains("panicked"), "ddstor {args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("ddstor:")).collect();
    assert_eq!(lines.len(), 1, "want one error line, got: {err}");
    lines[0].to_string()
}

#[test]
fn check_refuses_a_directory() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("dir.vhd");
    std::fs::create_dir(&dir).unwrap();
    let e = fails(&["vhd", "check", s(&dir)]);
    assert!(e.contains("is a directory, not a regular file"), "{e}");
    let e = fails(&["vhd", "info", s(&dir)]);
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn check_info_and_map_refuse_a_fifo_without_hanging() {
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("pipe.vhd");
    let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success());
    for sub in ["check", "info", "map"] {
        let e = fails_guarded(&["vhd", sub, s(&fifo)]);
        assert!(e.contains("is a FIFO, not a regular file"), "{sub}: {e}");
    }
}

#[test]
fn check_reports_a_disk_that_is_its_own_parent() {
    let d = tempfile::tempdir().unwrap();
    let base = disk_with_data(d.path(), "base.vhd");
    let c = d.path().join("c.vhd");
    ok(&["vhd", "snapshot", s(&base), s(&c)]);
    vhd::set_parent(&c, &c).unwrap();
    let out = run_guarded(&["vhd", "check", s(&c)]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("is its own parent"), "{text}");
}

#[test]
fn check_reports_a_two_disk_parent_cycle() {
    let d = tempfile::tempdir().unwrap();
    let base = disk_with_data(d.path(), "base.vhd");
    let a = d.path().join("a.vhd");
    ok(&["vhd", "snapshot", s(&base), s(&a)]);
    let b = d.path().join("b.vhd");
    ok(&["vhd", "snapshot", s(&a), s(&b)]);
    vhd::set_parent(&a, &b).unwrap();
    for f in [&a, &b] {
        let out = run_guarded(&["vhd", "check", s(f)]);
        assert!(!out.status.success(), "{}", f.display());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("parent cycle") && text.contains("ancestor of itself"),
            "{text}"
        );
    }
}

#[test]
fn check_and_map_refuse_a_symlink_leading_outside_the_root_with_the_same_error() {
    let d = tempfile::tempdir().unwrap();
    let sr = d.path().join("sr");
    std::fs::create_dir(&sr).unwrap();
    let outside = disk_with_data(d.path(), "outside.vhd");
    let link = sr.join("link.vhd");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let from_check = fails(&["vhd", "check", s(&link)]);
    let from_map = fails(&["vhd", "map", s(&link)]);
    assert!(from_check.contains("outside the root"), "{from_check}");
    assert!(from_map.contains("outside the root"), "{from_map}");
    // The same reason, whatever context each verb puts before it.
    let reason = |e: &str| {
        let at = e
            .find(&format!("{}: parent locator", s(&link)))
            .expect("the error names the link");
        e[at..].to_string()
    };
    assert!(
        reason(&from_check).contains("(the leaf itself)"),
        "{from_check}"
    );
    assert_eq!(reason(&from_check), reason(&from_map));
}
