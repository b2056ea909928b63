//! GC tests on real VHD chains: snapshot/delete churn collapses back to short chains with every
//! VDI reading what it should, a crash at every merge step resumes, and a leaf kept open and
//! written throughout (as the datapath does) never sees a wrong byte.

use super::*;
use crate::core::fixtures;
use crate::core::{Storage, VdiDerive};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

const SR: &str = "11111111-2222-3333-4444-555555555555";
const SIZE: u64 = 6 << 20;

fn engine(dir: &Path) -> Storage {
    fixtures::engine_vhd(dir, Failpoints::none())
}

async fn new_sr(st: &Storage) {
    fixtures::create_sr(st, SR).await;
}

fn open(root: &Path, vdi: &str, writable: bool) -> vhd::Chain {
    vhd::Chain::open(
        &root.join(format!("{vdi}.vhd")),
        &vhd::ChainOptions::new(root.canonicalize().unwrap()).writable(writable),
    )
    .unwrap()
}

fn read_all(root: &Path, vdi: &str) -> Vec<u8> {
    let c = open(root, vdi, false);
    let mut v = vec![0u8; c.virtual_size() as usize];
    c.read_at(&mut v, 0).unwrap();
    v
}

fn fill(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed ^ (i as u8).wrapping_mul(13))
        .collect()
}

/// A VDI snapshotted `n` times with a write before each snapshot; every snapshot but those in
/// `keep` destroyed. Returns (vdi, expected content per surviving VDI).
async fn churn(
    st: &Storage,
    root: &Path,
    n: usize,
    keep: &[usize],
) -> (String, BTreeMap<String, Vec<u8>>) {
    let v = fixtures::new_vdi(st, SR, SIZE).await;
    let mut expect = BTreeMap::new();
    for i in 0..n {
        let c = open(root, &v, true);
        c.write_at(
            &fill(i as u8 + 1, 300_000),
            (i as u64 * 500_000) % (SIZE - 300_000),
        )
        .unwrap();
        c.flush().unwrap();
        drop(c);
        let s = st
            .vdi_snapshot(SR, &v, VdiDerive::default(), false)
            .await
            .unwrap()
            .record
            .uuid;
        if keep.contains(&i) {
            expect.insert(s, read_all(root, &v));
        } else {
            st.vdi_destroy(SR, &s).await.unwrap();
        }
    }
    expect.insert(v.clone(), read_all(root, &v));
    (v, expect)
}

fn check_all(root: &Path, expect: &BTreeMap<String, Vec<u8>>) {
    for (vdi, want) in expect {
        assert!(read_all(root, vdi) == *want, "VDI {vdi} reads wrong data");
    }
    for n in list_nodes(root).unwrap() {
        let r = vhd::check(&node_file(root, &n)).unwrap();
        assert!(r.is_ok(), "{n}: {:?}", r.problems);
    }
    assert!(
        !root.join(".ddstor/gc-merge").exists(),
        "merge journal left"
    );
}

#[tokio::test]
async fn snapshot_delete_churn_collapses_to_short_chains_with_every_vdi_intact() {
    let dir = tempfile::tempdir().unwrap();
    let st = engine(dir.path());
    new_sr(&st).await;
    let root = dir.path().join(SR);
    let (v, expect) = churn(&st, &root, 8, &[3]).await;
    let (_, before) = st.vdi_chain(SR, &v).await.unwrap();
    assert_eq!(before.len(), 9);
    let r = st.sr_gc(SR, GcOptions::default()).await.unwrap();
    let (_, after) = st.vdi_chain(SR, &v).await.unwrap();
    assert_eq!(r.depth_before, 9);
    assert_eq!(
        after.len(),
        3,
        "{after:?}: base, the kept snapshot's base, leaf"
    );
    assert_eq!(r.depth_after, 3);
    assert!(r.merged.len() >= 5 && r.bytes_copied > 0, "{r:?}");
    check_all(&root, &expect);
    assert!(
        st.diagnostics().await.contains("gc: last run"),
        "diagnostics show the GC"
    );
    // Nothing left to do: a second run is a no-op.
    let r2 = st.sr_gc(SR, GcOptions::default()).await.unwrap();
    assert!(r2.merged.is_empty() && r2.removed.is_empty(), "{r2:?}");
    // The state survives a detach/attach.
    st.sr_detach(SR).await.unwrap();
    st.sr_attach(SR, &BTreeMap::new()).await.unwrap();
    assert_eq!(st.vdi_chain(SR, &v).await.unwrap().1.len(), 3);
    check_all(&root, &expect);
}

#[tokio::test]
async fn a_crash_at_every_merge_step_resumes_to_the_same_short_chain() {
    for fp in GC_MERGE {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join(SR);
        let st = engine(dir.path());
        new_sr(&st).await;
        let (v, expect) = churn(&st, &root, 4, &[]).await;
        let o = GcOptions {
            failpoints: Failpoints::panic_at(fp),
            ..Default::default()
        };
        let e = st.sr_gc(SR, o).await.unwrap_err();
        assert!(e.to_string().contains("aborted"), "{fp}: {e}");
        drop(st); // "crash"
        check_all_reads(&root, &expect, fp);
        let st = engine(dir.path());
        st.sr_attach(SR, &BTreeMap::new()).await.unwrap();
        check_all_reads(&root, &expect, fp);
        st.sr_gc(SR, GcOptions::default()).await.unwrap();
        assert_eq!(st.vdi_chain(SR, &v).await.unwrap().1.len(), 2, "{fp}");
        check_all(&root, &expect);
    }
}

fn check_all_reads(root: &Path, expect: &BTreeMap<String, Vec<u8>>, fp: &str) {
    for (vdi, want) in expect {
        assert!(
            read_all(root, vdi) == *want,
            "after a crash at {fp}: VDI {vdi} reads wrong data"
        );
    }
}

#[tokio::test]
async fn gc_runs_online_under_a_leaf_kept_open_and_written_without_a_wrong_read() {
    let dir = tempfile::tempdir().unwrap();
    let st = engine(dir.path());
    new_sr(&st).await;
    let root = dir.path().join(SR);
    let (v, expect) = churn(&st, &root, 6, &[]).await;
    // The "datapath": the leaf's chain opened before the GC and used throughout.
    let leaf = Arc::new(open(&root, &v, true));
    let stop = Arc::new(AtomicBool::new(false));
    let model = Arc::new(Mutex::new(expect[&v].clone()));
    let io = {
        let (leaf, stop, model) = (leaf.clone(), stop.clone(), model.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) || n < 50 {
                let off = (i * 77_777) % (SIZE - 65536);
                let data = fill(i as u8, 65536);
                leaf.write_at(&data, off).unwrap();
                model.lock().unwrap()[off as usize..off as usize + 65536].copy_from_slice(&data);
                let roff = (i * 131_071) % (SIZE - 100_000);
                let mut got = vec![0u8; 100_000];
                leaf.read_at(&mut got, roff).unwrap();
                let m = model.lock().unwrap();
                assert!(
                    got[..] == m[roff as usize..roff as usize + 100_000],
                    "wrong read at {roff} during GC"
                );
                i += 1;
                n += 1;
            }
            leaf.flush().unwrap();
            n
        })
    };
    let r = st
        .sr_gc(
            SR,
            GcOptions {
                rate_limit: Some(8 << 20),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let n = io.join().unwrap();
    assert!(n >= 50 && !r.merged.is_empty(), "{n} I/Os, {r:?}");
    let mut whole = vec![0u8; SIZE as usize];
    leaf.read_at(&mut whole, 0).unwrap();
    assert!(
        whole == *model.lock().unwrap(),
        "the open chain reads its writes"
    );
    drop(leaf);
    assert_eq!(st.vdi_chain(SR, &v).await.unwrap().1.len(), 2);
    assert!(
        read_all(&root, &v) == *model.lock().unwrap(),
        "a re-opened chain too"
    );
}

/// Session 2's race, replayed step by step. The background GC re-reads the chain index from
/// the files at every round ([`resync_index`]) and waits for a gap in the engine's journal
/// before touching chains. Here a round's re-read is run at two points of a snapshot in
/// flight: (1) when its journal entry file has just been created (still empty), then (2) after
/// its renames, before it updates the index. Before the fix, (1) found the empty entry
/// unparseable and set it aside as "torn", so (2) saw no operation in flight, re-read the
/// half-updated files into the index, and the snapshot then derived its new base's parent from
/// that index (its own leaf's new parent: the base itself): the base became its own parent in
/// the index and the real grandparent looked childless, which GC or a destroy would delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gc_index_resync_in_the_middle_of_a_snapshot_keeps_its_journal_entry_and_a_true_index() {
    use std::sync::mpsc;
    let dir = tempfile::tempdir().unwrap();
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (to_test, at_step) = mpsc::channel::<&'static str>();
    let (resume_tx, resume_rx) = mpsc::channel::<()>();
    let (to_test, resume_rx) = (Mutex::new(to_test), Mutex::new(resume_rx));
    let hook_armed = armed.clone();
    let fp = Failpoints::none().with_hook(Arc::new(move |name| {
        if hook_armed.load(Ordering::SeqCst)
            && matches!(name, "meta.journal_entry_created" | "vdi_snapshot.synced")
        {
            lock(&to_test).send(name).unwrap();
            lock(&resume_rx).recv().unwrap();
        }
    }));
    let st = fixtures::engine_vhd(dir.path(), fp);
    new_sr(&st).await;
    let root = dir.path().join(SR);
    // v ← its first snapshot's base B1 (hidden), that snapshot destroyed.
    let v = fixtures::new_vdi(&st, SR, SIZE).await;
    let s1 = st
        .vdi_snapshot(SR, &v, VdiDerive::default(), false)
        .await
        .unwrap()
        .record
        .uuid;
    st.vdi_destroy(SR, &s1).await.unwrap();
    let (_g, sr) = st.attached(SR).await.unwrap();
    let b1 = lock(&sr.chain).parent_of(&v).unwrap().to_string();

    armed.store(true, Ordering::SeqCst);
    let snap = {
        let sr = sr.clone();
        let vd = sr.vdi(&v).unwrap();
        let rec = crate::core::sr::new_record(&uuid::Uuid::new_v4().to_string(), SIZE);
        std::thread::spawn(move || sr.snapshot_vdi(&vd, rec, false))
    };
    for step in ["meta.journal_entry_created", "vdi_snapshot.synced"] {
        assert_eq!(at_step.recv().unwrap(), step);
        resync_index(&sr).unwrap();
        resume_tx.send(()).unwrap();
    }
    let s2 = snap.join().unwrap().unwrap().uuid;
    armed.store(false, Ordering::SeqCst);

    let torn: Vec<_> = std::fs::read_dir(sr.meta.journal_dir_path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".torn"))
        .collect();
    assert!(
        torn.is_empty(),
        "the in-flight snapshot's journal entry was set aside: {torn:?}"
    );
    let mut files = crate::differencing::ChainIndex::default();
    for n in list_nodes(&root).unwrap() {
        let i = VhdFormat.inspect(&node_file(&root, &n)).unwrap();
        files.insert(&n, i.parent, i.hidden);
    }
    assert_eq!(*lock(&sr.chain), files, "the index says what the files say");
    let b2 = lock(&sr.chain).parent_of(&v).unwrap().to_string();
    assert_eq!(sr.ancestry(&v), vec![v.clone(), b2.clone(), b1.clone()]);
    assert_eq!(sr.ancestry(&s2), vec![s2.clone(), b2, b1]);
    // And GC, then destroying the snapshot, leave every chain readable.
    drop(_g);
    st.vdi_destroy(SR, &s2).await.unwrap();
    let sr2 = sr.clone();
    tokio::task::spawn_blocking(move || run(&sr2, &GcOptions::default(), &mut |_| {}))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read_all(&root, &v).len() as u64, SIZE);
    assert_eq!(sr.ancestry(&v).len(), 2, "v ← one base after GC");
}
