//! Coalesce tests: only the child's sectors are copied, the child's view never changes (even
//! mid-merge), a crash at any write resumes to the right result, bad merges are refused, and
//! grandchildren are relinked.

use super::*;
use crate::chain::{Chain, ChainOptions};
use crate::create::{
    create_differencing, create_dynamic, create_dynamic_io, CreateOptions, ParentRef,
};
use crate::io::{BlockIo, MemFile};
use crate::tests::CrashIo;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

const BS: u32 = 64 * 1024;
const SIZE: u64 = 1 << 20;

fn opts() -> CreateOptions {
    CreateOptions {
        block_size: BS,
        uuid: None,
    }
}

fn mem_base() -> Arc<MemFile> {
    let m = Arc::new(MemFile::new());
    create_dynamic_io(m.as_ref(), "base", SIZE, &opts(), None).unwrap();
    m
}

fn mem_child(parent: &Arc<MemFile>) -> Arc<MemFile> {
    let p = Disk::from_io(parent.clone(), "parent", false).unwrap();
    let m = Arc::new(MemFile::new());
    let pref = ParentRef {
        uuid: p.uuid(),
        timestamp: 0,
        name: "p".into(),
        relative_path: "./p".into(),
    };
    create_dynamic_io(m.as_ref(), "child", SIZE, &opts(), Some(&pref)).unwrap();
    m
}

fn chain<T: BlockIo + 'static>(files: &[Arc<T>], writable: bool) -> Chain {
    let layers = files
        .iter()
        .enumerate()
        .map(|(i, f)| Disk::from_io(f.clone(), &format!("layer{i}"), writable && i == 0).unwrap())
        .collect();
    Chain::from_layers(layers, Vec::new(), writable).unwrap()
}

fn read_all(c: &Chain) -> Vec<u8> {
    let mut v = vec![0u8; c.virtual_size() as usize];
    c.read_at(&mut v, 0).unwrap();
    v
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(131).wrapping_add(i as u64 * 7) % 251) as u8 + 1)
        .collect()
}

/// A base with data in some blocks and a child with partial-sector and whole-block writes,
/// some over the base's data, some over holes, one spanning a block boundary.
fn fixture() -> (Arc<MemFile>, Arc<MemFile>, Vec<u8>, u64) {
    let base = mem_base();
    let c = chain(std::slice::from_ref(&base), true);
    c.write_at(&pattern(1, 300_000), 0).unwrap();
    c.write_at(&pattern(2, 70_000), 700_000).unwrap();
    let child = mem_child(&base);
    let c = chain(&[child.clone(), base.clone()], true);
    let writes: [(u64, usize); 5] = [
        (512, 1024),
        (60_000, 10_000),
        (BS as u64 * 5, BS as usize),
        (720_896, 4096),
        (SIZE - 512, 512),
    ];
    let mut bytes = 0;
    for (i, (off, len)) in writes.iter().enumerate() {
        c.write_at(&pattern(10 + i as u64, *len), *off).unwrap();
        bytes += ((off + *len as u64).div_ceil(512) - off / 512) * 512;
    }
    c.flush().unwrap();
    let view = read_all(&c);
    (base, child, view, bytes)
}

#[test]
fn merge_copies_only_the_childs_sectors_and_the_parent_then_reads_as_the_child() {
    let (base, child, view, bytes) = fixture();
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("j");
    let cd = Disk::from_io(child.clone(), "child", false).unwrap();
    let pd = Disk::from_io(base.clone(), "base", true).unwrap();
    let mut last = None;
    let r = coalesce_disks(
        &cd,
        &pd,
        &j,
        &CoalesceOptions::new(dir.path()),
        None,
        &mut |p| last = Some(*p),
    )
    .unwrap();
    assert_eq!(
        r.bytes_copied, bytes,
        "exactly the child's allocated sectors"
    );
    assert_eq!(r.child_blocks, 5);
    assert_eq!(r.resumed_from, 0);
    let last = last.unwrap();
    assert_eq!(last.blocks_done, last.blocks_total);
    assert_eq!(last.bytes_total, bytes);
    assert!(!j.exists(), "journal removed after a complete merge");
    drop(pd);
    assert_eq!(read_all(&chain(std::slice::from_ref(&base), false)), view);
    assert_eq!(read_all(&chain(&[child, base], false)), view);
}

#[test]
fn crash_at_every_parent_write_keeps_the_child_view_and_a_rerun_resumes_to_the_merged_parent() {
    let (base, child, view, _) = fixture();
    let mut o = CoalesceOptions::new("/");
    o.checkpoint_bytes = 4096; // checkpoint after nearly every block: resumes skip work
    let mut resumed = 0;
    let mut limit = 0;
    loop {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("j");
        let io = Arc::new(CrashIo {
            inner: MemFile::from_bytes(base.to_bytes()),
            writes: AtomicUsize::new(0),
            limit,
            ..Default::default()
        });
        let cd = Disk::from_io(child.clone(), "child", false).unwrap();
        let pd = Disk::from_io(io.clone(), "base", true).unwrap();
        let first = coalesce_disks(&cd, &pd, &j, &o, None, &mut |_| {});
        if first.is_ok() {
            assert!(limit > 10, "the merge needs several writes");
            break;
        }
        // "Restart": reopen the parent's bytes as the crash left them.
        let after = Arc::new(MemFile::from_bytes(io.inner.to_bytes()));
        assert_eq!(
            read_all(&chain(&[child.clone(), after.clone()], false)),
            view,
            "crash after {limit} writes: the child's view changed"
        );
        let pd = Disk::from_io(after.clone(), "base", true)
            .unwrap_or_else(|e| panic!("crash after {limit} writes: parent unreadable: {e}"));
        let r = coalesce_disks(&cd, &pd, &j, &o, None, &mut |_| {}).unwrap();
        if r.resumed_from > 0 {
            resumed += 1;
        }
        drop(pd);
        assert_eq!(
            read_all(&chain(std::slice::from_ref(&after), false)),
            view,
            "crash after {limit} writes: merged parent differs from the child's view"
        );
        assert!(crate::check::check_io(after.clone(), "after")
            .problems
            .is_empty());
        limit += 1;
    }
    assert!(resumed > 3, "resumes used the journal ({resumed})");
}

#[test]
fn a_cancelled_merge_records_its_progress_and_resumes_from_it() {
    let (base, child, view, bytes) = fixture();
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("j");
    let mut o = CoalesceOptions::new(dir.path());
    o.checkpoint_bytes = 1;
    let cancel = AtomicBool::new(false);
    let cd = Disk::from_io(child.clone(), "child", false).unwrap();
    let pd = Disk::from_io(base.clone(), "base", true).unwrap();
    let e = coalesce_disks(&cd, &pd, &j, &o, Some(&cancel), &mut |p| {
        if p.blocks_done >= 4 {
            cancel.store(true, Ordering::Relaxed)
        }
    })
    .unwrap_err();
    assert!(matches!(e, Error::Cancelled(_)), "{e}");
    let jr = Journal::load(&j).unwrap().unwrap();
    assert_eq!(jr.child, cd.uuid());
    assert_eq!(jr.next_block, 4);
    let r = coalesce_disks(&cd, &pd, &j, &o, None, &mut |_| {}).unwrap();
    assert_eq!(r.resumed_from, 4);
    assert!(r.bytes_copied < bytes);
    drop(pd);
    assert_eq!(read_all(&chain(&[base], false)), view);
}

#[test]
fn bad_merges_are_refused_with_the_reason() {
    let (base, child, _, _) = fixture();
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("j");
    let o = CoalesceOptions::new(dir.path());
    let bd = || Disk::from_io(base.clone(), "base", true).unwrap();
    // A dynamic disk has no parent.
    let e = coalesce_disks(&bd(), &bd(), &j, &o, None, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("no parent"), "{e}");
    // Not the child's parent.
    let other = mem_base();
    let od = Disk::from_io(other, "other", true).unwrap();
    let cd = Disk::from_io(child.clone(), "child", false).unwrap();
    let e = coalesce_disks(&cd, &od, &j, &o, None, &mut |_| {}).unwrap_err();
    assert!(matches!(e, Error::ParentMismatch { .. }), "{e}");
    // Parent opened read-only.
    let ro = Disk::from_io(base.clone(), "base", false).unwrap();
    let e = coalesce_disks(&cd, &ro, &j, &o, None, &mut |_| {}).unwrap_err();
    assert!(matches!(e, Error::ReadOnly(_)), "{e}");
    // A journal of another merge is not overwritten.
    Journal {
        child: Uuid::new_v4(),
        parent: Uuid::new_v4(),
        next_block: 3,
    }
    .store(&j)
    .unwrap();
    let e = coalesce_disks(&cd, &bd(), &j, &o, None, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("unfinished merge"), "{e}");
    // Sizes differ.
    let small = Arc::new(MemFile::new());
    create_dynamic_io(small.as_ref(), "small", SIZE / 2, &opts(), None).unwrap();
    let sd = Disk::from_io(small.clone(), "small", true).unwrap();
    let big = Arc::new(MemFile::new());
    let pref = ParentRef {
        uuid: sd.uuid(),
        timestamp: 0,
        name: "s".into(),
        relative_path: "./s".into(),
    };
    create_dynamic_io(big.as_ref(), "big", SIZE, &opts(), Some(&pref)).unwrap();
    let bigd = Disk::from_io(big, "big", false).unwrap();
    std::fs::remove_file(&j).unwrap();
    let e = coalesce_disks(&bigd, &sd, &j, &o, None, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("virtual size"), "{e}");
}

#[test]
fn files_merge_then_grandchildren_relink_to_the_parent_and_read_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (b, c, g) = (d.join("b.vhd"), d.join("c.vhd"), d.join("g.vhd"));
    create_dynamic(&b, SIZE, &opts()).unwrap();
    let co = ChainOptions::new(d).writable(true);
    Chain::open(&b, &co)
        .unwrap()
        .write_at(&pattern(1, 200_000), 100_000)
        .unwrap();
    create_differencing(&c, &b, &opts()).unwrap();
    Chain::open(&c, &co)
        .unwrap()
        .write_at(&pattern(2, 50_000), 150_000)
        .unwrap();
    create_differencing(&g, &c, &opts()).unwrap();
    let gc = Chain::open(&g, &co).unwrap();
    gc.write_at(&pattern(3, 5_000), 170_000).unwrap();
    let view = read_all(&gc);
    drop(gc);
    let cview = read_all(&Chain::open(&c, &co.clone().writable(false)).unwrap());
    let r = coalesce(&c, &CoalesceOptions::new(d), None, &mut |_| {}).unwrap();
    assert_eq!(r.parent_path, b.canonicalize().unwrap());
    assert_eq!(
        r.bytes_copied,
        99 * 512,
        "whole sectors of the child's one write"
    );
    let merged = Chain::open(&b, &co.clone().writable(false)).unwrap();
    assert_eq!(read_all(&merged), cview);
    // A disk whose parent is neither c nor b is refused.
    let other = d.join("o.vhd");
    create_dynamic(&other, SIZE, &opts()).unwrap();
    let x = d.join("x.vhd");
    create_differencing(&x, &other, &opts()).unwrap();
    let e = relink(&x, r.child, &b).unwrap_err();
    assert!(e.to_string().contains("refusing to relink"), "{e}");
    relink(&g, r.child, &b).unwrap();
    relink(&g, r.child, &b).unwrap(); // idempotent
    std::fs::remove_file(&c).unwrap();
    let gc = Chain::open(&g, &co).unwrap();
    assert_eq!(gc.depth(), 2);
    assert_eq!(read_all(&gc), view);
    assert!(crate::check::check(&g).unwrap().problems.is_empty());
}

#[test]
fn the_rate_limit_slows_the_copy_to_the_given_rate() {
    let (base, child, view, bytes) = fixture();
    let dir = tempfile::tempdir().unwrap();
    let mut o = CoalesceOptions::new(dir.path());
    o.rate_limit = Some(bytes * 4); // the whole merge should take about 1/4 s
    let cd = Disk::from_io(child, "child", false).unwrap();
    let pd = Disk::from_io(base.clone(), "base", true).unwrap();
    let t = Instant::now();
    coalesce_disks(&cd, &pd, &dir.path().join("j"), &o, None, &mut |_| {}).unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    drop(pd);
    assert_eq!(read_all(&chain(&[base], false)), view);
}

#[test]
fn coalesce_keeps_the_parents_batmap_true() {
    // base <- mid <- top: top wholly writes block 2 (which mid lacks) and part of block 5.
    let base = mem_base();
    let mid = mem_child(&base);
    let top = mem_child(&mid);
    {
        let c = chain(&[top.clone(), mid.clone(), base.clone()], true);
        c.write_at(&pattern(1, BS as usize), 2 * BS as u64).unwrap();
        c.write_at(&pattern(2, 4096), 5 * BS as u64).unwrap();
        c.flush().unwrap();
    }
    let d = tempfile::tempdir().unwrap();
    let cdisk = Disk::from_io(top, "top", false).unwrap();
    let pdisk = Disk::from_io(mid.clone(), "mid", true).unwrap();
    let o = CoalesceOptions::new(d.path());
    coalesce_disks(&cdisk, &pdisk, &d.path().join("j"), &o, None, &mut |_| {}).unwrap();
    assert!(pdisk.batmap_bit(2), "a block the merge wrote wholly");
    assert!(!pdisk.batmap_bit(5), "a block the merge wrote in part");
    drop(pdisk);
    let r = crate::check_io(mid, "mid");
    assert!(r.is_ok(), "{:?}", r.problems);
}
