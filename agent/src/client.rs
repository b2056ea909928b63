//! The dom0-side client library: connect to an agent (unix socket, vchan, or through a
//! xenstore lookup of an SR) and make typed xapi storage calls over the native protocol.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ddstor::client::ClientError> {
//! use ddstor::client::AgentClient;
//! let agent = AgentClient::connect_unix("/run/ddstor/agent.sock").await?;
//! let srs = agent.sr_list().await?;
//! # Ok(()) }
//! ```

use interface::{
    Call, Dbg, QueryResult, Reply, Response, ResultKind, SrId, SrInfo, StorageError, StringMap,
    VdiId, VdiInfo, INTERFACES,
};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use transport::Hello;

/// Why a call did not return a result.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent answered with a storage error (xapi's `Errors.error`).
    #[error("{0}")]
    Storage(#[from] StorageError),
    /// The connection failed (could not connect, broke, protocol mismatch).
    #[error("cannot talk to the agent: {0}")]
    Transport(#[from] transport::Error),
    /// The agent answered with a result of the wrong kind (a bug on one side).
    #[error("{method} answered with a {got:?} result, expected {want:?}")]
    Unexpected {
        /// The method.
        method: &'static str,
        /// Kind received.
        got: ResultKind,
        /// Kind expected.
        want: ResultKind,
    },
    /// Finding the agent failed (no agent registered for the SR, xenstore unreachable…).
    #[error("cannot find the agent: {0}")]
    Lookup(String),
    /// The agent's domain was destroyed or crashed while this client was connected to it
    /// over vchan (seen through xenstore's `@releaseDomain`).
    #[error(
        "the agent's domain {domid} is gone (destroyed or crashed: xenstore fired @releaseDomain \
         and /local/domain/{domid} was removed); calls to it cannot complete — find the SR's \
         agent again (`ddstor xs lookup SR`) once the driver domain is restarted"
    )]
    PeerDomainGone {
        /// The agent's domain.
        domid: u16,
    },
    /// A vchan connection was asked of a domain that does not exist.
    #[error(
        "domain {domid} does not exist (no /local/domain/{domid}/domid in xenstore), so no agent \
         can answer there: check the domain id (`xl list`), or find the SR's agent with \
         `ddstor xs lookup SR`"
    )]
    NoSuchDomain {
        /// The domain asked for.
        domid: u16,
    },
}

/// Result of client calls.
pub type Result<T> = std::result::Result<T, ClientError>;

/// How to reach an agent found in the xenstore registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Its unix socket (same domain, socket present here).
    Unix(std::path::PathBuf),
    /// vchan to its domain on its port.
    Vchan {
        /// The agent's domain.
        domid: u16,
        /// The vchan port name.
        port: String,
    },
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Unix(p) => write!(f, "unix socket {}", p.display()),
            Route::Vchan { domid, port } => write!(f, "vchan {domid}:{port}"),
        }
    }
}

/// The rule for reaching a registered agent from domain `own`: its unix socket when the
/// record announces one, the agent runs in our own domain (same host and kernel) and the
/// socket exists here; vchan to the agent's domain and port otherwise (the normal case:
/// dom0 talking to a driver domain).
pub fn route_for(addr: &xs_registry::registry::AgentAddr, own: u16) -> Route {
    use std::os::unix::fs::FileTypeExt;
    if let Some(p) = &addr.unix_path {
        let path = std::path::PathBuf::from(p);
        let is_socket = std::fs::metadata(&path)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false);
        if addr.domid.0 == own && is_socket {
            return Route::Unix(path);
        }
    }
    Route::Vchan {
        domid: addr.domid.0,
        port: addr.vchan_port.clone(),
    }
}

/// Waits (polling, until `deadline`) for an exclusive lock on the file `path` (created if
/// needed) and returns it held.
async fn take_turn(
    path: &Path,
    deadline: tokio::time::Instant,
) -> std::result::Result<std::fs::File, String> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("opening the vchan turn lock {}: {e}", path.display()))?;
    loop {
        use std::os::fd::AsRawFd;
        // SAFETY: flock(2) on a descriptor this function owns (kept open by `f`); no memory
        // is passed. The lock goes away with the descriptor, also when the process dies.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(f);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(format!("locking {}: {e}", path.display()));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "another client of this domain kept the vchan (lock {})",
                path.display()
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// Finds the agent serving `sr` in the xenstore registry (live, ready, least loaded) and the
/// route to it from domain `own` (see [`route_for`]).
pub async fn lookup_sr(xs: &xs_registry::client::Xs, sr: &str, own: u16) -> Result<Route> {
    let reg = xs_registry::registry::Registry::new(xs.clone());
    match reg.lookup(sr, None).await {
        Ok(Some(addr)) => Ok(route_for(&addr, own)),
        Ok(None) => Err(ClientError::Lookup(format!(
            "no live agent in xenstore serves SR {sr} (is it attached? `ddstor xs list` shows the agents)"
        ))),
        Err(e) => Err(ClientError::Lookup(format!(
            "looking up SR {sr} in xenstore at {}: {e}",
            xs.socket().display()
        ))),
    }
}

/// A connection to one agent. Cheap to clone; concurrent calls share (pipeline on) the one
/// connection.
#[derive(Debug, Clone)]
pub struct AgentClient {
    rpc: transport::Client<Call, Reply>,
    /// The lock held while this client owns its domain's vchan to the agent (see
    /// [`AgentClient::connect_vchan`]); released when the last clone is dropped.
    _turn: Option<Arc<std::fs::File>>,
    /// Watches the agent's domain over vchan (see [`crate::peer_domain`]).
    domain: Option<Arc<crate::peer_domain::DomainWatch>>,
    dbg_prefix: Arc<str>,
    seq: Arc<AtomicU64>,
}

macro_rules! expect {
    ($self:ident, $call:expr, $variant:ident) => {{
        let call = $call;
        let method = call.method();
        match $self.call(call).await? {
            Response::$variant(v) => Ok(v),
            other => Err(ClientError::Unexpected {
                method,
                got: other.kind(),
                want: ResultKind::$variant,
            }),
        }
    }};
}

macro_rules! expect_unit {
    ($self:ident, $call:expr) => {{
        let call = $call;
        let method = call.method();
        match $self.call(call).await? {
            Response::Unit => Ok(()),
            other => Err(ClientError::Unexpected {
                method,
                got: other.kind(),
                want: ResultKind::Unit,
            }),
        }
    }};
}

impl AgentClient {
    /// Connects over any byte stream (unix socket, vchan) and exchanges hellos.
    pub async fn handshake<S>(stream: S) -> Result<Self>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let hello = Hello::new(
            INTERFACES.iter().copied(),
            format!("ddstor-client {}", env!("CARGO_PKG_VERSION")),
        );
        let rpc = transport::Client::handshake(stream, hello).await?;
        Ok(AgentClient {
            rpc,
            _turn: None,
            domain: None,
            dbg_prefix: format!("ddstor-client-{}", std::process::id()).into(),
            seq: Arc::new(AtomicU64::new(1)),
        })
    }

    /// Connects to an agent's unix socket.
    pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Self> {
        let stream = transport::unix::connect(path).await?;
        Self::handshake(stream).await
    }

    /// Connects over vchan to the agent in domain `server` on `port`, as domain `own`:
    /// reads the ring's rendezvous in xenstore (`/local/domain/<server>/data/vchan/<own>/<port>`),
    /// maps the ring and exchanges hellos. The agent serves one vchan per client domain at a
    /// time and publishes a new ring when the previous client leaves, so this retries (every
    /// few milliseconds) until `timeout` while the rendezvous is missing or stale.
    ///
    /// Clients of one domain take turns: with `turn_lock` (a file path every client of this
    /// domain agrees on), the client holds an exclusive lock on it from before reading the
    /// rendezvous until it is dropped, so two processes never map the same published ring.
    ///
    /// When the agent runs in another domain than dom0 or this one, the client watches that
    /// domain through `xs` (`@releaseDomain`, see [`crate::peer_domain`]): once it is
    /// destroyed, calls in flight and later ones fail at once with
    /// [`ClientError::PeerDomainGone`]. Connecting to such a domain that does not exist (its
    /// `/local/domain/<id>/domid` is missing when an attempt fails) fails at once with
    /// [`ClientError::NoSuchDomain`] instead of retrying until `timeout`.
    pub async fn connect_vchan(
        xs: &xs_registry::client::Xs,
        backend: &dyn transport::vchan::Backend,
        own: u16,
        server: u16,
        port: &str,
        timeout: std::time::Duration,
        turn_lock: Option<&Path>,
    ) -> Result<Self> {
        use transport::vchan::{DomId, VchanClient};
        let rendezvous = xs_registry::rendezvous::XsRendezvous::new(xs.clone());
        let deadline = tokio::time::Instant::now() + timeout;
        let fail = |e: String| {
            ClientError::Transport(transport::Error::Vchan(format!(
                "vchan to domain {server} port {port:?} as domain {own}: {e} (gave up after {timeout:?})"
            )))
        };
        let turn = match turn_lock {
            Some(p) => Some(Arc::new(take_turn(p, deadline).await.map_err(fail)?)),
            None => None,
        };
        let mut pause = std::time::Duration::from_millis(2);
        loop {
            let attempt = async {
                let stream =
                    VchanClient::connect(backend, &rendezvous, DomId(server), DomId(own), port)
                        .await?;
                // dom0 cannot be destroyed while anything runs; any other agent domain can.
                let domain = if server != own && server != 0 {
                    match crate::peer_domain::DomainWatch::start(
                        xs,
                        server,
                        stream.peer_gone_handle(),
                    )
                    .await
                    {
                        Ok(w) => Some(Arc::new(w)),
                        Err(e) => {
                            tracing::warn!(domid = server, error = %e,
                                "cannot watch @releaseDomain: the agent's domain dying will only \
                                 be seen at a call's timeout");
                            None
                        }
                    }
                } else {
                    None
                };
                // A stale ring (its agent died) never answers the hello: bound the wait.
                match tokio::time::timeout_at(deadline, Self::handshake(stream)).await {
                    Ok(r) => r.map(|mut c| {
                        c.domain = domain;
                        c
                    }),
                    Err(_) => Err(ClientError::Transport(transport::Error::Vchan(
                        "the agent did not answer the hello on the published ring".into(),
                    ))),
                }
            };
            match attempt.await {
                Ok(mut c) => {
                    c._turn = turn;
                    return Ok(c);
                }
                Err(e) if tokio::time::Instant::now() + pause < deadline => {
                    // No point waiting for a ring from a domain that does not exist (never
                    // created, or destroyed): say so now rather than at the timeout.
                    if server != own && server != 0 {
                        let key = format!("/local/domain/{server}/domid");
                        if let Ok(None) = xs.read_opt(&key).await {
                            tracing::debug!(domid = server, key, error = %e,
                                "vchan connect failed and the agent's domain does not exist");
                            return Err(ClientError::NoSuchDomain { domid: server });
                        }
                    }
                    tracing::debug!(error = %e, "vchan connect failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_millis(100));
                }
                Err(e) => return Err(fail(e.to_string())),
            }
        }
    }

    /// The agent's hello (its version and interfaces).
    pub fn agent_hello(&self) -> &Hello {
        self.rpc.peer_hello()
    }

    /// Sends one call and waits for its reply. An empty `dbg` is filled with a unique one.
    pub async fn call(&self, mut call: Call) -> Result<Response> {
        if call.dbg().is_empty() {
            let n = self.seq.fetch_add(1, Ordering::Relaxed);
            call.set_dbg(Dbg::new(format!("{}-{n}", self.dbg_prefix)));
        }
        match self.rpc.call(call).await {
            Ok(r) => Ok(r?),
            Err(e) => Err(match &self.domain {
                Some(w) if w.is_gone() => ClientError::PeerDomainGone { domid: w.domid() },
                _ => e.into(),
            }),
        }
    }

    /// Whether the agent's domain was seen destroyed (vchan clients of another domain only).
    pub fn peer_domain_gone(&self) -> bool {
        self.domain.as_ref().is_some_and(|w| w.is_gone())
    }

    /// `Query.query`.
    pub async fn query(&self) -> Result<QueryResult> {
        expect!(
            self,
            Call::QueryQuery {
                dbg: Dbg::default()
            },
            Query
        )
    }

    /// `Query.diagnostics`.
    pub async fn diagnostics(&self) -> Result<String> {
        expect!(
            self,
            Call::QueryDiagnostics {
                dbg: Dbg::default()
            },
            Text
        )
    }

    /// `SR.create`: returns the device_config to attach it with.
    pub async fn sr_create(
        &self,
        sr: &SrId,
        name_label: &str,
        name_description: &str,
        device_config: StringMap,
    ) -> Result<StringMap> {
        expect!(
            self,
            Call::SrCreate {
                dbg: Dbg::default(),
                sr: sr.clone(),
                name_label: name_label.into(),
                name_description: name_description.into(),
                device_config,
                physical_size: 0,
            },
            DeviceConfig
        )
    }

    /// `SR.attach`.
    pub async fn sr_attach(&self, sr: &SrId, device_config: StringMap) -> Result<()> {
        expect_unit!(
            self,
            Call::SrAttach {
                dbg: Dbg::default(),
                sr: sr.clone(),
                device_config,
            }
        )
    }

    /// `SR.detach`.
    pub async fn sr_detach(&self, sr: &SrId) -> Result<()> {
        expect_unit!(
            self,
            Call::SrDetach {
                dbg: Dbg::default(),
                sr: sr.clone()
            }
        )
    }

    /// `SR.destroy`.
    pub async fn sr_destroy(&self, sr: &SrId) -> Result<()> {
        expect_unit!(
            self,
            Call::SrDestroy {
                dbg: Dbg::default(),
                sr: sr.clone()
            }
        )
    }

    /// `SR.scan`.
    pub async fn sr_scan(&self, sr: &SrId) -> Result<Vec<VdiInfo>> {
        expect!(
            self,
            Call::SrScan {
                dbg: Dbg::default(),
                sr: sr.clone()
            },
            VdiInfos
        )
    }

    /// `SR.stat`.
    pub async fn sr_stat(&self, sr: &SrId) -> Result<SrInfo> {
        expect!(
            self,
            Call::SrStat {
                dbg: Dbg::default(),
                sr: sr.clone()
            },
            SrInfo
        )
    }

    /// `SR.list`.
    pub async fn sr_list(&self) -> Result<Vec<SrId>> {
        expect!(
            self,
            Call::SrList {
                dbg: Dbg::default()
            },
            SrList
        )
    }

    /// `VDI.create`: returns the VDI as made (id chosen, size rounded up).
    pub async fn vdi_create(&self, sr: &SrId, vdi_info: VdiInfo) -> Result<VdiInfo> {
        expect!(
            self,
            Call::VdiCreate {
                dbg: Dbg::default(),
                sr: sr.clone(),
                vdi_info
            },
            VdiInfo
        )
    }

    /// `VDI.snapshot` of `vdi_info.vdi` (other fields: the snapshot's name etc.).
    pub async fn vdi_snapshot(&self, sr: &SrId, vdi_info: VdiInfo) -> Result<VdiInfo> {
        expect!(
            self,
            Call::VdiSnapshot {
                dbg: Dbg::default(),
                sr: sr.clone(),
                vdi_info
            },
            VdiInfo
        )
    }

    /// `VDI.clone` of `vdi_info.vdi`.
    pub async fn vdi_clone(&self, sr: &SrId, vdi_info: VdiInfo) -> Result<VdiInfo> {
        expect!(
            self,
            Call::VdiClone {
                dbg: Dbg::default(),
                sr: sr.clone(),
                vdi_info
            },
            VdiInfo
        )
    }

    /// `VDI.stat`.
    pub async fn vdi_stat(&self, sr: &SrId, vdi: &VdiId) -> Result<VdiInfo> {
        expect!(
            self,
            Call::VdiStat {
                dbg: Dbg::default(),
                sr: sr.clone(),
                vdi: vdi.clone()
            },
            VdiInfo
        )
    }

    /// `VDI.destroy`.
    pub async fn vdi_destroy(&self, sr: &SrId, vdi: &VdiId) -> Result<()> {
        expect_unit!(
            self,
            Call::VdiDestroy {
                dbg: Dbg::default(),
                sr: sr.clone(),
                vdi: vdi.clone()
            }
        )
    }

    /// `VDI.set_name_label`.
    pub async fn vdi_set_name_label(&self, sr: &SrId, vdi: &VdiId, label: &str) -> Result<()> {
        expect_unit!(
            self,
            Call::VdiSetNameLabel {
                dbg: Dbg::default(),
                sr: sr.clone(),
                vdi: vdi.clone(),
                new_name_label: label.into()
            }
        )
    }
}
