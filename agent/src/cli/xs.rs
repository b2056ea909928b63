//! `ddstor xs …` (dom0's view of the registry) and `ddstor xenstored` (the test server).

use anyhow::Context;
use clap::{Args, Subcommand};
use futures::StreamExt;
use std::path::PathBuf;
use std::time::Duration;
use xs_registry::client::Xs;
use xs_registry::registry::{self, Registered, Registration, Registry, RegistryEvent};
use xs_registry::server::{self, ServerOptions};
use xs_registry::DomId;

/// Arguments of `ddstor xs`: the registry of agents in xenstore, as dom0 sees it.
///
/// Connects like xenstore-utils: `XENSTORED_PATH`, else /run/xenstored/socket, else the xenbus
/// device /dev/xen/xenbus (a char device path selects xenbus mode).
#[derive(Debug, Args)]
pub struct XsArgs {
    #[command(subcommand)]
    command: XsCommand,
}

#[derive(Debug, Subcommand)]
enum XsCommand {
    /// List every registered agent (live or not) with its SRs, load and state.
    List {
        /// Print JSON (an array of records) instead of a table.
        #[arg(long)]
        json: bool,
        /// Seconds after which a heartbeat counts as stale.
        #[arg(long, default_value_t = registry::STALE_AFTER.as_secs())]
        stale_after: u64,
    },
    /// Print the address of the live agent serving SR-UUID with the least load.
    Lookup {
        /// The SR's uuid.
        #[arg(value_name = "SR-UUID")]
        sr: String,
        /// The VM the disk is for (accepted as xapi's load_balancing.lookup does).
        #[arg(long)]
        vm: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Seconds after which a heartbeat counts as stale.
        #[arg(long, default_value_t = registry::STALE_AFTER.as_secs())]
        stale_after: u64,
    },
    /// Print agents appearing, changing and leaving until interrupted.
    Watch {
        /// Print one JSON object per line.
        #[arg(long)]
        json: bool,
        /// Seconds after which a heartbeat counts as stale.
        #[arg(long, default_value_t = registry::STALE_AFTER.as_secs())]
        stale_after: u64,
    },
    /// Register an agent entry from this connection's domain (demos, tests) and keep its
    /// heartbeat until SIGINT/SIGTERM, then deregister.
    Register {
        /// SR uuids served (repeatable).
        #[arg(long = "sr", value_name = "SR-UUID")]
        srs: Vec<String>,
        /// vchan port name.
        #[arg(long, default_value = "ddstor")]
        vchan_port: String,
        /// Unix socket path to announce.
        #[arg(long)]
        unix_path: Option<String>,
        /// Load to announce.
        #[arg(long, default_value_t = 0)]
        load: u32,
        /// Interfaces served (comma-separated).
        #[arg(long, default_value = "core,disk_differencing")]
        interfaces: String,
    },
}

/// Arguments of `ddstor xenstored`: the project's test xenstore server, in the foreground.
///
/// Connections to `--socket` act as dom0. A connection to `<socket>.<N>` acts as domain N
/// once N is introduced (`--domain N`, or XS_INTRODUCE from dom0); `--domain-socket N=PATH`
/// binds another path for domain N. Stop it with SIGINT or SIGTERM.
#[derive(Debug, Args)]
pub struct XenstoredArgs {
    /// Unix socket to listen on (clients use `XENSTORED_PATH=PATH`).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Introduce domain N at start: creates /local/domain/N and the socket `<socket>.<N>`.
    #[arg(long = "domain", value_name = "N")]
    pub domains: Vec<u16>,
    /// Also listen on PATH for connections acting as domain N (introduces N).
    #[arg(long = "domain-socket", value_name = "N=PATH", value_parser = parse_domain_socket)]
    pub domain_sockets: Vec<(u16, PathBuf)>,
    /// Value of /local/domain/0/name.
    #[arg(long, default_value = "Domain-0")]
    pub dom0_name: String,
    /// Most nodes one unprivileged domain may own (ENOSPC beyond).
    #[arg(long, default_value_t = 1000)]
    pub max_nodes_per_domain: usize,
}

fn parse_domain_socket(s: &str) -> Result<(u16, PathBuf), String> {
    let (n, p) = s
        .split_once('=')
        .ok_or_else(|| format!("expected N=PATH, got {s:?}"))?;
    let n: u16 = n
        .parse()
        .map_err(|_| format!("domain id {n:?} is not a number 0-65535"))?;
    Ok((n, PathBuf::from(p)))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// Runs `ddstor xs`.
pub fn run(args: XsArgs) -> anyhow::Result<()> {
    runtime()?.block_on(run_async(args))
}

async fn open() -> anyhow::Result<Xs> {
    Xs::open().await.context("connecting to xenstore")
}

async fn run_async(args: XsArgs) -> anyhow::Result<()> {
    match args.command {
        XsCommand::List { json, stale_after } => {
            let reg =
                Registry::new(open().await?).with_stale_after(Duration::from_secs(stale_after));
            let list = reg.list().await.context("listing registered agents")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<6} {:<9} {:<5} {:>5}  {:<12} {:<16} SRS",
                    "DOMID", "STATE", "LIVE", "LOAD", "VCHAN-PORT", "AGENT"
                );
                for r in &list {
                    println!(
                        "{:<6} {:<9} {:<5} {:>5}  {:<12} {:<16} {}",
                        r.domid.0,
                        format!("{:?}", r.state).to_lowercase(),
                        if r.live { "yes" } else { "no" },
                        r.load,
                        r.vchan_port,
                        r.agent,
                        r.srs.join(",")
                    );
                }
            }
        }
        XsCommand::Lookup {
            sr,
            vm,
            json,
            stale_after,
        } => {
            let reg =
                Registry::new(open().await?).with_stale_after(Duration::from_secs(stale_after));
            let addr = reg
                .lookup(&sr, vm.as_deref())
                .await
                .with_context(|| format!("looking up SR {sr}"))?
                .with_context(|| {
                    format!("no live, ready agent serves SR {sr} (see `ddstor xs list`)")
                })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&addr)?);
            } else {
                println!(
                    "domid={} vchan-port={} unix-path={} load={} interfaces={}",
                    addr.domid.0,
                    addr.vchan_port,
                    addr.unix_path.as_deref().unwrap_or("-"),
                    addr.load,
                    addr.interfaces.join(",")
                );
            }
        }
        XsCommand::Watch { json, stale_after } => {
            let reg =
                Registry::new(open().await?).with_stale_after(Duration::from_secs(stale_after));
            let mut events = reg.watch().await.context("watching the registry")?;
            loop {
                let ev = tokio::select! {
                    e = events.next() => e,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                };
                let Some(ev) = ev else {
                    anyhow::bail!("xenstore connection closed");
                };
                if json {
                    println!("{}", serde_json::to_string(&ev)?);
                } else {
                    match ev {
                        RegistryEvent::Appeared(r) => println!(
                            "appeared domid={} load={} srs={}",
                            r.domid.0,
                            r.load,
                            r.srs.join(",")
                        ),
                        RegistryEvent::Changed(r) => println!(
                            "changed domid={} load={} srs={}",
                            r.domid.0,
                            r.load,
                            r.srs.join(",")
                        ),
                        RegistryEvent::Left { domid, reason } => {
                            println!("left domid={} reason={reason}", domid.0)
                        }
                    }
                }
            }
        }
        XsCommand::Register {
            srs,
            vchan_port,
            unix_path,
            load,
            interfaces,
        } => {
            // Handlers first, so a SIGTERM right after registration still deregisters.
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .context("installing the SIGTERM handler")?;
            let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .context("installing the SIGINT handler")?;
            let xs = open().await?;
            let reg = Registration {
                agent: format!("ddstor {}", env!("CARGO_PKG_VERSION")),
                interfaces: interfaces
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
                vchan_port,
                unix_path,
                srs,
                load,
            };
            let me = Registered::register(&xs, &reg)
                .await
                .context("registering in xenstore")?;
            println!("registered {}", me.base());
            let hb = me.spawn_heartbeat(registry::HEARTBEAT_INTERVAL);
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            hb.abort();
            me.deregister().await.context("deregistering")?;
        }
    }
    Ok(())
}

/// Runs `ddstor xenstored`.
pub fn run_xenstored(args: XenstoredArgs) -> anyhow::Result<()> {
    let mut opts = ServerOptions {
        dom0_name: args.dom0_name,
        domains: args.domains.into_iter().map(DomId).collect(),
        domain_sockets: args
            .domain_sockets
            .into_iter()
            .map(|(d, p)| (DomId(d), p))
            .collect(),
        ..ServerOptions::default()
    };
    opts.limits.max_nodes_per_domain = args.max_nodes_per_domain;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let socket = args.socket.clone();
    rt.block_on(server::run(&args.socket, opts))
        .with_context(|| format!("test xenstored on {}", socket.display()))
}
