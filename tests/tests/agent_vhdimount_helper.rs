//! The harness's libvhdi reader (`read_with_vhdimount`) reads the chain's leaf, not its base:
//! checked on a two-layer chain whose layers differ.

use ddstor_e2e::agent::read_with_vhdimount;
use std::process::Command;

fn ddstor(args: &[&str], stdin: Option<&[u8]>) {
    use std::io::Write;
    let mut child = Command::new(ddstor_e2e::bin("ddstor"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut i = child.stdin.take().unwrap();
    if let Some(b) = stdin {
        i.write_all(b).unwrap();
    }
    drop(i);
    assert!(child.wait().unwrap().success(), "ddstor {args:?}");
}

#[test]
fn read_with_vhdimount_reads_the_leaf_of_a_chain_whose_layers_differ() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.vhd");
    let leaf = d.path().join("leaf.vhd");
    let (b, l) = (base.to_str().unwrap(), leaf.to_str().unwrap());
    ddstor(&["vhd", "create", b, "--size", "4194304"], None);
    ddstor(&["vhd", "write", b, "--offset", "0"], Some(&[0xAA; 16384]));
    ddstor(&["vhd", "snapshot", b, l], None);
    // 4 KiB-aligned: libvhdi (20210425) reads sub-4 KiB runs of a partly present block
    // wrongly, which is not what this test is about.
    ddstor(
        &["vhd", "write", l, "--offset", "4096"],
        Some(&[0x55; 4096]),
    );
    let got = read_with_vhdimount(&leaf, 12288);
    assert_eq!(&got[..4096], &[0xAA; 4096][..], "through the parent");
    assert_eq!(&got[4096..8192], &[0x55; 4096][..], "the leaf's own data");
    assert_eq!(&got[8192..], &[0xAA; 4096][..], "through the parent again");
    // The base layer alone (what the helper used to read) differs there.
    assert_eq!(&read_with_vhdimount(&base, 8192)[4096..], &[0xAA; 4096][..]);
}
