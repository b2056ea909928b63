//! `ddstor nbd serve` on VHDs: qemu is the oracle for dynamic disks, a model (and the files
//! reopened) for differencing chains; nbdinfo's allocation map must match the VHD's.

use ddstor_e2e::nbd::{run_ok, sha256_file, NbdServe, RawClient};
use ddstor_e2e::require_tool;
use std::path::{Path, PathBuf};
use std::process::Command;

fn qemu_img() -> PathBuf {
    require_tool("qemu-img", "qemu-utils")
}

fn qemu_io(fmt: &str, target: &str, cmds: &[&str]) {
    let mut c = Command::new(require_tool("qemu-io", "qemu-utils"));
    match fmt.strip_suffix("-ro") {
        Some(f) => c.arg("-r").arg("-f").arg(f),
        None => c.arg("-f").arg(fmt),
    };
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(target);
    let out = run_ok(&mut c);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "qemu-io: {out}"
    );
}

/// Data ranges (merged) of an `nbdinfo --map --json` or `qemu-img map --output=json` listing.
fn data_ranges(json: &str, is_data: impl Fn(&serde_json::Value) -> bool) -> Vec<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        if !is_data(e) {
            continue;
        }
        let start = e["start"].as_u64().or(e["offset"].as_u64()).unwrap();
        let len = e["length"].as_u64().unwrap();
        match out.last_mut() {
            Some((s, l)) if *s + *l == start => *l += len,
            _ => out.push((start, len)),
        }
    }
    out
}

fn nbd_data_ranges(uri: &str) -> Vec<(u64, u64)> {
    let nbdinfo = require_tool("nbdinfo", "libnbd-bin");
    let j = run_ok(Command::new(nbdinfo).args(["--map", "--json"]).arg(uri));
    // base:allocation type bit 0 = hole.
    data_ranges(&j, |e| e["type"].as_u64().unwrap() & 1 == 0)
}

fn qemu_made_vhd(dir: &Path, size: &str) -> PathBuf {
    let p = dir.join("q.vhd");
    run_ok(
        Command::new(qemu_img())
            .args(["create", "-q", "-f", "vpc", "-o", "subformat=dynamic"])
            .arg(&p)
            .arg(size),
    );
    p
}

#[test]
fn dynamic_vhd_written_by_qemu_is_served_identically_with_its_allocation_map() {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_made_vhd(dir.path(), "32M");
    qemu_io(
        "vpc",
        img.to_str().unwrap(),
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 6M 3M",
            "write -P 0x33 20M 4k",
        ],
    );
    let srv = NbdServe::start(&img, &["--read-only"]);
    // Same bytes as qemu's own reading of the file.
    run_ok(
        Command::new(qemu_img())
            .args(["compare", "-f", "vpc", "-F", "raw"])
            .arg(&img)
            .arg(srv.uri()),
    );
    qemu_io(
        "raw-ro",
        &srv.uri(),
        &["read -P 0x22 6M 3M", "read -P 0 10M 1M"],
    );
    // Same allocation as qemu's map of the file (qemu allocates whole 2 MiB blocks).
    let qmap = run_ok(
        Command::new(qemu_img())
            .args(["map", "-f", "vpc", "--output=json"])
            .arg(&img),
    );
    let want = data_ranges(&qmap, |e| e["data"].as_bool() == Some(true));
    assert_eq!(nbd_data_ranges(&srv.uri()), want);
    assert_eq!(
        want,
        vec![(0, 2 << 20), (6 << 20, 4 << 20), (20 << 20, 2 << 20)],
        "qemu's map"
    );
}

#[test]
fn writes_over_nbd_land_in_the_dynamic_vhd_as_qemu_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_made_vhd(dir.path(), "16M");
    let srv = NbdServe::start(&img, &[]);
    qemu_io(
        "raw",
        &srv.uri(),
        &[
            "write -P 0xa1 0 1M",
            "aio_write -P 0xa2 3M 64k",
            "aio_write -P 0xa3 5M 4k",
            "aio_flush",
            "write -P 0xa4 1000 3000",
            "write -z 8M 2M",
            "discard 12M 1M",
            "read -P 0xa4 1000 3000",
            "flush",
        ],
    );
    drop(srv);
    qemu_io(
        "vpc",
        img.to_str().unwrap(),
        &[
            "read -P 0xa1 0 1000",
            "read -P 0xa4 1000 3000",
            "read -P 0xa1 4000 1044576",
            "read -P 0xa2 3M 64k",
            "read -P 0xa3 5M 4k",
            "read -P 0 8M 2M",
        ],
    );
    let report = vhd::check(&img).unwrap();
    assert!(report.is_ok(), "vhd check after NBD writes: {report:?}");
}

#[test]
fn differencing_chain_is_served_flattened_and_nbd_writes_go_to_the_leaf_only() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 16 << 20;
    let base = dir.path().join("base.vhd");
    let leaf = dir.path().join("leaf.vhd");
    let opts = vhd::CreateOptions::default();
    vhd::create_dynamic(&base, size, &opts).unwrap();
    {
        let c =
            vhd::Chain::open(&base, &vhd::ChainOptions::new(dir.path()).writable(true)).unwrap();
        c.write_at(&vec![0x5b; 4 << 20], 0).unwrap();
        c.write_at(&vec![0x5c; 8192], 10 << 20).unwrap();
        c.flush().unwrap();
    }
    vhd::create_differencing(&leaf, &base, &opts).unwrap();
    let base_sum = sha256_file(&base);

    let srv = NbdServe::start(&leaf, &[]);
    // Reads see the parent's data through the empty leaf.
    qemu_io(
        "raw",
        &srv.uri(),
        &[
            "read -P 0x5b 0 4M",
            "read -P 0x5c 10M 8k",
            "read -P 0 12M 1M",
        ],
    );
    // Allocation: the parent's data, nothing else.
    let ranges = nbd_data_ranges(&srv.uri());
    assert_eq!(ranges.first(), Some(&(0, 4 << 20)), "map: {ranges:?}");
    assert!(ranges
        .iter()
        .all(|&(s, l)| s < 4 << 20 || (s >= 10 << 20 && s + l <= 12 << 20)));
    // Write into the leaf through NBD (4 KiB-aligned: see vhd_libvhdi.rs on libvhdi's pages).
    qemu_io(
        "raw",
        &srv.uri(),
        &[
            "write -P 0xc1 1M 64k",
            "write -P 0xc2 14M 4k",
            "write -z 10M 4k",
            "flush",
        ],
    );
    let nbdcopy = require_tool("nbdcopy", "libnbd-bin");
    let flat = dir.path().join("flat.raw");
    run_ok(Command::new(&nbdcopy).arg(srv.uri()).arg(&flat));
    drop(srv);

    assert_eq!(sha256_file(&base), base_sum, "the parent was modified");
    let mut want = vec![0u8; size as usize];
    want[..4 << 20].fill(0x5b);
    want[(10 << 20) + 4096..(10 << 20) + 8192].fill(0x5c);
    want[1 << 20..(1 << 20) + (64 << 10)].fill(0xc1);
    want[14 << 20..(14 << 20) + 4096].fill(0xc2);
    assert!(
        std::fs::read(&flat).unwrap() == want,
        "NBD view differs from the model"
    );

    // The files, reopened after the server is gone, hold the same disk.
    let c = vhd::Chain::open(&leaf, &vhd::ChainOptions::new(dir.path())).unwrap();
    assert_eq!(c.depth(), 2);
    let mut back = vec![0u8; size as usize];
    c.read_at(&mut back, 0).unwrap();
    assert!(back == want, "reopened chain differs from the model");
    assert!(vhd::check(&leaf).unwrap().is_ok());
}

/// A depth-3 chain whose reads mix layers within blocks (sector-sized pieces in the leaf and
/// the middle layer, blocks and holes in the base); returns (leaf, its flattened content).
fn mixed_chain(dir: &Path, size: u64) -> (PathBuf, Vec<u8>) {
    let opts = vhd::CreateOptions::default();
    let root = vhd::ChainOptions::new(dir).writable(true);
    let base = dir.join("base.vhd");
    let mid = dir.join("mid.vhd");
    let leaf = dir.join("leaf.vhd");
    vhd::create_dynamic(&base, size, &opts).unwrap();
    let fill = |p: &Path, writes: &[(u64, usize, u8)]| {
        let c = vhd::Chain::open(p, &root).unwrap();
        for &(off, len, seed) in writes {
            let d: Vec<u8> = (0..len).map(|i| seed ^ (i % 251) as u8).collect();
            c.write_at(&d, off).unwrap();
        }
        c.flush().unwrap();
    };
    fill(
        &base,
        &[
            (0, 3 << 20, 0x10),
            (5 << 20, 1 << 20, 0x20),
            (7 << 20, 512, 0x30),
        ],
    );
    vhd::create_differencing(&mid, &base, &opts).unwrap();
    fill(
        &mid,
        &[
            (512, 1024, 0x40),
            (2 << 20, 4096, 0x50),
            ((6 << 20) - 512, 2048, 0x60),
        ],
    );
    vhd::create_differencing(&leaf, &mid, &opts).unwrap();
    fill(
        &leaf,
        &[
            (1536, 512, 0x70),
            ((2 << 20) + 512, 512, 0x80),
            (9 << 20, 65536, 0x90),
        ],
    );
    let c = vhd::Chain::open(&leaf, &vhd::ChainOptions::new(dir)).unwrap();
    let mut flat = vec![0u8; size as usize];
    c.read_at(&mut flat, 0).unwrap();
    (leaf, flat)
}

#[test]
fn zero_copy_reads_of_a_mixed_chain_match_it_for_simple_structured_and_extended_replies() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 12 << 20;
    let (leaf, flat) = mixed_chain(dir.path(), size);
    // Every read goes through the zero-copy path (no inline cached reads, no lower bound).
    let srv = NbdServe::start(
        &leaf,
        &["--read-only", "--zero-copy-min=1", "--inline-read-max=0"],
    );

    // Structured replies: nbdcopy, 4 connections of 256 KiB requests.
    let out = dir.path().join("flat.raw");
    run_ok(
        Command::new(require_tool("nbdcopy", "libnbd-bin"))
            .arg(srv.uri())
            .arg(&out),
    );
    assert!(
        std::fs::read(&out).unwrap() == flat,
        "nbdcopy's copy differs from the chain"
    );

    // Extended headers (qemu 10) or structured replies (qemu 7.2): unaligned reads that cross
    // sectors, blocks and layers, checked against the chain's bytes.
    let probe = |off: u64, len: u64| {
        let want = &flat[off as usize..(off + len) as usize];
        want.iter().all(|&b| b == want[0]).then_some(want[0])
    };
    for (off, len) in [
        (0u64, 1u64),
        (3 << 20, 1 << 20),
        ((3 << 20) + 7, 4093),
        (10 << 20, 2 << 20),
    ] {
        let b = probe(off, len).expect("a uniform range");
        qemu_io("raw-ro", &srv.uri(), &[&format!("read -P {b} {off} {len}")]);
    }

    // Simple replies: pipelined reads of odd ranges, answered in any order.
    let ranges: Vec<(u64, u32)> = vec![
        (0, 1),
        (511, 2),
        (1000, 3000),
        ((2 << 20) - 100, 8192),
        ((2 << 20) + 500, 30),
        ((6 << 20) - 4096, 3 << 20),
        (7 << 20, 513),
        (size - 1, 1),
        (1, (size - 2) as u32),
    ];
    let mut c = RawClient::connect(&srv.socket);
    c.go("");
    for (i, &(off, len)) in ranges.iter().enumerate() {
        c.request(0, 0, i as u64, off, len, &[]);
    }
    for _ in 0..ranges.len() {
        let (err, cookie, data) = c
            .simple_reply_for(|k| ranges[k as usize].1 as usize)
            .unwrap();
        let (off, len) = ranges[cookie as usize];
        assert_eq!(err, 0, "read {off}+{len} failed");
        assert!(
            data[..] == flat[off as usize..off as usize + len as usize],
            "read {off}+{len} differs from the chain"
        );
    }
}
