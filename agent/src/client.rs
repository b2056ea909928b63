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
}

/// Result of client calls.
pub type Result<T> = std::result::Result<T, ClientError>;

/// A connection to one agent. Cheap to clone; concurrent calls share (pipeline on) the one
/// connection.
#[derive(Debug, Clone)]
pub struct AgentClient {
    rpc: transport::Client<Call, Reply>,
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
            dbg_prefix: format!("ddstor-client-{}", std::process::id()).into(),
            seq: Arc::new(AtomicU64::new(1)),
        })
    }

    /// Connects to an agent's unix socket.
    pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Self> {
        let stream = transport::unix::connect(path).await?;
        Self::handshake(stream).await
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
        Ok(self.rpc.call(call).await??)
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
