//! 64 concurrent clients (each its own connection, through the client library) doing mixed
//! calls on shared and private VDIs against `ddstor serve`: no lost update, no deadlock, and
//! the final scan matches a model of what every client did.

use ddstor::client::AgentClient;
use ddstor_e2e::agent::{new_uuid, Agent, AgentOptions};
use interface::{SrId, VdiId, VdiInfo};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

const CLIENTS: usize = 64;
const SHARED: usize = 4;

/// What one client did: VDIs it made and kept, and its label writes to shared VDIs.
#[derive(Default)]
struct Done {
    kept: Vec<(VdiId, String)>,
    shared_labels: Vec<(VdiId, String)>,
    snapshots_of_shared: Vec<(VdiId, VdiId)>,
}

async fn client_work(c: AgentClient, sr: SrId, shared: Arc<Vec<VdiId>>, me: usize) -> Done {
    let mut done = Done::default();
    let mine = c
        .vdi_create(
            &sr,
            VdiInfo {
                name_label: format!("c{me}"),
                virtual_size: 2 << 20,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // A private chain: snapshot, clone, destroy the clone, rename.
    let snap = c
        .vdi_snapshot(
            &sr,
            VdiInfo {
                vdi: mine.vdi.clone(),
                name_label: format!("c{me}-snap"),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let clone = c
        .vdi_clone(
            &sr,
            VdiInfo {
                vdi: mine.vdi.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    c.vdi_destroy(&sr, &clone.vdi).await.unwrap();
    c.vdi_set_name_label(&sr, &mine.vdi, &format!("c{me}-renamed"))
        .await
        .unwrap();
    done.kept.push((mine.vdi.clone(), format!("c{me}-renamed")));
    done.kept.push((snap.vdi.clone(), format!("c{me}-snap")));
    // Shared VDIs: every client renames one and snapshots another (serialised per VDI).
    let a = &shared[me % SHARED];
    let label = format!("by-c{me}");
    c.vdi_set_name_label(&sr, a, &label).await.unwrap();
    done.shared_labels.push((a.clone(), label));
    let b = &shared[(me + 1) % SHARED];
    let s = c
        .vdi_snapshot(
            &sr,
            VdiInfo {
                vdi: b.clone(),
                name_label: format!("shared-snap-c{me}"),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(&s.snapshot_of, b);
    done.snapshots_of_shared.push((b.clone(), s.vdi.clone()));
    // Reads in between.
    c.sr_scan(&sr).await.unwrap();
    let st = c.vdi_stat(&sr, &mine.vdi).await.unwrap();
    assert_eq!(st.name_label, format!("c{me}-renamed"));
    done
}

#[test]
fn sixty_four_clients_mixed_calls_match_the_model() {
    let root = tempfile::tempdir().unwrap();
    let agent = Agent::start(root.path(), &AgentOptions::default());
    let sr = new_uuid();
    agent.ok("SR.create", json!({"sr": sr}));
    agent.ok("SR.attach", json!({"sr": sr}));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let socket = agent.socket.clone();
    let sr_id = SrId::new(sr.clone());
    let result = rt.block_on(async {
        let c0 = AgentClient::connect_unix(&socket).await.unwrap();
        let mut shared = Vec::new();
        for i in 0..SHARED {
            let v = c0
                .vdi_create(
                    &sr_id,
                    VdiInfo {
                        name_label: format!("shared{i}"),
                        virtual_size: 2 << 20,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            shared.push(v.vdi);
        }
        let shared = Arc::new(shared);
        let mut tasks = Vec::new();
        for me in 0..CLIENTS {
            let socket = socket.clone();
            let sr = sr_id.clone();
            let shared = shared.clone();
            tasks.push(tokio::spawn(async move {
                let c = AgentClient::connect_unix(&socket).await.unwrap();
                client_work(c, sr, shared, me).await
            }));
        }
        let all = tokio::time::timeout(Duration::from_secs(240), futures::future::join_all(tasks))
            .await
            .expect("deadlock: 64 clients did not finish in 240 s");
        let done: Vec<Done> = all
            .into_iter()
            .map(|r| r.expect("client panicked"))
            .collect();
        let scan = c0.sr_scan(&sr_id).await.unwrap();
        (shared, done, scan)
    });
    let (shared, done, scan) = result;

    // The model: shared VDIs + every kept private VDI + every snapshot of a shared VDI.
    let mut model: BTreeSet<VdiId> = shared.iter().cloned().collect();
    let mut labels: BTreeMap<VdiId, BTreeSet<String>> = BTreeMap::new();
    for d in &done {
        for (v, l) in &d.kept {
            model.insert(v.clone());
            labels.entry(v.clone()).or_default().insert(l.clone());
        }
        for (v, l) in &d.shared_labels {
            labels.entry(v.clone()).or_default().insert(l.clone());
        }
        for (_, s) in &d.snapshots_of_shared {
            model.insert(s.clone());
        }
    }
    let got: BTreeMap<VdiId, VdiInfo> = scan.into_iter().map(|v| (v.vdi.clone(), v)).collect();
    let got_ids: BTreeSet<VdiId> = got.keys().cloned().collect();
    assert_eq!(got_ids, model, "final scan differs from the model");
    assert_eq!(model.len(), SHARED + CLIENTS * 3);
    // No lost update: every label is one that some client wrote to that VDI.
    for (v, allowed) in &labels {
        let l = &got[v].name_label;
        assert!(
            allowed.contains(l),
            "{v}: label {l:?} was never written ({allowed:?})"
        );
    }
    // Every snapshot of a shared VDI points at it, and the shared VDIs kept their size.
    for d in &done {
        for (of, s) in &d.snapshots_of_shared {
            assert_eq!(&got[s].snapshot_of, of);
            assert!(got[s].is_a_snapshot);
        }
    }
    for v in shared.iter() {
        assert_eq!(got[v].virtual_size, 2 << 20);
    }
    // Every VHD on disk checks clean.
    let sr_dir = agent.data_dir.join(&sr);
    for v in &model {
        let leaf = sr_dir.join(format!("{v}.vhd"));
        let c = vhd::Chain::open(&leaf, &vhd::ChainOptions::new(&sr_dir))
            .unwrap_or_else(|e| panic!("{v}: {e}"));
        for p in c.paths() {
            let r = vhd::check(p).unwrap();
            assert!(r.is_ok(), "{}: {:?}", p.display(), r.problems);
        }
    }
}
