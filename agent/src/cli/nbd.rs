//! `ddstor nbd …`: serve a disk image over NBD from the command line, like `qemu-nbd`.

use crate::datapath::{ChainBackend, RawFileBackend};
use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use nbd::{BlockBackend, ExportOptions, Exports, NbdServer, ServerOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Arguments of `ddstor nbd`.
#[derive(Debug, Args)]
pub struct NbdArgs {
    #[command(subcommand)]
    command: NbdCommand,
}

#[derive(Debug, Subcommand)]
enum NbdCommand {
    /// Serve one disk image (a VHD chain, or a raw file) over NBD on a unix socket until
    /// interrupted (SIGINT/SIGTERM flush and exit). Clients: `nbd+unix:///?socket=PATH`.
    Serve(ServeArgs),
}

/// Image formats `ddstor nbd serve` understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A VHD (dynamic, fixed or differencing: the whole chain is served, written into the leaf).
    Vhd,
    /// A raw image file, served byte for byte.
    Raw,
}

/// Arguments of `ddstor nbd serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The image to serve.
    file: PathBuf,
    /// Unix socket to listen on (a stale socket at this path is replaced).
    #[arg(long)]
    socket: PathBuf,
    /// Also listen on this TCP address (e.g. 127.0.0.1:10809).
    #[arg(long)]
    tcp: Option<String>,
    /// Refuse writes (clients see a read-only export; writes fail with EPERM).
    #[arg(long)]
    read_only: bool,
    /// Export name clients ask for (qemu's and libnbd's default is the empty name).
    #[arg(long, default_value = "")]
    name: String,
    /// Image format.
    #[arg(long, value_enum, default_value = "vhd")]
    format: Format,
    /// Directory every member of a VHD chain must lie in (default: the file's directory).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Largest read (bytes) answered on the connection's own task when its data is cached;
    /// 0 = never (as `[nbd] inline_read_max` of `ddstor serve`).
    #[arg(long, value_name = "BYTES", default_value_t = nbd::ServerOptions::INLINE_READ_MAX)]
    inline_read_max: u64,
    /// Smallest read (bytes) sent zero-copy, spliced from the page cache; 0 = never (as
    /// `[nbd] zero_copy_min` of `ddstor serve`).
    #[arg(long, value_name = "BYTES", default_value_t = nbd::ServerOptions::ZERO_COPY_MIN)]
    zero_copy_min: u64,
    /// Most connections open at once on each listener; one more is closed at once (as
    /// `[nbd] max_connections` of `ddstor serve`).
    #[arg(long, value_name = "N", default_value_t = nbd::ServerOptions::MAX_CONNECTIONS as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
}

impl ServeArgs {
    /// The server's tuning from the flags.
    fn server_options(&self) -> ServerOptions {
        ServerOptions {
            inline_read_max: self.inline_read_max,
            zero_copy_min: self.zero_copy_min,
            max_connections: self.max_connections as usize,
        }
    }
}

/// Runs `ddstor nbd`.
pub fn run(args: NbdArgs) -> anyhow::Result<()> {
    match args.command {
        NbdCommand::Serve(a) => serve(a),
    }
}

fn open_backend(a: &ServeArgs) -> anyhow::Result<Arc<dyn BlockBackend>> {
    match a.format {
        Format::Vhd => {
            let root = match &a.root {
                Some(r) => r.clone(),
                None => a
                    .file
                    .canonicalize()
                    .with_context(|| format!("resolving {}", a.file.display()))?
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from("/")),
            };
            Ok(Arc::new(
                ChainBackend::open(&a.file, &root, !a.read_only).with_context(|| {
                    format!(
                        "opening VHD chain {} (parents confined to {}; use --root to widen, --format raw for raw images)",
                        a.file.display(),
                        root.display()
                    )
                })?,
            ))
        }
        Format::Raw => Ok(Arc::new(
            RawFileBackend::open(&a.file, a.read_only)
                .with_context(|| format!("opening raw image {}", a.file.display()))?,
        )),
    }
}

fn bind_unix(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.file_type().is_socket() {
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        } else {
            anyhow::bail!(
                "{} exists and is not a socket: choose another --socket path",
                path.display()
            );
        }
    }
    tokio::net::UnixListener::bind(path).with_context(|| {
        format!(
            "binding NBD socket {} (does its directory exist and is it writable?)",
            path.display()
        )
    })
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let backend = open_backend(&a)?;
    nbd::raise_open_file_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let exports = Exports::new();
        let export = exports.add(
            &a.name,
            backend.clone(),
            ExportOptions {
                read_only: a.read_only,
                description: Some(a.file.display().to_string()),
                ..Default::default()
            },
        )?;
        let server = NbdServer::with_options(exports, a.server_options());
        let listener = bind_unix(&a.socket)?;
        tracing::info!(socket = %a.socket.display(), file = %a.file.display(), size = export.size(), "serving NBD");
        let tcp = match &a.tcp {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding TCP {addr}"))?,
            ),
            None => None,
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let s2 = server.clone();
        let tcp_task = async move {
            match tcp {
                Some(l) => s2.serve_tcp(l).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = server.serve_unix(listener) => r.context("accepting NBD connections")?,
            r = tcp_task => r.context("accepting NBD TCP connections")?,
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        tracing::info!("stopping: flushing the export");
        export.pause().await.context("flushing the export")?;
        let _ = std::fs::remove_file(&a.socket);
        Ok(())
    })
}
