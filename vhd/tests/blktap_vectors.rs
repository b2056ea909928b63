//! A chain made by Xen's own tools (blktap 3.55's `vhd-util` and libvhd, `tests/vectors/vhd-util/`):
//! read here it gives the content `expected.json` records, every file checks (its batmap
//! included), and the files this engine creates with the same parameters are laid out as
//! blktap lays them out, structure for structure.

use ddstor_vhd as vhd;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use vhd::format::{self, BatmapHeader, Footer, Header, FOOTER_SIZE, HEADER_SIZE};
use vhd::{Chain, ChainOptions, CreateOptions, Disk};

fn vectors() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/vhd-util")
}

fn expected() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(vectors().join("expected.json")).unwrap()).unwrap()
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// The vectors copied into a scratch directory (check and open may not write, but the copies
/// keep the repository's files out of reach of any mistake).
fn copy_vectors() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for f in ["base.vhd", "mid.vhd", "leaf.vhd"] {
        std::fs::copy(vectors().join(f), d.path().join(f)).unwrap();
    }
    d
}

#[test]
fn the_vhd_util_chain_reads_as_libvhd_reads_it_and_every_file_checks() {
    let want = expected();
    let d = copy_vectors();
    let leaf = d.path().join(want["chain_leaf_first"][0].as_str().unwrap());
    let c = Chain::open(&leaf, &ChainOptions::new(d.path())).unwrap();
    assert_eq!(c.depth(), 3);
    assert_eq!(c.virtual_size(), want["virtual_size"].as_u64().unwrap());
    let names: Vec<String> = c
        .paths()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let want_names: Vec<&str> = want["chain_leaf_first"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(names, want_names);
    let mut all = vec![0u8; c.virtual_size() as usize];
    c.read_at(&mut all, 0).unwrap();
    assert_eq!(sha(&all), want["flattened_sha256"].as_str().unwrap());
    for (i, h) in want["per_mib_sha256"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        assert_eq!(
            sha(&all[i << 20..(i + 1) << 20]),
            h.as_str().unwrap(),
            "MiB {i}"
        );
    }
    // Each write reads back through the chain where no later layer overwrote it: the leaf's
    // writes are the top layer, so they read back exactly.
    for w in want["writes"].as_array().unwrap() {
        if w["layer"] != "leaf.vhd" {
            continue;
        }
        let (off, len) = (
            w["offset"].as_u64().unwrap() as usize,
            w["length"].as_u64().unwrap() as usize,
        );
        assert_eq!(sha(&all[off..off + len]), w["sha256"].as_str().unwrap());
    }
    let hidden: Vec<&str> = want["hidden"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for f in &want_names {
        let p = d.path().join(f);
        let r = vhd::check::check_with_root(&p, d.path()).unwrap();
        assert!(r.is_ok(), "{f}: {:?}", r.problems);
        let disk = Disk::open(&p, false).unwrap();
        assert_eq!(disk.is_hidden(), hidden.contains(f), "{f}");
        let bm = disk
            .batmap()
            .unwrap_or_else(|| panic!("{f}: batmap parsed"));
        assert_eq!(bm.version, format::BATMAP_VERSION, "{f}");
        assert_eq!(bm.size_sectors, 1, "{f}");
        // Only the base's first block is wholly written (2 MiB written at 0).
        for b in 0..disk.bat_entries() as u64 {
            assert_eq!(
                disk.batmap_bit(b),
                *f == "base.vhd" && b == 0,
                "{f} block {b}"
            );
        }
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// Footer fields that are the same for two files made with the same parameters (not the
/// uuid, time, hidden flag or checksum).
fn footer_shape(b: &[u8]) -> Footer {
    let mut f = Footer::parse(&b[b.len() - FOOTER_SIZE..], "f", 0).unwrap();
    f.uuid = vhd::Uuid::nil();
    f.timestamp = 0;
    f.hidden = 0;
    f
}

fn header_of(b: &[u8]) -> Header {
    Header::parse(&b[512..512 + HEADER_SIZE], "h", 512).unwrap()
}

fn batmap_of(b: &[u8], h: &Header) -> (u64, BatmapHeader) {
    let off = h.table_offset + format::round_up(h.max_table_entries as u64 * 4, 512);
    (
        off,
        BatmapHeader::parse(&b[off as usize..off as usize + 512]).unwrap(),
    )
}

#[test]
fn a_dynamic_disk_made_here_is_laid_out_as_vhd_util_lays_out_base_vhd() {
    let d = tempfile::tempdir().unwrap();
    let ours = d.path().join("base.vhd");
    vhd::create_dynamic(&ours, 8 << 20, &CreateOptions::default()).unwrap();
    let theirs = read(&vectors().join("base.vhd"));
    let empty = read(&ours);
    // Footer (copy at 0 and at the end): every field but uuid, time and hidden flag.
    assert_eq!(footer_shape(&empty), footer_shape(&theirs));
    assert_eq!(&empty[..FOOTER_SIZE], &empty[empty.len() - FOOTER_SIZE..]);
    // The dynamic header, byte for byte (no parent: every parent field zero).
    assert_eq!(empty[512..1536], theirs[512..1536]);
    let h = header_of(&empty);
    assert_eq!(h, header_of(&theirs));
    // Batmap header after the BAT, map right after it, one sector, version 1.2, rest zero.
    let (off, bm) = batmap_of(&empty, &h);
    let (toff, tbm) = batmap_of(&theirs, &h);
    assert_eq!(off, toff);
    assert_eq!(
        (bm.offset, bm.size_sectors, bm.version),
        (tbm.offset, tbm.size_sectors, tbm.version)
    );
    assert_eq!(
        empty[off as usize + 28..off as usize + 512],
        theirs[off as usize + 28..off as usize + 512]
    );
    // An empty disk ends with its footer right after the map.
    assert_eq!(empty.len() as u64, bm.offset + 512 + 512);
    // The same writes as the vector's (a whole first block, 4 KiB into the third) place the
    // blocks in the same order after all metadata. libvhd also starts each block's data on a
    // 4 KiB boundary (gaps of up to 3.5 KiB); blocks here follow each other without gaps (see
    // the vhd::disk documentation for why), which vhd-util accepts as well.
    let c = Chain::open(&ours, &ChainOptions::new(d.path()).writable(true)).unwrap();
    c.write_at(&vec![0x11; 2 << 20], 0).unwrap();
    c.write_at(&[0x22; 4096], 4_194_816).unwrap();
    c.flush().unwrap();
    drop(c);
    let written = read(&ours);
    let bat = |b: &[u8]| -> Vec<u32> {
        b[1536..1536 + 16]
            .chunks(4)
            .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
            .collect()
    };
    let (o, t) = (bat(&written), bat(&theirs));
    let unused = format::BAT_UNUSED;
    assert_eq!((o[1], o[3]), (unused, unused));
    assert_eq!((t[1], t[3]), (unused, unused));
    let meta_end = (bm.offset + 512) / 512;
    assert_eq!(
        o[0] as u64, meta_end,
        "the first block right after the metadata"
    );
    assert!(
        t[0] as u64 >= meta_end && t[0] as u64 - meta_end < 8,
        "libvhd: within a page"
    );
    assert_eq!(
        o[2],
        o[0] + 1 + 4096,
        "the next block right after the first"
    );
    assert!(t[2] >= t[0] + 1 + 4096 && t[2] - (t[0] + 1 + 4096) < 8);
    assert!(vhd::check(&ours).unwrap().is_ok());
}

#[test]
fn a_differencing_disk_made_here_is_laid_out_as_vhd_util_snapshot_lays_out_mid_vhd() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.vhd");
    vhd::create_dynamic(&base, 8 << 20, &CreateOptions::default()).unwrap();
    let mid = d.path().join("mid.vhd");
    vhd::create_differencing(&mid, &base, &CreateOptions::default()).unwrap();
    let ours = read(&mid);
    let theirs = read(&vectors().join("mid.vhd"));
    assert_eq!(footer_shape(&ours), footer_shape(&theirs));
    let (h, th) = (header_of(&ours), header_of(&theirs));
    assert_eq!(h.table_offset, th.table_offset);
    assert_eq!(h.max_table_entries, th.max_table_entries);
    assert_eq!(h.block_size, th.block_size);
    assert_eq!(h.parent_name, th.parent_name);
    assert_eq!(
        h.locators, th.locators,
        "MacX, W2ku, W2ru: offsets, spaces, lengths"
    );
    for l in h.locators.iter().filter(|l| l.code != 0) {
        let at = |b: &[u8]| {
            b[l.data_offset as usize..(l.data_offset + l.space_bytes()) as usize].to_vec()
        };
        assert_eq!(at(&ours), at(&theirs), "locator {}", l.code_name());
    }
    let ((off, bm), (toff, tbm)) = (batmap_of(&ours, &h), batmap_of(&theirs, &th));
    assert_eq!(
        (off, bm.offset, bm.size_sectors),
        (toff, tbm.offset, tbm.size_sectors)
    );
    assert!(vhd::check(&mid).unwrap().is_ok());
}
