//! Engine tests: lifecycle, snapshot/clone structure, locking, reconciliation, validation,
//! crash recovery at every failpoint, and concurrency. They run against the JSON test double of
//! the node format (fast) and, where it matters, against real VHDs (`vhd_tests`).

use super::fixtures::*;
use super::*;
use crate::differencing::fake::FakeFormat;
use crate::differencing::list_nodes;
use std::collections::BTreeSet;

fn sr_root(dir: &Path) -> PathBuf {
    dir.join(SR)
}

#[tokio::test]
async fn create_rounds_size_up_and_scan_stat_destroy_follow() {
    let Fixture { dir, st, .. } = Fixture::fake().await;
    let v = st.vdi_create(SR, create_params(1)).await.unwrap();
    assert_eq!(v.record.virtual_size, 2 << 20);
    assert!(v.record.persistent);
    let scan = st.sr_scan(SR).await.unwrap();
    assert_eq!(scan.len(), 1);
    assert_eq!(scan[0].record, v.record);
    let stat = st.vdi_stat(SR, &v.record.uuid).await.unwrap();
    assert_eq!(stat.record.name_label, "disk");
    st.vdi_set_name_label(SR, &v.record.uuid, "renamed")
        .await
        .unwrap();
    st.vdi_set_content_id(SR, &v.record.uuid, "cid")
        .await
        .unwrap();
    st.vdi_set_persistent(SR, &v.record.uuid, false)
        .await
        .unwrap();
    let stat = st.vdi_stat(SR, &v.record.uuid).await.unwrap();
    assert_eq!(
        (
            stat.record.name_label.as_str(),
            stat.record.content_id.as_str(),
            stat.record.persistent
        ),
        ("renamed", "cid", false)
    );
    st.vdi_destroy(SR, &v.record.uuid).await.unwrap();
    assert!(matches!(
        st.vdi_stat(SR, &v.record.uuid).await,
        Err(Error::VdiDoesNotExist(_))
    ));
    assert!(st.sr_scan(SR).await.unwrap().is_empty());
    assert_consistent(&sr_root(dir.path()), &FakeFormat);
}

#[tokio::test]
async fn records_survive_detach_and_reattach() {
    let Fixture { dir, st, .. } = Fixture::fake().await;
    let v = st.vdi_create(SR, create_params(5 << 20)).await.unwrap();
    st.vdi_epoch_begin(SR, &v.record.uuid, "vm1", true)
        .await
        .unwrap();
    st.sr_set_name_label(SR, "new name").await.unwrap();
    st.sr_detach(SR).await.unwrap();
    assert!(matches!(st.sr_scan(SR).await, Err(Error::SrNotAttached(_))));
    drop(st);
    let st = engine(dir.path());
    st.sr_attach(SR, &BTreeMap::new()).await.unwrap();
    let got = st.vdi_stat(SR, &v.record.uuid).await.unwrap();
    assert_eq!(got.record.virtual_size, 6 << 20);
    assert_eq!(got.record.epoch.as_ref().unwrap().vm, "vm1");
    assert_eq!(st.sr_stat(SR).await.unwrap().name_label, "new name");
}

#[tokio::test]
async fn snapshot_and_clone_use_the_double_child_scheme() {
    let Fixture { dir, st, .. } = Fixture::fake().await;
    let v = st
        .vdi_create(SR, create_params(4 << 20))
        .await
        .unwrap()
        .record;
    st.vdi_set_content_id(SR, &v.uuid, "content-1")
        .await
        .unwrap();
    let snap = st
        .vdi_snapshot(
            SR,
            &v.uuid,
            VdiDerive {
                name_label: Some("snap".into()),
                ..Default::default()
            },
            false,
        )
        .await
        .unwrap()
        .record;
    assert!(snap.is_a_snapshot && snap.read_only);
    assert_eq!(snap.snapshot_of, v.uuid);
    assert_eq!(snap.content_id, "content-1");
    assert_eq!(snap.name_label, "snap");
    assert_eq!(snap.virtual_size, v.virtual_size);
    let base = snap.sm_config.get(sr::SM_VHD_PARENT).unwrap().clone();
    let after = st.vdi_stat(SR, &v.uuid).await.unwrap().record;
    assert_eq!(after.sm_config.get(sr::SM_VHD_PARENT), Some(&base));
    let root = sr_root(dir.path());
    let b = FakeFormat
        .inspect(&root.join(format!("{base}.vhd")))
        .unwrap();
    assert!(b.hidden);
    for child in [&v.uuid, &snap.uuid] {
        let i = FakeFormat
            .inspect(&root.join(format!("{child}.vhd")))
            .unwrap();
        assert_eq!(i.parent.as_deref(), Some(base.as_str()));
        assert!(!i.hidden);
    }
    let clone = st
        .vdi_snapshot(SR, &snap.uuid, VdiDerive::default(), true)
        .await
        .unwrap()
        .record;
    assert!(!clone.is_a_snapshot && !clone.read_only);
    assert_eq!(clone.content_id, "content-1");
    assert_eq!(st.sr_scan(SR).await.unwrap().len(), 3, "bases are not VDIs");
    assert_consistent(&root, &FakeFormat);

    // Destroying everything collects every hidden base; then the SR can be destroyed.
    assert!(
        matches!(st.sr_destroy(SR).await, Err(Error::BackendError { code, .. }) if code == "SR_NOT_EMPTY")
    );
    for u in [&v.uuid, &snap.uuid, &clone.uuid] {
        st.vdi_destroy(SR, u).await.unwrap();
        assert_consistent(&root, &FakeFormat);
    }
    assert!(list_nodes(&root).unwrap().is_empty());
    st.sr_destroy(SR).await.unwrap();
    assert!(!root.exists());
    assert!(matches!(
        st.sr_attach(SR, &BTreeMap::new()).await,
        Err(Error::BackendError { code, .. }) if code == "SR_DOES_NOT_EXIST"
    ));
}

#[tokio::test]
async fn a_second_engine_cannot_attach_a_locked_sr() {
    let dir = tempfile::tempdir().unwrap();
    let a = engine(dir.path());
    new_sr(&a).await;
    let b = engine(dir.path());
    let err = b.sr_attach(SR, &BTreeMap::new()).await.unwrap_err();
    assert!(
        matches!(&err, Error::BackendError { code, .. } if code == "SR_LOCKED"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    a.sr_detach(SR).await.unwrap();
    b.sr_attach(SR, &BTreeMap::new()).await.unwrap();
}

#[tokio::test]
async fn attach_adopts_unknown_nodes_and_reports_missing_ones() {
    let Fixture { dir, st, .. } = Fixture::fake().await;
    let gone = st
        .vdi_create(SR, create_params(2 << 20))
        .await
        .unwrap()
        .record;
    st.sr_detach(SR).await.unwrap();
    let root = sr_root(dir.path());
    std::fs::remove_file(root.join(format!("{}.vhd", gone.uuid))).unwrap();
    let stranger = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
    FakeFormat
        .create_base(&root.join(format!("{stranger}.vhd")), 8 << 20)
        .unwrap();
    FakeFormat
        .create_base(&root.join("not-a-uuid.vhd"), 8 << 20)
        .unwrap();
    let rep = st.sr_attach(SR, &BTreeMap::new()).await.unwrap();
    assert_eq!(rep.adopted, vec![stranger.to_string()]);
    assert_eq!(rep.missing, vec![gone.uuid.clone()]);
    assert_eq!(rep.unreadable, vec!["not-a-uuid".to_string()]);
    let adopted = st.vdi_stat(SR, stranger).await.unwrap().record;
    assert!(!adopted.managed);
    assert_eq!(adopted.virtual_size, 8 << 20);
    assert_eq!(
        st.sr_stat(SR).await.unwrap().missing,
        vec![gone.uuid.clone()]
    );
    assert!(matches!(
        st.vdi_stat(SR, &gone.uuid).await,
        Err(Error::VdiDoesNotExist(_))
    ));
    st.vdi_destroy(SR, &gone.uuid).await.unwrap();
    assert!(st.sr_stat(SR).await.unwrap().missing.is_empty());
}

#[tokio::test]
async fn bad_arguments_are_typed_errors_that_change_nothing() {
    let Fixture { dir, st, .. } = Fixture::fake().await;
    let v = st
        .vdi_create(SR, create_params(2 << 20))
        .await
        .unwrap()
        .record;
    let before = disk_state(dir.path());
    let unknown = "99999999-9999-9999-9999-999999999999";
    let invalid =
        |e: Error| matches!(e, Error::BackendError { code, .. } if code == "INVALID_ARGUMENT");
    for bad in [
        "../etc",
        "a/b",
        "..",
        "",
        "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz",
    ] {
        assert!(invalid(st.vdi_stat(SR, bad).await.unwrap_err()), "{bad}");
        assert!(invalid(st.vdi_destroy(SR, bad).await.unwrap_err()), "{bad}");
        assert!(invalid(st.sr_scan(bad).await.unwrap_err()), "{bad}");
        assert!(
            invalid(st.sr_attach(bad, &BTreeMap::new()).await.unwrap_err()),
            "{bad}"
        );
    }
    assert!(matches!(
        st.vdi_stat(SR, unknown).await,
        Err(Error::VdiDoesNotExist(_))
    ));
    assert!(matches!(
        st.vdi_snapshot(SR, unknown, VdiDerive::default(), false)
            .await,
        Err(Error::VdiDoesNotExist(_))
    ));
    assert!(matches!(
        st.sr_scan(unknown).await,
        Err(Error::SrNotAttached(_))
    ));
    for size in [0, -1, i64::MIN, (2041_i64 << 30), i64::MAX] {
        assert!(
            invalid(st.vdi_create(SR, create_params(size)).await.unwrap_err()),
            "{size}"
        );
    }
    let mut p = create_params(1 << 20);
    p.name_label = "x".repeat(1 << 20);
    assert!(invalid(st.vdi_create(SR, p).await.unwrap_err()));
    let mut p = create_params(1 << 20);
    p.sm_config = (0..100_000)
        .map(|i| (format!("k{i}"), "v".repeat(10)))
        .collect();
    assert!(invalid(st.vdi_create(SR, p).await.unwrap_err()));
    assert!(invalid(
        st.vdi_set_name_label(SR, &v.uuid, &"x".repeat(1 << 20))
            .await
            .unwrap_err()
    ));
    assert!(invalid(
        st.sr_set_name_description(SR, &"x".repeat(1 << 20))
            .await
            .unwrap_err()
    ));
    let flood = VdiDerive {
        sm_config: (0..1000)
            .map(|i| (format!("k{i}"), String::new()))
            .collect(),
        ..Default::default()
    };
    assert!(invalid(
        st.vdi_snapshot(SR, &v.uuid, flood, true).await.unwrap_err()
    ));
    let rel: BTreeMap<_, _> = [("path".to_string(), "relative/dir".to_string())].into();
    assert!(invalid(
        st.sr_create("22222222-2222-3333-4444-555555555555", "", "", &rel)
            .await
            .unwrap_err()
    ));
    assert_eq!(
        disk_state(dir.path()),
        before,
        "a refused call changed the disk"
    );
}

#[tokio::test]
async fn destroy_is_refused_while_a_datapath_is_recorded() {
    let Fixture { dir: _dir, st, .. } = Fixture::fake().await;
    let v = st
        .vdi_create(SR, create_params(2 << 20))
        .await
        .unwrap()
        .record;
    st.vdi_set_datapaths(SR, &v.uuid, |d| {
        d.insert("dp1".into(), "attached-rw".into());
    })
    .await
    .unwrap();
    let err = st.vdi_destroy(SR, &v.uuid).await.unwrap_err();
    assert!(
        matches!(&err, Error::BackendError { code, .. } if code == "VDI_IN_USE"),
        "{err}"
    );
    st.vdi_set_datapaths(SR, &v.uuid, |d| d.clear())
        .await
        .unwrap();
    st.vdi_destroy(SR, &v.uuid).await.unwrap();
}

#[tokio::test]
async fn sr_create_refuses_an_existing_sr_and_honours_device_config_path() {
    let dir = tempfile::tempdir().unwrap();
    let st = engine(dir.path());
    let elsewhere = dir.path().join("elsewhere");
    let dc: BTreeMap<_, _> = [("path".to_string(), elsewhere.display().to_string())].into();
    let path = st.sr_create(SR, "a", "", &dc).await.unwrap();
    assert_eq!(path, elsewhere);
    let err = st
        .sr_create(SR, "a", "", &BTreeMap::new())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::BackendError { code, .. } if code == "SR_EXISTS"),
        "{err}"
    );
    // Attach without a path finds it where it was created.
    st.sr_attach(SR, &BTreeMap::new()).await.unwrap();
    assert_eq!(st.sr_stat(SR).await.unwrap().path, elsewhere);
    st.sr_destroy(SR).await.unwrap();
    assert!(!elsewhere.exists());
    // Gone from the agent's memory too: it can be created again.
    st.sr_create(SR, "a", "", &BTreeMap::new()).await.unwrap();
}

#[tokio::test]
async fn a_crash_at_every_create_step_recovers_to_before_or_after() {
    for fp in crate::failpoint::VDI_CREATE
        .iter()
        .chain(crate::failpoint::METADATA_WRITE)
    {
        let dir = tempfile::tempdir().unwrap();
        let (st, _) = crash_and_recover(
            dir.path(),
            Arc::new(FakeFormat),
            fp,
            async |_st: &Storage| String::new(),
            async |st: &Storage, _| {
                let r = st.vdi_create(SR, create_params(2 << 20)).await;
                assert!(r.is_err(), "{fp}: the crash must interrupt the call");
            },
        )
        .await;
        let n = st.sr_scan(SR).await.unwrap().len();
        assert!(n <= 1, "{fp}");
        if *fp == "vdi_create.record_written" {
            assert_eq!(n, 1, "{fp}: the record was durable, the VDI must survive");
        }
        if *fp == "vdi_create.vhd_created" || *fp == "vdi_create.journal_written" {
            assert_eq!(n, 0, "{fp}: no record yet, the create must be undone");
        }
    }
}

#[tokio::test]
async fn a_crash_at_every_snapshot_and_clone_step_recovers_and_keeps_the_source() {
    for (fps, clone) in [
        (crate::failpoint::VDI_SNAPSHOT, false),
        (crate::failpoint::VDI_CLONE, true),
    ] {
        for fp in fps {
            let dir = tempfile::tempdir().unwrap();
            let (st, src) = crash_and_recover(
                dir.path(),
                Arc::new(FakeFormat),
                fp,
                async |st: &Storage| {
                    let v = st
                        .vdi_create(SR, create_params(2 << 20))
                        .await
                        .unwrap()
                        .record;
                    st.vdi_set_content_id(SR, &v.uuid, "c").await.unwrap();
                    v.uuid
                },
                async |st: &Storage, id| {
                    assert!(
                        st.vdi_snapshot(SR, &id, VdiDerive::default(), clone)
                            .await
                            .is_err(),
                        "{fp}"
                    );
                },
            )
            .await;
            let scan = st.sr_scan(SR).await.unwrap();
            let srcrec = scan
                .iter()
                .find(|v| v.record.uuid == src)
                .unwrap_or_else(|| panic!("{fp}: source lost"));
            assert_eq!(srcrec.record.content_id, "c");
            assert!(scan.len() == 1 || scan.len() == 2, "{fp}: {}", scan.len());
            if scan.len() == 2 {
                let new = scan.iter().find(|v| v.record.uuid != src).unwrap();
                assert_eq!(new.record.is_a_snapshot, !clone, "{fp}");
                assert_eq!(new.record.content_id, "c", "{fp}");
            }
            // The recovered SR is fully usable: snapshot again, destroy everything, destroy SR.
            st.vdi_snapshot(SR, &src, VdiDerive::default(), clone)
                .await
                .unwrap();
            for v in st.sr_scan(SR).await.unwrap() {
                st.vdi_destroy(SR, &v.record.uuid).await.unwrap();
            }
            st.sr_destroy(SR).await.unwrap();
        }
    }
}

/// How a simulated crash damaged what was not yet synced (SIGKILL and panics keep the page
/// cache, so these states are made by hand).
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// The entry reached the disk only in part (crash during barrier 1).
    TornJournal,
    /// The leaf's link as the future base was lost (crash during barrier 1, after the entry).
    BaseLink,
    /// The base's rename was lost although later renames reached the disk.
    BaseRename,
    /// Both records were renamed into place but their data was lost (crash before barrier 2).
    Records,
}

#[tokio::test]
async fn a_snapshot_recovers_whichever_unsynced_step_the_crash_lost() {
    use crate::core::meta::{JournalOp, MetaStore};
    for (fp, loss, completed) in [
        ("vdi_snapshot.staged", Loss::TornJournal, false),
        ("vdi_snapshot.journal_written", Loss::BaseLink, true),
        ("vdi_snapshot.children_created", Loss::BaseRename, true),
        ("vdi_clone.base_hidden_records_written", Loss::Records, true),
    ] {
        let clone = fp.starts_with("vdi_clone");
        let dir = tempfile::tempdir().unwrap();
        let format: Arc<dyn Format> = Arc::new(FakeFormat);
        let st = engine_with(dir.path(), Failpoints::panic_at(fp), format.clone());
        new_sr(&st).await;
        let v = st
            .vdi_create(SR, create_params(2 << 20))
            .await
            .unwrap()
            .record;
        st.vdi_set_content_id(SR, &v.uuid, "c").await.unwrap();
        assert!(st
            .vdi_snapshot(SR, &v.uuid, VdiDerive::default(), clone)
            .await
            .is_err());
        drop(st);
        let root = sr_root(dir.path());
        let store = MetaStore::new(&root, Failpoints::none());
        let jdir = store.journal_dir_path();
        let jfile = std::fs::read_dir(&jdir)
            .unwrap()
            .flatten()
            .next()
            .unwrap()
            .path();
        match loss {
            Loss::TornJournal => {
                let b = std::fs::read(&jfile).unwrap();
                std::fs::write(&jfile, &b[..b.len() / 2]).unwrap();
            }
            _ => {
                let e = store.journal_pending().unwrap().remove(0);
                let JournalOp::Snapshot {
                    base, new_record, ..
                } = e.op
                else {
                    panic!("{fp}: not a snapshot entry")
                };
                match loss {
                    Loss::BaseLink => {
                        std::fs::remove_file(root.join(format!(".{base}.vhd.part"))).unwrap()
                    }
                    Loss::BaseRename => std::fs::rename(
                        root.join(format!("{base}.vhd")),
                        root.join(format!(".{base}.vhd.part")),
                    )
                    .unwrap(),
                    _ => {
                        for id in [&v.uuid, &new_record.uuid] {
                            std::fs::write(store.vdis_dir_path().join(format!("{id}.json")), b"")
                                .unwrap();
                        }
                    }
                }
            }
        }
        let st = engine_with(dir.path(), Failpoints::none(), format.clone());
        st.sr_attach(SR, &BTreeMap::new()).await.unwrap();
        assert_consistent(&root, format.as_ref());
        let scan = st.sr_scan(SR).await.unwrap();
        assert_eq!(scan.len(), if completed { 2 } else { 1 }, "{fp} {loss:?}");
        for x in &scan {
            assert_eq!(x.record.content_id, "c", "{fp} {loss:?}");
        }
        if completed {
            let base = st.sr_scan(SR).await.unwrap()[0].record.sm_config[sr::SM_VHD_PARENT].clone();
            let info = format.inspect(&root.join(format!("{base}.vhd"))).unwrap();
            assert!(info.hidden, "{fp} {loss:?}: base hidden");
            for x in &scan {
                assert_eq!(x.record.sm_config[sr::SM_VHD_PARENT], base, "{fp} {loss:?}");
                let i = format
                    .inspect(&root.join(format!("{}.vhd", x.record.uuid)))
                    .unwrap();
                assert_eq!(i.parent.as_deref(), Some(base.as_str()), "{fp} {loss:?}");
            }
        }
    }
}

#[tokio::test]
async fn metadata_writes_are_incremental_and_touch_only_the_changed_records() {
    use std::os::unix::fs::MetadataExt;
    let Fixture { dir, st, .. } = Fixture::fake().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            st.vdi_create(SR, create_params(2 << 20))
                .await
                .unwrap()
                .record
                .uuid,
        );
    }
    let vdis = sr_root(dir.path()).join(meta::META_DIR).join("vdis");
    // A record write replaces its file (temp + rename): an unchanged inode means untouched.
    let inodes = || -> BTreeMap<String, u64> {
        std::fs::read_dir(&vdis)
            .unwrap()
            .flatten()
            .map(|e| {
                (
                    e.file_name().to_string_lossy().to_string(),
                    e.metadata().unwrap().ino(),
                )
            })
            .collect()
    };
    let before = inodes();
    st.vdi_set_name_label(SR, &ids[0], "renamed").await.unwrap();
    let snap = st
        .vdi_snapshot(SR, &ids[1], VdiDerive::default(), false)
        .await
        .unwrap()
        .record
        .uuid;
    let after = inodes();
    for (name, ino) in &before {
        let changed = after.get(name) != Some(ino);
        let expected = name.starts_with(&ids[0]) || name.starts_with(&ids[1]);
        assert_eq!(changed, expected, "{name}: rewritten = {changed}");
    }
    assert!(after.contains_key(&format!("{snap}.json")));
    assert_eq!(after.len(), before.len() + 1);
}

#[tokio::test]
async fn a_crash_at_every_destroy_step_completes_the_destroy_and_keeps_the_rest() {
    for fp in crate::failpoint::VDI_DESTROY {
        let dir = tempfile::tempdir().unwrap();
        let (st, ids) = crash_and_recover(
            dir.path(),
            Arc::new(FakeFormat),
            fp,
            async |st: &Storage| {
                let v = st
                    .vdi_create(SR, create_params(2 << 20))
                    .await
                    .unwrap()
                    .record;
                let s = st
                    .vdi_snapshot(SR, &v.uuid, VdiDerive::default(), false)
                    .await
                    .unwrap()
                    .record;
                format!("{} {}", v.uuid, s.uuid)
            },
            async |st: &Storage, ids| {
                let v = ids.split(' ').next().unwrap().to_string();
                assert!(st.vdi_destroy(SR, &v).await.is_err(), "{fp}");
            },
        )
        .await;
        let (v, s) = ids.split_once(' ').unwrap();
        let scan: Vec<String> = fixtures::scan_uuids(&st, SR).await;
        assert_eq!(
            scan,
            vec![s.to_string()],
            "{fp}: destroy completed, snapshot kept (not {v})"
        );
        st.vdi_destroy(SR, s).await.unwrap();
        assert!(
            list_nodes(&dir.path().join(SR)).unwrap().is_empty(),
            "{fp}: bases collected"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_lose_no_update_and_match_a_model() {
    let Fixture { dir, st, .. } = Fixture::fake().await;
    let st = Arc::new(st);
    let shared = st
        .vdi_create(SR, create_params(2 << 20))
        .await
        .unwrap()
        .record
        .uuid;
    let mut tasks = Vec::new();
    for c in 0..64 {
        let st = st.clone();
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let mine = st
                .vdi_create(SR, create_params(2 << 20))
                .await
                .unwrap()
                .record
                .uuid;
            let mut made = vec![mine.clone()];
            for i in 0..4 {
                st.vdi_set_name_label(SR, &mine, &format!("c{c}-{i}"))
                    .await
                    .unwrap();
                let s = st
                    .vdi_snapshot(SR, &shared, VdiDerive::default(), c % 2 == 0)
                    .await
                    .unwrap()
                    .record;
                st.vdi_stat(SR, &shared).await.unwrap();
                if i % 2 == 0 {
                    st.vdi_destroy(SR, &s.uuid).await.unwrap();
                } else {
                    made.push(s.uuid);
                }
                let cl = st
                    .vdi_snapshot(SR, &mine, VdiDerive::default(), true)
                    .await
                    .unwrap()
                    .record;
                st.vdi_destroy(SR, &cl.uuid).await.unwrap();
            }
            (c, mine, made)
        }));
    }
    let mut model: BTreeSet<String> = [shared.clone()].into();
    let mut labels = Vec::new();
    for t in tasks {
        let (c, mine, made) = t.await.unwrap();
        labels.push((c, mine));
        model.extend(made);
    }
    let scan: BTreeSet<String> = fixtures::scan_uuids(&st, SR).await.into_iter().collect();
    assert_eq!(scan, model);
    for (c, mine) in labels {
        assert_eq!(
            st.vdi_stat(SR, &mine).await.unwrap().record.name_label,
            format!("c{c}-3")
        );
    }
    assert_consistent(&dir.path().join(SR), &FakeFormat);
    // Everything survives a re-attach identically.
    st.sr_detach(SR).await.unwrap();
    st.sr_attach(SR, &BTreeMap::new()).await.unwrap();
    let again: BTreeSet<String> = fixtures::scan_uuids(&st, SR).await.into_iter().collect();
    assert_eq!(again, model);
}

#[tokio::test]
async fn diagnostics_describe_srs_and_vdis() {
    let Fixture { dir: _dir, st, .. } = Fixture::fake().await;
    let v = st
        .vdi_create(SR, create_params(2 << 20))
        .await
        .unwrap()
        .record;
    let d = st.diagnostics().await;
    assert!(d.contains(SR) && d.contains(&v.uuid), "{d}");
}

#[tokio::test]
async fn handle_maps_xapi_calls_to_the_engine() {
    use interface::{Call, Response};
    let dir = tempfile::tempdir().unwrap();
    let st = engine(dir.path());
    let call = |m: &str, j: serde_json::Value| Call::from_json(m, j).unwrap();
    let r = st
        .handle(call("Query.query", serde_json::json!({})))
        .await
        .unwrap();
    let Response::Query(q) = r else {
        panic!("{r:?}")
    };
    assert!(q.features.contains(&"VDI_SNAPSHOT".to_string()));
    assert!(
        !q.features.iter().any(|f| f == "VDI_ATTACH"),
        "datapath not implemented yet"
    );
    let r = st
        .handle(call(
            "SR.create",
            serde_json::json!({"sr": SR, "name_label": "x"}),
        ))
        .await
        .unwrap();
    let Response::DeviceConfig(dc) = r else {
        panic!("{r:?}")
    };
    assert_eq!(dc["path"], dir.path().join(SR).display().to_string());
    let e = st
        .handle(call("SR.scan", serde_json::json!({"sr": SR})))
        .await
        .unwrap_err();
    assert_eq!(e.name(), "Sr_not_attached");
    st.handle(call("SR.attach", serde_json::json!({"sr": SR})))
        .await
        .unwrap();
    let r = st
        .handle(call(
            "VDI.create",
            serde_json::json!({"sr": SR, "vdi_info": {"name_label": "d", "virtual_size": "3000000"}}),
        ))
        .await
        .unwrap();
    let Response::VdiInfo(v) = r else {
        panic!("{r:?}")
    };
    assert_eq!(v.virtual_size, 4 << 20);
    assert_eq!(v.uuid.as_deref(), Some(v.vdi.as_str()));
    st.handle(call(
        "VDI.set_content_id",
        serde_json::json!({"sr": SR, "vdi": v.vdi, "content_id": "cid"}),
    ))
    .await
    .unwrap();
    let r = st
        .handle(call(
            "VDI.snapshot",
            serde_json::json!({"sr": SR, "vdi_info": {"vdi": v.vdi, "name_label": "s"}}),
        ))
        .await
        .unwrap();
    let Response::VdiInfo(s) = r else {
        panic!("{r:?}")
    };
    assert!(s.is_a_snapshot && s.read_only);
    assert_eq!(s.snapshot_of, v.vdi);
    assert_eq!(s.content_id, "cid");
    let r = st
        .handle(call("SR.scan", serde_json::json!({"sr": SR})))
        .await
        .unwrap();
    let Response::VdiInfos(all) = r else {
        panic!("{r:?}")
    };
    assert_eq!(all.len(), 2);
    let r = st
        .handle(call("SR.stat", serde_json::json!({"sr": SR})))
        .await
        .unwrap();
    let Response::SrInfo(info) = r else {
        panic!("{r:?}")
    };
    assert_eq!(info.name_label, "x");
    assert!(info.total_space > 0);
    let r = st
        .handle(call("SR.list", serde_json::json!({})))
        .await
        .unwrap();
    assert_eq!(r, Response::SrList(vec![interface::SrId::new(SR)]));
    let e = st
        .handle(call(
            "VDI.stat",
            serde_json::json!({"sr": SR, "vdi": "../x"}),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.backend_code(), Some("INVALID_ARGUMENT"));
    let e = st
        .handle(call(
            "VDI.attach2",
            serde_json::json!({"sr": SR, "vdi": v.vdi, "dp": "d", "read_write": true}),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.name(), "Unimplemented");
}
