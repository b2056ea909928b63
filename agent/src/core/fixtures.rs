//! Shared set-up of the engine tests (`tests.rs` on the JSON test double, `vhd_tests.rs` on
//! real VHDs): an engine over a temporary data directory with one attached SR, the SR's
//! invariants, and the crash-then-recover driver.

use super::*;
use crate::differencing::fake::FakeFormat;
use crate::differencing::vhdfmt::VhdFormat;
use crate::differencing::{list_nodes, ChainIndex};
use std::collections::BTreeSet;

/// A temporary data directory, an engine over it and SR [`SR`] created and attached.
pub(crate) struct Fixture {
    /// The data directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// The engine.
    pub st: Storage,
    /// The SR's directory.
    pub root: PathBuf,
}

impl Fixture {
    /// With `format` nodes.
    pub async fn new(format: Arc<dyn Format>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let st = engine_with(dir.path(), Failpoints::none(), format);
        new_sr(&st).await;
        let root = dir.path().join(SR);
        Fixture { dir, st, root }
    }

    /// With JSON test-double nodes (fast).
    pub async fn fake() -> Self {
        Self::new(Arc::new(FakeFormat)).await
    }

    /// With real VHD nodes.
    pub async fn vhd() -> Self {
        Self::new(Arc::new(VhdFormat)).await
    }
}

pub(crate) const SR: &str = "11111111-2222-3333-4444-555555555555";

pub(crate) fn engine_with(dir: &Path, fp: Failpoints, format: Arc<dyn Format>) -> Storage {
    Storage::with_format(
        StorageConfig {
            data_dir: dir.to_path_buf(),
            sr_roots: vec![],
            failpoints: fp,
        },
        format,
    )
}

pub(crate) fn engine(dir: &Path) -> Storage {
    engine_with(dir, Failpoints::none(), Arc::new(FakeFormat))
}

pub(crate) fn create_params(size: i64) -> VdiCreate {
    VdiCreate {
        name_label: "disk".into(),
        virtual_size: size,
        persistent: true,
        ..Default::default()
    }
}

pub(crate) async fn new_sr(st: &Storage) {
    create_sr(st, SR).await;
}

/// Creates and attaches SR `sr`.
pub(crate) async fn create_sr(st: &Storage, sr: &str) {
    st.sr_create(sr, "sr", "test sr", &BTreeMap::new())
        .await
        .unwrap();
    st.sr_attach(sr, &BTreeMap::new()).await.unwrap();
}

/// An engine over real VHD nodes (the production format) in `dir`.
pub(crate) fn engine_vhd(dir: &Path, fp: Failpoints) -> Storage {
    engine_with(dir, fp, Arc::new(VhdFormat))
}

/// Creates a VDI of `size` bytes on `sr`; returns its uuid.
pub(crate) async fn new_vdi(st: &Storage, sr: &str, size: u64) -> String {
    st.vdi_create(sr, create_params(size as i64))
        .await
        .unwrap()
        .record
        .uuid
}

/// The uuids `SR.scan` lists, in its order.
pub(crate) async fn scan_uuids(st: &Storage, sr: &str) -> Vec<String> {
    st.sr_scan(sr)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.record.uuid)
        .collect()
}

/// Everything on disk (relative path → contents), to prove a refused call changed nothing.
pub(crate) fn disk_state(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.ends_with("lock") {
                out.insert(
                    p.strip_prefix(dir).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

/// The SR's invariants after any operation or recovery: every record has a visible node;
/// every visible node has a record; every parent exists; no hidden base without children; no
/// journal entry and no temporary left.
pub(crate) fn assert_consistent(root: &Path, format: &dyn Format) {
    let store = meta::MetaStore::new(root, Failpoints::none());
    assert!(store.journal_pending().unwrap().is_empty(), "journal left");
    let records: BTreeSet<String> = store
        .read_vdis()
        .unwrap()
        .into_iter()
        .map(|r| r.uuid)
        .collect();
    let mut ix = ChainIndex::default();
    for n in list_nodes(root).unwrap() {
        let i = format.inspect(&root.join(format!("{n}.vhd"))).unwrap();
        ix.insert(&n, i.parent, i.hidden);
    }
    let nodes = list_nodes(root).unwrap();
    for n in &nodes {
        if ix.is_hidden(n) {
            assert!(!records.contains(n), "record for hidden node {n}");
            assert!(
                !ix.children_of(n).is_empty(),
                "hidden base {n} has no child"
            );
        } else {
            assert!(records.contains(n), "node {n} has no record");
        }
        if let Some(p) = ix.parent_of(n) {
            assert!(nodes.iter().any(|x| x == p), "parent {p} of {n} missing");
        }
    }
    for r in &records {
        assert!(nodes.contains(r), "record {r} has no node");
    }
    for e in std::fs::read_dir(root).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        assert!(
            !name.ends_with(".part") && !name.ends_with(".tmp"),
            "temporary {name} left"
        );
    }
}

/// Runs `op` with `failpoint` armed to panic (a crash: nothing after it runs), then re-attaches
/// with a fresh engine and checks the SR's invariants. Returns the fresh engine.
pub(crate) async fn crash_and_recover(
    dir: &Path,
    format: Arc<dyn Format>,
    failpoint: &str,
    setup: impl AsyncFnOnce(&Storage) -> String,
    op: impl AsyncFnOnce(&Storage, String),
) -> (Storage, String) {
    let st = engine_with(dir, Failpoints::panic_at(failpoint), format.clone());
    new_sr(&st).await;
    let id = setup(&st).await;
    op(&st, id.clone()).await;
    drop(st);
    let st = engine_with(dir, Failpoints::none(), format.clone());
    st.sr_attach(SR, &BTreeMap::new()).await.unwrap();
    assert_consistent(&dir.join(SR), format.as_ref());
    (st, id)
}
