//! GC tests on real VHD chains: snapshot/delete churn collapses back to short chains with every
//! VDI reading what it should, a crash at every merge step resumes, and a leaf kept open and
//! written throughout (as the datapath does) never sees a wrong byte.

use super::*;
use crate::core::{Storage, StorageConfig, VdiCreate, VdiDerive};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

const SR: &str = "11111111-2222-3333-4444-555555555555";
const SIZE: u64 = 6 << 20;

fn engine(dir: &Path) -> Storage {
    Storage::new(StorageConfig {
        data_dir: dir.to_path_buf(),
        sr_roots: vec![],
        failpoints: Failpoints::none(),
    })
}

async fn new_sr(st: &Storage) {
    st.sr_create(SR, "sr", "", &BTreeMap::new()).await.unwrap();
    st.sr_attach(SR, &BTreeMap::new()).await.unwrap();
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
    let v = st
        .vdi_create(
            SR,
            VdiCreate {
                name_label: "disk".into(),
                virtual_size: SIZE as i64,
                persistent: true,
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .record
        .uuid;
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
