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

/// Whether log lines get ANSI colours: only on a terminal, and never when `NO_COLOR` is set
/// to anything non-empty (no-color.org) or `TERM` is `dumb` (a Xen console is a terminal too,
/// but its log often ends up in a file).
fn colour_logs() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
    std::io::IsTerminal::is_terminal(&std::io::stderr()) && !no_color && !dumb
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        // Colour only on a terminal: redirected logs stay plain text.
        .with_ansi(colour_logs())
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
            eprintln!("ddstor: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// `error: cause: cause…`, leaving out a cause whose text the message already holds (many
/// errors, VHD and I/O ones among them, print their source as part of their own text).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_chain_names_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = anyhow::Error::new(io)
            .context("/x: I/O error while opening: No such file")
            .context("reading /x");
        assert_eq!(
            super::error_chain(&e),
            "reading /x: /x: I/O error while opening: No such file"
        );
    }
}
