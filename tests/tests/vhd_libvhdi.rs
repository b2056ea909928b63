//! libvhdi (vhdimount) as the independent read oracle for differencing chains made here.
//!
//! Writes are 4 KiB-aligned: libvhdi 20210425 (Debian bookworm) mis-reads a 4 KiB page in
//! which a child holds only some of the sectors (it takes the rest of the page from the child
//! too), while the VHD bitmap semantics — and this engine — take each absent sector from the
//! parent. Sector-granular correctness is proven by the unit/property tests instead.

use ddstor_e2e::libvhdi::VhdiMount;
use ddstor_e2e::{bin, require_tool};
use rand::{Rng, SeedableRng};
use std::process::{Command, Output};

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

#[test]
fn deep_chain_with_writes_at_every_layer_reads_identically_in_libvhdi() {
    require_tool("vhdimount", "libvhdi-utils");
    require_tool("fusermount3", "fuse3");
    let d = tempfile::tempdir().unwrap();
    let size: u64 = 24 << 20;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut model = vec![0u8; size as usize];
    let depth = 6;
    let mut leaf = d.path().join("l0.vhd");
    ddstor(&[
        "vhd",
        "create",
        leaf.to_str().unwrap(),
        "--size",
        "24M",
        "--block-size",
        "512K",
    ]);
    for layer in 0..depth {
        if layer > 0 {
            let child = d.path().join(format!("l{layer}.vhd"));
            ddstor(&[
                "vhd",
                "snapshot",
                leaf.to_str().unwrap(),
                child.to_str().unwrap(),
            ]);
            leaf = child;
        }
        for i in 0..12 {
            let len = rng.gen_range(1..64usize) * 4096;
            let off = rng.gen_range(0..(size - len as u64) / 4096) * 4096;
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let input = d.path().join(format!("in{layer}_{i}"));
            std::fs::write(&input, &data).unwrap();
            ddstor(&[
                "vhd",
                "write",
                leaf.to_str().unwrap(),
                "--offset",
                &off.to_string(),
                "--input",
                input.to_str().unwrap(),
            ]);
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
    }
    let flat = d.path().join("flat.raw");
    ddstor(&[
        "vhd",
        "convert",
        leaf.to_str().unwrap(),
        flat.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(&flat).unwrap() == model,
        "ddstor convert differs from the model"
    );
    for l in 0..depth {
        ddstor(&[
            "vhd",
            "check",
            d.path().join(format!("l{l}.vhd")).to_str().unwrap(),
        ]);
    }
    let mnt = d.path().join("mnt");
    let m = VhdiMount::new(&leaf, &mnt);
    let layers = m.layers();
    assert_eq!(
        layers.len(),
        depth,
        "vhdimount exposes one file per layer: {layers:?}"
    );
    // The highest-numbered file is the leaf's flattened view.
    let leaf_view = m.read_leaf();
    assert_eq!(leaf_view.len() as u64, size);
    let first_diff = leaf_view.iter().zip(&model).position(|(a, b)| a != b);
    assert!(
        first_diff.is_none(),
        "libvhdi differs from the model at byte {first_diff:?}"
    );
}
