//! `ddstor xs …` (dom0's view of the registry) and `ddstor xenstored` (the test server).

use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use xs_registry::server::{self, ServerOptions};
use xs_registry::DomId;

/// Arguments of `ddstor xs`.
#[derive(Debug, Args)]
pub struct XsArgs {}

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

/// Runs `ddstor xs`.
pub fn run(_args: XsArgs) -> anyhow::Result<()> {
    anyhow::bail!("ddstor xs: not built yet")
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
