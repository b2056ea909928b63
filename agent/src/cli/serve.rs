//! `ddstor serve`: the storage agent daemon.
//!
//! Serves the xapi storage interface on a unix socket (and vchan when a Xen backend is set)
//! until SIGTERM/SIGINT; then announces `stopping`, finishes in-flight calls (up to the grace
//! period), deregisters and exits 0. The configuration comes from `--config FILE` (TOML, see
//! `--print-config`) with flags overriding it.

use crate::config::{AgentConfig, XenBackend, EXAMPLE};
use crate::core::{Storage, StorageConfig};
use crate::failpoint::{self, Failpoints};
use crate::server::{self, BoxFuture, Server, Service};
use anyhow::Context;
use clap::Args;
use interface::{Call, Reply};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// On or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

/// Arguments of `ddstor serve`. Flags override the config file.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  ddstor serve --data-dir /var/lib/ddstor --unix /run/ddstor/agent.sock\n\n\
    Then: ddstor call --unix /run/ddstor/agent.sock Query.query\n\
    Logs go to stderr (--log info shows one line per call)."
)]
pub struct ServeArgs {
    /// TOML configuration file (every key optional; see --print-config).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the documented default configuration file and exit.
    #[arg(long)]
    print_config: bool,
    /// Print the engine's failpoint names (for DDSTOR_FAILPOINT, crash tests) and exit.
    #[arg(long)]
    list_failpoints: bool,
    /// Where SRs are created by default (config `data_dir`).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Unix socket to serve (config `unix.path`); `--unix ''` disables it.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Peer uid allowed on the unix socket (repeatable; config `unix.allow_uids`).
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uids: Vec<u32>,
    /// Extra directory searched by SR.attach (repeatable; config `sr_roots`).
    #[arg(long = "sr-root", value_name = "DIR")]
    sr_roots: Vec<PathBuf>,
    /// This agent's own domain id (config `domid`).
    #[arg(long, value_name = "N")]
    domid: Option<u16>,
    /// Xen backend for vchan (config `xen`).
    #[arg(long, value_enum)]
    xen: Option<XenBackend>,
    /// Simulated Xen directory for `--xen sim` (config `xen_sim_dir`; default $XEN_SIM_DIR).
    #[arg(long, value_name = "DIR")]
    xen_sim_dir: Option<PathBuf>,
    /// vchan port name (config `vchan.port`).
    #[arg(long, value_name = "PORT")]
    vchan_port: Option<String>,
    /// Client domain served over vchan (repeatable; config `vchan.clients`).
    #[arg(long = "vchan-client", value_name = "DOMID")]
    vchan_clients: Vec<u16>,
    /// Register in xenstore (config `xenstore.enabled`).
    #[arg(long, value_enum)]
    xenstore: Option<OnOff>,
    /// xenstored socket (config `xenstore.socket`; default $XENSTORED_PATH).
    #[arg(long, value_name = "PATH")]
    xenstore_socket: Option<PathBuf>,
    /// Seconds in-flight calls get at shutdown (config `shutdown_grace_secs`).
    #[arg(long, value_name = "SECS")]
    shutdown_grace: Option<u64>,
}

impl ServeArgs {
    /// The configuration: file (or defaults), then flags.
    pub fn config(&self) -> anyhow::Result<AgentConfig> {
        let mut c = match &self.config {
            Some(p) => AgentConfig::load(p)?,
            None => AgentConfig::default(),
        };
        if let Some(v) = &self.data_dir {
            c.data_dir = v.clone();
        }
        if let Some(v) = &self.unix {
            c.unix.path = v.clone();
        }
        if !self.allow_uids.is_empty() {
            c.unix.allow_uids = self.allow_uids.clone();
        }
        if !self.sr_roots.is_empty() {
            c.sr_roots = self.sr_roots.clone();
        }
        if let Some(v) = self.domid {
            c.domid = v;
        }
        if let Some(v) = self.xen {
            c.xen = v;
        }
        if let Some(v) = &self.xen_sim_dir {
            c.xen_sim_dir = v.clone();
        }
        if let Some(v) = &self.vchan_port {
            c.vchan.port = v.clone();
        }
        if !self.vchan_clients.is_empty() {
            c.vchan.clients = self.vchan_clients.clone();
        }
        if let Some(v) = self.xenstore {
            c.xenstore.enabled = v == OnOff::On;
        }
        if let Some(v) = &self.xenstore_socket {
            c.xenstore.socket = v.clone();
        }
        if let Some(v) = self.shutdown_grace {
            c.shutdown_grace_secs = v;
        }
        c.validate()?;
        Ok(c)
    }
}

/// The storage engine as the server's [`Service`].
#[derive(Debug)]
pub struct EngineService {
    storage: Arc<Storage>,
}

impl Service for EngineService {
    fn handle(&self, call: Call) -> BoxFuture<'_, Reply> {
        Box::pin(self.storage.handle(call))
    }
}

impl EngineService {
    /// Wraps an engine.
    pub fn new(storage: Arc<Storage>) -> Self {
        EngineService { storage }
    }
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

async fn serve(cfg: AgentConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating the data directory {}", cfg.data_dir.display()))?;
    let failpoints = Failpoints::from_env();
    if let Some(fp) = failpoints.armed() {
        tracing::warn!(
            failpoint = fp,
            "failpoint armed: the agent will crash there"
        );
    }
    let storage = Arc::new(Storage::new(StorageConfig {
        data_dir: cfg.data_dir.clone(),
        sr_roots: cfg.sr_roots.clone(),
        failpoints,
    }));
    let server = Server::new(
        Arc::new(EngineService::new(storage)),
        cfg.rpc.max_frame,
        cfg.rpc.max_in_flight,
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut listeners = Vec::new();
    if !cfg.unix.path.as_os_str().is_empty() {
        let listener = transport::unix::UnixServer::bind(&cfg.unix.path, &server::allow_uids(&cfg))
            .await
            .with_context(|| format!("serving on unix socket {}", cfg.unix.path.display()))?;
        listeners.push(tokio::spawn(server::run_unix_listener(
            server.clone(),
            listener,
            stopped(stop_rx.clone()),
        )));
    }
    if cfg.xen != XenBackend::None {
        anyhow::bail!(
            "--xen {:?}: the vchan listener is not available in this build; use --xen none",
            cfg.xen
        );
    }
    if cfg.xenstore.enabled {
        anyhow::bail!("--xenstore on: xenstore registration is not available in this build");
    }
    tracing::info!(
        unix = %cfg.unix.path.display(),
        data_dir = %cfg.data_dir.display(),
        "ddstor serving"
    );
    let sig = wait_for_signal().await?;
    tracing::info!(signal = sig, "stopping: finishing in-flight calls");
    let _ = stop_tx.send(true);
    for l in listeners {
        let _ = l.await;
    }
    let left = server
        .shutdown(Duration::from_secs(cfg.shutdown_grace_secs))
        .await;
    if left > 0 {
        tracing::warn!(
            in_flight = left,
            "grace period over; exiting with calls still running"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

/// Runs `ddstor serve`.
pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    if a.print_config {
        print!("{EXAMPLE}");
        return Ok(());
    }
    if a.list_failpoints {
        for f in failpoint::ALL {
            println!("{f}");
        }
        return Ok(());
    }
    let cfg = a.config()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ddstor")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(cfg))?;
    Ok(())
}
