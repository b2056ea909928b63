//! `ddstor`: the storage agent and its tools. See `ddstor --help`.

use clap::{Parser, Subcommand};
use ddstor::cli;
use std::process::ExitCode;

/// ddstor — storage agent of a Xen driver domain (xapi storage interface over vchan or unix).
#[derive(Debug, Parser)]
#[command(name = "ddstor", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax, e.g. `info`, `ddstor=debug`); RUST_LOG also works.
    #[arg(long, global = true, env = "DDSTOR_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Offline tools on VHD files and chains (create, snapshot, info, check, map, read, write, convert…).
    Vhd(cli::vhd::VhdArgs),
    /// dom0's view of the xenstore registry of agents (list, lookup, watch).
    Xs(cli::xs::XsArgs),
    /// Run the project's test xenstore server in the foreground.
    Xenstored(cli::xs::XenstoredArgs),
    /// Serve a disk image over NBD on a unix socket (like qemu-nbd).
    Nbd(cli::nbd::NbdArgs),
    /// Run the storage agent: serve xapi's storage interface until SIGTERM.
    Serve(cli::serve::ServeArgs),
    /// Send one xapi storage call to an agent: `ddstor call METHOD 'JSON-ARGS'`.
    Call(cli::call::CallArgs),
    /// SR verbs: create, attach, detach, scan, stat, list, destroy…
    Sr(cli::sr::SrArgs),
    /// VDI verbs: create, snapshot, clone, stat, list, destroy…
    Vdi(cli::vdi::VdiArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        // Colour only on a terminal: redirected logs stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Vhd(a) => cli::vhd::run(a),
        Command::Xs(a) => cli::xs::run(a),
        Command::Xenstored(a) => cli::xs::run_xenstored(a),
        Command::Nbd(a) => cli::nbd::run(a),
        Command::Serve(a) => cli::serve::run(a),
        Command::Call(a) => cli::call::run(a),
        Command::Sr(a) => cli::sr::run(a),
        Command::Vdi(a) => cli::vdi::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ddstor: {e:#}");
            ExitCode::FAILURE
        }
    }
}
