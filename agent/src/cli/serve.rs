//! `ddstor serve`: the storage agent daemon.
//!
//! Serves the xapi storage interface on a unix socket (and vchan when a Xen backend is set)
//! until SIGTERM/SIGINT; then announces `stopping`, finishes in-flight calls (up to the grace
//! period), deregisters and exits 0. The configuration comes from `--config FILE` (TOML, see
//! `--print-config`) with flags overriding it.

use crate::config::{AgentConfig, XenBackend, EXAMPLE};
use crate::core::{Storage, StorageConfig};
use crate::datapath::Datapaths;
use crate::failpoint::{self, Failpoints};
use crate::server::xenstore::XsAnnouncer;
use crate::server::{self, Announcer, BoxFuture, Server, Service};
use anyhow::Context;
use clap::Args;
use interface::{Call, Reply, INTERFACES};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use transport::vchan::sim::SimXen;
use transport::vchan::{Backend, BackendKind, DomId, VchanServer};
use xs_registry::client::Xs;
use xs_registry::registry::Registration;
use xs_registry::rendezvous::XsRendezvous;

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
    /// Unix socket of the NBD datapath (config `nbd.socket`; default <data_dir>/nbd.sock).
    #[arg(long, value_name = "PATH")]
    nbd_socket: Option<PathBuf>,
    /// Also serve NBD on this loopback TCP address, e.g. 127.0.0.1:10809 (config `nbd.tcp`).
    #[arg(long, value_name = "ADDR")]
    nbd_tcp: Option<String>,
    /// Seconds in-flight calls get at shutdown (config `shutdown_grace_secs`).
    #[arg(long, value_name = "SECS")]
    shutdown_grace: Option<u64>,
    /// Background GC of the attached SRs' chains (config `gc.enabled`; default on).
    #[arg(long, value_enum)]
    gc: Option<OnOff>,
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
        if let Some(v) = &self.nbd_socket {
            c.nbd.socket = v.clone();
        }
        if let Some(v) = self.gc {
            c.gc.enabled = v == OnOff::On;
        }
        if let Some(v) = &self.nbd_tcp {
            c.nbd.tcp = v.clone();
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
    datapaths: Option<Arc<Datapaths>>,
}

impl Service for EngineService {
    fn handle(&self, call: Call) -> BoxFuture<'_, Reply> {
        Box::pin(async move {
            let attach = match (&call, &self.datapaths) {
                (Call::SrAttach { sr, .. }, Some(d)) => Some((sr.to_string(), d.clone())),
                _ => None,
            };
            let reply = self.storage.handle(call).await;
            if let (Ok(_), Some((sr, dps))) = (&reply, attach) {
                restore_datapaths(&self.storage, &dps, &sr).await;
            }
            reply
        })
    }
}

impl EngineService {
    /// Wraps an engine.
    pub fn new(storage: Arc<Storage>) -> Self {
        EngineService {
            storage,
            datapaths: None,
        }
    }

    /// Wraps an engine whose datapaths are `dps`: a successful `SR.attach` re-exports the
    /// SR's attached and activated VDIs (after a restart).
    pub fn with_datapaths(storage: Arc<Storage>, dps: Arc<Datapaths>) -> Self {
        EngineService {
            storage,
            datapaths: Some(dps),
        }
    }
}

/// Re-creates the NBD exports of `sr`'s VDIs from their persisted datapath states. A failure
/// is logged (the SR stays attached; the VDI's next VDI.attach/activate retries).
async fn restore_datapaths(storage: &Storage, dps: &Datapaths, sr: &str) {
    if let Err(e) = dps.restore_sr(storage, sr).await {
        tracing::error!(sr, error = %e, "could not restore the SR's datapaths");
    }
}

/// Creates the datapath layer and starts its NBD listeners (unix socket, optional TCP).
async fn start_datapaths(cfg: &AgentConfig) -> anyhow::Result<Arc<Datapaths>> {
    let sock = cfg.nbd_socket();
    let kernel = nbd::kernel::KernelNbd::new(cfg.nbd.kernel_devices)
        .with_timeout(cfg.nbd.kernel_timeout_secs);
    let dps = Datapaths::with_options(&sock, kernel, cfg.nbd.server_options());
    dps.listen()
        .with_context(|| format!("serving NBD on unix socket {}", sock.display()))?;
    if let Some(addr) = cfg.nbd_tcp()? {
        dps.listen_tcp(addr)
            .await
            .with_context(|| format!("serving NBD on TCP {addr}"))?;
    }
    Ok(dps)
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
    nbd::raise_open_file_limit();
    let failpoints = Failpoints::from_env();
    if let Some(fp) = failpoints.armed() {
        tracing::warn!(
            failpoint = fp,
            "failpoint armed: the agent will crash there"
        );
    }
    let mut storage = Storage::new(StorageConfig {
        data_dir: cfg.data_dir.clone(),
        sr_roots: cfg.sr_roots.clone(),
        failpoints,
    });
    let dps = start_datapaths(&cfg).await?;
    storage.set_datapath_hooks(dps.clone());
    let storage = Arc::new(storage);
    crate::differencing::online::set_defaults(cfg.gc.online_options());
    if cfg.gc.enabled {
        crate::differencing::online::spawn_background(
            storage.clone(),
            crate::differencing::online::BackgroundGc {
                interval: Duration::from_secs(cfg.gc.interval_secs.max(1)),
                options: storage.gc_options(),
                snapshot_wait_depth: cfg.gc.snapshot_wait_depth,
            },
        );
    }
    let nbd_diag = dps.clone();
    let server = Server::new(
        Arc::new(EngineService::with_datapaths(storage, dps)),
        cfg.rpc.max_frame,
        cfg.rpc.max_in_flight,
    );
    server.add_diagnostics("nbd", move || nbd_diag.diagnostics());
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
    // One xenstore connection serves both the vchan rendezvous and the registration.
    let xs = connect_xenstore(&cfg).await?;
    let vchan_port = match &xs {
        Some(xs) if cfg.xen != XenBackend::None => {
            let (dom, handles) = start_vchan(&cfg, &server, xs, &stop_rx).await?;
            listeners.extend(handles);
            Some((dom, cfg.vchan.port.clone(), xs.clone()))
        }
        _ => None,
    };
    // Announce only once listening: the registry writes `state = ready` last.
    let announcer = match &xs {
        Some(xs) if cfg.xenstore.enabled => Some(register(&cfg, xs.clone()).await?),
        _ => None,
    };
    let announce_task = announcer.clone().map(|a| {
        tokio::spawn(server::run_announcer(
            server.clone(),
            a,
            Duration::from_secs(cfg.xenstore.heartbeat_secs.max(1)),
        ))
    });
    tracing::info!(
        unix = %cfg.unix.path.display(),
        vchan = %vchan_port.as_ref().map(|(d, p, _)| format!("dom{d}:{p} for {:?}", cfg.vchan.clients)).unwrap_or_else(|| "off".into()),
        nbd = %cfg.nbd_socket().display(),
        data_dir = %cfg.data_dir.display(),
        xenstore = cfg.xenstore.enabled,
        "ddstor serving"
    );
    let sig = wait_for_signal().await?;
    tracing::info!(signal = sig, "stopping: finishing in-flight calls");
    if let Some(a) = &announcer {
        if let Err(e) = a.stopping().await {
            tracing::warn!(error = %e, "could not write state = stopping in xenstore");
        }
    }
    let _ = stop_tx.send(true);
    for l in listeners {
        let _ = l.await;
    }
    if let Some((dom, port, xs)) = &vchan_port {
        remove_rendezvous(xs, *dom, port, &cfg.vchan.clients).await;
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
    if let Some(t) = announce_task {
        t.abort();
    }
    if let Some(a) = &announcer {
        match a.deregister().await {
            Ok(()) => tracing::info!("deregistered from xenstore"),
            Err(e) => tracing::warn!(error = %e, "could not deregister from xenstore"),
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Connects to xenstore when the agent registers there or serves vchan (whose rendezvous
/// lives in xenstore); `None` otherwise.
async fn connect_xenstore(cfg: &AgentConfig) -> anyhow::Result<Option<Xs>> {
    if !cfg.xenstore.enabled && cfg.xen == XenBackend::None {
        return Ok(None);
    }
    let sock = cfg.xenstore.socket_path();
    let why = if cfg.xenstore.enabled {
        "registering in xenstore"
    } else {
        "publishing the vchan rendezvous"
    };
    let xs = Xs::connect(&sock).await.with_context(|| {
        format!(
            "connecting to xenstore at {} ({why}); start xenstored (or `ddstor xenstored --socket PATH`) \
             and pass --xenstore-socket or XENSTORED_PATH",
            sock.display()
        )
    })?;
    Ok(Some(xs))
}

/// Registers the agent in xenstore (state `ready` last), announcing its unix path and vchan port.
async fn register(cfg: &AgentConfig, xs: Xs) -> anyhow::Result<Arc<dyn Announcer>> {
    let unix_path =
        (!cfg.unix.path.as_os_str().is_empty()).then(|| cfg.unix.path.display().to_string());
    let reg = Registration {
        agent: format!("ddstor {}", env!("CARGO_PKG_VERSION")),
        interfaces: INTERFACES.iter().map(|s| s.to_string()).collect(),
        vchan_port: cfg.vchan.port.clone(),
        unix_path,
        srs: Vec::new(),
        load: 0,
    };
    let a = XsAnnouncer::register(xs, &reg)
        .await
        .context("registering in xenstore")?;
    Ok(Arc::new(a))
}

/// This domain's id as xenstore knows it (its relative `domid` key); falls back to the
/// configured one when xenstore does not say, and warns when they differ.
async fn own_domid(cfg: &AgentConfig, xs: &Xs) -> u16 {
    match xs.read("domid").await.map(|v| v.trim().parse::<u16>()) {
        Ok(Ok(d)) => {
            if d != cfg.domid {
                tracing::warn!(
                    configured = cfg.domid,
                    xenstore = d,
                    "--domid differs from the domain xenstore says this is; using xenstore's"
                );
            }
            d
        }
        _ => cfg.domid,
    }
}

/// Opens the configured Xen backend (`sim` in the configured directory, or `/dev/xen`).
fn open_backend(cfg: &AgentConfig) -> anyhow::Result<Arc<dyn Backend>> {
    Ok(match cfg.xen {
        XenBackend::Sim => {
            let dir = cfg
                .sim_dir()
                .context("--xen sim needs --xen-sim-dir or XEN_SIM_DIR")?;
            Arc::new(SimXen::new(&dir).with_context(|| {
                format!("opening the simulated Xen in {}", dir.display())
            })?)
        }
        XenBackend::Xen => transport::vchan::open_backend(BackendKind::Xen)
            .context("opening /dev/xen (gntalloc, gntdev, evtchn); is this a Xen domain with the xen modules loaded?")?,
        XenBackend::None => anyhow::bail!("no Xen backend configured"),
    })
}

/// Starts one vchan listener per configured client domain (rendezvous in xenstore, under
/// this domain's `/local/domain/<D>/data/vchan/<client>/<port>`), each stopping when `stop`
/// turns true. Returns this domain's id and the listener tasks.
async fn start_vchan(
    cfg: &AgentConfig,
    server: &Server,
    xs: &Xs,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(u16, Vec<tokio::task::JoinHandle<()>>)> {
    let backend = open_backend(cfg)?;
    let me = own_domid(cfg, xs).await;
    let rendezvous = Arc::new(XsRendezvous::new(xs.clone()));
    let mut handles = Vec::new();
    for &client in &cfg.vchan.clients {
        let listener = VchanServer::new(
            backend.clone(),
            rendezvous.clone(),
            DomId(me),
            DomId(client),
            cfg.vchan.port.clone(),
            VCHAN_RING_BYTES,
            VCHAN_RING_BYTES,
        )
        .with_context(|| format!("setting up the vchan for domain {client}"))?
        .with_stall_timeout(Duration::from_secs(cfg.shutdown_grace_secs.max(5)));
        tracing::info!(
            server = me,
            client,
            port = %cfg.vchan.port,
            backend = backend.name(),
            "vchan listening"
        );
        let mut rx = stop.clone();
        // dom0 (and our own domain) cannot die while the agent lives; any other client
        // domain is watched so that its destruction frees the listener at once.
        let watch = (client != me && client != 0).then(|| xs.clone());
        handles.push(tokio::spawn(server::run_vchan_listener(
            server.clone(),
            listener,
            client,
            watch,
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        )));
    }
    Ok((me, handles))
}

/// Removes the rendezvous keys of rings published but never connected (clients must not find
/// a stopped agent's ring).
async fn remove_rendezvous(xs: &Xs, me: u16, port: &str, clients: &[u16]) {
    use transport::vchan::Rendezvous;
    let rz = XsRendezvous::new(xs.clone());
    for &c in clients {
        if let Err(e) = rz.remove(DomId(me), DomId(c), port).await {
            tracing::warn!(client = c, error = %e, "could not remove the vchan rendezvous");
        }
    }
}

/// Bytes of each vchan ring direction (order 16: 16 granted pages each way).
const VCHAN_RING_BYTES: usize = 64 << 10;

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
