//! Online leaf merges: under I/O through an activated datapath's export (no request fails,
//! every byte reads back), on both paths (direct switch, freeze first), and a crash at every
//! step recovered at attach.

use super::*;
use crate::core::fixtures;
use crate::core::VdiDerive;
use crate::datapath::manager::Op;
use crate::datapath::Datapaths;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

const SR: &str = "11111111-2222-3333-4444-777777777777";
const SIZE: u64 = 8 << 20;

fn engine(dir: &Path) -> Storage {
    fixtures::engine_vhd(dir, Failpoints::none())
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as u8) ^ (i as u8).wrapping_mul(31) ^ ((i >> 9) as u8))
        .collect()
}

fn read_all(root: &Path, vdi: &str) -> Vec<u8> {
    let c = vhd::Chain::open(
        &node_file(root, vdi),
        &vhd::ChainOptions::new(root.canonicalize().unwrap()),
    )
    .unwrap();
    let mut v = vec![0u8; c.virtual_size() as usize];
    c.read_at(&mut v, 0).unwrap();
    v
}

fn write(root: &Path, vdi: &str, off: u64, data: &[u8]) {
    let c = vhd::Chain::open(
        &node_file(root, vdi),
        &vhd::ChainOptions::new(root.canonicalize().unwrap()).writable(true),
    )
    .unwrap();
    c.write_at(data, off).unwrap();
    c.flush().unwrap();
}

async fn new_vdi(st: &Storage) -> String {
    fixtures::create_sr(st, SR).await;
    fixtures::new_vdi(st, SR, SIZE).await
}

fn opts(freeze_above: u64) -> OnlineOptions {
    OnlineOptions {
        freeze_above,
        ..Default::default()
    }
}

async fn leaf_merge_under_io(freeze_above: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut st = engine(dir.path());
    let dps = Datapaths::new(dir.path().join("nbd.sock"));
    st.set_datapath_hooks(dps.clone());
    let st = Arc::new(st);
    let v = new_vdi(&st).await;
    dps.attach(&st, SR, &v, "dp", true).await.unwrap();
    dps.transition(&st, SR, &v, "dp", Op::Activate)
        .await
        .unwrap();
    let export = dps.exports().get(&format!("{SR}/{v}")).unwrap();
    // The "guest": writes and checks reads through the export's gate, as NBD requests do.
    let model = Arc::new(std::sync::Mutex::new(vec![0u8; SIZE as usize]));
    let stop = Arc::new(AtomicBool::new(false));
    let io = {
        let (export, model, stop) = (export.clone(), model.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) || i < 40 {
                let off = (i * 123_456 * 512) % (SIZE - 65536) / 512 * 512;
                let data = pattern(i, 65536);
                let pass = export.enter().await.expect("a request failed");
                let b = pass.backend.clone();
                let d2 = data.clone();
                tokio::task::spawn_blocking(move || b.write_at(&d2, off))
                    .await
                    .unwrap()
                    .expect("a write failed during GC");
                model.lock().unwrap()[off as usize..off as usize + 65536].copy_from_slice(&data);
                let roff = (i * 77_777 * 512) % (SIZE - 131072) / 512 * 512;
                let b = pass.backend.clone();
                let got = tokio::task::spawn_blocking(move || {
                    let mut g = vec![0u8; 131072];
                    b.read_at(&mut g, roff).map(|()| g)
                })
                .await
                .unwrap()
                .expect("a read failed during GC");
                drop(pass);
                let m = model.lock().unwrap();
                assert!(
                    got[..] == m[roff as usize..roff as usize + 131072],
                    "wrong read at {roff} during GC"
                );
                i += 1;
            }
            i
        })
    };
    // Snapshot/delete churn leaves single-child hidden bases under the live leaf.
    for _ in 0..3 {
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        let s = st
            .vdi_snapshot(SR, &v, VdiDerive::default(), false)
            .await
            .unwrap();
        st.vdi_destroy(SR, &s.record.uuid).await.unwrap();
    }
    assert!(st.vdi_chain(SR, &v).await.unwrap().1.len() >= 3);
    let r = gc_round(&st, SR, &opts(freeze_above)).await.unwrap();
    assert!(r.merged.iter().any(|(_, c)| c == &v), "{r:?}");
    assert_eq!(
        st.vdi_chain(SR, &v).await.unwrap().1,
        vec![v.clone()],
        "the chain is one layer again"
    );
    stop.store(true, Ordering::SeqCst);
    let n = io.await.unwrap();
    assert!(n >= 40, "{n} I/Os");
    // Everything through the export (the new chain) and through a fresh open of the file.
    let pass = export.enter().await.unwrap();
    let b = pass.backend.clone();
    let whole = tokio::task::spawn_blocking(move || {
        let mut w = vec![0u8; SIZE as usize];
        b.read_at(&mut w, 0).map(|()| w)
    })
    .await
    .unwrap()
    .unwrap();
    drop(pass);
    assert!(
        whole == *model.lock().unwrap(),
        "the export reads every write"
    );
    dps.transition(&st, SR, &v, "dp", Op::Deactivate)
        .await
        .unwrap();
    let root = dir.path().join(SR);
    assert!(
        read_all(&root, &v) == *model.lock().unwrap(),
        "the file holds every write"
    );
    for n in crate::differencing::list_nodes(&root).unwrap() {
        let r = vhd::check(&node_file(&root, &n)).unwrap();
        assert!(r.is_ok(), "{n}: {:?}", r.problems);
    }
    let s = status(SR);
    assert!(s.leaf_merges >= 1 && s.max_pause_ms > 0.0, "{s:?}");
    assert!(st.diagnostics().await.contains("leaf merges"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaf_merge_switches_an_activated_vdi_under_io_without_a_failed_request() {
    leaf_merge_under_io(u64::MAX).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaf_merge_with_a_freeze_first_keeps_the_guest_writing_into_a_new_leaf() {
    leaf_merge_under_io(0).await;
}

#[tokio::test]
async fn a_crash_at_every_leaf_merge_step_recovers_at_attach_with_the_data_intact() {
    for fp in GC_LEAF {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join(SR);
        let st = engine(dir.path());
        let v = new_vdi(&st).await;
        write(&root, &v, 0, &pattern(1, 3 << 20));
        let s = st
            .vdi_snapshot(SR, &v, VdiDerive::default(), true)
            .await
            .unwrap();
        write(&root, &v, 1 << 20, &pattern(2, 4 << 20));
        st.vdi_destroy(SR, &s.record.uuid).await.unwrap();
        let want = read_all(&root, &v);
        let mut o = opts(0);
        o.gc.failpoints = Failpoints::panic_at(fp);
        let e = gc_round(&st, SR, &o).await.unwrap_err();
        assert!(e.to_string().contains("aborted"), "{fp}: {e}");
        drop(st); // the "crash"
        let st = engine(dir.path());
        let rep = st.sr_attach(SR, &BTreeMap::new()).await.unwrap();
        assert!(
            rep.recovered.iter().any(|r| r.contains("leaf merge")),
            "{fp}: {rep:?}"
        );
        assert!(read_all(&root, &v) == want, "{fp}: data changed");
        assert_eq!(
            st.sr_scan(SR).await.unwrap().len(),
            1,
            "{fp}: a VDI was lost or adopted"
        );
        for n in crate::differencing::list_nodes(&root).unwrap() {
            let r = vhd::check(&node_file(&root, &n)).unwrap();
            assert!(r.is_ok(), "{fp}: {n}: {:?}", r.problems);
        }
        gc_round(&st, SR, &opts(0)).await.unwrap();
        assert_eq!(
            st.vdi_chain(SR, &v).await.unwrap().1,
            vec![v.clone()],
            "{fp}"
        );
        assert!(
            read_all(&root, &v) == want,
            "{fp}: data after the resumed merge"
        );
    }
}

async fn export_io(dps: &Datapaths, v: &str, write: Option<(u64, Vec<u8>)>) -> Vec<u8> {
    let export = dps.exports().get(&format!("{SR}/{v}")).unwrap();
    let pass = export.enter().await.expect("the export refused a request");
    let b = pass.backend.clone();
    tokio::task::spawn_blocking(move || {
        if let Some((off, d)) = write {
            b.write_at(&d, off).unwrap();
            b.flush().unwrap();
        }
        let mut w = vec![0u8; SIZE as usize];
        b.read_at(&mut w, 0).unwrap();
        w
    })
    .await
    .unwrap()
}

/// A non-persistent disk in an epoch is served from `.<vdi>.epoch.vhd`, a dot-named child of
/// the leaf that the index does not list. GC must not leaf-merge such a VDI: the merge gives the
/// leaf a new identity (a freeze creates a new leaf, a switch renames the parent over it), and
/// an epoch layer on disk without a live export (detached within the epoch) would then name a
/// parent that no longer exists. Hidden merges below the leaf stay fine (the leaf keeps its
/// uuid). Once the epoch ends, the leaf merge happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_leaves_a_leaf_under_a_live_epoch_layer_alone_and_merges_it_after_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join(SR);
    let mut st = engine(dir.path());
    let dps = Datapaths::new(dir.path().join("nbd.sock"));
    st.set_datapath_hooks(dps.clone());
    let st = Arc::new(st);
    let v = new_vdi(&st).await;
    // v ← P (hidden, single child) with data in both: a leaf-merge candidate.
    write(&root, &v, 0, &pattern(1, 2 << 20));
    for _ in 0..2 {
        let s = st
            .vdi_snapshot(SR, &v, VdiDerive::default(), false)
            .await
            .unwrap();
        st.vdi_destroy(SR, &s.record.uuid).await.unwrap();
    }
    write(&root, &v, 1 << 20, &pattern(2, 2 << 20));
    let persistent = read_all(&root, &v);
    st.vdi_set_persistent(SR, &v, false).await.unwrap();
    dps.attach(&st, SR, &v, "dp", true).await.unwrap();
    dps.transition(&st, SR, &v, "dp", Op::Activate)
        .await
        .unwrap();
    st.vdi_epoch_begin(SR, &v, "vm1", false).await.unwrap();
    let overlay = root.join(format!(".{v}.epoch.vhd"));
    assert!(overlay.exists());
    let mut in_epoch = persistent.clone();
    in_epoch[(3 << 20)..(4 << 20)].copy_from_slice(&pattern(3, 1 << 20));
    let got = export_io(&dps, &v, Some((3 << 20, pattern(3, 1 << 20)))).await;
    assert!(got == in_epoch, "the epoch's write reads back");

    // Live export: hidden merges collapse the chain to v ← P; v itself is not merged.
    let r = gc_round(&st, SR, &opts(0)).await.unwrap();
    assert!(!r.merged.iter().any(|(_, c)| c == &v), "{r:?}");
    assert_eq!(st.vdi_chain(SR, &v).await.unwrap().1.len(), 2, "{r:?}");
    assert!(export_io(&dps, &v, None).await == in_epoch);
    // Detached within the epoch (the layer stays on disk): still not merged, and the layer
    // still opens on re-attach with the epoch's writes.
    dps.transition(&st, SR, &v, "dp", Op::Deactivate)
        .await
        .unwrap();
    dps.transition(&st, SR, &v, "dp", Op::Detach).await.unwrap();
    let r = gc_round(&st, SR, &opts(u64::MAX)).await.unwrap();
    assert!(!r.merged.iter().any(|(_, c)| c == &v), "{r:?}");
    dps.attach(&st, SR, &v, "dp", true).await.unwrap();
    dps.transition(&st, SR, &v, "dp", Op::Activate)
        .await
        .unwrap();
    assert!(
        export_io(&dps, &v, None).await == in_epoch,
        "the epoch layer survived GC"
    );
    // Epoch over: its writes are gone, and now the leaf merge runs (live, under the export).
    st.vdi_epoch_end(SR, &v, "vm1").await.unwrap();
    assert!(!overlay.exists());
    let r = gc_round(&st, SR, &opts(0)).await.unwrap();
    assert!(r.merged.iter().any(|(_, c)| c == &v), "{r:?}");
    assert_eq!(st.vdi_chain(SR, &v).await.unwrap().1, vec![v.clone()]);
    assert!(export_io(&dps, &v, None).await == persistent);
    dps.transition(&st, SR, &v, "dp", Op::Deactivate)
        .await
        .unwrap();
    assert!(read_all(&root, &v) == persistent);
}
