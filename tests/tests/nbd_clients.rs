//! `ddstor nbd serve` against real NBD clients: qemu-io, qemu-img, nbdinfo, nbdcopy.

use ddstor_e2e::nbd::{run_fail, run_ok, sha256_file, NbdServe, RawClient};
use ddstor_e2e::require_tool;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::process::Command;

const SIZE: usize = 16 << 20;

fn random_file(path: &Path, size: usize, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; size];
    rng.fill(&mut data[..]);
    std::fs::write(path, data).unwrap();
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new(require_tool("qemu-io", "qemu-utils"));
    c.arg("-f").arg("raw");
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(uri);
    let out = run_ok(&mut c);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

#[test]
fn qemu_io_patterns_written_over_nbd_read_back_and_reach_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    std::fs::write(&img, vec![0u8; SIZE]).unwrap();
    let srv = NbdServe::start(&img, &["--format=raw"]);
    qemu_io(
        &srv.uri(),
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "aio_write -P 0xcd 4M 64k",
            "aio_write -P 0xce 5M 64k",
            "aio_flush",
            "read -P 0xcd 4M 64k",
            "read -P 0xce 5M 64k",
            "write -z 64k 64k",
            "read -P 0 64k 64k",
            "write -P 0x11 8M 4k",
            "discard 8M 4k",
            "write -P 0x22 9M 512",
            "flush",
        ],
    );
    // A second connection sees the data, and so does the file itself.
    qemu_io(&srv.uri(), &["read -P 0xab 0 64k", "read -P 0x22 9M 512"]);
    drop(srv);
    let data = std::fs::read(&img).unwrap();
    assert!(data[..64 << 10].iter().all(|&b| b == 0xab));
    assert!(data[64 << 10..128 << 10].iter().all(|&b| b == 0));
    assert!(data[4 << 20..(4 << 20) + (64 << 10)]
        .iter()
        .all(|&b| b == 0xcd));
    assert!(data[9 << 20..(9 << 20) + 512].iter().all(|&b| b == 0x22));
}

#[test]
fn qemu_img_info_convert_and_compare_see_the_served_disk() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    random_file(&img, SIZE, 1);
    let srv = NbdServe::start(&img, &["--format=raw", "--read-only"]);
    let qimg = require_tool("qemu-img", "qemu-utils");
    let info = run_ok(
        Command::new(&qimg)
            .args(["info", "--output=json"])
            .arg(srv.uri()),
    );
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"].as_u64(), Some(SIZE as u64));
    let out = dir.path().join("copy.raw");
    run_ok(
        Command::new(&qimg)
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(srv.uri())
            .arg(&out),
    );
    assert_eq!(sha256_file(&img), sha256_file(&out));
    run_ok(
        Command::new(&qimg)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(srv.uri())
            .arg(&img),
    );
}

#[test]
fn nbdcopy_copies_both_directions_with_equal_checksums() {
    let dir = tempfile::tempdir().unwrap();
    let nbdcopy = require_tool("nbdcopy", "libnbd-bin");
    let src = dir.path().join("src.raw");
    random_file(&src, SIZE, 2);
    let target = dir.path().join("target.raw");
    std::fs::write(&target, vec![0u8; SIZE]).unwrap();
    let srv = NbdServe::start(&target, &["--format=raw"]);
    // Into the export, with several connections and requests in flight.
    run_ok(
        Command::new(&nbdcopy)
            .args(["--connections=4", "--requests=16"])
            .arg(&src)
            .arg(srv.uri()),
    );
    // And back out of it.
    let back = dir.path().join("back.raw");
    run_ok(Command::new(&nbdcopy).arg(srv.uri()).arg(&back));
    assert_eq!(sha256_file(&src), sha256_file(&back));
    drop(srv);
    assert_eq!(sha256_file(&src), sha256_file(&target));
}

#[test]
fn nbdinfo_reports_size_flags_and_the_allocation_context() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    std::fs::write(&img, vec![0u8; SIZE]).unwrap();
    let srv = NbdServe::start(&img, &["--format=raw", "--read-only"]);
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let out = run_ok(Command::new(&nbdinfo).arg("--json").arg(srv.uri()));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"].as_u64(), Some(SIZE as u64));
    assert_eq!(e["is_read_only"].as_bool(), Some(true));
    assert_eq!(e["can_multi_conn"].as_bool(), Some(true));
    assert!(e["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "base:allocation"));
    assert_eq!(v["protocol"].as_str(), Some("newstyle-fixed"));
    let map = run_ok(Command::new(&nbdinfo).arg("--map").arg(srv.uri()));
    assert!(map.contains(&format!("{SIZE}")), "map: {map}");
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
    let srv = NbdServe::start(&img, &["--format=raw", "--read-only"]);
    // qemu refuses to open the read-only export for writing…
    let text = run_fail(
        Command::new(require_tool("qemu-io", "qemu-utils"))
            .args(["-f", "raw", "-c", "write -P 1 0 512"])
            .arg(srv.uri()),
    );
    assert!(text.contains("Permission denied"), "qemu-io: {text}");
    // …and a client that writes anyway gets EPERM (1) for WRITE, WRITE_ZEROES and TRIM.
    let mut c = RawClient::connect(&srv.socket);
    c.go("");
    c.request(0, 1, 11, 0, 512, &[1u8; 512]);
    assert_eq!(c.simple_reply(0).unwrap(), (1, 11, vec![]));
    c.request(0, 6, 12, 0, 512, &[]);
    assert_eq!(c.simple_reply(0).unwrap(), (1, 12, vec![]));
    c.request(0, 4, 13, 0, 512, &[]);
    assert_eq!(c.simple_reply(0).unwrap(), (1, 13, vec![]));
    c.request(0, 0, 14, 0, 4, &[]);
    assert_eq!(c.simple_reply(4).unwrap(), (0, 14, vec![7u8; 4]));
    drop(srv);
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 7));
}

#[test]
fn several_clients_write_disjoint_regions_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    std::fs::write(&img, vec![0u8; SIZE]).unwrap();
    let srv = NbdServe::start(&img, &["--format=raw"]);
    let uri = srv.uri();
    let handles: Vec<_> = (0..6u8)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let off = u64::from(i) * (2 << 20);
                let w = format!("aio_write -P {} {} 1M", i + 1, off);
                let w2 = format!("aio_write -P {} {} 1M", i + 1, off + (1 << 20));
                let r = format!("read -P {} {} 2M", i + 1, off);
                qemu_io(&uri, &[&w, &w2, "aio_flush", &r]);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread");
    }
    let checks: Vec<String> = (0..6u8)
        .map(|i| format!("read -P {} {} 2M", i + 1, u64::from(i) * (2 << 20)))
        .collect();
    let refs: Vec<&str> = checks.iter().map(|s| s.as_str()).collect();
    qemu_io(&uri, &refs);
}
