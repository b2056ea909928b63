//! qemu as the oracle for dynamic VHDs (never for differencing disks, which qemu corrupts):
//! images qemu creates and writes read back byte-identical here, and images made and written
//! here compare identical in qemu-img and report the right size.

use ddstor_e2e::{bin, require_tool};
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::process::{Command, Output};

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ddstor(args: &[&str]) -> Output {
    run(Command::new(bin("ddstor")).args(args))
}

fn qemu_virtual_size(file: &Path) -> u64 {
    let out = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "vpc"])
        .arg(file));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

#[test]
fn qemu_created_and_written_dynamic_disk_reads_back_identical() {
    require_tool("qemu-img", "qemu-utils");
    require_tool("qemu-io", "qemu-utils");
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("q.vhd");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vpc", "-o", "subformat=dynamic"])
        .arg(&img)
        .arg("64M"));
    let writes = "write -P 0xab 0 4096\nwrite -P 0x11 1000448 70000\nwrite -P 0x5c 6291456 2097152\nwrite -P 0x77 33554432 12345\nwrite -P 0x01 60000000 512\n";
    run(Command::new("qemu-io")
        .args(["-f", "vpc"])
        .arg(&img)
        .args(writes.lines().flat_map(|l| ["-c", l])));
    let qraw = d.path().join("q.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(&img)
        .arg(&qraw));
    let expected = std::fs::read(&qraw).unwrap();
    // Sizes: qemu sizes its own images by CHS geometry; ours reads the footer's current size,
    // which qemu sets to that same CHS size.
    let info: serde_json::Value =
        serde_json::from_slice(&ddstor(&["vhd", "info", "--json", img.to_str().unwrap()]).stdout)
            .unwrap();
    assert_eq!(
        info["virtual_size"].as_u64().unwrap(),
        qemu_virtual_size(&img)
    );
    assert_eq!(
        info["virtual_size"].as_u64().unwrap(),
        expected.len() as u64
    );
    let ours = d.path().join("ours.raw");
    ddstor(&[
        "vhd",
        "convert",
        img.to_str().unwrap(),
        ours.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(&ours).unwrap() == expected,
        "convert differs from qemu's"
    );
    let read = ddstor(&[
        "vhd",
        "read",
        img.to_str().unwrap(),
        "--offset",
        "1000000",
        "--length",
        "100000",
    ]);
    assert_eq!(read.stdout, expected[1_000_000..1_100_000]);
    ddstor(&["vhd", "check", img.to_str().unwrap()]);
}

#[test]
fn disk_written_here_compares_identical_in_qemu_and_reports_its_size() {
    require_tool("qemu-img", "qemu-utils");
    let d = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (asked, bs) in [(50_000_000u64, "2M"), (8_388_608 + 512 * 3, "64K")] {
        let img = d.path().join(format!("o{asked}.vhd"));
        ddstor(&[
            "vhd",
            "create",
            img.to_str().unwrap(),
            "--size",
            &asked.to_string(),
            "--block-size",
            bs,
        ]);
        // Sizes are rounded up to whole sectors.
        let size = asked.div_ceil(512) * 512;
        let mut model = vec![0u8; size as usize];
        for i in 0..25 {
            let len = rng.gen_range(1..300_000usize);
            let off = rng.gen_range(0..size - len as u64);
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let input = d.path().join(format!("in{i}"));
            std::fs::write(&input, &data).unwrap();
            ddstor(&[
                "vhd",
                "write",
                img.to_str().unwrap(),
                "--offset",
                &off.to_string(),
                "--input",
                input.to_str().unwrap(),
            ]);
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        let raw = d.path().join("model.raw");
        std::fs::write(&raw, &model).unwrap();
        assert_eq!(qemu_virtual_size(&img), size);
        run(Command::new("qemu-img")
            .args(["compare", "-f", "vpc", "-F", "raw"])
            .arg(&img)
            .arg(&raw));
        ddstor(&["vhd", "check", img.to_str().unwrap()]);
        std::fs::remove_file(&raw).unwrap();
    }
}

#[test]
fn raw_converted_to_vhd_is_read_identically_by_qemu() {
    require_tool("qemu-img", "qemu-utils");
    let d = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut raw = vec![0u8; 10 << 20];
    for chunk in raw.chunks_mut(1 << 20).step_by(3) {
        rng.fill(&mut chunk[..100_000]);
    }
    let rawp = d.path().join("src.raw");
    std::fs::write(&rawp, &raw).unwrap();
    let vhdp = d.path().join("dst.vhd");
    ddstor(&[
        "vhd",
        "convert",
        rawp.to_str().unwrap(),
        vhdp.to_str().unwrap(),
        "--to",
        "vhd",
    ]);
    run(Command::new("qemu-img")
        .args(["compare", "-f", "vpc", "-F", "raw"])
        .arg(&vhdp)
        .arg(&rawp));
    // Sparse: all-zero blocks stay unallocated.
    let info: serde_json::Value =
        serde_json::from_slice(&ddstor(&["vhd", "info", "--json", vhdp.to_str().unwrap()]).stdout)
            .unwrap();
    assert_eq!(info["allocated_blocks"].as_u64().unwrap(), 4);
}
