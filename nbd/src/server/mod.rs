//! The NBD server: listeners and connections. A connection is the handshake
//! (`handshake.rs`: fixed newstyle, options until an export is chosen), then the transmission
//! phase (`transmission.rs`: requests and out-of-order replies). Tuning comes in
//! [`ServerOptions`].

mod handshake;
mod listener;
mod transmission;

pub use listener::{ListenerState, ListenerStatus};

use crate::export::{Export, Exports};
use crate::proto::{self, ReplyStyle};
use crate::splice::FilledPipe;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

/// Time a client has to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// Read buffer of a connection: requests headers arrive many per read (512 compact ones fit);
/// a write payload bigger than what is left of it is read straight into its own buffer. It is
/// what an idle connection costs, so it is small (it was 256 KiB, with as much again to
/// write: thousands of connections then held gigabytes; issue 19).
const READ_BUFFER: usize = 16 << 10;
/// Write buffer of the handshake (option replies are small). Replies of the transmission
/// phase are written from their own buffers, with no buffer of the connection's.
const HANDSHAKE_WRITE_BUFFER: usize = 4 << 10;

/// Tuning of an [`NbdServer`] (the agent fills it from its `[nbd]` configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerOptions {
    /// Largest read (bytes) answered on the connection's own task when its data is cached
    /// ([`crate::BlockBackend::try_read_at`]); bigger and uncached reads go to the blocking
    /// pool, where big copies run in parallel. 0 = never inline. Default 64 KiB.
    pub inline_read_max: u64,
    /// Smallest read (bytes) sent zero-copy (spliced from the page cache through a pipe; see
    /// [`crate::splice`]) when the connection is a socket; below it, copying costs less than
    /// the pipe's system calls. 0 = never. Default 32 KiB.
    pub zero_copy_min: u64,
    /// Most connections open at once on one listener; one more is accepted and closed at once
    /// (see `listener.rs`). At least 1. Default 1024.
    pub max_connections: usize,
}

impl ServerOptions {
    /// Default of [`ServerOptions::inline_read_max`].
    pub const INLINE_READ_MAX: u64 = 64 << 10;
    /// Default of [`ServerOptions::zero_copy_min`].
    pub const ZERO_COPY_MIN: u64 = 32 << 10;
    /// Default of [`ServerOptions::max_connections`]: far more than a driver domain's guests
    /// open (a few per disk), few enough that their buffers cannot exhaust its memory.
    pub const MAX_CONNECTIONS: usize = 1024;
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            inline_read_max: Self::INLINE_READ_MAX,
            zero_copy_min: Self::ZERO_COPY_MIN,
            max_connections: Self::MAX_CONNECTIONS,
        }
    }
}

/// Socket buffer size asked for on every connection: a 2 MiB read reply (or several 256 KiB
/// ones) leaves in one write instead of a dozen wake-ups at the default ~200 KiB.
const SOCKET_BUFFER: usize = 4 << 20;

/// Enlarges a connection's send and receive buffers (best effort: the kernel caps them at
/// `net.core.wmem_max`/`rmem_max`).
fn big_buffers(s: socket2::SockRef<'_>) {
    if let Err(e) = s
        .set_send_buffer_size(SOCKET_BUFFER)
        .and_then(|()| s.set_recv_buffer_size(SOCKET_BUFFER))
    {
        tracing::debug!(error = %e, "could not enlarge the NBD socket buffers");
    }
}

/// The write side of an NBD connection: any byte stream; a socket also offers
/// [`NbdSink::socket`], through which read replies are spliced without copying.
pub trait NbdSink: AsyncWrite + Unpin + Send + 'static {
    /// The socket under this stream, if it is one (the default: not).
    fn socket(&self) -> Option<&dyn SpliceSocket> {
        None
    }
}

/// A non-blocking socket that replies can be spliced into from a pipe.
pub trait SpliceSocket: Send + Sync {
    /// Ready when the socket may take more bytes.
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>>;
    /// Moves what the socket takes now from `pipe`; `WouldBlock` (readiness cleared) if none.
    fn try_splice(&self, pipe: &mut FilledPipe) -> std::io::Result<usize>;
}

impl SpliceSocket for tokio::net::UnixStream {
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_write_ready(cx)
    }
    fn try_splice(&self, pipe: &mut FilledPipe) -> std::io::Result<usize> {
        self.try_io(tokio::io::Interest::WRITABLE, || {
            pipe.splice_to(self.as_raw_fd())
        })
    }
}

impl SpliceSocket for tokio::net::TcpStream {
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_write_ready(cx)
    }
    fn try_splice(&self, pipe: &mut FilledPipe) -> std::io::Result<usize> {
        self.try_io(tokio::io::Interest::WRITABLE, || {
            pipe.splice_to(self.as_raw_fd())
        })
    }
}

impl NbdSink for tokio::net::unix::OwnedWriteHalf {
    fn socket(&self) -> Option<&dyn SpliceSocket> {
        Some(self.as_ref())
    }
}

impl NbdSink for tokio::net::tcp::OwnedWriteHalf {
    fn socket(&self) -> Option<&dyn SpliceSocket> {
        Some(self.as_ref())
    }
}

impl NbdSink for tokio::io::DuplexStream {}

impl<T: AsyncRead + AsyncWrite + Send + 'static> NbdSink for tokio::io::WriteHalf<T> {}

/// An NBD server offering a run-time set of exports on any number of listeners.
#[derive(Clone, Default)]
pub struct NbdServer {
    exports: Exports,
    options: ServerOptions,
    /// Every listener served, by name (one re-listening replaces the stopped one).
    listeners: Arc<std::sync::Mutex<Vec<Arc<listener::Listener>>>>,
}

impl NbdServer {
    /// A server offering `exports` (which may change while it runs), with default options.
    pub fn new(exports: Exports) -> Self {
        Self::with_options(exports, ServerOptions::default())
    }

    /// A server offering `exports`, tuned by `options`.
    pub fn with_options(exports: Exports, options: ServerOptions) -> Self {
        NbdServer {
            exports,
            options,
            listeners: Default::default(),
        }
    }

    /// Its options.
    pub fn options(&self) -> &ServerOptions {
        &self.options
    }

    /// The exports offered.
    pub fn exports(&self) -> &Exports {
        &self.exports
    }

    /// Every listener served so far (stopped ones included), in the order they started.
    pub fn listeners(&self) -> Vec<ListenerStatus> {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|l| l.status())
            .collect()
    }

    /// Registers a listener named `name`, replacing an earlier one of that name.
    fn register(&self, name: String) -> Arc<listener::Listener> {
        let l = listener::Listener::new(name, self.options.max_connections);
        let mut all = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|o| o.name() != l.name());
        all.push(l.clone());
        l
    }

    /// Accepts connections on `listener`, serving each in its own task, until the listening
    /// socket fails for good (transient accept errors are retried; see `listener.rs`). Its
    /// status is listed by [`Self::listeners`] as `unix <path>`.
    pub async fn serve_unix(&self, listener: tokio::net::UnixListener) -> std::io::Result<()> {
        let path = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
            .unwrap_or_else(|| "(unnamed)".into());
        let l = self.register(format!("unix {path}"));
        listener::run(
            l,
            |cx| listener.poll_accept(cx).map_ok(|(s, _)| s),
            |stream: tokio::net::UnixStream, slot| {
                big_buffers(socket2::SockRef::from(&stream));
                let (exports, options) = (self.exports.clone(), self.options);
                tokio::spawn(async move {
                    let _slot = slot;
                    let (r, w) = stream.into_split();
                    if let Err(e) = serve_connection(r, w, exports, &options).await {
                        tracing::info!(error = %e, "NBD connection ended");
                    }
                });
            },
        )
        .await
    }

    /// Accepts connections on a TCP `listener` (loopback use), like [`Self::serve_unix`];
    /// listed as `tcp <address>`.
    pub async fn serve_tcp(&self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "(unbound)".into());
        let l = self.register(format!("tcp {addr}"));
        listener::run(
            l,
            |cx| listener.poll_accept(cx),
            |(stream, peer): (tokio::net::TcpStream, std::net::SocketAddr), slot| {
                let _ = stream.set_nodelay(true);
                big_buffers(socket2::SockRef::from(&stream));
                let (exports, options) = (self.exports.clone(), self.options);
                tokio::spawn(async move {
                    let _slot = slot;
                    let (r, w) = stream.into_split();
                    if let Err(e) = serve_connection(r, w, exports, &options).await {
                        tracing::info!(%peer, error = %e, "NBD connection ended");
                    }
                });
            },
        )
        .await
    }
}

/// Why a connection ended other than by a clean `NBD_CMD_DISC` / `NBD_OPT_ABORT`.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The socket failed or the client went away mid-message.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol in a way that cannot be answered (bad magic, …).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The client did not finish the handshake in time.
    #[error("handshake timed out")]
    Timeout,
}

/// What the handshake agreed on.
struct Session {
    export: Arc<Export>,
    style: ReplyStyle,
    base_allocation: bool,
}

/// Serves one client connection (handshake, then transmission) until it ends.
/// `Ok(())` means the client left cleanly (abort, disconnect command or EOF between requests).
pub async fn serve_connection<R, W>(
    r: R,
    w: W,
    exports: Exports,
    options: &ServerOptions,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: NbdSink,
{
    let mut r = BufReader::with_capacity(READ_BUFFER, r);
    let mut w = BufWriter::with_capacity(HANDSHAKE_WRITE_BUFFER, w);
    let session = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake::handshake(&mut r, &mut w, &exports),
    )
    .await
    {
        Err(_) => return Err(ConnError::Timeout),
        Ok(res) => res?,
    };
    let Some(session) = session else {
        return Ok(());
    };
    tracing::debug!(export = session.export.name(), style = ?session.style, "NBD transmission");
    w.flush().await?;
    transmission::transmission(r, w.into_inner(), session, options).await
}

/// Serves one connection whose handshake happened elsewhere — the kernel's nbd driver, handed
/// the other end of a socketpair with `NBD_SET_SOCK`: transmission only, simple replies, no
/// metadata context.
pub async fn serve_negotiated<R, W>(
    r: R,
    w: W,
    export: Arc<Export>,
    options: &ServerOptions,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: NbdSink,
{
    let r = BufReader::with_capacity(READ_BUFFER, r);
    let session = Session {
        export,
        style: ReplyStyle::Simple,
        base_allocation: false,
    };
    transmission::transmission(r, w, session, options).await
}

/// The transmission flags a kernel nbd device is given (`NBD_SET_FLAGS`) for `export`.
pub fn kernel_transmission_flags(export: &Export) -> u16 {
    transmission_flags(export, false)
}

/// The transmission flags of `export` (`structured`: the client negotiated structured replies).
fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut f = proto::TF_HAS_FLAGS | proto::TF_SEND_FLUSH | proto::TF_CAN_MULTI_CONN;
    if export.read_only() {
        f |= proto::TF_READ_ONLY;
    } else {
        f |= proto::TF_SEND_FUA | proto::TF_SEND_TRIM | proto::TF_SEND_WRITE_ZEROES;
    }
    if structured {
        f |= proto::TF_SEND_DF;
    }
    f
}

/// Reads and drops `n` bytes (an oversized payload the server refuses).
async fn discard<R: AsyncRead + Unpin>(r: &mut R, mut n: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        r.read_exact(&mut buf[..k]).await?;
        n -= k as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemBackend;
    use crate::export::ExportOptions;
    use tokio::io::AsyncReadExt;

    fn server(max_connections: usize) -> NbdServer {
        let exports = Exports::new();
        exports
            .add(
                "",
                Arc::new(MemBackend::new(1 << 20, false)),
                ExportOptions::default(),
            )
            .unwrap();
        NbdServer::with_options(
            exports,
            ServerOptions {
                max_connections,
                ..Default::default()
            },
        )
    }

    /// Connects and reads the greeting's magic: `true` if it came, `false` on EOF.
    async fn greeted(path: &std::path::Path) -> bool {
        let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
        let mut g = [0u8; 8];
        match s.read_exact(&mut g).await {
            Ok(_) => &g == b"NBDMAGIC",
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
            Err(e) => panic!("reading the greeting: {e}"),
        }
    }

    async fn wait_until(what: &str, f: impl Fn() -> bool) {
        let t0 = std::time::Instant::now();
        while !f() {
            assert!(t0.elapsed() < Duration::from_secs(10), "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_full_listener_closes_new_connections_at_once_until_one_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let srv = server(2);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let s2 = srv.clone();
        let task = tokio::spawn(async move { s2.serve_unix(listener).await });

        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
            let mut g = [0u8; 8];
            s.read_exact(&mut g).await.unwrap();
            held.push(s);
        }
        assert!(
            !greeted(&path).await,
            "a third connection is closed at once"
        );
        let st = &srv.listeners()[0];
        assert_eq!(st.name, format!("unix {}", path.display()));
        assert_eq!((st.connections, st.refused, st.accepted), (2, 1, 2));
        assert_eq!(st.state, ListenerState::Accepting);

        drop(held.pop());
        wait_until("the closed connection's slot is freed", || {
            srv.listeners()[0].connections == 1
        })
        .await;
        assert!(greeted(&path).await, "a slot freed: served again");
        task.abort();
        let _ = task.await;
        assert!(
            matches!(srv.listeners()[0].state, ListenerState::Stopped { .. }),
            "a dropped accept loop says it stopped"
        );
    }

    #[tokio::test]
    async fn a_listening_socket_shut_down_stops_its_listener_and_says_why() {
        let std_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_l.set_nonblocking(true).unwrap();
        let same = std_l.try_clone().unwrap();
        let srv = server(8);
        let l = tokio::net::TcpListener::from_std(std_l).unwrap();
        let s2 = srv.clone();
        let task = tokio::spawn(async move { s2.serve_tcp(l).await });
        wait_until("the listener is registered", || !srv.listeners().is_empty()).await;
        // accept(2) on a listening socket that was shut down fails with EINVAL: not transient.
        socket2::SockRef::from(&same)
            .shutdown(std::net::Shutdown::Both)
            .unwrap();
        let r = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the accept loop returns")
            .unwrap();
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EINVAL));
        let st = &srv.listeners()[0];
        assert!(
            matches!(&st.state, ListenerState::Stopped { error } if !error.is_empty()),
            "{st}"
        );
        assert!(st.to_string().contains("STOPPED"), "{st}");
    }
}
