//! `xenvm-vchan`: drives ddstor's Rust vchan ring (`transport::vchan`) inside the Xen VM of
//! `scripts/xen-vm/`, speaking the same little protocol as the C driver of Debian's libxenvchan
//! (`scripts/xen-vm/c/vchan-peer.c`), so that each side can be swapped for the other:
//!
//! - `server`: an echo server (every byte comes back) for one client domain on one port,
//!   serving clients one after another; prints one line per client (bytes echoed, or why the
//!   connection was dropped: a hostile peer's bogus indices are reported, not fatal);
//! - `client … ping | stream BYTES | rtt COUNT | hold`: the same modes as `vchan-peer client`.
//!
//! The rendezvous (`/local/domain/<server>/data/vchan/<client>/<port>/{ring-ref,event-channel}`)
//! goes through the real xenstored with Debian's `xenstore-*` tools, which work in dom0 (unix
//! socket) and in a guest (`/dev/xen/xenbus`) alike.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use futures::future::BoxFuture;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use transport::vchan::{
    open_backend, rendezvous_path, Backend, BackendKind, DomId, EvtchnPort, GrantRef, PeerGone,
    Rendezvous, VchanClient, VchanServer, VchanStream,
};

/// Test driver of ddstor's vchan ring on real Xen.
#[derive(Debug, Parser)]
#[command(name = "xenvm-vchan", version, about)]
struct Cli {
    /// Grant/event-channel backend: "xen" (/dev/xen/*) or "sim" ($XEN_SIM_DIR).
    #[arg(long, default_value = "xen")]
    backend: String,
    /// This domain's id (default: `xenstore-read domid`, 0 in dom0).
    #[arg(long)]
    dom: Option<u16>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Echo server for CLIENT_DOM on PORT; serves COUNT clients one after another (0 = forever).
    Server {
        /// The client's domain.
        client_dom: u16,
        /// The vchan port (rendezvous key).
        port: String,
        /// Ring orders LEFT,RIGHT (10..=20), e.g. 10,11.
        #[arg(long, value_parser = parse_orders)]
        orders: Option<(u8, u8)>,
        /// Clients to serve before exiting (0 = forever).
        #[arg(long, default_value_t = 1)]
        count: u64,
    },
    /// Client of a server in SERVER_DOM on PORT.
    Client {
        /// The server's domain.
        server_dom: u16,
        /// The vchan port.
        port: String,
        /// ping | stream | rtt | hold
        mode: String,
        /// Bytes (stream) or calls (rtt).
        #[arg(default_value_t = 0)]
        arg: u64,
    },
}

fn parse_orders(s: &str) -> std::result::Result<(u8, u8), String> {
    let (l, r) = s.split_once(',').ok_or("expected LEFT,RIGHT")?;
    Ok((
        l.trim().parse().map_err(|e| format!("{e}"))?,
        r.trim().parse().map_err(|e| format!("{e}"))?,
    ))
}

/// The rendezvous through Debian's xenstore-* tools against the real xenstored.
struct XsTools;

fn xs(args: &[&str]) -> transport::Result<String> {
    // Under TCG a tool run now and then fails with nothing on stderr: retry a few times and
    // say how it ended, so a real failure still surfaces with its reason.
    let mut last = String::new();
    for attempt in 0..4 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(200));
            eprintln!("xenvm-vchan: retrying {} ({last})", args.join(" "));
        }
        let out = match Command::new(args[0])
            .args(&args[1..])
            .stdin(std::process::Stdio::null())
            .output()
        {
            Ok(o) => o,
            Err(e) => {
                last = format!("running {}: {e}", args[0]);
                continue;
            }
        };
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
        last = format!(
            "{} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Err(transport::Error::Vchan(last))
}

impl Rendezvous for XsTools {
    fn publish<'a>(
        &'a self,
        server: DomId,
        client: DomId,
        port: &'a str,
        ring_ref: GrantRef,
        evtchn: EvtchnPort,
    ) -> BoxFuture<'a, transport::Result<()>> {
        Box::pin(async move {
            let dir = rendezvous_path(server, client, port);
            let (r, e) = (format!("{dir}/ring-ref"), format!("{dir}/event-channel"));
            let (owner, reader) = (format!("n{server}"), format!("r{client}"));
            xs(&["xenstore-write", &r, &ring_ref.0.to_string()])?;
            xs(&["xenstore-write", &e, &evtchn.0.to_string()])?;
            for p in [&dir, &r, &e] {
                xs(&["xenstore-chmod", p, &owner, &reader])?;
            }
            Ok(())
        })
    }

    fn read<'a>(
        &'a self,
        server: DomId,
        client: DomId,
        port: &'a str,
    ) -> BoxFuture<'a, transport::Result<(GrantRef, EvtchnPort)>> {
        Box::pin(async move {
            let dir = rendezvous_path(server, client, port);
            let num = |k: &str| -> transport::Result<u32> {
                let v = xs(&["xenstore-read", &format!("{dir}/{k}")])?;
                v.parse().map_err(|_| {
                    transport::Error::Vchan(format!("{dir}/{k} = {v:?}: not a number"))
                })
            };
            Ok((
                GrantRef(num("ring-ref")?),
                EvtchnPort(num("event-channel")?),
            ))
        })
    }

    fn remove<'a>(
        &'a self,
        server: DomId,
        client: DomId,
        port: &'a str,
    ) -> BoxFuture<'a, transport::Result<()>> {
        Box::pin(
            async move { xs(&["xenstore-rm", &rendezvous_path(server, client, port)]).map(|_| ()) },
        )
    }
}

fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// Echo everything until the client goes away; the number of bytes echoed.
async fn echo(stream: &mut VchanStream) -> Result<u64> {
    let mut buf = vec![0u8; 65536];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf).await.context("read")?;
        if n == 0 {
            return Ok(total);
        }
        match stream.write_all(&buf[..n]).await {
            Ok(()) => total += n as u64,
            // The client left while we answered: that is its end, not our failure.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(total),
            Err(e) => return Err(e).context("write"),
        }
    }
}

async fn server(
    backend: Arc<dyn Backend>,
    me: DomId,
    client: DomId,
    port: &str,
    orders: Option<(u8, u8)>,
    count: u64,
) -> Result<()> {
    let mut srv = VchanServer::new(backend, Arc::new(XsTools), me, client, port, 1, 1)?;
    if let Some((l, r)) = orders {
        srv = srv.with_orders(l, r)?;
    }
    let mut served = 0u64;
    loop {
        println!("xenvm-vchan: server {me} ready for domain {client} on port {port}");
        let mut stream = match srv.accept().await {
            Ok(s) => s,
            // A client killed between mapping the ring and announcing itself clears its live
            // byte through the unmap notification: not this server's failure, listen again.
            Err(e) if e.to_string().contains("left before connecting") => {
                println!("xenvm-vchan: a client left before connecting ({e}); listening again");
                continue;
            }
            Err(e) => return Err(e).context("accept"),
        };
        served += 1;
        let (l, r) = stream.orders();
        match echo(&mut stream).await {
            Ok(n) => println!("xenvm-vchan: client {served} (orders {l},{r}): echoed {n} bytes"),
            Err(e) => println!("xenvm-vchan: client {served} (orders {l},{r}): dropped: {e:#}"),
        }
        drop(stream);
        if count != 0 && served >= count {
            return Ok(());
        }
    }
}

async fn client(
    backend: Arc<dyn Backend>,
    me: DomId,
    server: DomId,
    port: &str,
    mode: &str,
    arg: u64,
) -> Result<()> {
    let stream = VchanClient::connect(&*backend, &XsTools, server, me, port)
        .await
        .with_context(|| format!("connecting to domain {server} port {port}"))?;
    let (l, r) = stream.orders();
    let mut stream = stream;
    match mode {
        "ping" => {
            let mut got = [0u8; 5];
            stream.write_all(b"PING!").await?;
            stream.read_exact(&mut got).await?;
            if &got != b"PING!" {
                bail!("ping: got {got:?}");
            }
            println!("VCHAN_OK (orders {l},{r})");
        }
        "rtt" => {
            let (mut out, mut inp) = ([0u8; 16], [0u8; 16]);
            let t = Instant::now();
            for i in 0..arg {
                out.fill(i as u8);
                stream.write_all(&out).await?;
                stream.read_exact(&mut inp).await?;
                if out != inp {
                    bail!("rtt: echo mismatch at call {i}");
                }
            }
            let us = t.elapsed().as_secs_f64() / arg.max(1) as f64 * 1e6;
            println!("xenvm-vchan: rtt {us:.1} us over {arg} calls");
        }
        "stream" => {
            let (mut rd, mut wr) = tokio::io::split(stream);
            let t = Instant::now();
            let writer = async move {
                let mut buf = vec![0u8; 65536];
                let mut sent = 0u64;
                while sent < arg {
                    let n = (arg - sent).min(buf.len() as u64) as usize;
                    for (i, b) in buf[..n].iter_mut().enumerate() {
                        *b = pattern(sent + i as u64);
                    }
                    wr.write_all(&buf[..n]).await.context("stream write")?;
                    sent += n as u64;
                }
                anyhow::Ok(wr)
            };
            let reader = async move {
                let mut buf = vec![0u8; 65536];
                let mut got = 0u64;
                while got < arg {
                    let n = rd.read(&mut buf).await.context("stream read")?;
                    if n == 0 {
                        bail!("stream: peer closed after {got} of {arg} bytes");
                    }
                    for (i, b) in buf[..n].iter().enumerate() {
                        if *b != pattern(got + i as u64) {
                            bail!("stream: byte {} differs", got + i as u64);
                        }
                    }
                    got += n as u64;
                }
                anyhow::Ok(rd)
            };
            let (wr, rd) = tokio::try_join!(writer, reader)?;
            let secs = t.elapsed().as_secs_f64();
            println!(
                "xenvm-vchan: stream {arg} bytes verified (orders {l},{r}), {:.2} MiB/s",
                arg as f64 / secs / 1048576.0
            );
            drop(rd.unsplit(wr));
            return Ok(());
        }
        "hold" => {
            if server != me {
                watch_domain(server, stream.peer_gone_handle());
            }
            println!("xenvm-vchan: connected (orders {l},{r}), holding");
            let mut b = [0u8; 64];
            let t = Instant::now();
            loop {
                match stream.read(&mut b).await {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) => {
                        println!("xenvm-vchan: read error: {e}");
                        break;
                    }
                }
            }
            println!(
                "xenvm-vchan: peer closed (seen after {:.1} s)",
                t.elapsed().as_secs_f64()
            );
        }
        other => bail!("unknown mode {other:?}: ping, stream, rtt or hold"),
    }
    // Let the peer read our last bytes before the ring goes.
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}

/// A destroyed domain never clears its live byte nor signals: watch xenstore's
/// `@releaseDomain` (fired whenever a domain dies) and, once the server's domain tree is gone,
/// tell the stream (`PeerGone`), as a long-lived dom0 client of a driver domain must.
fn watch_domain(dom: DomId, gone: PeerGone) {
    use std::io::BufRead;
    let child = Command::new("xenstore-watch")
        .arg("@releaseDomain")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("xenvm-vchan: cannot watch @releaseDomain: {e}");
            return;
        }
    };
    let out = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for _line in std::io::BufReader::new(out).lines() {
            let domid = format!("/local/domain/{}/domid", dom.0);
            let exists = Command::new("xenstore-exists")
                .arg(&domid)
                .stdin(std::process::Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(true);
            if !exists {
                println!("xenvm-vchan: domain {} is gone (@releaseDomain)", dom.0);
                gone.signal();
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    });
}

fn my_domid(arg: Option<u16>) -> Result<DomId> {
    if let Some(d) = arg {
        return Ok(DomId(d));
    }
    let v = xs(&["xenstore-read", "domid"]).context("reading this domain's id")?;
    Ok(DomId(v.parse().with_context(|| format!("domid {v:?}"))?))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        ))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let run = async {
        let kind: BackendKind = cli.backend.parse()?;
        let backend = open_backend(kind).context("opening the vchan backend")?;
        let me = my_domid(cli.dom)?;
        match cli.cmd {
            Cmd::Server {
                client_dom,
                port,
                orders,
                count,
            } => server(backend, me, DomId(client_dom), &port, orders, count).await,
            Cmd::Client {
                server_dom,
                port,
                mode,
                arg,
            } => client(backend, me, DomId(server_dom), &port, &mode, arg).await,
        }
    };
    match run.await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xenvm-vchan: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
