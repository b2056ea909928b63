//! Connections carrying framed requests and replies (DESIGN.md §3): a hello each way, then
//! pipelined requests whose replies carry the request's id and may come back out of order.
//!
//! Generic over any `AsyncRead + AsyncWrite` byte stream: unix sockets and vchan rings are just
//! streams. A frame over the limit, a body that does not decode, or trailing bytes end that
//! connection with a logged reason.

use crate::error::{Error, Result};
use crate::frame::{self, FrameReader, FrameWriter, MAX_FRAME_DEFAULT};
use futures::stream::{FuturesUnordered, StreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// The native protocol's version. Both sides must speak the same one.
pub const PROTOCOL_VERSION: u32 = 1;

/// Request id carried by the hello frame; requests use ids from 1.
pub const HELLO_ID: u64 = 0;

/// The first frame each way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub protocol_version: u32,
    /// Interfaces the sender serves (server) or wants (client), e.g. `"core"`.
    pub interfaces: Vec<String>,
    /// Free-form name and version of the sender, for logs.
    pub agent: String,
}

impl Hello {
    /// A hello with this crate's [`PROTOCOL_VERSION`].
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(
        interfaces: I,
        agent: impl Into<String>,
    ) -> Self {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            interfaces: interfaces.into_iter().map(Into::into).collect(),
            agent: agent.into(),
        }
    }
}

/// Tunables of a connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnOptions {
    /// Largest frame payload accepted or sent.
    pub max_frame: u32,
    /// Server side: requests handled concurrently on one connection before reading pauses.
    pub max_in_flight: usize,
}

impl Default for ConnOptions {
    fn default() -> Self {
        ConnOptions {
            max_frame: MAX_FRAME_DEFAULT,
            max_in_flight: 1024,
        }
    }
}

async fn exchange_hello<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    ours: &Hello,
) -> Result<Hello>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer.write(HELLO_ID, ours).await?;
    let peer = match reader.read::<Hello>().await? {
        None => return Err(Error::Closed),
        Some(f) if f.id != HELLO_ID => {
            return Err(Error::Protocol(format!(
                "first frame has id {}, expected the hello (id {HELLO_ID})",
                f.id
            )))
        }
        Some(f) => f.body,
    };
    if peer.protocol_version != ours.protocol_version {
        return Err(Error::VersionMismatch {
            peer: peer.protocol_version,
            ours: ours.protocol_version,
        });
    }
    Ok(peer)
}

/// Serve one connection: exchange hellos, then call `handler` for each request, running up to
/// [`ConnOptions::max_in_flight`] of them concurrently and writing each reply as soon as it is
/// ready (so replies may come out of order). Returns `Ok(())` when the peer closes cleanly
/// (after every reply was written), or the reason the connection was dropped.
pub async fn serve_connection<S, Req, Resp, H, F>(stream: S, hello: Hello, handler: H) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    Req: DeserializeOwned,
    Resp: Serialize,
    H: Fn(Req) -> F,
    F: Future<Output = Resp>,
{
    serve_connection_with(stream, hello, ConnOptions::default(), handler).await
}

/// [`serve_connection`] with explicit options.
pub async fn serve_connection_with<S, Req, Resp, H, F>(
    stream: S,
    hello: Hello,
    opts: ConnOptions,
    handler: H,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    Req: DeserializeOwned,
    Resp: Serialize,
    H: Fn(Req) -> F,
    F: Future<Output = Resp>,
{
    let result = async {
        let (rd, wr) = tokio::io::split(stream);
        let mut reader = FrameReader::new(rd, opts.max_frame);
        let mut writer = FrameWriter::new(wr, opts.max_frame);
        let peer = exchange_hello(&mut reader, &mut writer, &hello).await?;
        tracing::debug!(peer = %peer.agent, interfaces = ?peer.interfaces, "hello");

        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(opts.max_in_flight.max(1));
        let max = opts.max_frame;
        let read_loop = async move {
            let mut in_flight = FuturesUnordered::new();
            let mut eof = false;
            loop {
                if eof && in_flight.is_empty() {
                    return Ok::<(), Error>(());
                }
                tokio::select! {
                    biased;
                    Some((id, resp)) = in_flight.next(), if !in_flight.is_empty() => {
                        let bytes = frame::encode(id, &resp, max)?;
                        if tx.send(bytes).await.is_err() {
                            return Err(Error::Closed);
                        }
                    }
                    payload = reader.read_payload(), if !eof && in_flight.len() < opts.max_in_flight => {
                        match payload? {
                            None => eof = true,
                            Some(p) => {
                                let f: frame::Frame<Req> = frame::decode(&p, max)?;
                                if f.id == HELLO_ID {
                                    return Err(Error::Protocol("request with the hello's id 0".into()));
                                }
                                let id = f.id;
                                let fut = handler(f.body);
                                in_flight.push(async move { (id, fut.await) });
                            }
                        }
                    }
                }
            }
        };
        let write_loop = async {
            while let Some(bytes) = rx.recv().await {
                writer.write_encoded(&bytes).await?;
                // Batch: flush only when no other reply is queued.
                while let Ok(more) = rx.try_recv() {
                    writer.write_encoded(&more).await?;
                }
                writer.flush().await?;
            }
            writer.shutdown().await.or(Ok::<(), Error>(()))
        };
        tokio::try_join!(read_loop, write_loop)?;
        Ok(())
    }
    .await;
    match &result {
        Ok(()) => tracing::debug!("connection closed by peer"),
        Err(e) => tracing::warn!(reason = %e, "dropping connection"),
    }
    result
}

type Pending<Resp> = HashMap<u64, oneshot::Sender<Resp>>;

struct Shared<Resp> {
    pending: Mutex<Option<Pending<Resp>>>,
    close_reason: Mutex<Option<String>>,
}

struct Tasks {
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.reader.abort();
        // The writer ends by itself once every sender is gone (it shuts the stream down).
        let _ = &self.writer;
    }
}

/// The client side of a connection: many concurrent [`Client::call`]s share one stream.
/// Cloning shares the connection; it closes when the last clone is dropped.
pub struct Client<Req, Resp> {
    shared: Arc<Shared<Resp>>,
    tx: mpsc::Sender<Vec<u8>>,
    next_id: Arc<AtomicU64>,
    max_frame: u32,
    peer: Arc<Hello>,
    _tasks: Arc<Tasks>,
    _req: PhantomData<fn(Req)>,
}

impl<Req, Resp> Clone for Client<Req, Resp> {
    fn clone(&self) -> Self {
        Client {
            shared: self.shared.clone(),
            tx: self.tx.clone(),
            next_id: self.next_id.clone(),
            max_frame: self.max_frame,
            peer: self.peer.clone(),
            _tasks: self._tasks.clone(),
            _req: PhantomData,
        }
    }
}

impl<Req, Resp> std::fmt::Debug for Client<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl<Req, Resp> Client<Req, Resp>
where
    Req: Serialize,
    Resp: DeserializeOwned + Send + 'static,
{
    /// Exchange hellos over `stream` and start the connection's reader and writer tasks.
    pub async fn handshake<S>(stream: S, hello: Hello) -> Result<Self>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Self::handshake_with(stream, hello, ConnOptions::default()).await
    }

    /// [`Client::handshake`] with explicit options.
    pub async fn handshake_with<S>(stream: S, hello: Hello, opts: ConnOptions) -> Result<Self>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let max = opts.max_frame;
        let mut reader = FrameReader::new(rd, max);
        let mut writer = FrameWriter::new(wr, max);
        let peer = exchange_hello(&mut reader, &mut writer, &hello).await?;
        let shared = Arc::new(Shared::<Resp> {
            pending: Mutex::new(Some(HashMap::new())),
            close_reason: Mutex::new(None),
        });
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(1024);
        let rshared = shared.clone();
        let reader_task = tokio::spawn(async move {
            let reason = loop {
                let f: frame::Frame<Resp> = match reader.read().await {
                    Ok(Some(f)) => f,
                    Ok(None) => break None,
                    Err(e) => break Some(e.to_string()),
                };
                let sender = rshared
                    .pending
                    .lock()
                    .expect("pending lock")
                    .as_mut()
                    .and_then(|p| p.remove(&f.id));
                match sender {
                    // The caller may have given up (dropped its future): nothing to do.
                    Some(s) => drop(s.send(f.body)),
                    None => break Some(format!("reply with unknown id {}", f.id)),
                }
            };
            if let Some(r) = &reason {
                tracing::warn!(reason = %r, "client connection dropped");
            }
            *rshared.close_reason.lock().expect("reason lock") = reason;
            // Fail every outstanding and future call.
            rshared.pending.lock().expect("pending lock").take();
        });
        let writer_task = tokio::spawn(async move {
            while let Some(bytes) = rx.recv().await {
                let mut ok = writer.write_encoded(&bytes).await.is_ok();
                while ok {
                    match rx.try_recv() {
                        Ok(more) => ok = writer.write_encoded(&more).await.is_ok(),
                        Err(_) => break,
                    }
                }
                if !ok || writer.flush().await.is_err() {
                    return;
                }
            }
            let _ = writer.shutdown().await;
        });
        Ok(Client {
            shared,
            tx,
            next_id: Arc::new(AtomicU64::new(1)),
            max_frame: max,
            peer: Arc::new(peer),
            _tasks: Arc::new(Tasks {
                reader: reader_task,
                writer: writer_task,
            }),
            _req: PhantomData,
        })
    }

    /// The server's hello.
    pub fn peer_hello(&self) -> &Hello {
        &self.peer
    }

    /// Send a request and wait for its reply. Many calls may be in flight at once.
    pub async fn call(&self, req: Req) -> Result<Resp> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = frame::encode(id, &req, self.max_frame)?;
        let (otx, orx) = oneshot::channel();
        {
            let mut pending = self.shared.pending.lock().expect("pending lock");
            match pending.as_mut() {
                Some(p) => p.insert(id, otx),
                None => return Err(self.closed()),
            };
        }
        if self.tx.send(bytes).await.is_err() {
            return Err(self.closed());
        }
        orx.await.map_err(|_| self.closed())
    }

    fn closed(&self) -> Error {
        match self
            .shared
            .close_reason
            .lock()
            .expect("reason lock")
            .as_ref()
        {
            Some(r) => Error::Protocol(format!("connection dropped: {r}")),
            None => Error::Closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Req {
        Echo(u64),
        Sleep { ms: u64, tag: u64 },
    }

    async fn handler(r: Req) -> u64 {
        match r {
            Req::Echo(x) => x,
            Req::Sleep { ms, tag } => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                tag
            }
        }
    }

    fn hello() -> Hello {
        Hello::new(["core"], "test")
    }

    #[tokio::test]
    async fn hello_is_exchanged_and_calls_are_answered() {
        let (a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(serve_connection(
            a,
            Hello::new(["core", "x"], "srv"),
            handler,
        ));
        let c = Client::<Req, u64>::handshake(b, hello()).await.unwrap();
        assert_eq!(c.peer_hello().interfaces, vec!["core", "x"]);
        assert_eq!(c.peer_hello().agent, "srv");
        assert_eq!(c.call(Req::Echo(42)).await.unwrap(), 42);
        drop(c);
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn replies_come_back_out_of_order_to_the_right_caller() {
        let (a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(serve_connection(a, hello(), handler));
        let c = Client::<Req, u64>::handshake(b, hello()).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (ms, tag) in [(150u64, 1u64), (10, 2), (80, 3)] {
            let c = c.clone();
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let got = c.call(Req::Sleep { ms, tag }).await.unwrap();
                assert_eq!(got, tag);
                order.lock().unwrap().push(tag);
            }));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![2, 3, 1]);
        drop(c);
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn many_pipelined_calls_each_get_their_reply() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(serve_connection(a, hello(), handler));
        let c = Client::<Req, u64>::handshake(b, hello()).await.unwrap();
        let calls = (0..2000u64).map(|i| {
            let c = c.clone();
            async move { (i, c.call(Req::Echo(i * 3)).await.unwrap()) }
        });
        for (i, r) in futures::future::join_all(calls).await {
            assert_eq!(r, i * 3);
        }
        drop(c);
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn version_mismatch_is_refused_with_both_versions() {
        let (a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(serve_connection(a, hello(), handler));
        let mut old = hello();
        old.protocol_version = 99;
        let err = Client::<Req, u64>::handshake(b, old).await.unwrap_err();
        assert!(
            matches!(err, Error::VersionMismatch { peer: 1, ours: 99 }),
            "{err}"
        );
        let err = server.await.unwrap().unwrap_err();
        assert!(
            matches!(err, Error::VersionMismatch { peer: 99, ours: 1 }),
            "{err}"
        );
    }

    /// A raw peer: sends a hello, then whatever bytes the test wants.
    async fn raw_peer(extra: Vec<u8>) -> (Result<()>, Vec<u8>) {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(serve_connection_with(
            a,
            hello(),
            ConnOptions {
                max_frame: 1024,
                max_in_flight: 8,
            },
            handler,
        ));
        b.write_all(&frame::encode(HELLO_ID, &hello(), 1024).unwrap())
            .await
            .unwrap();
        b.write_all(&extra).await.unwrap();
        b.shutdown().await.unwrap();
        let res = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server must not hang")
            .unwrap();
        let mut out = Vec::new();
        b.read_to_end(&mut out).await.unwrap();
        (res, out)
    }

    #[tokio::test]
    async fn oversized_frame_closes_the_connection_with_a_reason() {
        let (res, _) = raw_peer(5000u32.to_le_bytes().to_vec()).await;
        assert!(matches!(
            res,
            Err(Error::FrameTooLarge {
                len: 5000,
                max: 1024
            })
        ));
    }

    #[tokio::test]
    async fn undecodable_frame_closes_the_connection() {
        let mut bad = 12u32.to_le_bytes().to_vec();
        bad.extend_from_slice(&5u64.to_le_bytes());
        bad.extend_from_slice(&77u32.to_le_bytes()); // no such variant
        let (res, _) = raw_peer(bad).await;
        assert!(matches!(res, Err(Error::Decode(_))), "{res:?}");
    }

    #[tokio::test]
    async fn trailing_bytes_in_a_frame_close_the_connection() {
        let mut f = frame::encode(5, &Req::Echo(1), 1024).unwrap();
        f.push(0);
        let len = (f.len() - 4) as u32;
        f[..4].copy_from_slice(&len.to_le_bytes());
        let (res, _) = raw_peer(f).await;
        assert!(matches!(res, Err(Error::Decode(_))), "{res:?}");
    }

    #[tokio::test]
    async fn truncated_frame_at_eof_is_reported() {
        let f = frame::encode(5, &Req::Echo(1), 1024).unwrap();
        let (res, _) = raw_peer(f[..f.len() - 2].to_vec()).await;
        assert!(matches!(res, Err(Error::Truncated { .. })), "{res:?}");
    }

    #[tokio::test]
    async fn replies_to_requests_before_a_clean_close_are_all_written() {
        let mut bytes = Vec::new();
        for i in 1..=20u64 {
            bytes.extend(frame::encode(i, &Req::Echo(i), 1024).unwrap());
        }
        let (res, out) = raw_peer(bytes).await;
        res.unwrap();
        let mut r = FrameReader::new(&out[..], 1024);
        let h: frame::Frame<Hello> = r.read().await.unwrap().unwrap();
        assert_eq!(h.id, HELLO_ID);
        let mut ids = Vec::new();
        while let Some(f) = r.read::<u64>().await.unwrap() {
            assert_eq!(f.id, f.body);
            ids.push(f.id);
        }
        ids.sort();
        assert_eq!(ids, (1..=20).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn calls_fail_once_the_server_is_gone() {
        let (a, b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let (rd, wr) = tokio::io::split(a);
            let mut r = FrameReader::new(rd, 1024);
            let mut w = FrameWriter::new(wr, 1024);
            exchange_hello(&mut r, &mut w, &hello()).await.unwrap();
            // then hang up
        });
        let c = Client::<Req, u64>::handshake(b, hello()).await.unwrap();
        server.await.unwrap();
        let err = tokio::time::timeout(Duration::from_secs(5), c.call(Req::Echo(1)))
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, Error::Closed), "{err}");
    }
}
