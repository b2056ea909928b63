//! A hostile vchan peer (another "domain" that writes the shared page directly, through the
//! simulated grant files) never crashes, hangs or overruns the agent's side: the connection is
//! dropped with a reason and the next client is served.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use transport::vchan::mem::Mapping;
use transport::vchan::ring::*;
use transport::vchan::sim::{SimEvtchn, SimXen};
use transport::vchan::{
    Backend, DomId, EventChannel, MemRendezvous, Rendezvous, VchanClient, VchanServer, VchanStream,
};

const S: DomId = DomId(0);
const C: DomId = DomId(3);
const PORT: &str = "hostile";
const LIMIT: Duration = Duration::from_secs(10);

struct Setup {
    _tmp: tempfile::TempDir,
    sim: Arc<SimXen>,
    rz: Arc<MemRendezvous>,
    server: Arc<VchanServer>,
}

fn setup(stall: Option<Duration>) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let sim = Arc::new(SimXen::new(tmp.path()).unwrap());
    let rz = Arc::new(MemRendezvous::new());
    let mut server = VchanServer::new(sim.clone(), rz.clone(), S, C, PORT, 1024, 2048).unwrap();
    if let Some(t) = stall {
        server = server.with_stall_timeout(t);
    }
    Setup {
        _tmp: tmp,
        sim,
        rz,
        server: Arc::new(server),
    }
}

/// A client that plays by hand: maps the ring page and announces itself, nothing more.
struct RawClient {
    page: Mapping,
    ev: SimEvtchn,
}

impl RawClient {
    async fn connect(s: &Setup) -> RawClient {
        let (gref, port) = loop {
            match s.rz.read(S, C, PORT).await {
                Ok(x) => break x,
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let ev = s.sim.bind_interdomain_port(port).unwrap();
        let page = s.sim.map(S, &[gref], true, None).unwrap();
        page.u8_at(CLI_LIVE).store(1, Ordering::SeqCst);
        ev.notify().unwrap();
        RawClient { page, ev }
    }

    /// Write bytes into LEFT (order 10, offset 1024) the honest way.
    fn send(&self, data: &[u8]) {
        let prod = self.page.u32_at(LEFT_PROD).load(Ordering::SeqCst);
        for (i, b) in data.iter().enumerate() {
            let off = 1024 + ((prod as usize + i) & 1023);
            self.page.u8_at(off).store(*b, Ordering::SeqCst);
        }
        self.page
            .u32_at(LEFT_PROD)
            .store(prod.wrapping_add(data.len() as u32), Ordering::SeqCst);
        self.ev.notify().unwrap();
    }
}

async fn accept(s: &Setup) -> tokio::task::JoinHandle<transport::Result<VchanStream>> {
    let srv = s.server.clone();
    tokio::spawn(async move { srv.accept().await })
}

/// After a hostile client was dropped, an honest client is served.
async fn next_client_is_served(s: &Setup) {
    let acc = accept(s).await;
    let mut c = loop {
        match VchanClient::connect(&*s.sim, &*s.rz, S, C, PORT).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let mut srv = tokio::time::timeout(LIMIT, acc)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    c.write_all(b"honest").await.unwrap();
    let mut b = [0u8; 6];
    tokio::time::timeout(LIMIT, srv.read_exact(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&b, b"honest");
}

async fn expect_read_error(srv: &mut VchanStream, what: &str) {
    let mut b = [0u8; 64];
    let err = tokio::time::timeout(LIMIT, srv.read(&mut b))
        .await
        .expect("the agent side must not hang")
        .expect_err("the hostile peer must be refused");
    assert!(
        err.to_string().contains(what),
        "reason {err:?} should mention {what:?}"
    );
    assert!(srv.write(b"x").await.is_err(), "connection stays dropped");
}

#[tokio::test]
async fn producer_index_claiming_more_than_the_ring_drops_the_connection() {
    let s = setup(None);
    let acc = accept(&s).await;
    let h = RawClient::connect(&s).await;
    let mut srv = acc.await.unwrap().unwrap();
    h.page.u32_at(LEFT_PROD).store(1 << 20, Ordering::SeqCst);
    h.ev.notify().unwrap();
    expect_read_error(&mut srv, "claims").await;
    drop(srv);
    next_client_is_served(&s).await;
}

#[tokio::test]
async fn consumer_index_claiming_more_than_the_ring_drops_the_connection() {
    let s = setup(None);
    let acc = accept(&s).await;
    let h = RawClient::connect(&s).await;
    let mut srv = acc.await.unwrap().unwrap();
    h.page
        .u32_at(RIGHT_CONS)
        .store(0x8000_0000, Ordering::SeqCst);
    let err = srv.write(b"data").await.unwrap_err();
    assert!(err.to_string().contains("claims"), "{err}");
    drop(srv);
    next_client_is_served(&s).await;
}

#[tokio::test]
async fn orders_rewritten_outside_10_to_20_drop_the_connection() {
    let s = setup(None);
    let acc = accept(&s).await;
    let h = RawClient::connect(&s).await;
    let mut srv = acc.await.unwrap().unwrap();
    h.page.u16_at(LEFT_ORDER).store(30, Ordering::SeqCst);
    h.send(b"x");
    expect_read_error(&mut srv, "orders changed").await;
    drop(srv);
    next_client_is_served(&s).await;
}

#[tokio::test]
async fn live_byte_flipping_drops_the_connection() {
    let s = setup(None);
    let acc = accept(&s).await;
    let h = RawClient::connect(&s).await;
    let mut srv = acc.await.unwrap().unwrap();
    h.page.u8_at(CLI_LIVE).store(2, Ordering::SeqCst);
    h.ev.notify().unwrap();
    expect_read_error(&mut srv, "live byte").await;
    drop(srv);
    next_client_is_served(&s).await;
}

#[tokio::test]
async fn rewriting_our_own_index_drops_the_connection() {
    let s = setup(None);
    let acc = accept(&s).await;
    let h = RawClient::connect(&s).await;
    let mut srv = acc.await.unwrap().unwrap();
    h.page.u32_at(LEFT_CONS).store(77, Ordering::SeqCst);
    h.ev.notify().unwrap();
    expect_read_error(&mut srv, "consumer index").await;
}

#[tokio::test]
async fn event_flood_neither_hangs_nor_corrupts_the_agent_side() {
    let s = setup(None);
    let acc = accept(&s).await;
    let h = RawClient::connect(&s).await;
    let mut srv = acc.await.unwrap().unwrap();
    let t0 = Instant::now();
    for _ in 0..100_000 {
        h.ev.notify().unwrap();
    }
    h.send(b"after the flood");
    let mut b = [0u8; 15];
    tokio::time::timeout(LIMIT, srv.read_exact(&mut b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&b, b"after the flood");
    assert!(t0.elapsed() < LIMIT);
    drop(srv);
    next_client_is_served(&s).await;
}

#[tokio::test]
async fn peer_that_never_reads_is_dropped_after_the_stall_timeout() {
    let s = setup(Some(Duration::from_millis(300)));
    let acc = accept(&s).await;
    let _c = loop {
        match VchanClient::connect(&*s.sim, &*s.rz, S, C, PORT).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let mut srv = acc.await.unwrap().unwrap();
    let err = tokio::time::timeout(LIMIT, srv.write_all(&vec![1u8; 1 << 20]))
        .await
        .expect("the writer must not hang")
        .unwrap_err();
    assert!(err.to_string().contains("without reading"), "{err}");
    drop(srv);
    next_client_is_served(&s).await;
}

/// A hostile *server* (the agent as client): bad orders, overlapping orders, missing grants.
#[tokio::test]
async fn client_refuses_bad_orders_and_grant_refs_that_do_not_exist() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = SimXen::new(tmp.path()).unwrap();
    let rz = MemRendezvous::new();
    for (l, r, grant, what) in [
        (9u16, 11u16, None, "outside"),
        (10, 21, None, "outside"),
        (10, 10, None, "overlap"),
        (12, 12, Some(999_999u32), "does not exist"),
    ] {
        let ev = sim.bind_unbound(C).unwrap();
        let (refs, page) = sim.share(C, 1, None).unwrap();
        page.u16_at(LEFT_ORDER).store(l, Ordering::SeqCst);
        page.u16_at(RIGHT_ORDER).store(r, Ordering::SeqCst);
        page.u8_at(SRV_LIVE).store(1, Ordering::SeqCst);
        page.u8_at(CLI_LIVE).store(2, Ordering::SeqCst);
        if let Some(g) = grant {
            for i in 0..2 {
                page.u32_at(GRANTS + 4 * i)
                    .store(g + i as u32, Ordering::SeqCst);
            }
        }
        rz.publish(S, C, PORT, refs[0], ev.local_port())
            .await
            .unwrap();
        let err = tokio::time::timeout(LIMIT, VchanClient::connect(&sim, &rz, S, C, PORT))
            .await
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains(what), "{l}/{r}: {err}");
        assert_eq!(
            page.u8_at(CLI_LIVE).load(Ordering::SeqCst),
            2,
            "refused before announcing itself"
        );
    }
}
