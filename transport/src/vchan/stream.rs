//! [`VchanStream`]: a vchan ring as a tokio byte stream, woken by the event channel's file
//! descriptor (readiness wakes both the reader and the writer, which drain the events; nothing
//! polls while idle). [`VchanServer`] and [`VchanClient`] set rings up through a [`Rendezvous`].

use super::ring::{choose_orders, Live, Ring};
use super::sim::SimXen;
use super::{Backend, DomId, EventChannel, Rendezvous};
use crate::error::{Error, Result};
use futures::task::AtomicWaker;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Which backend to use, chosen at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// Real Xen: `/dev/xen/{gntalloc,gntdev,evtchn}`.
    Xen,
    /// Simulated Xen under `$XEN_SIM_DIR`.
    Sim,
}

impl FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "xen" => Ok(BackendKind::Xen),
            "sim" => Ok(BackendKind::Sim),
            other => Err(Error::Vchan(format!(
                "unknown vchan backend {other:?}: use \"xen\" or \"sim\""
            ))),
        }
    }
}

/// Open a backend of the given kind (`Sim` reads `$XEN_SIM_DIR`).
pub fn open_backend(kind: BackendKind) -> Result<Arc<dyn Backend>> {
    Ok(match kind {
        BackendKind::Xen => Arc::new(super::xen::XenBackend::open()?),
        BackendKind::Sim => Arc::new(SimXen::from_env()?),
    })
}

struct Wakers {
    read: AtomicWaker,
    write: AtomicWaker,
    events: AtomicU64,
    /// Set by [`PeerGone::signal`]: the peer's domain died.
    peer_domain_gone: AtomicBool,
}

/// Tells a [`VchanStream`] that the peer's *domain* is gone (destroyed or crashed). A process
/// that dies has the kernel clear its live byte and signal for it (the unmap notification), but
/// a destroyed domain's kernel never runs again: Xen closes its end of the event channel without
/// an event and the live byte keeps its last value, so the ring alone cannot tell. Whoever
/// watches the domain (e.g. xenstore's `@releaseDomain` and the domain's tree gone) calls
/// [`PeerGone::signal`]; readers then see end-of-file and writers `BrokenPipe`.
#[derive(Clone)]
pub struct PeerGone(Arc<Wakers>);

impl std::fmt::Debug for PeerGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerGone")
            .field("signalled", &self.0.peer_domain_gone.load(Ordering::SeqCst))
            .finish()
    }
}

impl PeerGone {
    /// Mark the peer's domain gone and wake the stream's reader and writer.
    pub fn signal(&self) {
        self.0.peer_domain_gone.store(true, Ordering::SeqCst);
        self.0.read.wake();
        self.0.write.wake();
    }
}

/// Keeps the event channel (and so its descriptor) alive as long as tokio watches it.
struct EvFd(Arc<dyn EventChannel>);
impl AsRawFd for EvFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.fd()
    }
}

/// One end of a vchan as a byte stream. Dropping it closes the vchan (the peer sees its live
/// byte cleared and an event).
pub struct VchanStream {
    ring: Ring,
    event: Arc<dyn EventChannel>,
    wakers: Arc<Wakers>,
    afd: AsyncFd<EvFd>,
    both: Waker,
    failed: Option<String>,
    stall_timeout: Option<Duration>,
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl futures::task::ArcWake for Wakers {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.read.wake();
        arc_self.write.wake();
    }
}

impl std::fmt::Debug for VchanStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VchanStream")
            .field("server", &self.ring.is_server())
            .field("orders", &self.ring.orders())
            .field("port", &self.event.local_port())
            .field("failed", &self.failed)
            .finish()
    }
}

impl VchanStream {
    /// Wrap a set-up ring and its event channel. Must run inside a tokio runtime.
    pub fn new(ring: Ring, event: Arc<dyn EventChannel>) -> Result<VchanStream> {
        let wakers = Arc::new(Wakers {
            read: AtomicWaker::new(),
            write: AtomicWaker::new(),
            events: AtomicU64::new(0),
            peer_domain_gone: AtomicBool::new(false),
        });
        // SAFETY: `EvFd` owns an `Arc` of the event channel, whose descriptor stays open and
        // unchanged until the channel is dropped, which cannot happen before the `AsyncFd`.
        let afd = unsafe {
            AsyncFd::register_with_interest(EvFd(event.clone()), tokio::io::Interest::READABLE)
        }
        .map_err(|e| Error::io("registering the event channel with tokio", e.into()))?;
        let both = futures::task::waker(wakers.clone());
        Ok(VchanStream {
            ring,
            event,
            wakers,
            afd,
            both,
            failed: None,
            stall_timeout: None,
            stall: None,
        })
    }

    /// Drop the connection when the peer leaves our outgoing ring full for this long (a peer
    /// that never reads). `None` (the default) waits for ever.
    pub fn set_stall_timeout(&mut self, timeout: Option<Duration>) {
        self.stall_timeout = timeout;
        self.stall = None;
    }

    /// Consume pending events and arm the descriptor so the next event wakes both the reader
    /// and the writer (whichever registered). Call after registering a waker, before looking
    /// at the ring.
    fn poll_events(&mut self) -> Result<()> {
        let mut cx = Context::from_waker(&self.both);
        loop {
            match self.afd.poll_read_ready(&mut cx) {
                Poll::Ready(Ok(mut guard)) => {
                    let n = self.event.drain()?;
                    self.wakers.events.fetch_add(n, Ordering::Relaxed);
                    guard.clear_ready();
                }
                Poll::Ready(Err(e)) => return Err(Error::io("polling the event channel", e)),
                Poll::Pending => return Ok(()),
            }
        }
    }

    /// A handle to tell this stream its peer's domain died (see [`PeerGone`]).
    pub fn peer_gone_handle(&self) -> PeerGone {
        PeerGone(self.wakers.clone())
    }

    /// The peer is gone: its live byte says so, or its domain was reported dead.
    fn peer_gone(&mut self) -> Result<bool> {
        if self.wakers.peer_domain_gone.load(Ordering::SeqCst) {
            return Ok(true);
        }
        Ok(self.ring.peer_live()? == Live::Gone)
    }

    /// Events received so far (diagnostics).
    pub fn events_received(&self) -> u64 {
        self.wakers.events.load(Ordering::Relaxed)
    }

    /// (left, right) ring orders.
    pub fn orders(&self) -> (u8, u8) {
        self.ring.orders()
    }

    /// The ring (tests, diagnostics).
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    fn fail(&mut self, e: Error) -> io::Error {
        let reason = e.to_string();
        tracing::warn!(reason = %reason, "dropping vchan connection");
        self.failed = Some(reason.clone());
        self.close_ring();
        io::Error::new(io::ErrorKind::InvalidData, reason)
    }

    fn close_ring(&mut self) {
        if !self.ring.is_closed() {
            self.ring.close();
            let _ = self.event.notify();
        }
    }

    fn kick(&mut self, kick: bool) -> io::Result<()> {
        if kick {
            if let Err(e) = self.event.notify() {
                return Err(self.fail(e));
            }
        }
        Ok(())
    }

    /// Server side: wait until the client has connected (its live byte becomes 1).
    pub async fn wait_connected(&mut self) -> Result<()> {
        std::future::poll_fn(|cx| {
            self.wakers.read.register(cx.waker());
            if let Err(e) = self.poll_events() {
                return Poll::Ready(Err(e));
            }
            match self.ring.peer_live() {
                Ok(Live::Connected) => Poll::Ready(Ok(())),
                Ok(Live::Waiting) => Poll::Pending,
                Ok(Live::Gone) => {
                    Poll::Ready(Err(Error::Vchan("client left before connecting".into())))
                }
                Err(e) => Poll::Ready(Err(e)),
            }
        })
        .await
    }
}

impl AsyncRead for VchanStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(r) = &this.failed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, r.clone())));
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        this.wakers.read.register(cx.waker());
        if let Err(e) = this.poll_events() {
            return Poll::Ready(Err(this.fail(e)));
        }
        for attempt in 0..2 {
            match this.ring.recv(buf.initialize_unfilled()) {
                Ok((0, _)) => {}
                Ok((n, kick)) => {
                    buf.advance(n);
                    return Poll::Ready(this.kick(kick));
                }
                Err(e) => return Poll::Ready(Err(this.fail(e))),
            }
            if attempt == 1 {
                break;
            }
            match this.peer_gone() {
                // Gone: read once more (data written just before the close), then EOF.
                Ok(true) => continue,
                Ok(false) => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(this.fail(e))),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for VchanStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(r) = &this.failed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, r.clone())));
        }
        if this.ring.is_closed() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "vchan closed by this side",
            )));
        }
        this.wakers.write.register(cx.waker());
        if let Err(e) = this.poll_events() {
            return Poll::Ready(Err(this.fail(e)));
        }
        match this.peer_gone() {
            Ok(true) => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "vchan peer has gone",
                )))
            }
            Ok(false) => {}
            Err(e) => return Poll::Ready(Err(this.fail(e))),
        }
        match this.ring.send(buf) {
            Ok((0, _)) if !buf.is_empty() => {
                if let Some(t) = this.stall_timeout {
                    let sleep = this
                        .stall
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(t)));
                    if sleep.as_mut().poll(cx).is_ready() {
                        let e = Error::HostilePeer(format!(
                            "peer left the ring full for {t:?} without reading"
                        ));
                        return Poll::Ready(Err(this.fail(e)));
                    }
                }
                Poll::Pending
            }
            Ok((n, kick)) => {
                this.stall = None;
                Poll::Ready(this.kick(kick).map(|()| n))
            }
            Err(e) => Poll::Ready(Err(this.fail(e))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Bytes are in the shared ring as soon as poll_write returns.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().close_ring();
        Poll::Ready(Ok(()))
    }
}

impl Drop for VchanStream {
    fn drop(&mut self) {
        self.close_ring();
    }
}

/// Listens for one client domain on one port: each [`VchanServer::accept`] shares a fresh
/// ring, publishes it, and waits for the client; call it again after a client leaves.
pub struct VchanServer {
    backend: Arc<dyn Backend>,
    rendezvous: Arc<dyn Rendezvous>,
    server: DomId,
    client: DomId,
    port: String,
    orders: (u8, u8),
    stall_timeout: Option<Duration>,
}

impl std::fmt::Debug for VchanServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VchanServer")
            .field("backend", &self.backend.name())
            .field("server", &self.server)
            .field("client", &self.client)
            .field("port", &self.port)
            .field("orders", &self.orders)
            .finish()
    }
}

impl VchanServer {
    /// A server in domain `server` for `client` on `port`, with rings of at least `read_min`
    /// bytes (client → server, LEFT) and `write_min` bytes (server → client, RIGHT).
    pub fn new(
        backend: Arc<dyn Backend>,
        rendezvous: Arc<dyn Rendezvous>,
        server: DomId,
        client: DomId,
        port: impl Into<String>,
        read_min: usize,
        write_min: usize,
    ) -> Result<VchanServer> {
        Ok(VchanServer {
            backend,
            rendezvous,
            server,
            client,
            port: port.into(),
            orders: choose_orders(read_min, write_min)?,
            stall_timeout: None,
        })
    }

    /// Streams accepted from now on drop a client that leaves the ring full this long
    /// (see [`VchanStream::set_stall_timeout`]).
    pub fn with_stall_timeout(mut self, timeout: Duration) -> VchanServer {
        self.stall_timeout = Some(timeout);
        self
    }

    /// Use exactly these (left, right) orders (10–20; equal orders must be ≥ 12).
    pub fn with_orders(mut self, left: u8, right: u8) -> Result<VchanServer> {
        super::ring::validate_orders(left.into(), right.into())?;
        self.orders = (left, right);
        Ok(self)
    }

    /// Share a ring, publish it, and wait for the client to connect.
    pub async fn accept(&self) -> Result<VchanStream> {
        let event = self.backend.bind_unbound(self.client)?;
        let (ring, gref) = Ring::server_init(
            &*self.backend,
            self.client,
            event.clone(),
            self.orders.0,
            self.orders.1,
        )?;
        let mut stream = VchanStream::new(ring, event.clone())?;
        stream.set_stall_timeout(self.stall_timeout);
        self.rendezvous
            .publish(
                self.server,
                self.client,
                &self.port,
                gref,
                event.local_port(),
            )
            .await?;
        tracing::debug!(server = %self.server, client = %self.client, port = %self.port,
            ring_ref = %gref, evtchn = %event.local_port(), "vchan published");
        let connected = stream.wait_connected().await;
        if let Err(e) = self
            .rendezvous
            .remove(self.server, self.client, &self.port)
            .await
        {
            tracing::warn!(error = %e, "could not remove the vchan rendezvous keys");
        }
        connected?;
        tracing::info!(client = %self.client, port = %self.port, orders = ?self.orders, "vchan client connected");
        Ok(stream)
    }
}

/// Connects to a [`VchanServer`] (or libxenvchan server).
#[derive(Debug, Clone, Copy)]
pub struct VchanClient;

impl VchanClient {
    /// Read the rendezvous, bind the event channel, map the ring and announce ourselves.
    pub async fn connect(
        backend: &dyn Backend,
        rendezvous: &dyn Rendezvous,
        server: DomId,
        client: DomId,
        port: &str,
    ) -> Result<VchanStream> {
        let (gref, remote) = rendezvous.read(server, client, port).await?;
        let event = backend.bind_interdomain(server, remote)?;
        let ring = Ring::client_init(backend, server, gref, event.clone())?;
        let stream = VchanStream::new(ring, event.clone())?;
        event.notify()?;
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::super::mem::MemXen;
    use super::super::MemRendezvous;
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn connected(
        backend: Arc<dyn Backend>,
        orders: (u8, u8),
    ) -> (VchanServer, VchanStream, VchanStream) {
        let rz = Arc::new(MemRendezvous::new());
        let srv = VchanServer::new(backend.clone(), rz.clone(), DomId(0), DomId(7), "p", 1, 1)
            .unwrap()
            .with_orders(orders.0, orders.1)
            .unwrap();
        let (s, c) = tokio::join!(srv.accept(), async {
            loop {
                match VchanClient::connect(&*backend, &*rz, DomId(0), DomId(7), "p").await {
                    Ok(c) => break c,
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        });
        (srv, s.unwrap(), c)
    }

    async fn bulk(backend: Arc<dyn Backend>, orders: (u8, u8), len: usize) {
        let (_srv, mut s, mut c) = connected(backend, orders).await;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        let d2 = data.clone();
        let w = tokio::spawn(async move {
            c.write_all(&d2).await.unwrap();
            let mut back = Vec::new();
            c.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = vec![0u8; len];
        s.read_exact(&mut got).await.unwrap();
        assert!(got == data, "server received the client's bytes");
        s.write_all(&got).await.unwrap();
        s.shutdown().await.unwrap();
        drop(s);
        let back = tokio::time::timeout(Duration::from_secs(20), w)
            .await
            .unwrap()
            .unwrap();
        assert!(back == data, "client received the echo, then EOF");
    }

    #[tokio::test]
    async fn mem_backend_moves_bytes_both_ways_in_page_rings() {
        let xen = MemXen::new();
        bulk(Arc::new(xen.clone()), (10, 11), 300_000).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(xen.live_grants(), 0);
        assert_eq!(xen.live_ports(), 0);
    }

    #[tokio::test]
    async fn mem_backend_moves_bytes_both_ways_multi_page_rings() {
        bulk(Arc::new(MemXen::new()), (14, 16), 1 << 20).await;
    }

    #[tokio::test]
    async fn sim_backend_moves_bytes_both_ways() {
        let tmp = tempfile::tempdir().unwrap();
        bulk(
            Arc::new(SimXen::new(tmp.path()).unwrap()),
            (11, 13),
            1 << 20,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            0,
            "sim dir cleaned up"
        );
    }

    #[tokio::test]
    async fn server_sees_eof_when_client_leaves_and_accepts_the_next_client() {
        let xen: Arc<dyn Backend> = Arc::new(MemXen::new());
        let (srv, mut s, c) = connected(xen.clone(), (10, 11)).await;
        drop(c);
        let mut b = [0u8; 4];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0, "EOF after the client left");
        drop(s);
        // Listen again: a second client.
        let rz = MemRendezvous::new();
        let srv2 = VchanServer::new(
            xen.clone(),
            Arc::new(rz.clone()),
            DomId(0),
            DomId(7),
            "p",
            1,
            1,
        )
        .unwrap();
        drop(srv);
        let (s2, c2) = tokio::join!(srv2.accept(), async {
            loop {
                if let Ok(c) = VchanClient::connect(&*xen, &rz, DomId(0), DomId(7), "p").await {
                    break c;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let (mut s2, mut c2) = (s2.unwrap(), c2);
        c2.write_all(b"again").await.unwrap();
        let mut b = [0u8; 5];
        s2.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"again");
        assert!(rz.is_empty(), "rendezvous removed once connected");
    }

    #[tokio::test]
    async fn a_dead_peer_domain_reported_ends_reads_and_writes() {
        // The peer's domain is destroyed: no live-byte change, no event. Only the report of
        // its death (PeerGone) ends the stream: a blocked reader gets EOF, a writer BrokenPipe.
        let (_srv, mut s, c) = connected(Arc::new(MemXen::new()), (10, 11)).await;
        let gone = s.peer_gone_handle();
        let reader = tokio::spawn(async move {
            let mut b = [0u8; 8];
            let n = s.read(&mut b).await.unwrap();
            (s, n)
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !reader.is_finished(),
            "nothing ends the read before the report"
        );
        gone.signal();
        let (mut s, n) = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the report wakes the blocked reader")
            .unwrap();
        assert_eq!(n, 0, "end-of-file once the peer's domain is gone");
        let err = s.write(b"x").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        drop(c);
    }

    #[tokio::test]
    async fn hostile_index_fails_the_stream_with_a_reason() {
        let (_srv, mut s, _c) = connected(Arc::new(MemXen::new()), (10, 11)).await;
        s.ring()
            .page()
            .u32_at(super::super::ring::LEFT_PROD)
            .store(1 << 30, Ordering::SeqCst);
        let mut b = [0u8; 8];
        let err = s.read(&mut b).await.unwrap_err();
        assert!(err.to_string().contains("claims"), "{err}");
        assert!(s.write(b"x").await.is_err(), "connection stays dropped");
    }

    #[tokio::test]
    async fn rpc_runs_over_a_vchan() {
        let (_srv, s, c) = connected(Arc::new(MemXen::new()), (10, 11)).await;
        let server = tokio::spawn(crate::rpc::serve_connection(
            s,
            crate::Hello::new(["core"], "srv"),
            |x: u64| async move { x + 1 },
        ));
        let client = crate::Client::<u64, u64>::handshake(c, crate::Hello::new(["core"], "cli"))
            .await
            .unwrap();
        let calls = (0..500u64).map(|i| {
            let client = client.clone();
            async move { assert_eq!(client.call(i).await.unwrap(), i + 1) }
        });
        futures::future::join_all(calls).await;
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
