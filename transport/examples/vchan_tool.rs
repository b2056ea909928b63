//! `vchan_tool`: exercise the vchan transport by hand or in a benchmark, on real Xen (dom0 /
//! driver domain) or on the simulated Xen.
//!
//! ```text
//! vchan_tool --backend xen server --client-dom 5 --port test           # echo server
//! vchan_tool --backend xen client --server-dom 0 --port test --bytes 64M
//! vchan_tool --backend sim bench-throughput --orders 20,20 --bytes 1G   # in-process
//! vchan_tool --backend sim bench-latency --iters 20000 --size 64
//! vchan_tool bench-unix-latency --iters 20000 --size 64
//! vchan_tool --backend sim bench-rpc --transport vchan|unix --clients 64 --requests 2000
//! ```
//! `server`/`client` rendezvous through xenstore with Debian's `xenstore-write`/`-read`/
//! `-chmod`/`-rm` (xenstore-utils; `XENSTORED_PATH` selects a test xenstored). The `bench-*`
//! commands run both ends in this process with an in-memory rendezvous.

use clap::{Parser, Subcommand};
use ddstor_transport::vchan::{
    open_backend, rendezvous_path, Backend, BackendKind, DomId, EvtchnPort, GrantRef,
    MemRendezvous, Rendezvous, VchanClient, VchanServer, VchanStream,
};
use ddstor_transport::{Error, Result};
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Parser)]
#[command(about = "Exercise and benchmark the ddstor vchan transport")]
struct Cli {
    /// Backend: `xen` (/dev/xen) or `sim` ($XEN_SIM_DIR).
    #[arg(long, default_value = "sim")]
    backend: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo server: accept clients one after another, echo what they send.
    Server {
        /// Domain of the client.
        #[arg(long)]
        client_dom: u16,
        /// Our own domain id (for the xenstore path).
        #[arg(long, default_value_t = 0)]
        server_dom: u16,
        /// vchan port (last xenstore path component).
        #[arg(long)]
        port: String,
        /// Minimum ring sizes client->server,server->client in bytes.
        #[arg(long, default_value = "65536,65536")]
        sizes: String,
        /// Stop after this many clients (0 = for ever).
        #[arg(long, default_value_t = 0)]
        clients: usize,
    },
    /// Client: send BYTES of data, read the echo back, check it, print throughput.
    Client {
        /// Domain of the server.
        #[arg(long)]
        server_dom: u16,
        /// Our own domain id.
        #[arg(long)]
        client_dom: u16,
        /// vchan port.
        #[arg(long)]
        port: String,
        /// Bytes to send (suffixes K, M, G).
        #[arg(long, default_value = "16M")]
        bytes: String,
    },
    /// Bulk throughput, both ends in this process.
    BenchThroughput {
        /// left,right orders.
        #[arg(long, default_value = "20,20")]
        orders: String,
        /// Bytes to move client->server.
        #[arg(long, default_value = "1G")]
        bytes: String,
    },
    /// Small-message round trips over a vchan, both ends in this process.
    BenchLatency {
        /// Round trips.
        #[arg(long, default_value_t = 20000)]
        iters: usize,
        /// Message size.
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Small-message round trips over a unix socket pair.
    BenchUnixLatency {
        /// Round trips.
        #[arg(long, default_value_t = 20000)]
        iters: usize,
        /// Message size.
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Pipelined RPC requests per second.
    BenchRpc {
        /// `vchan` or `unix`.
        #[arg(long, default_value = "vchan")]
        transport: String,
        /// Concurrent callers.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Requests per caller.
        #[arg(long, default_value_t = 2000)]
        requests: usize,
    },
}

fn parse_size(s: &str) -> usize {
    let (n, mul) = match s.chars().last() {
        Some('K') => (&s[..s.len() - 1], 1 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    n.parse::<usize>().expect("size") * mul
}

fn pair(s: &str) -> (usize, usize) {
    let (a, b) = s.split_once(',').expect("two comma-separated values");
    (a.parse().expect("number"), b.parse().expect("number"))
}

/// Rendezvous through xenstore-utils commands.
struct XsCmd;

async fn xs(args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .await
        .map_err(|e| Error::io(format!("running {} (install xenstore-utils)", args[0]), e))?;
    if !out.status.success() {
        return Err(Error::Vchan(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Rendezvous for XsCmd {
    fn publish<'a>(
        &'a self,
        s: DomId,
        c: DomId,
        port: &'a str,
        r: GrantRef,
        e: EvtchnPort,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let d = rendezvous_path(s, c, port);
            let (rp, ep) = (format!("{d}/ring-ref"), format!("{d}/event-channel"));
            xs(&[
                "xenstore-write",
                &rp,
                &r.0.to_string(),
                &ep,
                &e.0.to_string(),
            ])
            .await?;
            for p in [&rp, &ep] {
                xs(&[
                    "xenstore-chmod",
                    p,
                    &format!("n{}", s.0),
                    &format!("r{}", c.0),
                ])
                .await?;
            }
            Ok(())
        })
    }
    fn read<'a>(
        &'a self,
        s: DomId,
        c: DomId,
        port: &'a str,
    ) -> BoxFuture<'a, Result<(GrantRef, EvtchnPort)>> {
        Box::pin(async move {
            let d = rendezvous_path(s, c, port);
            let out = xs(&[
                "xenstore-read",
                &format!("{d}/ring-ref"),
                &format!("{d}/event-channel"),
            ])
            .await?;
            let v: Vec<u32> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
            match v[..] {
                [r, e] => Ok((GrantRef(r), EvtchnPort(e))),
                _ => Err(Error::Vchan(format!(
                    "unexpected rendezvous values {out:?}"
                ))),
            }
        })
    }
    fn remove<'a>(&'a self, s: DomId, c: DomId, port: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            xs(&["xenstore-rm", &rendezvous_path(s, c, port)])
                .await
                .map(|_| ())
        })
    }
}

async fn pair_in_process(
    backend: Arc<dyn Backend>,
    orders: (u8, u8),
) -> Result<(VchanStream, VchanStream)> {
    let rz = Arc::new(MemRendezvous::new());
    let server = VchanServer::new(
        backend.clone(),
        rz.clone(),
        DomId(0),
        DomId(1),
        "bench",
        1,
        1,
    )?
    .with_orders(orders.0, orders.1)?;
    let (s, c) = tokio::join!(server.accept(), async {
        loop {
            match VchanClient::connect(&*backend, &*rz, DomId(0), DomId(1), "bench").await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    });
    Ok((s?, c))
}

async fn latency<A, B>(mut a: A, mut b: B, iters: usize, size: usize) -> (f64, f64)
where
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let echo = tokio::spawn(async move {
        let mut buf = vec![0u8; size];
        while b.read_exact(&mut buf).await.is_ok() {
            if b.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut samples = Vec::with_capacity(iters);
    for i in 0..iters + iters / 10 {
        let t = Instant::now();
        a.write_all(&msg).await.unwrap();
        a.read_exact(&mut back).await.unwrap();
        if i >= iters / 10 {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(a);
    let _ = echo.await;
    samples.sort_by(|x, y| x.partial_cmp(y).unwrap());
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

async fn rpc_rate<S>(server: S, client: S, clients: usize, requests: usize) -> f64
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use futures::stream::StreamExt;
    let hello = ddstor_transport::Hello::new(["bench"], "vchan_tool");
    let srv = tokio::spawn(ddstor_transport::rpc::serve_connection(
        server,
        hello.clone(),
        |x: u64| async move { x },
    ));
    let c = ddstor_transport::Client::<u64, u64>::handshake(client, hello)
        .await
        .unwrap();
    let t = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|k| {
            let c = c.clone();
            tokio::spawn(async move {
                futures::stream::iter(0..requests)
                    .map(|i| {
                        let c = c.clone();
                        async move {
                            assert_eq!(
                                c.call((k * requests + i) as u64).await.unwrap(),
                                (k * requests + i) as u64
                            )
                        }
                    })
                    .buffer_unordered(32)
                    .collect::<Vec<()>>()
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let rate = (clients * requests) as f64 / t.elapsed().as_secs_f64();
    drop(c);
    let _ = srv.await;
    rate
}

#[tokio::main]
async fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber_init();
    let cli = Cli::parse();
    let kind: BackendKind = cli.backend.parse()?;
    match cli.cmd {
        Cmd::Server {
            client_dom,
            server_dom,
            port,
            sizes,
            clients,
        } => {
            let (l, r) = pair(&sizes);
            let server = VchanServer::new(
                open_backend(kind)?,
                Arc::new(XsCmd),
                DomId(server_dom),
                DomId(client_dom),
                port,
                l,
                r,
            )?;
            let mut served = 0;
            while clients == 0 || served < clients {
                let s = server.accept().await?;
                eprintln!("client connected, orders {:?}", s.orders());
                let (mut rd, mut wr) = tokio::io::split(s);
                let n = tokio::io::copy(&mut rd, &mut wr).await.unwrap_or(0);
                eprintln!("client left after {n} bytes");
                served += 1;
            }
        }
        Cmd::Client {
            server_dom,
            client_dom,
            port,
            bytes,
        } => {
            let backend = open_backend(kind)?;
            let s = VchanClient::connect(
                &*backend,
                &XsCmd,
                DomId(server_dom),
                DomId(client_dom),
                &port,
            )
            .await?;
            let n = parse_size(&bytes);
            let data: Vec<u8> = (0..n).map(|i| (i * 31 + i / 4093) as u8).collect();
            let t = Instant::now();
            let (mut rd, mut wr) = tokio::io::split(s);
            let d = data.clone();
            let w = tokio::spawn(async move { wr.write_all(&d).await.map(|_| wr) });
            let mut back = vec![0u8; n];
            rd.read_exact(&mut back).await?;
            let _wr = w.await??;
            let secs = t.elapsed().as_secs_f64();
            if back != data {
                return Err("echo differs from what was sent".into());
            }
            println!(
                "echoed {n} bytes intact in {secs:.3} s: {:.1} MB/s each way",
                n as f64 / secs / 1e6
            );
        }
        Cmd::BenchThroughput { orders, bytes } => {
            let (l, r) = pair(&orders);
            let (mut s, mut c) = pair_in_process(open_backend(kind)?, (l as u8, r as u8)).await?;
            let n = parse_size(&bytes);
            let t = Instant::now();
            let w = tokio::spawn(async move {
                let buf = vec![0xa5u8; 1 << 16];
                let mut left = n;
                while left > 0 {
                    let k = left.min(buf.len());
                    c.write_all(&buf[..k]).await.unwrap();
                    left -= k;
                }
                c
            });
            let mut buf = vec![0u8; 1 << 16];
            let mut got = 0;
            while got < n {
                got += s.read(&mut buf).await?;
            }
            let secs = t.elapsed().as_secs_f64();
            drop(w.await?);
            println!(
                "throughput_mb_s={:.1} bytes={n} secs={secs:.3}",
                n as f64 / secs / 1e6
            );
        }
        Cmd::BenchLatency { iters, size } => {
            let (s, c) = pair_in_process(open_backend(kind)?, (10, 11)).await?;
            let (p50, p99) = latency(c, s, iters, size).await;
            println!("p50_us={p50:.2} p99_us={p99:.2}");
        }
        Cmd::BenchUnixLatency { iters, size } => {
            let (a, b) = tokio::net::UnixStream::pair()?;
            let (p50, p99) = latency(a, b, iters, size).await;
            println!("p50_us={p50:.2} p99_us={p99:.2}");
        }
        Cmd::BenchRpc {
            transport,
            clients,
            requests,
        } => {
            let rate = if transport == "unix" {
                let (a, b) = tokio::net::UnixStream::pair()?;
                rpc_rate(a, b, clients, requests).await
            } else {
                let (s, c) = pair_in_process(open_backend(kind)?, (16, 16)).await?;
                rpc_rate(s, c, clients, requests).await
            };
            println!("requests_per_s={rate:.0}");
        }
    }
    Ok(())
}

fn tracing_subscriber_init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        ))
        .with_writer(std::io::stderr)
        .try_init();
}
