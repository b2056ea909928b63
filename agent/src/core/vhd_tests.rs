//! Engine tests on real VHD files: every file the engine writes passes `vhd::check`, data
//! written before a snapshot/clone is readable through both VDIs afterwards, and no crash at any
//! failpoint loses it.

use super::fixtures::{assert_consistent, crash_and_recover, create_params, Fixture, SR};
use super::*;
use crate::differencing::list_nodes;
use crate::differencing::vhdfmt::VhdFormat;

fn chain(root: &Path, vdi: &str, writable: bool) -> vhd::Chain {
    vhd::Chain::open(
        &root.join(format!("{vdi}.vhd")),
        &vhd::ChainOptions::new(root.canonicalize().unwrap()).writable(writable),
    )
    .unwrap()
}

fn write(root: &Path, vdi: &str, byte: u8, offset: u64) {
    let c = chain(root, vdi, true);
    c.write_at(&vec![byte; 65536], offset).unwrap();
    c.flush().unwrap();
}

fn read(root: &Path, vdi: &str, offset: u64) -> Vec<u8> {
    let c = chain(root, vdi, false);
    let mut buf = vec![0u8; 65536];
    c.read_at(&mut buf, offset).unwrap();
    buf
}

fn check_all(root: &Path) {
    for n in list_nodes(root).unwrap() {
        let p = root.join(format!("{n}.vhd"));
        let r = vhd::check(&p).unwrap();
        assert!(r.is_ok(), "{}: {:?}", p.display(), r.problems);
    }
}

#[tokio::test]
async fn snapshot_and_clone_of_real_vhds_keep_data_and_pass_check() {
    let Fixture {
        dir: _dir,
        st,
        root,
    } = Fixture::vhd().await;
    let v = st
        .vdi_create(SR, create_params(5 << 20))
        .await
        .unwrap()
        .record;
    assert_eq!(v.virtual_size, 6 << 20);
    assert_eq!(chain(&root, &v.uuid, false).virtual_size(), 6 << 20);
    write(&root, &v.uuid, 0xAA, 1 << 20);
    let snap = st
        .vdi_snapshot(SR, &v.uuid, VdiDerive::default(), false)
        .await
        .unwrap()
        .record;
    write(&root, &v.uuid, 0xBB, 1 << 20);
    let clone = st
        .vdi_snapshot(SR, &snap.uuid, VdiDerive::default(), true)
        .await
        .unwrap()
        .record;
    write(&root, &clone.uuid, 0xCC, 4 << 20);
    assert_eq!(read(&root, &v.uuid, 1 << 20), vec![0xBB; 65536]);
    assert_eq!(read(&root, &snap.uuid, 1 << 20), vec![0xAA; 65536]);
    assert_eq!(read(&root, &clone.uuid, 1 << 20), vec![0xAA; 65536]);
    assert_eq!(read(&root, &clone.uuid, 4 << 20), vec![0xCC; 65536]);
    assert_eq!(read(&root, &snap.uuid, 4 << 20), vec![0; 65536]);
    check_all(&root);
    assert_consistent(&root, &VhdFormat);
    // The hidden base really is hidden for blktap-aware tools.
    let base = snap.sm_config.get(sr::SM_VHD_PARENT).unwrap();
    assert!(vhd::info(&root.join(format!("{base}.vhd"))).unwrap().hidden);
    // Re-attach rebuilds the same view from the VHD headers.
    st.sr_detach(SR).await.unwrap();
    let rep = st.sr_attach(SR, &BTreeMap::new()).await.unwrap();
    assert!(
        rep.adopted.is_empty() && rep.missing.is_empty() && rep.collected.is_empty(),
        "{rep:?}"
    );
    assert_eq!(st.sr_scan(SR).await.unwrap().len(), 3);
    for u in [&v.uuid, &snap.uuid, &clone.uuid] {
        st.vdi_destroy(SR, u).await.unwrap();
        check_all(&root);
        assert_consistent(&root, &VhdFormat);
    }
    assert!(list_nodes(&root).unwrap().is_empty());
}

#[tokio::test]
async fn a_crash_at_any_snapshot_or_clone_step_loses_no_data_in_real_vhds() {
    let failpoints: Vec<(&str, bool)> = crate::failpoint::VDI_SNAPSHOT
        .iter()
        .map(|f| (*f, false))
        .chain(crate::failpoint::VDI_CLONE.iter().map(|f| (*f, true)))
        .collect();
    for (fp, clone) in failpoints {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join(SR);
        let r2 = root.clone();
        let (st, src) = crash_and_recover(
            dir.path(),
            Arc::new(VhdFormat),
            fp,
            async move |st: &Storage| {
                let v = st
                    .vdi_create(SR, create_params(4 << 20))
                    .await
                    .unwrap()
                    .record;
                write(&r2, &v.uuid, 0x5A, 2 << 20);
                v.uuid
            },
            async |st: &Storage, id| {
                assert!(st
                    .vdi_snapshot(SR, &id, VdiDerive::default(), clone)
                    .await
                    .is_err());
            },
        )
        .await;
        check_all(&root);
        for v in st.sr_scan(SR).await.unwrap() {
            assert_eq!(
                read(&root, &v.record.uuid, 2 << 20),
                vec![0x5A; 65536],
                "{fp}"
            );
        }
        assert!(st.vdi_stat(SR, &src).await.is_ok(), "{fp}");
        // Still writable and snapshottable.
        write(&root, &src, 0x11, 0);
        st.vdi_snapshot(SR, &src, VdiDerive::default(), clone)
            .await
            .unwrap();
        check_all(&root);
    }
}

#[tokio::test]
async fn a_crash_at_any_destroy_step_keeps_the_snapshot_data_in_real_vhds() {
    for fp in crate::failpoint::VDI_DESTROY {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join(SR);
        let r2 = root.clone();
        let (st, ids) = crash_and_recover(
            dir.path(),
            Arc::new(VhdFormat),
            fp,
            async move |st: &Storage| {
                let v = st
                    .vdi_create(SR, create_params(4 << 20))
                    .await
                    .unwrap()
                    .record;
                write(&r2, &v.uuid, 0x77, 0);
                let s = st
                    .vdi_snapshot(SR, &v.uuid, VdiDerive::default(), false)
                    .await
                    .unwrap()
                    .record;
                format!("{} {}", v.uuid, s.uuid)
            },
            async |st: &Storage, ids| {
                let v = ids.split(' ').next().unwrap().to_string();
                assert!(st.vdi_destroy(SR, &v).await.is_err());
            },
        )
        .await;
        let (_, s) = ids.split_once(' ').unwrap();
        assert_eq!(read(&root, s, 0), vec![0x77; 65536], "{fp}");
        check_all(&root);
        st.vdi_destroy(SR, s).await.unwrap();
        assert!(list_nodes(&root).unwrap().is_empty(), "{fp}");
    }
}

#[tokio::test]
async fn attach_does_not_adopt_a_node_whose_parent_chain_loops() {
    let Fixture {
        dir: _dir,
        st,
        root,
    } = Fixture::vhd().await;
    st.sr_detach(SR).await.unwrap();
    let node = |u: &str| root.join(format!("{u}.vhd"));
    let (own, a, b) = (
        "aaaaaaaa-0000-0000-0000-000000000001",
        "aaaaaaaa-0000-0000-0000-000000000002",
        "aaaaaaaa-0000-0000-0000-000000000003",
    );
    let base = "aaaaaaaa-0000-0000-0000-0000000000ba";
    vhd::create_dynamic(&node(base), 8 << 20, &Default::default()).unwrap();
    for c in [own, a] {
        vhd::create_differencing(&node(c), &node(base), &Default::default()).unwrap();
    }
    vhd::create_differencing(&node(b), &node(a), &Default::default()).unwrap();
    // `own` is its own parent; a and b are each other's.
    vhd::set_parent(&node(own), &node(own)).unwrap();
    vhd::set_parent(&node(a), &node(b)).unwrap();
    let rep = st.sr_attach(SR, &BTreeMap::new()).await.unwrap();
    let mut unreadable = rep.unreadable.clone();
    unreadable.sort();
    assert_eq!(
        unreadable,
        vec![own.to_string(), a.to_string(), b.to_string()],
        "{rep:?}"
    );
    assert_eq!(rep.adopted, vec![base.to_string()], "{rep:?}");
    for u in [own, a, b] {
        assert!(
            matches!(st.vdi_stat(SR, u).await, Err(Error::VdiDoesNotExist(_))),
            "{u} adopted"
        );
        assert!(node(u).exists(), "{u} left alone");
    }
    let diag = st.diagnostics().await;
    assert!(diag.contains(own) && diag.contains(a), "{diag}");
}
