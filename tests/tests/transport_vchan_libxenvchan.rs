//! The Rust vchan against Debian's real libxenvchan (libxenmisc4.17), both ways, on the
//! simulated Xen (`XEN_SIM_DIR`) through the project's shim (`LD_PRELOAD`), with libxenstore
//! talking to the project's test xenstored (`XENSTORED_PATH`). The C side is
//! `tests/c/vchan_peer.c`, a driver of libxenvchan's public API; the Rust side's rendezvous
//! goes through Debian's xenstore-utils.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use transport::vchan::sim::SimXen;
use transport::vchan::{
    rendezvous_path, DomId, EvtchnPort, GrantRef, Rendezvous, VchanClient, VchanServer, VchanStream,
};
use transport::Error;
use xs_registry::server::{Server, ServerOptions};

const SERVER: DomId = DomId(0);
const CLIENT: DomId = DomId(1);
const PORT: &str = "ddstor-test";

fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// The C driver's `source` stream (xorshift64, seed 1, byte = state >> 24).
fn xorshift_stream(n: usize) -> Vec<u8> {
    let mut s: u64 = 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

fn random_data(n: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn shim_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().unwrap().parent().unwrap();
    for p in [
        profile.join("libddstor_xen_sim.so"),
        profile.join("deps/libddstor_xen_sim.so"),
    ] {
        if p.exists() {
            ddstor_e2e::assert_fresh(&p, &["transport/sim-shim/src", "transport/src"]);
            return p;
        }
    }
    panic!(
        "libddstor_xen_sim.so not built under {}: run `cargo build --workspace`",
        profile.display()
    );
}

fn build_peer(dir: &Path) -> PathBuf {
    let gcc = ddstor_e2e::require_tool("gcc", "gcc");
    assert!(
        Path::new("/usr/include/libxenvchan.h").exists(),
        "libxenvchan.h missing: install Debian package libxen-dev"
    );
    let exe = dir.join("vchan_peer");
    let out = std::process::Command::new(gcc)
        .args(["-O2", "-Wall", "-o"])
        .arg(&exe)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/c/vchan_peer.c"))
        .arg("-lxenvchan")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building vchan_peer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

struct Env {
    tmp: tempfile::TempDir,
    sim: Arc<SimXen>,
    xs: Server,
    peer: PathBuf,
    shim: PathBuf,
}

impl Env {
    fn new() -> Env {
        ddstor_e2e::require_tool("xenstore-write", "xenstore-utils");
        let tmp = tempfile::tempdir().unwrap();
        let sim = Arc::new(SimXen::new(tmp.path().join("sim")).unwrap());
        let xs = Server::start(
            tmp.path().join("xs.sock"),
            ServerOptions {
                domains: vec![xs_registry::DomId(CLIENT.0)],
                ..ServerOptions::default()
            },
        )
        .unwrap();
        let peer = build_peer(tmp.path());
        Env {
            sim,
            xs,
            peer,
            shim: shim_path(),
            tmp,
        }
    }

    fn xs_sock(&self, dom: DomId) -> PathBuf {
        if dom == SERVER {
            self.xs.socket_path().to_path_buf()
        } else {
            xs_registry::server::domain_socket_path(
                self.xs.socket_path(),
                xs_registry::DomId(dom.0),
            )
        }
    }

    fn rendezvous(&self, as_dom: DomId) -> XsCmd {
        XsCmd {
            socket: self.xs_sock(as_dom),
        }
    }

    /// Start the C driver acting as `dom`.
    fn spawn_c(&self, dom: DomId, args: &[&str]) -> Child {
        Command::new(&self.peer)
            .args(args)
            .env("XEN_SIM_DIR", self.sim.dir())
            .env("XENSTORED_PATH", self.xs_sock(dom))
            .env("LD_PRELOAD", &self.shim)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    fn sim_dir_is_empty(&self) -> bool {
        std::fs::read_dir(self.sim.dir()).unwrap().count() == 0
    }
}

/// The C driver's final line: (bytes read, bytes written, fnv of bytes read).
async fn c_result(child: Child) -> (u64, u64, u64) {
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("C peer finished")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "C peer failed ({}): {stdout} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("bytes="))
        .expect("result line");
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap()
            .to_string()
    };
    (
        field("bytes=").parse().unwrap(),
        field("written=").parse().unwrap(),
        u64::from_str_radix(&field("fnv="), 16).unwrap(),
    )
}

/// A [`Rendezvous`] through Debian's xenstore-utils, acting as whichever domain `socket` is for.
struct XsCmd {
    socket: PathBuf,
}

impl XsCmd {
    async fn run(&self, args: &[&str]) -> Result<String, Error> {
        let out = Command::new(args[0])
            .args(&args[1..])
            .env("XENSTORED_PATH", &self.socket)
            .output()
            .await
            .map_err(|e| Error::io(args[0], e))?;
        if !out.status.success() {
            return Err(Error::Vchan(format!(
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }
}

impl Rendezvous for XsCmd {
    fn publish<'a>(
        &'a self,
        server: DomId,
        client: DomId,
        port: &'a str,
        ring_ref: GrantRef,
        evtchn: EvtchnPort,
    ) -> futures::future::BoxFuture<'a, transport::Result<()>> {
        Box::pin(async move {
            let dir = rendezvous_path(server, client, port);
            let (r, e) = (format!("{dir}/ring-ref"), format!("{dir}/event-channel"));
            self.run(&[
                "xenstore-write",
                &r,
                &ring_ref.0.to_string(),
                &e,
                &evtchn.0.to_string(),
            ])
            .await?;
            let (owner, reader) = (format!("n{}", server.0), format!("r{}", client.0));
            self.run(&["xenstore-chmod", &r, &owner, &reader]).await?;
            self.run(&["xenstore-chmod", &e, &owner, &reader]).await?;
            Ok(())
        })
    }

    fn read<'a>(
        &'a self,
        server: DomId,
        client: DomId,
        port: &'a str,
    ) -> futures::future::BoxFuture<'a, transport::Result<(GrantRef, EvtchnPort)>> {
        Box::pin(async move {
            let dir = rendezvous_path(server, client, port);
            let out = self
                .run(&[
                    "xenstore-read",
                    &format!("{dir}/ring-ref"),
                    &format!("{dir}/event-channel"),
                ])
                .await?;
            let mut it = out.lines().map(|l| l.trim().parse::<u32>());
            match (it.next(), it.next()) {
                (Some(Ok(r)), Some(Ok(e))) => Ok((GrantRef(r), EvtchnPort(e))),
                _ => Err(Error::Vchan(format!("bad rendezvous values {out:?}"))),
            }
        })
    }

    fn remove<'a>(
        &'a self,
        server: DomId,
        client: DomId,
        port: &'a str,
    ) -> futures::future::BoxFuture<'a, transport::Result<()>> {
        Box::pin(async move {
            self.run(&["xenstore-rm", &rendezvous_path(server, client, port)])
                .await?;
            Ok(())
        })
    }
}

/// Write `data` and read the echo concurrently; returns the echoed bytes.
async fn echo_through(stream: VchanStream, data: Arc<Vec<u8>>) -> Vec<u8> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let d = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in d.chunks(256 * 1024) {
            wr.write_all(chunk).await.unwrap();
        }
        wr
    });
    let mut back = vec![0u8; data.len()];
    rd.read_exact(&mut back).await.unwrap();
    let wr = writer.await.unwrap();
    drop(rd.unsplit(wr));
    back
}

async fn rust_server_c_client(orders: (u8, u8), len: usize) {
    let env = Env::new();
    let server = VchanServer::new(
        env.sim.clone(),
        Arc::new(env.rendezvous(SERVER)),
        SERVER,
        CLIENT,
        PORT,
        1,
        1,
    )
    .unwrap()
    .with_orders(orders.0, orders.1)
    .unwrap();
    let accept = tokio::spawn(async move { (server.accept().await, server) });
    // Let the server publish before the C client looks (libxenvchan does not retry).
    let path = rendezvous_path(SERVER, CLIENT, PORT);
    let reader = env.rendezvous(CLIENT);
    for _ in 0..500 {
        if reader.read(SERVER, CLIENT, PORT).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let child = env.spawn_c(CLIENT, &["client", &SERVER.0.to_string(), &path, "echo"]);
    let (stream, _server) = accept.await.unwrap();
    let stream = stream.unwrap();
    assert_eq!(stream.orders(), orders);
    let data = Arc::new(random_data(
        len,
        u64::from(orders.0) << 8 | u64::from(orders.1),
    ));
    let back = echo_through(stream, data.clone()).await;
    assert!(
        back == *data,
        "echo from libxenvchan differs from what was sent"
    );
    // Dropping the stream closed the vchan: the C client sees it and reports what it read.
    let (read, written, fnv) = c_result(child).await;
    assert_eq!((read, written), (len as u64, len as u64));
    assert_eq!(fnv, fnv1a(&data), "libxenvchan received exactly our bytes");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        env.sim_dir_is_empty(),
        "grants and ports released by both sides"
    );
    drop(env.tmp);
}

async fn c_server_rust_client(mins: (usize, usize), expect: (u8, u8), len: usize) {
    let env = Env::new();
    let path = rendezvous_path(SERVER, CLIENT, PORT);
    let child = env.spawn_c(
        SERVER,
        &[
            "server",
            &CLIENT.0.to_string(),
            &path,
            &mins.0.to_string(),
            &mins.1.to_string(),
            "echo",
        ],
    );
    let rz = env.rendezvous(CLIENT);
    let mut stream = None;
    for _ in 0..1000 {
        match VchanClient::connect(&*env.sim, &rz, SERVER, CLIENT, PORT).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let stream = stream.expect("connected to the libxenvchan server");
    assert_eq!(stream.orders(), expect, "orders chosen by libxenvchan");
    let data = Arc::new(random_data(len, len as u64));
    let back = echo_through(stream, data.clone()).await;
    assert!(back == *data, "echo from the libxenvchan server differs");
    let (read, written, fnv) = c_result(child).await;
    assert_eq!((read, written), (len as u64, len as u64));
    assert_eq!(fnv, fnv1a(&data));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        env.sim_dir_is_empty(),
        "grants and ports released by both sides"
    );
    assert!(
        rz.read(SERVER, CLIENT, PORT).await.is_err(),
        "libxenvchan removed its keys on close"
    );
}

const BIG: usize = 64 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_server_and_libxenvchan_client_orders_10_11_echo_with_checksums() {
    rust_server_c_client((10, 11), 4 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_server_and_libxenvchan_client_orders_14_16_echo_64mib() {
    rust_server_c_client((14, 16), BIG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_server_and_libxenvchan_client_orders_20_20_echo_64mib() {
    rust_server_c_client((20, 20), BIG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libxenvchan_server_and_rust_client_orders_10_11_echo_with_checksums() {
    c_server_rust_client((1024, 2048), (10, 11), 4 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libxenvchan_server_and_rust_client_orders_14_16_echo_64mib() {
    c_server_rust_client((1 << 14, 1 << 16), (14, 16), BIG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libxenvchan_server_and_rust_client_orders_20_20_echo_64mib() {
    c_server_rust_client((1 << 20, 1 << 20), (20, 20), BIG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_sees_eof_when_the_libxenvchan_server_closes() {
    let env = Env::new();
    let path = rendezvous_path(SERVER, CLIENT, PORT);
    let n = 3 << 20;
    let child = env.spawn_c(
        SERVER,
        &[
            "server",
            "1",
            &path,
            "2048",
            "65536",
            "source",
            &n.to_string(),
        ],
    );
    let rz = env.rendezvous(CLIENT);
    let mut stream = loop {
        match VchanClient::connect(&*env.sim, &rz, SERVER, CLIENT, PORT).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut got))
        .await
        .expect("EOF after the server closed")
        .unwrap();
    assert!(
        got == xorshift_stream(n),
        "every byte the C server wrote, in order"
    );
    c_result(child).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_server_serves_a_second_libxenvchan_client_after_the_first_leaves() {
    let env = Env::new();
    let server = Arc::new(
        VchanServer::new(
            env.sim.clone(),
            Arc::new(env.rendezvous(SERVER)),
            SERVER,
            CLIENT,
            PORT,
            1024,
            2048,
        )
        .unwrap(),
    );
    let path = rendezvous_path(SERVER, CLIENT, PORT);
    let reader = env.rendezvous(CLIENT);
    for round in 0..2u64 {
        let srv = server.clone();
        let accept = tokio::spawn(async move { srv.accept().await });
        while reader.read(SERVER, CLIENT, PORT).await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let child = env.spawn_c(CLIENT, &["client", "0", &path, "echo"]);
        let mut stream = accept.await.unwrap().unwrap();
        let msg = format!("hello client {round}");
        stream.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg.as_bytes());
        drop(stream);
        let (read, _, _) = c_result(child).await;
        assert_eq!(read, msg.len() as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libxenvchan_server_sees_the_rust_client_close() {
    let env = Env::new();
    let path = rendezvous_path(SERVER, CLIENT, PORT);
    let child = env.spawn_c(SERVER, &["server", "1", &path, "1024", "2048", "sink"]);
    let rz = env.rendezvous(CLIENT);
    let mut stream = loop {
        match VchanClient::connect(&*env.sim, &rz, SERVER, CLIENT, PORT).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    stream.write_all(b"goodbye").await.unwrap();
    stream.shutdown().await.unwrap();
    drop(stream);
    let (read, _, fnv) = c_result(child).await;
    assert_eq!(read, 7);
    assert_eq!(fnv, fnv1a(b"goodbye"));
}
