//! Engine tests across modules: in-memory and on-disk chains, confinement, hostile files,
//! crash ordering, and a proptest model of create/write/snapshot/read.

use crate::*;
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const BS: u32 = 64 * 1024;

fn mem_dynamic(size: u64) -> Arc<MemFile> {
    let m = Arc::new(MemFile::new());
    let opts = CreateOptions {
        block_size: BS,
        uuid: None,
    };
    create_dynamic_io(m.as_ref(), "mem", size, &opts, None).unwrap();
    m
}

fn mem_child(parent: &Arc<MemFile>, name: &str) -> Arc<MemFile> {
    let p = Disk::from_io(parent.clone(), "parent", false).unwrap();
    let m = Arc::new(MemFile::new());
    let pref = ParentRef {
        uuid: p.uuid(),
        timestamp: 0,
        name: name.into(),
        relative_path: format!("./{name}"),
    };
    let opts = CreateOptions {
        block_size: BS,
        uuid: None,
    };
    create_dynamic_io(m.as_ref(), "child", p.virtual_size(), &opts, Some(&pref)).unwrap();
    m
}

/// Opens in-memory files (leaf first) as a chain; the leaf writable.
fn mem_chain(files: &[Arc<MemFile>]) -> Chain {
    let layers = files
        .iter()
        .enumerate()
        .map(|(i, f)| Disk::from_io(f.clone(), &format!("layer{i}"), i == 0).unwrap())
        .collect();
    Chain::from_layers(layers, Vec::new(), true).unwrap()
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8 + 1)
        .collect()
}

/// Reads `len` bytes at `off` by following [`Chain::read_plan`] (the layers' files directly).
fn read_by_plan(c: &Chain, off: u64, len: u64) -> Vec<u8> {
    let plan = c.read_plan(off, len).unwrap();
    assert_eq!(plan.iter().map(|p| p.len).sum::<u64>(), len);
    let mut out = Vec::new();
    for (i, p) in plan.iter().enumerate() {
        assert!(p.len > 0);
        if i > 0 {
            assert!(
                !(plan[i - 1].source == PieceSource::Zero && p.source == PieceSource::Zero),
                "adjacent zero pieces are merged"
            );
        }
        match p.source {
            PieceSource::Zero => out.resize(out.len() + p.len as usize, 0),
            PieceSource::File { layer, file_offset } => {
                let mut b = vec![0u8; p.len as usize];
                c.layers()[layer].io().read_at(&mut b, file_offset).unwrap();
                out.extend_from_slice(&b);
            }
        }
    }
    out
}

#[test]
fn read_plan_of_a_snapshot_chain_names_parent_bytes_child_bytes_and_zeros() {
    let base = mem_dynamic(4 * BS as u64);
    {
        let c = mem_chain(std::slice::from_ref(&base));
        c.write_at(&pattern(1, 2 * BS as usize), 0).unwrap();
    }
    let child = mem_child(&base, "base");
    let c = mem_chain(&[child, base]);
    c.write_at(&pattern(2, 4096), 4096).unwrap();
    let plan = c.read_plan(0, 4 * BS as u64).unwrap();
    let layers: Vec<_> = plan
        .iter()
        .map(|p| match p.source {
            PieceSource::Zero => None,
            PieceSource::File { layer, .. } => Some(layer),
        })
        .collect();
    // parent [0,4K), child [4K,8K), parent to the end of block 0, parent's block 1 (a
    // separate piece: its bitmap sits between the two blocks' data in the file), zeros.
    assert_eq!(layers, vec![Some(1), Some(0), Some(1), Some(1), None]);
    assert_eq!(plan[3].len, BS as u64);
    assert_eq!(plan[4].len, 2 * BS as u64);
    assert_eq!(read_by_plan(&c, 0, 4 * BS as u64), read_all(&c));
    assert_eq!(read_by_plan(&c, 4000, 5000), {
        let mut b = vec![0u8; 5000];
        c.read_at(&mut b, 4000).unwrap();
        b
    });
    assert!(c.read_plan(4 * BS as u64 - 1, 2).is_err(), "past the end");
}

fn read_all(c: &Chain) -> Vec<u8> {
    let mut v = vec![0u8; c.virtual_size() as usize];
    c.read_at(&mut v, 0).unwrap();
    v
}

#[test]
fn fresh_dynamic_disk_reads_zero_and_reports_one_zero_extent() {
    let c = mem_chain(&[mem_dynamic(1 << 20)]);
    assert_eq!(c.virtual_size(), 1 << 20);
    assert!(read_all(&c).iter().all(|&b| b == 0));
    let st = c.block_status(0, 1 << 20).unwrap();
    assert_eq!(
        st,
        vec![Extent {
            offset: 0,
            length: 1 << 20,
            state: ExtentState::Zero
        }]
    );
}

#[test]
fn unaligned_writes_read_back_and_survive_reopen() {
    let f = mem_dynamic(1 << 20);
    let mut model = vec![0u8; 1 << 20];
    {
        let c = mem_chain(std::slice::from_ref(&f));
        for (off, len, seed) in [
            (0u64, 512usize, 1u64),
            (1000, 3000, 2),
            (BS as u64 - 7, 100, 3),
            (900_000, 148_576, 4),
        ] {
            let d = pattern(seed, len);
            c.write_at(&d, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&d);
        }
        c.flush().unwrap();
        assert_eq!(read_all(&c), model);
    }
    let c = mem_chain(&[f]);
    assert_eq!(read_all(&c), model);
}

#[test]
fn differencing_child_reads_parent_where_unwritten_and_leaves_parent_untouched() {
    let base = mem_dynamic(512 * 1024);
    {
        let c = mem_chain(std::slice::from_ref(&base));
        c.write_at(&vec![0xAA; 200_000], 10_000).unwrap();
    }
    let before = base.to_bytes();
    let child = mem_child(&base, "base.vhd");
    let c = mem_chain(&[child, base.clone()]);
    c.write_at(&[0x55; 1024], 10_240).unwrap();
    let mut buf = vec![0u8; 4096];
    c.read_at(&mut buf, 8192).unwrap();
    assert!(buf[..1808].iter().all(|&b| b == 0));
    assert!(buf[1808..2048].iter().all(|&b| b == 0xAA));
    assert!(buf[2048..3072].iter().all(|&b| b == 0x55));
    assert!(buf[3072..].iter().all(|&b| b == 0xAA));
    assert_eq!(base.to_bytes(), before, "parent was modified");
    let st = c.block_status(8192, 4096).unwrap();
    assert_eq!(
        st,
        vec![
            // The base is a dynamic disk: its allocated blocks are wholly present (zero-filled).
            Extent {
                offset: 8192,
                length: 2048,
                state: ExtentState::Data { layer: 1 }
            },
            Extent {
                offset: 10240,
                length: 1024,
                state: ExtentState::Data { layer: 0 }
            },
            Extent {
                offset: 11264,
                length: 1024,
                state: ExtentState::Data { layer: 1 }
            },
        ]
    );
}

#[test]
fn write_zeroes_hides_parent_data_and_skips_holes() {
    let base = mem_dynamic(256 * 1024);
    mem_chain(std::slice::from_ref(&base))
        .write_at(&[7; 4096], 0)
        .unwrap();
    let child = mem_child(&base, "b");
    let c = mem_chain(&[child.clone(), base]);
    c.write_zeroes(0, 256 * 1024).unwrap();
    assert!(read_all(&c).iter().all(|&b| b == 0));
    // Only the block holding parent data was allocated in the child.
    assert_eq!(c.layers()[0].allocated_blocks(), 1);
}

#[test]
fn read_only_chain_refuses_writes() {
    let f = mem_dynamic(1 << 20);
    let d = Disk::from_io(f, "ro", false).unwrap();
    let c = Chain::from_layers(vec![d], Vec::new(), false).unwrap();
    assert!(matches!(c.write_at(&[0; 512], 0), Err(Error::ReadOnly(_))));
    assert!(matches!(
        c.read_at(&mut [0; 512], 1 << 20),
        Err(Error::OutOfRange { .. })
    ));
}

#[test]
fn chain_refuses_a_parent_with_the_wrong_uuid() {
    let base = mem_dynamic(1 << 20);
    let other = mem_dynamic(1 << 20);
    let child = mem_child(&base, "b");
    let layers = vec![
        Disk::from_io(child, "c", false).unwrap(),
        Disk::from_io(other, "o", false).unwrap(),
    ];
    assert!(matches!(
        Chain::from_layers(layers, vec![], false),
        Err(Error::ParentMismatch { .. })
    ));
}

/// A BlockIo that fails every write after the first `limit` — a crash at that point (also
/// used by the coalesce tests) — and records the byte range of every write and each sync
/// ([`SYNC`]) in order.
#[derive(Default)]
pub(crate) struct CrashIo {
    pub(crate) inner: MemFile,
    pub(crate) writes: AtomicUsize,
    pub(crate) limit: usize,
    pub(crate) ops: std::sync::Mutex<Vec<(u64, u64)>>,
}

/// A sync in [`CrashIo::ops`].
const SYNC: (u64, u64) = (u64::MAX, 0);

impl BlockIo for CrashIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if self.writes.fetch_add(1, Ordering::SeqCst) >= self.limit {
            return Err(std::io::Error::other("simulated crash"));
        }
        self.ops
            .lock()
            .unwrap()
            .push((offset, offset + buf.len() as u64));
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.ops.lock().unwrap().push(SYNC);
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
}

#[test]
fn crash_at_any_write_leaves_a_readable_file_with_flushed_data_intact() {
    for diff in [false, true] {
        let base = mem_dynamic(512 * 1024);
        mem_chain(std::slice::from_ref(&base))
            .write_at(&pattern(9, 100_000), 5000)
            .unwrap();
        let template = if diff {
            mem_child(&base, "b")
        } else {
            base.clone()
        };
        let flushed = pattern(1, 70_000);
        let later = pattern(2, 200_000);
        for limit in 0..40 {
            let io = Arc::new(CrashIo {
                inner: MemFile::from_bytes(template.to_bytes()),
                writes: AtomicUsize::new(0),
                limit: usize::MAX,
                ..Default::default()
            });
            let mk = |io: Arc<CrashIo>| {
                let mut layers = vec![Disk::from_io(io, "leaf", true).unwrap()];
                if diff {
                    layers.push(Disk::from_io(base.clone(), "base", false).unwrap());
                }
                Chain::from_layers(layers, vec![], true).unwrap()
            };
            let c = mk(io.clone());
            c.write_at(&flushed, 1000).unwrap();
            c.flush().unwrap();
            let expect_flushed = read_all(&c);
            let io2 = Arc::new(CrashIo {
                inner: MemFile::from_bytes(io.inner.to_bytes()),
                writes: AtomicUsize::new(0),
                limit,
                ..Default::default()
            });
            let c2 = mk(io2.clone());
            let _ = c2.write_at(&later, 150_000);
            let _ = c2.write_at(&later[..3000], 60_000);
            // "Crash": reopen the bytes as they are.
            let after = Arc::new(MemFile::from_bytes(io2.inner.to_bytes()));
            let mut layers = vec![Disk::from_io(after.clone(), "after", false)
                .unwrap_or_else(|e| panic!("limit {limit}: {e}"))];
            if diff {
                layers.push(Disk::from_io(base.clone(), "base", false).unwrap());
            }
            let c3 = Chain::from_layers(layers, vec![], false).unwrap();
            let got = read_all(&c3);
            // Flushed data outside the later writes is intact.
            assert_eq!(
                got[1000..60_000],
                expect_flushed[1000..60_000],
                "limit {limit} diff {diff}"
            );
            let rep = check_io(after, "after");
            assert!(rep.is_ok(), "limit {limit}: {:?}", rep.problems);
        }
    }
}

// ---- files on disk: locators, confinement, hidden flag, check, hostile files ----

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn opts_bs() -> CreateOptions {
    CreateOptions {
        block_size: BS,
        uuid: None,
    }
}

fn open(leaf: &Path, root: &Path) -> Result<Chain> {
    Chain::open(leaf, &ChainOptions::new(root).writable(true))
}

#[test]
fn file_chain_opens_from_its_leaf_through_relative_locators() {
    let d = tmp();
    let base = d.path().join("base.vhd");
    create_dynamic(&base, 1 << 20, &opts_bs()).unwrap();
    std::fs::create_dir(d.path().join("sub")).unwrap();
    let mid = d.path().join("sub/mid.vhd");
    create_differencing(&mid, &base, &CreateOptions::default()).unwrap();
    let top = d.path().join("top.vhd");
    create_differencing(&top, &mid, &CreateOptions::default()).unwrap();
    let i = info(&mid).unwrap();
    assert_eq!(
        i.block_size,
        Some(BS as u64),
        "child takes the parent's block size"
    );
    assert!(
        i.parent_locators
            .iter()
            .any(|(k, t)| k == "MacX" && t == "./../base.vhd" || t == "../base.vhd"),
        "{:?}",
        i.parent_locators
    );
    let c = open(&top, d.path()).unwrap();
    assert_eq!(c.depth(), 3);
    assert_eq!(c.paths()[2], base.canonicalize().unwrap());
    c.write_at(b"hello", 4096).unwrap();
    c.flush().unwrap();
    for f in [&base, &mid, &top] {
        let r = check::check_with_root(f, d.path()).unwrap();
        assert!(r.is_ok(), "{}: {:?}", f.display(), r.problems);
    }
}

#[test]
fn parent_outside_the_root_is_refused() {
    let d = tmp();
    let outside = d.path().join("outside.vhd");
    create_dynamic(&outside, 1 << 20, &opts_bs()).unwrap();
    let root = d.path().join("sr");
    std::fs::create_dir(&root).unwrap();
    let child = root.join("child.vhd");
    create_differencing(&child, &outside, &opts_bs()).unwrap();
    let e = open(&child, &root).unwrap_err();
    assert!(matches!(e, Error::OutsideRoot { .. }), "{e}");
    assert!(e.to_string().contains("outside the root"), "{e}");
    // With the wider root it opens.
    assert_eq!(open(&child, d.path()).unwrap().depth(), 2);
}

#[test]
fn symlinked_parent_leading_out_of_the_root_is_refused() {
    let d = tmp();
    let root = d.path().join("sr");
    std::fs::create_dir(&root).unwrap();
    let outside = d.path().join("real.vhd");
    create_dynamic(&outside, 1 << 20, &opts_bs()).unwrap();
    let link = root.join("base.vhd");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let child = root.join("child.vhd");
    create_differencing(&child, &link, &opts_bs()).unwrap();
    // create_differencing resolved the link: its locator points outside the root.
    let e = open(&child, &root).unwrap_err();
    assert!(matches!(e, Error::OutsideRoot { .. }), "{e}");
}

#[test]
fn leaf_outside_the_root_is_refused() {
    let d = tmp();
    let f = d.path().join("a.vhd");
    create_dynamic(&f, 1 << 20, &opts_bs()).unwrap();
    let sub = d.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    assert!(matches!(open(&f, &sub), Err(Error::OutsideRoot { .. })));
}

#[test]
fn chain_cycle_and_depth_limit_are_refused() {
    let d = tmp();
    let a = d.path().join("a.vhd");
    create_dynamic(&a, 1 << 20, &opts_bs()).unwrap();
    let b = d.path().join("b.vhd");
    create_differencing(&b, &a, &opts_bs()).unwrap();
    let c = d.path().join("c.vhd");
    create_differencing(&c, &b, &opts_bs()).unwrap();
    let mut o = ChainOptions::new(d.path());
    o.max_depth = 2;
    assert!(matches!(
        Chain::open(&c, &o),
        Err(Error::TooDeep { max: 2, .. })
    ));
    // Make a cycle: b's parent becomes c (uuid and locators), c's parent is b.
    set_parent(&b, &c).unwrap();
    let e = Chain::open(&c, &ChainOptions::new(d.path())).unwrap_err();
    assert!(matches!(e, Error::Cycle(_)), "{e}");
}

#[test]
fn set_hidden_sets_both_footer_copies_with_valid_checksums() {
    let d = tmp();
    let f = d.path().join("a.vhd");
    create_dynamic(&f, 1 << 20, &opts_bs()).unwrap();
    set_hidden(&f, true).unwrap();
    let bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    assert_eq!(bytes[85], 1);
    assert_eq!(bytes[n - 512 + 85], 1);
    assert!(info(&f).unwrap().hidden);
    assert!(check(&f).unwrap().is_ok());
    set_hidden(&f, false).unwrap();
    assert!(!info(&f).unwrap().hidden);
}

#[test]
fn set_parent_repoints_locators_and_uuid() {
    let d = tmp();
    let a = d.path().join("a.vhd");
    create_dynamic(&a, 1 << 20, &opts_bs()).unwrap();
    let b = d.path().join("b.vhd");
    std::fs::copy(&a, &b).unwrap(); // same content, same uuid: make b distinct via a new file
    std::fs::remove_file(&b).unwrap();
    create_dynamic(&b, 1 << 20, &opts_bs()).unwrap();
    let c = d.path().join("c.vhd");
    create_differencing(&c, &a, &opts_bs()).unwrap();
    set_parent(&c, &b).unwrap();
    let ch = Chain::open(&c, &ChainOptions::new(d.path())).unwrap();
    assert_eq!(ch.paths()[1], b.canonicalize().unwrap());
    assert!(check(&c).unwrap().is_ok());
}

fn corrupt(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn fix_footer_checksums(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let n = b.len();
    for off in [0, n - 512] {
        let c = format::checksum(&b[off..off + 512], 64);
        b[off + 64..off + 68].copy_from_slice(&c.to_be_bytes());
    }
    std::fs::write(path, b).unwrap();
}

fn hostile_base(d: &tempfile::TempDir) -> PathBuf {
    let f = d.path().join("h.vhd");
    create_dynamic(&f, 1 << 20, &opts_bs()).unwrap();
    let c = open(&f, d.path()).unwrap();
    c.write_at(&[1; 4096], 0).unwrap();
    c.write_at(&[2; 4096], 3 * BS as u64).unwrap();
    f
}

#[test]
fn truncated_file_is_refused_with_a_clear_error() {
    let d = tmp();
    let f = hostile_base(&d);
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 10_000)
        .unwrap();
    let e = Disk::open(&f, false).unwrap_err().to_string();
    assert!(e.contains("BAT entry") && e.contains("past the end"), "{e}");
    assert!(!check(&f).unwrap().is_ok());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(100)
        .unwrap();
    let e = Disk::open(&f, false).unwrap_err().to_string();
    assert!(e.contains("too short"), "{e}");
}

#[test]
fn bad_header_checksum_names_the_structure_and_offset() {
    let d = tmp();
    let f = hostile_base(&d);
    corrupt(&f, 512 + 100, &[0x42]);
    let e = Disk::open(&f, false).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Checksum {
                structure: "dynamic header",
                offset: 512,
                ..
            }
        ),
        "{e}"
    );
    let r = check(&f).unwrap();
    assert!(
        r.problems.iter().any(|p| p.what.contains("checksum")),
        "{:?}",
        r.problems
    );
}

#[test]
fn bad_footer_checksum_in_both_copies_is_refused() {
    let d = tmp();
    let f = hostile_base(&d);
    let n = std::fs::metadata(&f).unwrap().len();
    corrupt(&f, 50, &[0x42]);
    // Only the copy at 0 broken: opens (trailing footer is primary), check reports it.
    assert!(Disk::open(&f, false).is_ok());
    let r = check(&f).unwrap();
    assert!(
        r.problems
            .iter()
            .any(|p| p.offset == Some(0) && p.what.contains("checksum")),
        "{:?}",
        r.problems
    );
    corrupt(&f, n - 512 + 50, &[0x42]);
    let e = Disk::open(&f, false).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Checksum {
                structure: "footer",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn bat_entry_past_eof_or_overlapping_is_refused() {
    let d = tmp();
    let f = hostile_base(&d);
    // BAT at 1536: entry 3 points far past the end.
    corrupt(&f, 1536 + 12, &0x00FF_0000u32.to_be_bytes());
    let e = Disk::open(&f, false).unwrap_err().to_string();
    assert!(
        e.contains("BAT entry 3") && e.contains("past the end"),
        "{e}"
    );
    // Entry 3 now points at block 0's sectors: overlap.
    let e0 = std::fs::read(&f).unwrap()[1536..1540].to_vec();
    corrupt(&f, 1536 + 12, &e0);
    let e = Disk::open(&f, false).unwrap_err().to_string();
    assert!(e.contains("overlap"), "{e}");
    let r = check(&f).unwrap();
    assert!(
        r.problems.iter().any(|p| p.what.contains("overlaps")),
        "{:?}",
        r.problems
    );
    // Entry 3 points into the BAT (metadata).
    corrupt(&f, 1536 + 12, &3u32.to_be_bytes());
    let e = Disk::open(&f, false).unwrap_err().to_string();
    assert!(e.contains("overlap"), "{e}");
}

#[test]
fn absurd_sizes_are_refused() {
    let d = tmp();
    let f = hostile_base(&d);
    let n = std::fs::metadata(&f).unwrap().len();
    for off in [0, n - 512] {
        corrupt(&f, off + 48, &(5u64 << 40).to_be_bytes());
    }
    fix_footer_checksums(&f);
    let e = Disk::open(&f, false).unwrap_err().to_string();
    assert!(e.contains("current size") && e.contains("2040 GiB"), "{e}");
    assert!(create_dynamic(&d.path().join("x.vhd"), 3 << 40, &opts_bs()).is_err());
    let f2 = d.path().join("y.vhd");
    create_dynamic(&f2, 1 << 20, &opts_bs()).unwrap();
    // max table entries absurdly large: BAT would extend past the end.
    let mut b = std::fs::read(&f2).unwrap();
    b[512 + 28..512 + 32].copy_from_slice(&0x4000_0000u32.to_be_bytes());
    let c = format::checksum(&b[512..1536], 36);
    b[512 + 36..512 + 40].copy_from_slice(&c.to_be_bytes());
    std::fs::write(&f2, b).unwrap();
    let e = Disk::open(&f2, false).unwrap_err().to_string();
    assert!(e.contains("BAT") && e.contains("past the end"), "{e}");
}

/// The batmap bits of `d` are exactly its wholly written blocks.
fn assert_batmap_exact(d: &Disk) {
    assert!(d.batmap().is_some(), "{}: has a batmap", d.name());
    for b in 0..d.bat_entries() as u64 {
        let full = d.presence(b).unwrap().is_some_and(|bm| bm.is_full());
        assert_eq!(
            d.batmap_bit(b),
            full,
            "{}: batmap bit of block {b}",
            d.name()
        );
    }
}

#[test]
fn a_foreign_batmap_keeps_its_marker_and_key_hash_and_is_kept_true() {
    let f = mem_dynamic(1 << 20);
    let d = Disk::from_io(f.clone(), "f", false).unwrap();
    let bm_hdr = d.header().unwrap().table_offset + 512;
    drop(d);
    // A marker and a key hash as vhd-util key would write them (not covered by the checksum).
    let keyed: Vec<u8> = (0..33).map(|i| i as u8 + 1).collect();
    f.write_at(&keyed, bm_hdr + 28).unwrap();
    let c = mem_chain(std::slice::from_ref(&f));
    c.write_at(&[9; 4096], 0).unwrap();
    c.flush().unwrap();
    drop(c);
    let after = f.to_bytes();
    let h = bm_hdr as usize;
    assert_eq!(&after[h..h + 8], b"tdbatmap");
    assert_eq!(
        &after[h + 28..h + 61],
        &keyed[..],
        "marker and key hash kept"
    );
    let d = Disk::from_io(f.clone(), "f", false).unwrap();
    let map_end = d.batmap().unwrap().offset + 512;
    assert_batmap_exact(&d);
    assert!(d.batmap_bit(0));
    let entry = d.bat_entry(0).unwrap() as u64 * 512;
    assert!(entry >= map_end, "block at {entry} overlaps metadata");
    assert!(check_io(f, "f").is_ok());
}

#[test]
fn batmap_bits_are_set_at_flush_for_wholly_written_blocks_only() {
    let base = mem_dynamic(4 * BS as u64);
    let c = mem_chain(std::slice::from_ref(&base));
    c.write_at(&[1; 4096], BS as u64).unwrap();
    // A dynamic disk's new block is wholly present (zero-filled), but not durable yet.
    assert!(!c.layers()[0].batmap_bit(1));
    c.flush().unwrap();
    assert!(c.layers()[0].batmap_bit(1));
    assert_batmap_exact(&c.layers()[0]);
    drop(c);
    let child = mem_child(&base, "b");
    let c = mem_chain(&[child.clone(), base.clone()]);
    c.write_at(&[2; 4096], 0).unwrap();
    c.flush().unwrap();
    assert!(!c.layers()[0].batmap_bit(0), "a partly written block");
    c.write_at(&vec![3; BS as usize - 4096], 4096).unwrap();
    assert!(!c.layers()[0].batmap_bit(0), "not before the flush");
    c.flush().unwrap();
    assert!(c.layers()[0].batmap_bit(0), "wholly written now");
    assert_batmap_exact(&c.layers()[0]);
    drop(c);
    let d = Disk::from_io(child.clone(), "child", false).unwrap();
    assert!(d.batmap_bit(0) && !d.batmap_bit(1));
    assert!(check_io(child, "child").is_ok());
}

#[test]
fn a_batmap_bit_reaches_the_file_only_after_the_sync_that_makes_its_block_durable() {
    for diff in [false, true] {
        let base = mem_dynamic(4 * BS as u64);
        let template = if diff {
            mem_child(&base, "b")
        } else {
            base.clone()
        };
        let rec = Arc::new(CrashIo {
            inner: MemFile::from_bytes(template.to_bytes()),
            limit: usize::MAX,
            ..Default::default()
        });
        let mut layers = vec![Disk::from_io(rec.clone(), "rec", true).unwrap()];
        if diff {
            layers.push(Disk::from_io(base.clone(), "base", false).unwrap());
        }
        let bm = layers[0].batmap().unwrap();
        let batmap = (bm.offset - 512, bm.offset + 512);
        let c = Chain::from_layers(layers, vec![], true).unwrap();
        c.write_at(&pattern(4, BS as usize), 2 * BS as u64).unwrap();
        c.flush().unwrap();
        drop(c);
        let ops = rec.ops.lock().unwrap().clone();
        let touches = |o: &(u64, u64)| *o != SYNC && o.0 < batmap.1 && o.1 > batmap.0;
        let at = ops
            .iter()
            .position(touches)
            .expect("the batmap was written");
        assert_eq!(
            ops.iter().filter(|o| touches(o)).count(),
            1,
            "one write of header and map"
        );
        let last_sync_before = ops[..at]
            .iter()
            .rposition(|o| *o == SYNC)
            .expect("a sync before");
        assert!(
            ops[last_sync_before..at].iter().all(|o| *o == SYNC),
            "diff {diff}: nothing of the block written between that sync and the batmap: {ops:?}"
        );
        assert_eq!(ops.last(), Some(&SYNC), "the batmap is synced too");
        let d = Disk::from_io(
            Arc::new(MemFile::from_bytes(rec.inner.to_bytes())),
            "d",
            false,
        )
        .unwrap();
        assert!(d.batmap_bit(2));
    }
}

#[test]
fn check_reports_a_batmap_bit_of_a_partly_written_block_and_a_bad_batmap_checksum() {
    let base = mem_dynamic(4 * BS as u64);
    let child = mem_child(&base, "b");
    {
        let c = mem_chain(&[child.clone(), base]);
        c.write_at(&[5; 4096], BS as u64).unwrap();
        c.flush().unwrap();
    }
    let d = Disk::from_io(child.clone(), "c", false).unwrap();
    let bm = d.batmap().unwrap();
    let hdr = bm.offset - 512;
    drop(d);
    // Claim block 1 (4 KiB of 64 KiB written) full, with a checksum that matches the claim.
    let mut map = vec![0u8; 512];
    map[0] = 0x40;
    child.write_at(&map, bm.offset).unwrap();
    let c = format::batmap_checksum(&map, bm.version, 4 * BS as u64);
    child.write_at(&c.to_be_bytes(), hdr + 24).unwrap();
    let r = check_io(child.clone(), "c");
    assert!(
        r.problems
            .iter()
            .any(|p| p.what.contains("batmap bit 1") && p.offset == Some(bm.offset)),
        "{:?}",
        r.problems
    );
    // Opening is not refused (the bitmaps, not the batmap, say what is present).
    assert!(Disk::from_io(child.clone(), "c", false).is_ok());
    // A checksum that does not match the map.
    child.write_at(&(c ^ 1).to_be_bytes(), hdr + 24).unwrap();
    let r = check_io(child.clone(), "c");
    assert!(
        r.problems
            .iter()
            .any(|p| p.what.contains("checksum") && p.what.contains("batmap")),
        "{:?}",
        r.problems
    );
    // The next flush of a write rewrites a true map (the stale claim is gone).
    {
        let d = Disk::from_io(child.clone(), "c", true).unwrap();
        d.write_sectors(3, 0, &[6; 512]).unwrap();
        d.flush().unwrap();
    }
    assert!(
        check_io(child.clone(), "c").is_ok(),
        "{:?}",
        check_io(child, "c").problems
    );
}

#[test]
fn a_file_that_promises_a_batmap_but_has_none_is_reported_and_still_opens() {
    let f = mem_dynamic(1 << 20);
    let d = Disk::from_io(f.clone(), "f", false).unwrap();
    let hdr = d.batmap().unwrap().offset - 512;
    drop(d);
    f.write_at(&[0; 8], hdr).unwrap();
    let d = Disk::from_io(f.clone(), "f", true).unwrap();
    assert!(d.batmap().is_none());
    d.write_sectors(0, 0, &[1; 512]).unwrap();
    d.flush().unwrap();
    let r = check_io(f, "f");
    assert!(
        r.problems
            .iter()
            .any(|p| p.what.contains("promises a batmap")),
        "{:?}",
        r.problems
    );
}

#[test]
fn concurrent_readers_and_writers_see_consistent_data() {
    let f = mem_dynamic(2 << 20);
    let c = Arc::new(mem_chain(&[f]));
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let c = c.clone();
            s.spawn(move || {
                for i in 0..16u64 {
                    let off = (t * 16 + i) * 8192;
                    c.write_at(&[(t + 1) as u8; 8192], off).unwrap();
                    let mut r = [0u8; 8192];
                    c.read_at(&mut r, off).unwrap();
                    assert!(r.iter().all(|&x| x == (t + 1) as u8));
                }
            });
        }
    });
}

// ---- property test: random create/write/snapshot/read against a model ----

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, seed: u64 },
    Zero { off: u64, len: u64 },
    Snapshot,
    Read { off: u64, len: usize },
}

const PSIZE: u64 = 6 * BS as u64 + 3 * 512;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..PSIZE, 1usize..150_000, any::<u64>()).prop_map(|(off, len, seed)| Op::Write { off, len: len.min((PSIZE - off) as usize), seed }),
        1 => (0..PSIZE, 1u64..100_000).prop_map(|(off, len)| Op::Zero { off, len: len.min(PSIZE - off) }),
        1 => Just(Op::Snapshot),
        2 => (0..PSIZE, 1usize..200_000).prop_map(|(off, len)| Op::Read { off, len: len.min((PSIZE - off) as usize) }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
    #[test]
    fn chain_matches_a_flat_model(ops in prop::collection::vec(op(), 1..24)) {
        let mut files = vec![mem_dynamic(PSIZE)];
        let mut model = vec![0u8; PSIZE as usize];
        let mut chain = mem_chain(&files);
        for op in ops {
            match op {
                Op::Write { off, len, seed } => {
                    let d = pattern(seed, len);
                    chain.write_at(&d, off).unwrap();
                    model[off as usize..off as usize + len].copy_from_slice(&d);
                }
                Op::Zero { off, len } => {
                    chain.write_zeroes(off, len).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                Op::Snapshot => {
                    drop(chain);
                    let child = mem_child(&files[0], "p");
                    files.insert(0, child);
                    chain = mem_chain(&files);
                }
                Op::Read { off, len } => {
                    let mut b = vec![0u8; len];
                    chain.read_at(&mut b, off).unwrap();
                    prop_assert_eq!(&b[..], &model[off as usize..off as usize + len]);
                    // The read plan names the same bytes: the layers' file bytes or zeros.
                    prop_assert_eq!(read_by_plan(&chain, off, len as u64), b);
                }
            }
            // block_status agrees with the data: Zero extents read as zeros.
            for e in chain.block_status(0, PSIZE).unwrap() {
                if e.state == ExtentState::Zero {
                    prop_assert!(model[e.offset as usize..(e.offset + e.length) as usize].iter().all(|&b| b == 0));
                }
            }
        }
        drop(chain);
        // Reopen everything from bytes: persisted state equals the model, and every file checks.
        let reopened: Vec<Arc<MemFile>> = files.iter().map(|f| Arc::new(MemFile::from_bytes(f.to_bytes()))).collect();
        for f in &reopened {
            let r = check_io(f.clone(), "f");
            prop_assert!(r.is_ok(), "{:?}", r.problems);
            // Every file was closed after its last write: its batmap is exact.
            assert_batmap_exact(&Disk::from_io(f.clone(), "f", false).unwrap());
        }
        prop_assert_eq!(read_all(&mem_chain(&reopened)), model);
    }
}

/// A file whose first `len()` answers an older, shorter length, as a reader racing a writer
/// that appends a block sees it.
struct GrewWhileOpening {
    inner: Arc<MemFile>,
    stale_len: std::sync::Mutex<Option<u64>>,
}

impl BlockIo for GrewWhileOpening {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        match self.stale_len.lock().unwrap().take() {
            Some(l) => Ok(l),
            None => self.inner.len(),
        }
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
}

#[test]
fn a_disk_opened_while_a_writer_appends_a_block_opens_with_that_block() {
    let m = mem_dynamic(4 * BS as u64);
    let before = m.len().unwrap();
    {
        let c = mem_chain(std::slice::from_ref(&m));
        c.write_at(&pattern(3, 4096), BS as u64).unwrap();
    }
    assert!(m.len().unwrap() > before, "the write appended a block");
    // The reader takes the length before the append and the BAT after it.
    let io = Arc::new(GrewWhileOpening {
        inner: m,
        stale_len: std::sync::Mutex::new(Some(before)),
    });
    let d = Disk::from_io(io, "growing", false).expect("a file that grew while opened opens");
    assert!(d.is_allocated(1));
    assert!(d.trailing_footer_ok());
}

// ---- fuzz findings, kept as named regressions ----

/// fuzz `locators` crash-e75ad4a9: locator text starting with "tdbatmap", written where the
/// locator's data sat right after the BAT, read as a batmap header there. Files are now laid out
/// as blktap lays them (the batmap after the BAT, locators after it), so the same finding is a
/// locator whose data lies on the batmap header: opening such a disk is refused with a clear
/// overlap error naming the batmap; nothing panics.
#[test]
fn fuzz_regression_locator_text_that_looks_like_a_batmap_header_is_a_clear_error() {
    let base = mem_dynamic(64 * 1024);
    let child = mem_child(&base, "b");
    let d = Disk::from_io(child.clone(), "c", false).unwrap();
    let bm_header = d.header().unwrap().table_offset + 512;
    assert_eq!(d.batmap().unwrap().offset, bm_header + 512);
    let mut b = child.to_bytes();
    let h = 512 + 576;
    b[h + 16..h + 24].copy_from_slice(&bm_header.to_be_bytes());
    let c = format::checksum(&b[512..1536], 36);
    b[512 + 36..512 + 40].copy_from_slice(&c.to_be_bytes());
    let e = Disk::from_io(Arc::new(MemFile::from_bytes(b)), "c", false)
        .expect_err("a locator over the batmap header");
    assert!(e.to_string().contains("batmap"), "unexpected error: {e}");
}

/// fuzz `disk` crash-95bd2b6c: a dynamic disk whose (meaningless) locator entry pointed past the
/// end of a short file opened, was written (the file grew over that range), then failed to
/// reopen with "parent locator overlaps footer copy". Locators of non-differencing disks are now
/// ignored, and a differencing disk's locator data past EOF is refused at open.
#[test]
fn fuzz_regression_locator_entry_past_eof_does_not_break_reopen_after_a_write() {
    let f = mem_dynamic(64 * 1024);
    let mut b = f.to_bytes();
    let h = 512 + 576 + 24 * 3;
    b[h..h + 4].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    b[h + 8..h + 12].copy_from_slice(&4096u32.to_be_bytes());
    b[h + 16..h + 24].copy_from_slice(&0u64.to_be_bytes());
    let c = format::checksum(&b[512..1536], 36);
    b[512 + 36..512 + 40].copy_from_slice(&c.to_be_bytes());
    let m = Arc::new(MemFile::from_bytes(b));
    mem_chain(std::slice::from_ref(&m))
        .write_at(&[0xA5; 1000], 0)
        .unwrap();
    let again = Arc::new(MemFile::from_bytes(m.to_bytes()));
    let c = mem_chain(std::slice::from_ref(&again));
    let mut r = [0u8; 1000];
    c.read_at(&mut r, 0).unwrap();
    assert!(r.iter().all(|&x| x == 0xA5));
    assert!(check_io(again, "again").is_ok());
    // A differencing disk whose locator data lies past the end is refused with a clear error.
    let base = mem_dynamic(64 * 1024);
    let child = mem_child(&base, "b");
    let mut b = child.to_bytes();
    let h = 512 + 576;
    b[h + 16..h + 24].copy_from_slice(&(1u64 << 40).to_be_bytes());
    let c = format::checksum(&b[512..1536], 36);
    b[512 + 36..512 + 40].copy_from_slice(&c.to_be_bytes());
    let e = Disk::from_io(Arc::new(MemFile::from_bytes(b)), "c", false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("parent locator 0") && e.contains("past the end"),
        "{e}"
    );
}

#[test]
fn try_read_at_waits_for_cached_bitmaps_then_reads_what_read_at_reads() {
    let base = mem_dynamic(1 << 20);
    let top = mem_child(&base, "base");
    {
        let c = mem_chain(std::slice::from_ref(&base));
        c.write_at(&pattern(1, 100_000), 10_000).unwrap();
    }
    {
        let c = mem_chain(&[top.clone(), base.clone()]);
        c.write_at(&pattern(2, 3_000), 50_001).unwrap();
    }
    let c = mem_chain(&[top, base]);
    let mut fast = vec![0u8; 200_000];
    // Freshly opened: no bitmap is cached, so the non-blocking read declines.
    assert!(!c.try_read_at(&mut fast, 1000).unwrap());
    let mut slow = vec![0u8; 200_000];
    c.read_at(&mut slow, 1000).unwrap();
    // Every bitmap involved is cached now (and MemFile never waits): the same bytes.
    assert!(c.try_read_at(&mut fast, 1000).unwrap());
    assert_eq!(fast, slow);
    assert!(c.try_read_at(&mut [0u8; 1], (1 << 20) - 1).unwrap());
    assert!(c.try_read_at(&mut [0u8; 2], (1 << 20) - 1).is_err());
}

#[test]
fn file_try_read_at_reads_cached_pages_and_declines_past_the_end() {
    use std::io::Write;
    let d = tmp();
    let p = d.path().join("f");
    let data = pattern(3, 3 * 4096);
    std::fs::File::create(&p).unwrap().write_all(&data).unwrap();
    let f = std::fs::File::open(&p).unwrap();
    let mut buf = vec![0u8; 4096];
    // Just written, so in the page cache.
    assert!(io::BlockIo::try_read_at(&f, &mut buf, 4096).unwrap());
    assert_eq!(buf, data[4096..8192]);
    assert!(!io::BlockIo::try_read_at(&f, &mut buf, 10_000).unwrap());
}

#[test]
fn an_io_error_keeps_the_os_error_as_its_source_without_repeating_it() {
    let d = tmp();
    let e = Disk::open(&d.path().join("missing.vhd"), false).unwrap_err();
    let msg = e.to_string();
    let source = std::error::Error::source(&e).expect("the OS error is the source");
    assert!(!msg.contains(&source.to_string()), "{msg}");
    assert!(
        msg.contains("missing.vhd") && msg.contains("opening"),
        "{msg}"
    );
    assert_eq!(e.full_text(), format!("{msg}: {source}"));
}
