//! The registry against the in-process test xenstored: round trips, permissions, lookup
//! choice, liveness, hostile entries, watch, and 100 concurrent agents.

use ddstor_xs_registry::client::Xs;
use ddstor_xs_registry::registry::{
    base_path, AgentState, Registered, Registration, Registry, RegistryEvent,
};
use ddstor_xs_registry::server::{Server, ServerOptions};
use ddstor_xs_registry::store::Perm;
use ddstor_xs_registry::wire::XsErrno;
use ddstor_xs_registry::{DomId, Error};
use futures::StreamExt;
use std::time::Duration;

struct Env {
    server: Server,
    _dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(dir.path().join("xs"), ServerOptions::default()).unwrap();
        Env { server, _dir: dir }
    }

    async fn dom0(&self) -> Xs {
        Xs::connect(self.server.socket_path()).await.unwrap()
    }

    async fn domain(&self, d: u16) -> Xs {
        let p = self.server.introduce_domain(DomId(d)).unwrap();
        Xs::connect(&p).await.unwrap()
    }
}

fn reg(srs: &[&str], load: u32) -> Registration {
    Registration {
        agent: "ddstor 0.1.0".into(),
        interfaces: vec!["core".into(), "disk_differencing".into()],
        vchan_port: "ddstor".into(),
        unix_path: None,
        srs: srs.iter().map(|s| s.to_string()).collect(),
        load,
    }
}

fn errno(e: &Error) -> Option<XsErrno> {
    match e {
        Error::Xs { errno, .. } => Some(*errno),
        _ => None,
    }
}

#[tokio::test]
async fn register_list_deregister_round_trip() {
    let env = Env::new();
    let agent = env.domain(5).await;
    let mut r = reg(&["sr-a", "sr-b"], 2);
    r.unix_path = Some("/run/ddstor.sock".into());
    let me = Registered::register(&agent, &r).await.unwrap();
    assert_eq!(me.domid(), DomId(5));
    let registry = Registry::new(env.dom0().await);
    let list = registry.list().await.unwrap();
    assert_eq!(list.len(), 1);
    let a = &list[0];
    assert_eq!(a.domid, DomId(5));
    assert_eq!(a.state, AgentState::Ready);
    assert!(a.live, "{:?}", a.not_live_because);
    assert_eq!(a.srs, vec!["sr-a", "sr-b"]);
    assert_eq!(a.interfaces, vec!["core", "disk_differencing"]);
    assert_eq!(a.unix_path.as_deref(), Some("/run/ddstor.sock"));
    assert_eq!(a.load, 2);
    me.update_srs(&["sr-b".into(), "sr-c".into()])
        .await
        .unwrap();
    me.set_load(4).await.unwrap();
    let a = registry.list().await.unwrap().remove(0);
    assert_eq!(
        (a.srs, a.load),
        (vec!["sr-b".to_string(), "sr-c".to_string()], 4)
    );
    me.deregister().await.unwrap();
    assert!(registry.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn subtree_is_readable_by_dom0_only_and_agent_stays_in_its_domain() {
    let env = Env::new();
    let agent = env.domain(5).await;
    let other = env.domain(7).await;
    let me = Registered::register(&agent, &reg(&["sr-a"], 0))
        .await
        .unwrap();
    let base = base_path(DomId(5));
    let d0 = env.dom0().await;
    assert_eq!(
        d0.get_perms(&base).await.unwrap(),
        vec![Perm {
            dom: DomId(5),
            bits: 0
        }]
    );
    assert_eq!(d0.read(&format!("{base}/state")).await.unwrap(), "ready");
    for p in [
        format!("{base}/state"),
        format!("{base}/srs/sr-a"),
        base.clone(),
    ] {
        let e = other.read(&p).await.unwrap_err();
        assert_eq!(errno(&e), Some(XsErrno::EACCES), "{p}: {e}");
        let e = other.write(&p, "x").await.unwrap_err();
        assert_eq!(errno(&e), Some(XsErrno::EACCES), "{p}: {e}");
    }
    let e = other.rm(&base).await.unwrap_err();
    assert_eq!(errno(&e), Some(XsErrno::EACCES));
    for p in [
        "/local/domain/7/data/x",
        "/local/domain/0/x",
        "/tool/x",
        "/local/domain/5/name",
    ] {
        let e = agent.write(p, "x").await.unwrap_err();
        assert_eq!(errno(&e), Some(XsErrno::EACCES), "{p}: {e}");
    }
    // Not even the agent may hand its subtree to another domain.
    let e = agent
        .set_perms(
            &base,
            &[Perm {
                dom: DomId(7),
                bits: 0,
            }],
        )
        .await
        .unwrap_err();
    assert_eq!(errno(&e), Some(XsErrno::EPERM));
    me.deregister().await.unwrap();
}

#[tokio::test]
async fn lookup_picks_least_loaded_ready_agent_then_lowest_domid() {
    let env = Env::new();
    let a5 = Registered::register(&env.domain(5).await, &reg(&["sr-a"], 3))
        .await
        .unwrap();
    let a6 = Registered::register(&env.domain(6).await, &reg(&["sr-a", "sr-b"], 1))
        .await
        .unwrap();
    let _a7 = Registered::register(&env.domain(7).await, &reg(&["sr-a"], 1))
        .await
        .unwrap();
    let registry = Registry::new(env.dom0().await);
    let pick = |sr: &'static str| {
        let r = registry.clone();
        async move { r.lookup(sr, None).await.unwrap().map(|a| a.domid.0) }
    };
    assert_eq!(pick("sr-a").await, Some(6));
    a6.set_load(5).await.unwrap();
    assert_eq!(pick("sr-a").await, Some(7));
    assert_eq!(pick("sr-b").await, Some(6));
    assert_eq!(pick("sr-none").await, None);
    a5.set_load(0).await.unwrap();
    assert_eq!(pick("sr-a").await, Some(5));
    // An agent that is still starting or already stopping is not chosen.
    env.dom0()
        .await
        .write(&format!("{}/state", base_path(DomId(5))), "starting")
        .await
        .unwrap();
    assert_eq!(pick("sr-a").await, Some(7));
    assert!(registry.lookup("bad/uuid", None).await.is_err());
}

#[tokio::test]
async fn crashed_agent_drops_out_by_stale_heartbeat_and_gone_domain() {
    let env = Env::new();
    let _a5 = Registered::register(&env.domain(5).await, &reg(&["sr-a"], 0))
        .await
        .unwrap();
    let a6 = Registered::register(&env.domain(6).await, &reg(&["sr-a"], 9))
        .await
        .unwrap();
    let registry = Registry::new(env.dom0().await).with_stale_after(Duration::from_secs(30));
    assert_eq!(
        registry.lookup("sr-a", None).await.unwrap().unwrap().domid,
        DomId(5)
    );
    // dom5's agent crashed an hour ago: its heartbeat stopped.
    let old = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 3600;
    env.dom0()
        .await
        .write(
            &format!("{}/heartbeat", base_path(DomId(5))),
            &old.to_string(),
        )
        .await
        .unwrap();
    assert_eq!(
        registry.lookup("sr-a", None).await.unwrap().unwrap().domid,
        DomId(6)
    );
    let l = registry.list().await.unwrap();
    let r5 = l.iter().find(|r| r.domid == DomId(5)).unwrap();
    assert!(!r5.live);
    assert!(
        r5.not_live_because
            .as_deref()
            .unwrap()
            .contains("heartbeat"),
        "{r5:?}"
    );
    // A heartbeat brings an agent back.
    a6.heartbeat().await.unwrap();
    // dom6 is destroyed: the toolstack removes its tree, the entry goes with it.
    env.server.release_domain(DomId(6)).unwrap();
    assert_eq!(registry.lookup("sr-a", None).await.unwrap(), None);
    assert!(registry
        .list()
        .await
        .unwrap()
        .iter()
        .all(|r| r.domid != DomId(6)));
}

#[tokio::test]
async fn hostile_entries_are_skipped_not_fatal() {
    let env = Env::new();
    let _good = Registered::register(&env.domain(5).await, &reg(&["sr-a"], 5))
        .await
        .unwrap();
    let mut doms = Vec::new();
    for d in 10..16u16 {
        let xs = env.domain(d).await;
        Registered::register(&xs, &reg(&["sr-a"], 0)).await.unwrap();
        doms.push(xs);
    }
    let b = |d: u16| base_path(DomId(d));
    // Non-UTF-8 state, written raw through a transaction.
    let t = doms[0].transaction().await.unwrap();
    t.write(&format!("{}/state", b(10)), b"\xff\xfe")
        .await
        .unwrap();
    t.commit().await.unwrap();
    // Huge value.
    doms[1]
        .write(&format!("{}/agent", b(11)), &"x".repeat(3000))
        .await
        .unwrap();
    // Missing key.
    doms[2].rm(&format!("{}/vchan-port", b(12))).await.unwrap();
    // Malformed load.
    doms[3]
        .write(&format!("{}/load", b(13)), "-1; DROP")
        .await
        .unwrap();
    // Unknown schema.
    doms[4]
        .write(&format!("{}/version", b(14)), "999")
        .await
        .unwrap();
    // Unknown state.
    doms[5]
        .write(&format!("{}/state", b(15)), "ready-ish")
        .await
        .unwrap();
    // Junk in /local/domain itself.
    env.dom0()
        .await
        .write("/local/domain/not-a-domid/data/ddstor/version", "1")
        .await
        .unwrap();
    let registry = Registry::new(env.dom0().await);
    let list = registry.list().await.unwrap();
    assert_eq!(list.iter().map(|r| r.domid.0).collect::<Vec<_>>(), vec![5]);
    assert_eq!(
        registry.lookup("sr-a", None).await.unwrap().unwrap().domid,
        DomId(5)
    );
}

async fn next<S: futures::Stream<Item = RegistryEvent> + Unpin>(w: &mut S) -> RegistryEvent {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("event")
        .unwrap()
}

#[tokio::test]
async fn watch_streams_appear_change_and_leave() {
    let env = Env::new();
    let registry = Registry::new(env.dom0().await);
    let mut w = registry.watch().await.unwrap();
    let a5 = Registered::register(&env.domain(5).await, &reg(&["sr-a"], 0))
        .await
        .unwrap();
    match next(&mut w).await {
        RegistryEvent::Appeared(r) => assert_eq!(r.domid, DomId(5)),
        e => panic!("expected Appeared, got {e:?}"),
    }
    a5.set_load(3).await.unwrap();
    match next(&mut w).await {
        RegistryEvent::Changed(r) => assert_eq!(r.load, 3),
        e => panic!("expected Changed, got {e:?}"),
    }
    let _a6 = Registered::register(&env.domain(6).await, &reg(&["sr-b"], 0))
        .await
        .unwrap();
    match next(&mut w).await {
        RegistryEvent::Appeared(r) => assert_eq!(r.domid, DomId(6)),
        e => panic!("expected Appeared, got {e:?}"),
    }
    a5.deregister().await.unwrap();
    match next(&mut w).await {
        RegistryEvent::Left { domid, .. } => assert_eq!(domid, DomId(5)),
        e => panic!("expected Left, got {e:?}"),
    }
    env.server.release_domain(DomId(6)).unwrap();
    match next(&mut w).await {
        RegistryEvent::Left { domid, .. } => assert_eq!(domid, DomId(6)),
        e => panic!("expected Left, got {e:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_agents_register_concurrently() {
    let env = Env::new();
    let mut conns = Vec::new();
    for d in 100..200u16 {
        conns.push(env.domain(d).await);
    }
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, xs)| {
            tokio::spawn(async move {
                let srs: Vec<String> = (0..10).map(|j| format!("sr-{}", (i + j) % 50)).collect();
                let r = Registration {
                    srs,
                    load: (i % 7) as u32,
                    ..reg(&[], 0)
                };
                Registered::register(&xs, &r).await.map(|_| xs)
            })
        })
        .collect();
    let mut keep = Vec::new();
    for t in tasks {
        keep.push(t.await.unwrap().unwrap());
    }
    let registry = Registry::new(env.dom0().await);
    let list = registry.list().await.unwrap();
    assert_eq!(list.len(), 100);
    assert!(list.iter().all(|r| r.live && r.srs.len() == 10));
    // sr-0 is served by agents i with (i + j) % 50 == 0 for some j < 10; least load wins.
    let pick = registry.lookup("sr-0", None).await.unwrap().unwrap();
    let best = list
        .iter()
        .filter(|r| r.srs.iter().any(|s| s == "sr-0"))
        .min_by_key(|r| (r.load, r.domid))
        .unwrap();
    assert_eq!(pick.domid, best.domid);
}

#[tokio::test]
async fn vchan_rendezvous_is_readable_by_the_client_domain_only() {
    use ddstor_xs_registry::rendezvous::XsRendezvous;
    use transport::vchan::{DomId as TDom, EvtchnPort, GrantRef, Rendezvous};
    let env = Env::new();
    let server = XsRendezvous::new(env.domain(5).await);
    let client = XsRendezvous::new(env.domain(7).await);
    let other = XsRendezvous::new(env.domain(9).await);
    server
        .publish(TDom(5), TDom(7), "ddstor", GrantRef(8), EvtchnPort(10))
        .await
        .unwrap();
    assert_eq!(
        client.read(TDom(5), TDom(7), "ddstor").await.unwrap(),
        (GrantRef(8), EvtchnPort(10))
    );
    assert!(other.read(TDom(5), TDom(7), "ddstor").await.is_err());
    let d0 = env.dom0().await;
    let p = "/local/domain/5/data/vchan/7/ddstor/ring-ref";
    assert_eq!(
        d0.get_perms(p).await.unwrap(),
        vec![
            Perm {
                dom: DomId(5),
                bits: 0
            },
            Perm {
                dom: DomId(7),
                bits: ddstor_xs_registry::store::PERM_READ
            }
        ]
    );
    // A hostile value is an error, not a panic.
    d0.write(p, "not-a-number").await.unwrap();
    assert!(client.read(TDom(5), TDom(7), "ddstor").await.is_err());
    server.remove(TDom(5), TDom(7), "ddstor").await.unwrap();
    assert!(client.read(TDom(5), TDom(7), "ddstor").await.is_err());
    server.remove(TDom(5), TDom(7), "ddstor").await.unwrap();
}
