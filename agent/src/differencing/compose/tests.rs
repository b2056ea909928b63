//! similar_content and compose over real VHD chains: ordering, the storage-migration sequence,
//! every refusal, and a crash at every step of a compose.

use super::*;
use crate::core::fixtures;
use crate::core::{Storage, VdiDerive};
use std::collections::BTreeMap;
use std::path::Path;

const SR: &str = "11111111-2222-3333-4444-555555555555";
const SR2: &str = "11111111-2222-3333-4444-666666666666";
const SIZE: u64 = 6 << 20;

fn engine(dir: &Path, fp: Failpoints) -> Storage {
    fixtures::engine_vhd(dir, fp)
}

async fn new_sr(st: &Storage, sr: &str) {
    fixtures::create_sr(st, sr).await;
}

async fn create(st: &Storage, sr: &str, size: u64) -> String {
    fixtures::new_vdi(st, sr, size).await
}

async fn derive(st: &Storage, vdi: &str, clone: bool) -> String {
    st.vdi_snapshot(SR, vdi, VdiDerive::default(), clone)
        .await
        .unwrap()
        .record
        .uuid
}

fn chain(root: &Path, vdi: &str, writable: bool) -> vhd::Chain {
    vhd::Chain::open(
        &root.join(format!("{vdi}.vhd")),
        &vhd::ChainOptions::new(root.canonicalize().unwrap()).writable(writable),
    )
    .unwrap()
}

fn write(root: &Path, vdi: &str, off: u64, data: &[u8]) {
    let c = chain(root, vdi, true);
    c.write_at(data, off).unwrap();
    c.flush().unwrap();
}

fn read_all(root: &Path, vdi: &str) -> Vec<u8> {
    let c = chain(root, vdi, false);
    let mut v = vec![0u8; c.virtual_size() as usize];
    c.read_at(&mut v, 0).unwrap();
    v
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed ^ (i as u8).wrapping_mul(29))
        .collect()
}

fn code(e: &Error) -> String {
    match e {
        Error::BackendError { code, .. } => code.clone(),
        other => format!("{other:?}"),
    }
}

#[tokio::test]
async fn similar_content_lists_chain_relatives_nearest_first_then_equal_content_ids() {
    let dir = tempfile::tempdir().unwrap();
    let st = engine(dir.path(), Failpoints::none());
    new_sr(&st, SR).await;
    let a = create(&st, SR, SIZE).await;
    let s1 = derive(&st, &a, false).await; // a, s1 children of base b1
    let c1 = derive(&st, &a, true).await; // a, c1 children of b2 (child of b1)
    let u = create(&st, SR, SIZE).await;
    let lone = create(&st, SR, SIZE).await;
    st.vdi_set_content_id(SR, &a, "cid-1").await.unwrap();
    st.vdi_set_content_id(SR, &u, "cid-1").await.unwrap();
    let got: Vec<String> = st
        .vdi_similar_content(SR, &a)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.record.uuid)
        .collect();
    assert_eq!(got, vec![c1.clone(), s1.clone(), u.clone()]);
    assert!(!got.contains(&lone), "an unrelated VDI is not similar");
    // Hidden bases never appear, from any side.
    let scan: Vec<String> = fixtures::scan_uuids(&st, SR).await;
    for v in st.vdi_similar_content(SR, &s1).await.unwrap() {
        assert!(scan.contains(&v.record.uuid));
    }
    assert_eq!(
        st.vdi_similar_content(SR, &s1).await.unwrap()[0]
            .record
            .uuid,
        a.clone().min(c1.clone()),
        "a and c1 are both three steps from s1: ties by uuid"
    );
    assert!(st.vdi_similar_content(SR, &lone).await.unwrap().is_empty());
}

/// xapi's storage migration: receive the mirrored writes into a leaf, copy the base into a
/// clone of a similar VDI, then compose. Returns (root, parent, child, expected content).
async fn migration(st: &Storage, root: &Path) -> (String, String, Vec<u8>) {
    // The "source" disk: base content plus recent writes.
    let base = pattern(7, SIZE as usize);
    let mut expect = base.clone();
    let w1 = pattern(99, 70_144); // whole sectors, as a mirror writes
    let w2 = pattern(42, 4096);
    expect[1_000_448..1_070_592].copy_from_slice(&w1);
    expect[5_000_192..5_004_288].copy_from_slice(&w2);
    // Receive: an empty VDI's clone (a differencing leaf over an empty base) takes the writes.
    let empty = create(st, SR, SIZE).await;
    let leaf = derive(st, &empty, true).await;
    write(root, &leaf, 1_000_448, &w1);
    write(root, &leaf, 5_000_192, &w2);
    // A similar VDI (old copy of the base), cloned; the base is copied into the clone.
    let similar = create(st, SR, SIZE).await;
    write(root, &similar, 0, &pattern(7, (SIZE / 2) as usize));
    let parent = derive(st, &similar, true).await;
    write(root, &parent, 0, &base);
    (parent, leaf, expect)
}

#[tokio::test]
async fn compose_layers_the_received_leaf_on_the_copied_base() {
    let dir = tempfile::tempdir().unwrap();
    let st = engine(dir.path(), Failpoints::none());
    new_sr(&st, SR).await;
    let root = dir.path().join(SR);
    let (parent, leaf, expect) = migration(&st, &root).await;
    let parent_before = read_all(&root, &parent);
    st.vdi_compose(SR, &parent, &leaf).await.unwrap();
    assert!(
        read_all(&root, &leaf) == expect,
        "composed leaf = base + writes"
    );
    assert!(
        read_all(&root, &parent) == parent_before,
        "the parent is unchanged"
    );
    // They are independent afterwards: writes to one do not show in the other.
    write(&root, &parent, 0, &[0xee; 4096]);
    assert!(read_all(&root, &leaf) == expect);
    write(&root, &leaf, 8192, &[0xdd; 4096]);
    assert_eq!(
        &read_all(&root, &parent)[8192..8196],
        &parent_before[8192..8196]
    );
    // The leaf is now similar to the parent (shared chain), and everything checks clean.
    let sim: Vec<String> = st
        .vdi_similar_content(SR, &leaf)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.record.uuid)
        .collect();
    assert_eq!(sim.first(), Some(&parent));
    for n in crate::differencing::list_nodes(&root).unwrap() {
        let r = vhd::check(&node_file(&root, &n)).unwrap();
        assert!(r.is_ok(), "{n}: {:?}", r.problems);
    }
    assert!(!root.join(".ddstor/compose").exists());
    // Survives a re-attach.
    st.sr_detach(SR).await.unwrap();
    st.sr_attach(SR, &BTreeMap::new()).await.unwrap();
    let mut e2 = expect.clone();
    e2[8192..8192 + 4096].copy_from_slice(&[0xdd; 4096]);
    assert!(read_all(&root, &leaf) == e2);
    assert!(st
        .handle(interface::Call::QueryQuery {
            dbg: Default::default()
        })
        .await
        .is_ok());
    assert!(st.features().contains(&"VDI_COMPOSE".to_string()));
}

#[tokio::test]
async fn bad_composes_are_refused_with_typed_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let st = engine(dir.path(), Failpoints::none());
    new_sr(&st, SR).await;
    new_sr(&st, SR2).await;
    let root = dir.path().join(SR);
    let a = create(&st, SR, SIZE).await;
    let other_sr = create(&st, SR2, SIZE).await;
    let small = create(&st, SR, 2 << 20).await;
    // A leaf over a base with data that is not the parent's: unrelated.
    let x = create(&st, SR, SIZE).await;
    write(&root, &x, 0, &[1; 4096]);
    let xc = derive(&st, &x, true).await;
    // A standalone disk with data: not a delta.
    let full = create(&st, SR, SIZE).await;
    write(&root, &full, 0, &[2; 512]);
    // A leaf over layers only it uses: not a single-layer delta.
    let deep = create(&st, SR, SIZE).await;
    write(&root, &deep, 0, &[3; 512]);
    let snap = derive(&st, &deep, false).await;
    st.vdi_destroy(SR, &snap).await.unwrap();
    let nodes_before = crate::differencing::list_nodes(&root).unwrap();
    let cases: Vec<(&str, &str, &str)> = vec![
        (&a, &a, SAME_VDI),
        (&other_sr, &a, ACROSS_SRS),
        (&a, &small, SIZE_MISMATCH),
        (&a, &xc, UNRELATED),
        (&a, &full, NOT_A_DELTA),
        (&a, &deep, NOT_A_DELTA),
    ];
    for (p, c, want) in cases {
        let e = st.vdi_compose(SR, p, c).await.unwrap_err();
        assert_eq!(code(&e), want, "compose({p}, {c}): {e}");
        assert!(e.to_string().len() > 40, "the error explains itself: {e}");
    }
    let missing = uuid::Uuid::new_v4().to_string();
    assert!(matches!(
        st.vdi_compose(SR, &a, &missing).await,
        Err(Error::VdiDoesNotExist(_))
    ));
    assert_eq!(
        crate::differencing::list_nodes(&root).unwrap(),
        nodes_before
    );
}

#[tokio::test]
async fn a_crash_at_every_compose_step_is_completed_or_undone_at_attach() {
    for fp in COMPOSE {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join(SR);
        let (parent, leaf, expect, leaf_before, parent_before);
        {
            let st = engine(dir.path(), Failpoints::none());
            new_sr(&st, SR).await;
            (parent, leaf, expect) = migration(&st, &root).await;
            leaf_before = read_all(&root, &leaf);
            parent_before = read_all(&root, &parent);
        }
        let st = engine(dir.path(), Failpoints::panic_at(fp));
        st.sr_attach(SR, &BTreeMap::new()).await.unwrap();
        let e = st.vdi_compose(SR, &parent, &leaf).await.unwrap_err();
        assert!(e.to_string().contains("aborted"), "{fp}: {e}");
        drop(st); // the "crash"
        let st = engine(dir.path(), Failpoints::none());
        let rep = st.sr_attach(SR, &BTreeMap::new()).await.unwrap();
        assert!(
            rep.recovered.iter().any(|r| r.contains("compose")),
            "{fp}: {rep:?}"
        );
        let now = read_all(&root, &leaf);
        let completed = now == expect;
        assert!(
            completed || now == leaf_before,
            "{fp}: the leaf is neither before nor after"
        );
        assert!(
            read_all(&root, &parent) == parent_before,
            "{fp}: parent changed"
        );
        assert_eq!(
            completed,
            *fp != "compose.journal_written",
            "{fp}: completed iff the commit point was passed"
        );
        for n in crate::differencing::list_nodes(&root).unwrap() {
            let r = vhd::check(&node_file(&root, &n)).unwrap();
            assert!(r.is_ok(), "{fp}: {n}: {:?}", r.problems);
        }
        if !completed {
            st.vdi_compose(SR, &parent, &leaf).await.unwrap();
            assert!(read_all(&root, &leaf) == expect, "{fp}: retried compose");
        }
        assert_eq!(
            st.sr_scan(SR).await.unwrap().len(),
            4,
            "{fp}: no VDI lost or adopted"
        );
    }
}
