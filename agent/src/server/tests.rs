//! Server tests over a real unix socket with a fake in-memory service (the engine has its own
//! tests; the end-to-end tests in `tests/` drive the real one).

use super::*;
use crate::client::{AgentClient, ClientError};
use interface::{QueryResult, VdiId};
use std::sync::Mutex;
use xs_registry::client::Xs;

/// Answers Query.query, SR.list, and VDI.stat (after sleeping `sleep_ms` = the vdi name as a
/// number, to make slow calls); panics on VDI.destroy.
#[derive(Default)]
struct Fake {
    srs: Mutex<Vec<SrId>>,
}

impl Service for Fake {
    fn handle(&self, call: Call) -> BoxFuture<'_, Reply> {
        Box::pin(async move {
            match call {
                Call::QueryQuery { .. } => Ok(Response::Query(QueryResult {
                    driver: "fake".into(),
                    name: "fake".into(),
                    description: String::new(),
                    vendor: String::new(),
                    copyright: String::new(),
                    version: "0".into(),
                    required_api_version: "5.0".into(),
                    features: vec![],
                    configuration: Default::default(),
                    required_cluster_stack: vec![],
                })),
                Call::SrList { .. } => Ok(Response::SrList(self.srs.lock().unwrap().clone())),
                Call::SrAttach { sr, .. } => {
                    self.srs.lock().unwrap().push(sr);
                    Ok(Response::Unit)
                }
                Call::VdiStat { vdi, .. } => {
                    let ms: u64 = vdi.as_str().parse().unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(Response::VdiInfo(interface::VdiInfo {
                        vdi,
                        ..Default::default()
                    }))
                }
                Call::VdiDestroy { .. } => panic!("fake engine bug"),
                other => Err(StorageError::Unimplemented(other.method().into())),
            }
        })
    }
}

async fn start() -> (
    Server,
    tempfile::TempDir,
    std::path::PathBuf,
    tokio::sync::oneshot::Sender<()>,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/agent.sock");
    let server = Server::new(Arc::new(Fake::default()), 1 << 20, 64);
    let listener = transport::unix::UnixServer::bind(&path, &[transport::unix::Uid::current()])
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(run_unix_listener(server.clone(), listener, async {
        let _ = rx.await;
    }));
    (server, dir, path, tx)
}

fn stat(ms: u64) -> Call {
    Call::VdiStat {
        dbg: "t".into(),
        sr: "sr".into(),
        vdi: VdiId::new(ms.to_string()),
    }
}

#[tokio::test]
async fn calls_over_unix_get_typed_results_and_errors() {
    let (server, _dir, path, _stop) = start().await;
    let c = AgentClient::connect_unix(&path).await.unwrap();
    assert_eq!(c.agent_hello().interfaces, INTERFACES);
    assert_eq!(c.query().await.unwrap().driver, "fake");
    let e = c.sr_scan(&"x".into()).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Storage(StorageError::Unimplemented(m)) if m == "SR.scan"),
        "{e}"
    );
    assert_eq!(server.stats().calls.load(Ordering::Relaxed), 2);
    assert_eq!(server.stats().errors.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_panicking_call_is_an_internal_error_and_the_connection_survives() {
    let (_server, _dir, path, _stop) = start().await;
    let c = AgentClient::connect_unix(&path).await.unwrap();
    let e = c.vdi_destroy(&"sr".into(), &"v".into()).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Storage(StorageError::InternalError(m)) if m.contains("VDI.destroy")),
        "{e}"
    );
    assert_eq!(c.query().await.unwrap().driver, "fake");
}

#[tokio::test]
async fn slow_calls_do_not_block_others_on_the_same_connection() {
    let (_server, _dir, path, _stop) = start().await;
    let c = AgentClient::connect_unix(&path).await.unwrap();
    let slow = {
        let c = c.clone();
        tokio::spawn(async move { c.call(stat(400)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = Instant::now();
    c.call(stat(0)).await.unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    slow.await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_waits_for_in_flight_calls_and_refuses_new_ones() {
    let (server, _dir, path, _stop) = start().await;
    let c = AgentClient::connect_unix(&path).await.unwrap();
    let slow = {
        let c = c.clone();
        tokio::spawn(async move { c.call(stat(300)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = Instant::now();
    let left = server.shutdown(Duration::from_secs(5)).await;
    assert_eq!(left, 0);
    assert!(t0.elapsed() >= Duration::from_millis(200), "did not wait");
    slow.await
        .unwrap()
        .expect("the in-flight call finished normally");
    let e = c.call(stat(0)).await.unwrap_err();
    match e {
        ClientError::Storage(e) => assert_eq!(e.backend_code(), Some(codes::SHUTTING_DOWN)),
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn shutdown_gives_up_after_the_grace_period() {
    let (server, _dir, path, _stop) = start().await;
    let c = AgentClient::connect_unix(&path).await.unwrap();
    let _slow = {
        let c = c.clone();
        tokio::spawn(async move { c.call(stat(5000)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(server.shutdown(Duration::from_millis(100)).await, 1);
}

#[tokio::test]
async fn sr_attach_notifies_the_announcer_side() {
    let (server, _dir, path, _stop) = start().await;
    let c = AgentClient::connect_unix(&path).await.unwrap();
    let waiter = {
        let s = server.clone();
        tokio::spawn(async move { s.srs_changed().await })
    };
    c.sr_attach(&"sr1".into(), Default::default())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .expect("notified")
        .unwrap();
    assert_eq!(server.attached_srs().await, vec![SrId::from("sr1")]);
}

/// Records what it was told to publish, slowly (as a loaded xenstored would).
#[derive(Default)]
struct SlowAnnouncer {
    published: Mutex<Vec<Vec<SrId>>>,
}

impl Announcer for SlowAnnouncer {
    fn ready<'a>(&'a self, _: &'a [SrId]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn srs_changed<'a>(&'a self, srs: &'a [SrId]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.published.lock().unwrap().push(srs.to_vec());
            Ok(())
        })
    }
    fn heartbeat(&self, _: u64) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn stopping(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn deregister(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

#[tokio::test]
async fn sr_attach_replies_only_after_the_announcer_published_the_sr() {
    let (server, _dir, path, _stop) = start().await;
    let announcer = Arc::new(SlowAnnouncer::default());
    tokio::spawn(run_announcer(
        server.clone(),
        announcer.clone(),
        Duration::from_secs(3600),
    ));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let c = AgentClient::connect_unix(&path).await.unwrap();
    for sr in ["sr1", "sr2"] {
        c.sr_attach(&sr.into(), Default::default()).await.unwrap();
        let last = announcer.published.lock().unwrap().last().cloned();
        assert!(
            last.is_some_and(|srs| srs.contains(&SrId::from(sr))),
            "{sr} was not published before SR.attach replied"
        );
    }
}

#[tokio::test]
async fn garbage_on_one_connection_does_not_disturb_another() {
    use tokio::io::AsyncWriteExt;
    let (_server, _dir, path, _stop) = start().await;
    let good = AgentClient::connect_unix(&path).await.unwrap();
    let mut bad = transport::unix::connect(&path).await.unwrap();
    bad.write_all(&[0xff, 0xff, 0xff, 0x7f, 1, 2, 3])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(good.query().await.unwrap().driver, "fake");
}

/// A test xenstored with `doms` introduced, and a dom0 connection to it.
async fn xenstored(doms: &[u16]) -> (tempfile::TempDir, xs_registry::server::Server, Xs) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("xs.sock");
    let srv = xs_registry::server::Server::start(
        &sock,
        xs_registry::server::ServerOptions {
            domains: doms.iter().map(|&d| xs_registry::DomId(d)).collect(),
            ..Default::default()
        },
    )
    .unwrap();
    let xs = Xs::connect(&sock).await.unwrap();
    (dir, srv, xs)
}

/// Serves the fake engine over vchan (in-memory grants, rendezvous in `xs`) as domain
/// `me` for client domain `client`, watching the client's domain when `watch`.
fn vchan_agent(
    xs: &Xs,
    xen: Arc<dyn transport::vchan::Backend>,
    me: u16,
    client: u16,
    watch: bool,
) -> tokio::sync::oneshot::Sender<()> {
    use transport::vchan::{DomId, VchanServer};
    let server = Server::new(Arc::new(Fake::default()), 1 << 20, 64);
    let rz = Arc::new(xs_registry::rendezvous::XsRendezvous::new(xs.clone()));
    let listener =
        VchanServer::new(xen, rz, DomId(me), DomId(client), "ddstor", 4096, 4096).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(run_vchan_listener(
        server,
        listener,
        client,
        watch.then(|| xs.clone()),
        async {
            let _ = rx.await;
        },
    ));
    tx
}

#[tokio::test]
async fn vchan_calls_fail_at_once_when_the_agents_domain_is_destroyed() {
    let (_dir, _xsd, xs) = xenstored(&[7]).await;
    let xen: Arc<dyn transport::vchan::Backend> = Arc::new(transport::vchan::mem::MemXen::new());
    let _stop = vchan_agent(&xs, xen.clone(), 7, 0, false);
    let client =
        AgentClient::connect_vchan(&xs, &*xen, 0, 7, "ddstor", Duration::from_secs(10), None)
            .await
            .unwrap();
    assert_eq!(client.query().await.unwrap().driver, "fake");
    // A call that would take a minute is in flight when the agent's domain is destroyed.
    let c2 = client.clone();
    let slow = tokio::spawn(async move { c2.call(stat(60_000)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = std::time::Instant::now();
    xs.release_domain(xs_registry::DomId(7)).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), slow)
        .await
        .expect("the call ends when the domain goes, not at its end")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, ClientError::PeerDomainGone { domid: 7 }),
        "{err}"
    );
    assert!(err.to_string().contains("domain 7 is gone"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(client.peer_domain_gone());
    let later = client.query().await.unwrap_err();
    assert!(
        matches!(later, ClientError::PeerDomainGone { domid: 7 }),
        "{later}"
    );
}

#[tokio::test]
async fn connecting_over_vchan_to_a_domain_that_does_not_exist_fails_at_once() {
    let (_dir, _xsd, xs) = xenstored(&[3]).await;
    let xen: Arc<dyn transport::vchan::Backend> = Arc::new(transport::vchan::mem::MemXen::new());
    let t0 = std::time::Instant::now();
    let err = AgentClient::connect_vchan(&xs, &*xen, 0, 9, "ddstor", Duration::from_secs(30), None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::NoSuchDomain { domid: 9 }),
        "{err}"
    );
    assert!(err.to_string().contains("domain 9 does not exist"), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    // A domain that exists but serves nothing (yet) is waited for, up to the timeout.
    let t0 = std::time::Instant::now();
    let err =
        AgentClient::connect_vchan(&xs, &*xen, 0, 3, "ddstor", Duration::from_millis(500), None)
            .await
            .unwrap_err();
    assert!(matches!(err, ClientError::Transport(_)), "{err}");
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "gave up early: {:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn the_vchan_listener_drops_a_destroyed_client_domain_and_listens_again() {
    let (_dir, _xsd, xs) = xenstored(&[5]).await;
    let xen: Arc<dyn transport::vchan::Backend> = Arc::new(transport::vchan::mem::MemXen::new());
    let _stop = vchan_agent(&xs, xen.clone(), 0, 5, true);
    let key = "/local/domain/0/data/vchan/5/ddstor/event-channel";
    let client =
        AgentClient::connect_vchan(&xs, &*xen, 5, 0, "ddstor", Duration::from_secs(10), None)
            .await
            .unwrap();
    assert_eq!(client.query().await.unwrap().driver, "fake");
    assert_eq!(
        xs.read_opt(key).await.unwrap(),
        None,
        "the ring is taken: nothing published while the client is connected"
    );
    xs.release_domain(xs_registry::DomId(5)).await.unwrap();
    let t0 = std::time::Instant::now();
    while xs.read_opt(key).await.unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the listener did not publish a new ring after the client's domain went"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The client in the "destroyed" domain (still running here) sees its ring closed.
    let err = tokio::time::timeout(Duration::from_secs(5), client.query())
        .await
        .expect("the dropped connection ends the client's calls")
        .unwrap_err();
    assert!(matches!(err, ClientError::Transport(_)), "{err}");
}

#[tokio::test]
async fn without_a_watch_a_destroyed_client_domain_keeps_the_listener() {
    // The control for the test above: the ring alone cannot tell that a domain died.
    let (_dir, _xsd, xs) = xenstored(&[5]).await;
    let xen: Arc<dyn transport::vchan::Backend> = Arc::new(transport::vchan::mem::MemXen::new());
    let _stop = vchan_agent(&xs, xen.clone(), 0, 5, false);
    let client =
        AgentClient::connect_vchan(&xs, &*xen, 5, 0, "ddstor", Duration::from_secs(10), None)
            .await
            .unwrap();
    assert_eq!(client.query().await.unwrap().driver, "fake");
    xs.release_domain(xs_registry::DomId(5)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let key = "/local/domain/0/data/vchan/5/ddstor/event-channel";
    assert_eq!(xs.read_opt(key).await.unwrap(), None);
    assert_eq!(
        client.query().await.unwrap().driver,
        "fake",
        "still connected"
    );
}
