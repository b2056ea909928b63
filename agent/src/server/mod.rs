//! The daemon half of `ddstor serve`: accepts connections (unix socket, vchan), serves every
//! connection concurrently over the native protocol ([`transport::rpc`]), hands each call to a
//! [`Service`] (the storage engine), logs one `tracing` span per call, announces the agent
//! (xenstore, through an [`Announcer`]) and shuts down gracefully.
//!
//! Shutdown: [`Server::shutdown`] marks the agent stopping (the announcer writes `stopping`),
//! stops accepting connections, answers calls that arrive afterwards with
//! `Backend_error(SHUTTING_DOWN)`, waits for in-flight calls (up to a grace period) and then
//! deregisters.

use crate::config::AgentConfig;
use interface::{codes, Call, Reply, Response, SrId, StorageError, INTERFACES};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::Instrument;
use transport::rpc::{serve_connection_with, ConnOptions};
use transport::Hello;

/// A boxed, sendable future (object-safe async trait methods).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What answers calls: the storage engine (or, in tests, a fake).
pub trait Service: Send + Sync + 'static {
    /// Handles one call. Calls may run concurrently; the service serialises what must be.
    fn handle(&self, call: Call) -> BoxFuture<'_, Reply>;

    /// Active datapaths (the `load` published in xenstore). Default: 0.
    fn load(&self) -> u64 {
        0
    }
}

/// The longest an SR.attach/detach/destroy waits for the announcer to publish its change
/// before replying anyway (the announcer logs why it could not).
pub const PUBLISH_WAIT: Duration = Duration::from_secs(5);

/// Where the agent announces itself (xenstore registry). Errors are logged, never fatal.
pub trait Announcer: Send + Sync + 'static {
    /// The agent listens: publish it (state `ready`) with the SRs it serves.
    fn ready<'a>(&'a self, srs: &'a [SrId]) -> BoxFuture<'a, Result<(), String>>;
    /// The set of attached SRs changed.
    fn srs_changed<'a>(&'a self, srs: &'a [SrId]) -> BoxFuture<'a, Result<(), String>>;
    /// Periodic liveness/load refresh.
    fn heartbeat(&self, load: u64) -> BoxFuture<'_, Result<(), String>>;
    /// Shutdown began (state `stopping`).
    fn stopping(&self) -> BoxFuture<'_, Result<(), String>>;
    /// Shutdown finished: remove the registration.
    fn deregister(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// The transport a connection came in on (counters are kept per transport).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The unix socket.
    Unix,
    /// A vchan (shared ring with a client domain).
    Vchan,
}

impl Transport {
    /// Every transport, in the order diagnostics print them.
    pub const ALL: [Transport; 2] = [Transport::Unix, Transport::Vchan];

    /// Short name ("unix", "vchan").
    pub fn name(self) -> &'static str {
        match self {
            Transport::Unix => "unix",
            Transport::Vchan => "vchan",
        }
    }
}

/// Counters of one transport.
#[derive(Debug, Default)]
pub struct TransportStats {
    /// Calls answered over this transport since start.
    pub calls: AtomicU64,
    /// Of which answered with an error.
    pub errors: AtomicU64,
    /// Calls running now.
    pub in_flight: AtomicUsize,
    /// Connections open now.
    pub connections: AtomicUsize,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
}

/// Counters of the running server (for `Query.diagnostics` and tests).
#[derive(Debug, Default)]
pub struct Stats {
    /// Per transport, indexed like [`Transport::ALL`] (see [`Stats::transport`]).
    pub per_transport: [TransportStats; 2],
    /// Calls currently running.
    pub in_flight: AtomicUsize,
    /// Calls answered since start.
    pub calls: AtomicU64,
    /// Calls answered with an error since start.
    pub errors: AtomicU64,
    /// Connections currently open.
    pub connections: AtomicUsize,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
}

impl Stats {
    /// The counters of one transport.
    pub fn transport(&self, t: Transport) -> &TransportStats {
        &self.per_transport[t as usize]
    }
}

struct Shared {
    service: Arc<dyn Service>,
    hello: Hello,
    opts: ConnOptions,
    stats: Stats,
    stopping: AtomicBool,
    idle: Notify,
    srs_changed: Notify,
    /// Generation of SR-set changes asked for (bumped by each successful SR.attach/detach/destroy).
    srs_requested: AtomicU64,
    /// Generation the announcer has published; calls wait for it to catch up with theirs.
    srs_published: tokio::sync::watch::Sender<u64>,
    /// True while [`run_announcer`] runs, so SR calls wait for their publication.
    announcer_running: AtomicBool,
    started: Instant,
    extra_diagnostics: std::sync::Mutex<Vec<(String, DiagFn)>>,
}

type DiagFn = Box<dyn Fn() -> String + Send + Sync>;

/// The call dispatcher shared by every connection. Cheap to clone.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("in_flight", &self.shared.stats.in_flight)
            .field("stopping", &self.shared.stopping)
            .finish_non_exhaustive()
    }
}

/// Decrements the in-flight count when a call ends, however it ends.
struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.stats.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// True for calls after whose success the set of attached SRs may have changed.
fn changes_srs(call: &Call) -> bool {
    matches!(
        call,
        Call::SrAttach { .. } | Call::SrDetach { .. } | Call::SrDestroy { .. }
    )
}

impl Server {
    /// A server answering with `service`, with connection limits from `rpc`.
    pub fn new(service: Arc<dyn Service>, max_frame: u32, max_in_flight: usize) -> Self {
        Server {
            shared: Arc::new(Shared {
                service,
                hello: Hello::new(
                    INTERFACES.iter().copied(),
                    format!("ddstor {}", env!("CARGO_PKG_VERSION")),
                ),
                opts: ConnOptions {
                    max_frame,
                    max_in_flight,
                },
                stats: Stats::default(),
                stopping: AtomicBool::new(false),
                idle: Notify::new(),
                srs_changed: Notify::new(),
                srs_requested: AtomicU64::new(0),
                srs_published: tokio::sync::watch::channel(0).0,
                announcer_running: AtomicBool::new(false),
                started: Instant::now(),
                extra_diagnostics: std::sync::Mutex::new(Vec::new()),
            }),
        }
    }

    /// The server's counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// The hello this server sends.
    pub fn hello(&self) -> &Hello {
        &self.shared.hello
    }

    /// Seconds since the server was made.
    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// True once shutdown began.
    pub fn is_stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::Acquire)
    }

    /// Asks the announcer to publish the SR set and, while one runs, waits until it has
    /// published a set that includes this call's change (at most [`PUBLISH_WAIT`]): once
    /// SR.attach returns, a registry lookup of that SR finds this agent.
    async fn publish_srs_before_reply(&self) {
        let shared = &self.shared;
        let want = shared.srs_requested.fetch_add(1, Ordering::AcqRel) + 1;
        shared.srs_changed.notify_one();
        if !shared.announcer_running.load(Ordering::Acquire) {
            return;
        }
        let mut published = shared.srs_published.subscribe();
        let caught_up = published.wait_for(|&g| g >= want);
        if tokio::time::timeout(PUBLISH_WAIT, caught_up).await.is_err() {
            tracing::warn!(
                wait_ms = PUBLISH_WAIT.as_millis() as u64,
                "the SR list was not published in time; replying anyway (lookups may lag)"
            );
        }
    }

    /// Resolves when a call may have changed the set of attached SRs.
    pub async fn srs_changed(&self) {
        self.shared.srs_changed.notified().await
    }

    /// The attached SRs, asked of the service (`SR.list`); empty when it fails.
    pub async fn attached_srs(&self) -> Vec<SrId> {
        let call = Call::SrList {
            dbg: "ddstor-registry".into(),
        };
        match self.shared.service.handle(call).await {
            Ok(Response::SrList(l)) => l,
            Ok(other) => {
                tracing::warn!(kind = ?other.kind(), "SR.list answered with an unexpected result");
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(error = %e, "SR.list failed");
                Vec::new()
            }
        }
    }

    /// The service's load (active datapaths).
    pub fn load(&self) -> u64 {
        self.shared.service.load()
    }

    /// Handles one call: one `tracing` span (method, dbg, sr, vdi, dp) with an event carrying
    /// the duration and outcome. The service runs in its own task, so a panic in it becomes an
    /// `Internal_error` for that call only.
    pub async fn handle_call(&self, call: Call) -> Reply {
        let shared = &*self.shared;
        let span = tracing::info_span!(
            "call",
            method = call.method(),
            dbg = %call.dbg(),
            sr = %call.sr().map(SrId::as_str).unwrap_or(""),
            vdi = %call.vdi().map(|v| v.as_str()).unwrap_or(""),
            dp = %call.dp().map(|v| v.as_str()).unwrap_or(""),
        );
        async move {
            let t0 = Instant::now();
            let reply = if shared.stopping.load(Ordering::Acquire) {
                Err(StorageError::backend(
                    codes::SHUTTING_DOWN,
                    vec![
                        call.method().to_string(),
                        "the agent is shutting down; retry against the restarted agent".into(),
                    ],
                ))
            } else {
                shared.stats.in_flight.fetch_add(1, Ordering::AcqRel);
                let _guard = InFlight(shared);
                let svc = shared.service.clone();
                let notify_srs = changes_srs(&call);
                let method = call.method();
                let is_diagnostics = matches!(call, Call::QueryDiagnostics { .. });
                let task = tokio::spawn(
                    async move { svc.handle(call).await }.instrument(tracing::Span::current()),
                );
                let reply = match task.await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "call handler panicked");
                        Err(StorageError::InternalError(format!(
                            "{method} failed inside the agent ({e}); the agent keeps serving, \
                             please report this with the agent's log"
                        )))
                    }
                };
                if notify_srs && reply.is_ok() {
                    self.publish_srs_before_reply().await;
                }
                match reply {
                    Ok(Response::Text(t)) if is_diagnostics => {
                        Ok(Response::Text(format!("{}{t}", self.diagnostics())))
                    }
                    other => other,
                }
            };
            let duration_us = t0.elapsed().as_micros() as u64;
            shared.stats.calls.fetch_add(1, Ordering::Relaxed);
            match &reply {
                Ok(_) => tracing::info!(duration_us, outcome = "ok", "call done"),
                Err(e) => {
                    shared.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(duration_us, outcome = e.name(), error = %e, "call failed")
                }
            }
            reply
        }
        .instrument(span)
        .await
    }

    /// Serves one connection in a new task until the peer leaves or the connection breaks
    /// (the reason is logged; other connections are unaffected). Counted under `transport`.
    pub fn spawn_connection<S>(
        &self,
        stream: S,
        transport: Transport,
        peer: String,
    ) -> JoinHandle<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let server = self.clone();
        let span = tracing::info_span!("conn", transport = transport.name(), peer = %peer);
        tokio::spawn(
            async move {
                let stats = &server.shared.stats;
                let ts = stats.transport(transport);
                stats.connections.fetch_add(1, Ordering::Relaxed);
                stats.connections_total.fetch_add(1, Ordering::Relaxed);
                ts.connections.fetch_add(1, Ordering::Relaxed);
                ts.connections_total.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("connection open");
                let hello = server.shared.hello.clone();
                let opts = server.shared.opts;
                let s2 = server.clone();
                let result = serve_connection_with(stream, hello, opts, move |call: Call| {
                    let s = s2.clone();
                    async move {
                        let ts = s.shared.stats.transport(transport);
                        ts.in_flight.fetch_add(1, Ordering::Relaxed);
                        let reply = s.handle_call(call).await;
                        ts.in_flight.fetch_sub(1, Ordering::Relaxed);
                        ts.calls.fetch_add(1, Ordering::Relaxed);
                        if reply.is_err() {
                            ts.errors.fetch_add(1, Ordering::Relaxed);
                        }
                        reply
                    }
                })
                .await;
                stats.connections.fetch_sub(1, Ordering::Relaxed);
                ts.connections.fetch_sub(1, Ordering::Relaxed);
                match result {
                    Ok(()) => tracing::debug!("connection closed"),
                    Err(e) => tracing::info!(reason = %e, "connection ended"),
                }
            }
            .instrument(span),
        )
    }

    /// Marks the server stopping (new calls are refused) and waits up to `grace` for in-flight
    /// calls to finish. Returns the number of calls still running when it gave up (0 = drained).
    pub async fn shutdown(&self, grace: Duration) -> usize {
        self.shared.stopping.store(true, Ordering::Release);
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let idle = self.shared.idle.notified();
            let n = self.shared.stats.in_flight.load(Ordering::Acquire);
            if n == 0 {
                return 0;
            }
            tracing::info!(in_flight = n, "waiting for in-flight calls");
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.shared.stats.in_flight.load(Ordering::Acquire);
            }
        }
    }

    /// A human-readable summary of the server (prepended to `Query.diagnostics`): uptime,
    /// totals, then one line per transport.
    pub fn diagnostics(&self) -> String {
        use std::fmt::Write;
        let s = &self.shared.stats;
        let mut out = format!(
            "server: uptime {}s, connections {} open / {} total, calls {} ({} errors), {} in flight, stopping {}\n",
            self.uptime().as_secs(),
            s.connections.load(Ordering::Relaxed),
            s.connections_total.load(Ordering::Relaxed),
            s.calls.load(Ordering::Relaxed),
            s.errors.load(Ordering::Relaxed),
            s.in_flight.load(Ordering::Relaxed),
            self.is_stopping(),
        );
        for t in Transport::ALL {
            let ts = s.transport(t);
            let _ = writeln!(
                out,
                "  {}: connections {} open / {} total, calls {} ({} errors), {} in flight",
                t.name(),
                ts.connections.load(Ordering::Relaxed),
                ts.connections_total.load(Ordering::Relaxed),
                ts.calls.load(Ordering::Relaxed),
                ts.errors.load(Ordering::Relaxed),
                ts.in_flight.load(Ordering::Relaxed),
            );
        }
        for (name, text) in self
            .shared
            .extra_diagnostics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(out, "{name}: {}", text().trim_end());
        }
        out
    }

    /// Adds a named section to `Query.diagnostics` (e.g. the vchan listeners), produced on
    /// each call by `f`.
    pub fn add_diagnostics(&self, name: &str, f: impl Fn() -> String + Send + Sync + 'static) {
        self.shared
            .extra_diagnostics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name.to_string(), Box::new(f)));
    }
}

/// Accepts unix connections until `stop` resolves; each is served in its own task.
pub async fn run_unix_listener(
    server: Server,
    listener: transport::unix::UnixServer,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            r = listener.accept() => match r {
                Ok((stream, cred)) => {
                    let peer = format!("unix uid {} pid {}", cred.uid.0, cred.pid.unwrap_or(-1));
                    server.spawn_connection(stream, Transport::Unix, peer);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    tracing::info!(path = %listener.path().display(), "unix listener closed");
}

/// Serves one client domain over vchan until `stop` resolves: publish a ring, wait for the
/// client, serve that connection until it leaves, publish again. One vchan per (client, port)
/// at a time, as libxenvchan; the client pipelines its calls over it. A ring published but
/// not connected when `stop` resolves leaves its rendezvous keys behind: the caller removes
/// them (`Rendezvous::remove`).
///
/// With `watch_client` (a xenstore connection), each accepted connection is tied to the client
/// domain's life: when that domain is destroyed (`@releaseDomain`, see
/// [`crate::peer_domain`]) the connection is dropped at once and the listener publishes a new
/// ring; without it a dead client domain's connection would hold the listener for ever (a
/// destroyed domain never clears its live byte). Pass `None` for dom0, which cannot die while
/// the agent lives.
pub async fn run_vchan_listener(
    server: Server,
    listener: transport::vchan::VchanServer,
    client: u16,
    watch_client: Option<xs_registry::client::Xs>,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            _ = &mut stop => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(client, error = %e, "vchan accept failed; retrying in 1 s");
                    tokio::select! {
                        _ = &mut stop => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            }
        };
        let watch = match &watch_client {
            Some(xs) => {
                match crate::peer_domain::DomainWatch::start(xs, client, stream.peer_gone_handle())
                    .await
                {
                    Ok(w) => Some(w),
                    Err(e) => {
                        tracing::warn!(client, error = %e,
                            "cannot watch @releaseDomain: if this client's domain dies, its \
                             connection is only dropped by the ring's stall timeout");
                        None
                    }
                }
            }
            None => None,
        };
        let mut conn =
            server.spawn_connection(stream, Transport::Vchan, format!("vchan dom{client}"));
        tokio::select! {
            // The connection stays up: its in-flight calls finish (later ones are refused
            // while the server stops) and it ends when the process does.
            _ = &mut stop => break,
            _ = &mut conn => {}
        }
        if watch.as_ref().is_some_and(|w| w.is_gone()) {
            tracing::info!(
                client,
                "the client's domain is gone: its connection was dropped; listening again"
            );
        }
    }
    tracing::info!(client, "vchan listener closed");
}

/// Keeps the announcer up to date: SR changes as they happen, load every `heartbeat`.
pub async fn run_announcer(server: Server, announcer: Arc<dyn Announcer>, heartbeat: Duration) {
    server
        .shared
        .announcer_running
        .store(true, Ordering::Release);
    let mut tick = tokio::time::interval(heartbeat.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = server.srs_changed() => {
                // Every change asked for up to here is in the list read below.
                let generation = server.shared.srs_requested.load(Ordering::Acquire);
                let srs = server.attached_srs().await;
                if let Err(e) = announcer.srs_changed(&srs).await {
                    tracing::warn!(error = %e, "cannot publish the SR list");
                }
                // Published or failed (logged): either way the waiting calls may reply.
                server.shared.srs_published.send_modify(|g| *g = (*g).max(generation));
            }
            _ = tick.tick() => {
                if let Err(e) = announcer.heartbeat(server.load()).await {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
            }
        }
    }
}

/// Everything `ddstor serve` needs besides the engine: validated config.
pub fn allow_uids(cfg: &AgentConfig) -> Vec<transport::unix::Uid> {
    if cfg.unix.allow_uids.is_empty() {
        let me = transport::unix::Uid::current();
        let mut v = vec![transport::unix::Uid(0)];
        if me.0 != 0 {
            v.push(me);
        }
        v
    } else {
        cfg.unix
            .allow_uids
            .iter()
            .map(|u| transport::unix::Uid(*u))
            .collect()
    }
}

pub mod xenstore;

#[cfg(test)]
mod tests;
