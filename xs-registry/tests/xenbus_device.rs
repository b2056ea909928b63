//! The client's xenbus-device mode (what a guest uses: `/dev/xen/xenbus`), against an emulated
//! device that enforces the kernel device's semantics: one request in flight per open file,
//! replies and watch events interleaved on reads, reads returning messages in pieces. The
//! emulator relays to the in-process test xenstored, as the guest kernel relays to xenstored.
//!
//! Two device stand-ins: a socketpair handed to [`Xs::from_device_file`], and a raw-mode pty
//! slave — a real character device, so [`Xs::connect`] picks xenbus mode from the path alone.

use ddstor_xs_registry::client::{Endpoint, Xs};
use ddstor_xs_registry::registry::{Registered, Registration, Registry, RegistryEvent};
use ddstor_xs_registry::rendezvous::XsRendezvous;
use ddstor_xs_registry::server::{Server, ServerOptions};
use ddstor_xs_registry::wire::{Header, MsgType, HEADER_LEN};
use ddstor_xs_registry::DomId;
use futures::StreamExt;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use transport::vchan::{EvtchnPort, GrantRef, Rendezvous};

fn read_msg(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut m = vec![0u8; HEADER_LEN];
    r.read_exact(&mut m)?;
    let mut hb = [0u8; HEADER_LEN];
    hb.copy_from_slice(&m);
    let len = Header::decode(&hb).len as usize;
    m.resize(HEADER_LEN + len, 0);
    r.read_exact(&mut m[HEADER_LEN..])?;
    Ok(m)
}

/// What the emulated device saw.
#[derive(Default)]
struct DeviceStats {
    requests: AtomicUsize,
    events: AtomicUsize,
    /// Requests written while another was still unanswered (the device forbids it).
    overlapped: AtomicUsize,
    in_flight: AtomicBool,
}

/// Relays between the guest side of a device (`guest`, blocking) and the test xenstored
/// socket `xs_socket`, the way the guest kernel's xenbus driver does.
fn emulate_device(guest: File, xs_socket: &Path) -> Arc<DeviceStats> {
    let stats = Arc::new(DeviceStats::default());
    let up = std::os::unix::net::UnixStream::connect(xs_socket).unwrap();
    let (mut g_rd, mut g_wr) = (guest.try_clone().unwrap(), guest);
    let (mut u_rd, mut u_wr) = (up.try_clone().unwrap(), up);
    let s = stats.clone();
    std::thread::spawn(move || {
        while let Ok(m) = read_msg(&mut g_rd) {
            if s.in_flight.swap(true, Ordering::SeqCst) {
                s.overlapped.fetch_add(1, Ordering::SeqCst);
            }
            s.requests.fetch_add(1, Ordering::SeqCst);
            if u_wr.write_all(&m).is_err() {
                break;
            }
        }
        let _ = u_wr.shutdown(std::net::Shutdown::Both);
    });
    let s = stats.clone();
    std::thread::spawn(move || {
        while let Ok(m) = read_msg(&mut u_rd) {
            let ty = u32::from_ne_bytes([m[0], m[1], m[2], m[3]]);
            if ty == MsgType::WatchEvent as u32 {
                s.events.fetch_add(1, Ordering::SeqCst);
            } else {
                // Answered: the next request may come (cleared before the guest can see it).
                s.in_flight.store(false, Ordering::SeqCst);
            }
            // Hand the message over in small pieces, as reads of the device may return.
            for piece in m.chunks(7) {
                if g_wr.write_all(piece).is_err() {
                    return;
                }
                std::thread::yield_now();
            }
        }
    });
    stats
}

/// A socketpair: the client's end (non-blocking, as the device is opened) and the emulator's.
fn device_pair() -> (File, File) {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    (File::from(OwnedFd::from(a)), File::from(OwnedFd::from(b)))
}

struct Env {
    server: Server,
    _dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(dir.path().join("xs"), ServerOptions::default()).unwrap();
        Env { server, _dir: dir }
    }

    /// A xenbus-mode client acting as `dom` (through its domain socket) and the device stats.
    fn guest(&self, dom: u16) -> (Xs, Arc<DeviceStats>) {
        let sock = if dom == 0 {
            self.server.socket_path().to_path_buf()
        } else {
            self.server.introduce_domain(DomId(dom)).unwrap()
        };
        let (client, dev) = device_pair();
        let stats = emulate_device(dev, &sock);
        let xs = Xs::from_device_file(client, Path::new("/dev/xen/xenbus")).unwrap();
        (xs, stats)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xenbus_mode_keeps_one_request_in_flight_while_watch_events_interleave() {
    let env = Env::new();
    let (xs, stats) = env.guest(0);
    assert!(matches!(xs.endpoint(), Endpoint::Xenbus(_)));
    let mut w = xs.watch("/test").await.unwrap();
    assert_eq!(w.next().await.as_deref(), Some("/test"));
    // Many concurrent callers on one device handle: the client must queue them.
    let writes = (0..48).map(|i| {
        let xs = xs.clone();
        async move { xs.write(&format!("/test/k{i}"), &format!("v{i}")).await }
    });
    for r in futures::future::join_all(writes).await {
        r.unwrap();
    }
    let reads = (0..48).map(|i| {
        let xs = xs.clone();
        async move { xs.read(&format!("/test/k{i}")).await.unwrap() }
    });
    let got = futures::future::join_all(reads).await;
    assert_eq!(got[17], "v17");
    // Every write fired an event on the same handle, interleaved with the replies.
    let mut seen = 0;
    while seen < 48 {
        let p = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("watch event")
            .unwrap();
        assert!(p.starts_with("/test/k"), "{p}");
        seen += 1;
    }
    // Transactions and permissions work through the device too.
    let t = xs.transaction().await.unwrap();
    t.write("/test/tx", b"1").await.unwrap();
    t.commit().await.unwrap();
    assert_eq!(xs.read("/test/tx").await.unwrap(), "1");
    assert!(xs.get_perms("/test/tx").await.unwrap()[0].dom == DomId(0));
    assert!(stats.requests.load(Ordering::SeqCst) >= 100);
    assert!(stats.events.load(Ordering::SeqCst) >= 49);
    assert_eq!(
        stats.overlapped.load(Ordering::SeqCst),
        0,
        "a request was written to the device before the previous one was answered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_agent_registers_and_publishes_a_rendezvous_over_xenbus() {
    let env = Env::new();
    let (guest, stats) = env.guest(7);
    let reg = Registration {
        agent: "ddstor test".into(),
        interfaces: vec!["core".into()],
        vchan_port: "ddstor".into(),
        unix_path: None,
        srs: vec!["sr-a".into()],
        load: 1,
    };
    let r = Registered::register(&guest, &reg).await.unwrap();
    assert_eq!(r.domid(), DomId(7));
    let rv = XsRendezvous::new(guest.clone());
    rv.publish(
        transport::vchan::DomId(7),
        transport::vchan::DomId(0),
        "ddstor",
        GrantRef(12),
        EvtchnPort(34),
    )
    .await
    .unwrap();

    // dom0, on the ordinary socket, finds the agent and reads the rendezvous.
    let dom0 = Xs::connect(env.server.socket_path()).await.unwrap();
    let addr = Registry::new(dom0.clone())
        .lookup("sr-a", None)
        .await
        .unwrap()
        .expect("the guest agent serves sr-a");
    assert_eq!(addr.domid, DomId(7));
    let got = XsRendezvous::new(dom0)
        .read(
            transport::vchan::DomId(7),
            transport::vchan::DomId(0),
            "ddstor",
        )
        .await
        .unwrap();
    assert_eq!(got, (GrantRef(12), EvtchnPort(34)));
    r.deregister().await.unwrap();
    assert!(dom0_has_no_entry(&env).await);
    assert_eq!(stats.overlapped.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_watch_runs_on_one_xenbus_device_handle() {
    let env = Env::new();
    // The watcher has nothing but a device handle (no socket to open a second connection on).
    let (dev, stats) = env.guest(0);
    let registry = Registry::new(dev.clone());
    let mut w = registry.watch().await.unwrap();
    let agent = Xs::connect(&env.server.introduce_domain(DomId(9)).unwrap())
        .await
        .unwrap();
    let reg = Registration {
        agent: "ddstor test".into(),
        interfaces: vec!["core".into()],
        vchan_port: "ddstor".into(),
        unix_path: None,
        srs: vec!["sr-w".into()],
        load: 0,
    };
    let r = Registered::register(&agent, &reg).await.unwrap();
    match next_event(&mut w).await {
        RegistryEvent::Appeared(a) => assert_eq!(a.domid, DomId(9)),
        e => panic!("expected Appeared, got {e:?}"),
    }
    // The same handle keeps answering ordinary requests while the watch is live.
    assert_eq!(
        registry.lookup("sr-w", None).await.unwrap().unwrap().domid,
        DomId(9)
    );
    r.set_load(4).await.unwrap();
    match next_event(&mut w).await {
        RegistryEvent::Changed(a) => assert_eq!(a.load, 4),
        e => panic!("expected Changed, got {e:?}"),
    }
    r.deregister().await.unwrap();
    match next_event(&mut w).await {
        RegistryEvent::Left { domid, .. } => assert_eq!(domid, DomId(9)),
        e => panic!("expected Left, got {e:?}"),
    }
    assert!(stats.events.load(Ordering::SeqCst) >= 3);
    assert_eq!(
        stats.overlapped.load(Ordering::SeqCst),
        0,
        "a request was written to the device before the previous one was answered"
    );
}

async fn next_event<S: futures::Stream<Item = RegistryEvent> + Unpin>(w: &mut S) -> RegistryEvent {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("a registry event within 10 s")
        .expect("the registry watch ended")
}

async fn dom0_has_no_entry(env: &Env) -> bool {
    let dom0 = Xs::connect(env.server.socket_path()).await.unwrap();
    Registry::new(dom0).list().await.unwrap().is_empty()
}

/// A pty pair in raw mode: (master, slave path, an open slave fd keeping the settings).
fn raw_pty() -> (File, PathBuf, File) {
    // SAFETY: plain libc calls on descriptors this function owns; every result is checked.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(m >= 0, "posix_openpt");
        assert_eq!(libc::grantpt(m), 0);
        assert_eq!(libc::unlockpt(m), 0);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(m, name.as_mut_ptr(), name.len()), 0);
        let path = PathBuf::from(
            std::ffi::CStr::from_ptr(name.as_ptr())
                .to_str()
                .unwrap()
                .to_string(),
        );
        let master = File::from_raw_fd(m);
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&slave);
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(fd, &mut t), 0);
        libc::cfmakeraw(&mut t);
        assert_eq!(libc::tcsetattr(fd, libc::TCSANOW, &t), 0);
        (master, path, slave)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_character_device_path_selects_xenbus_mode() {
    let env = Env::new();
    let (master, slave_path, _keep) = raw_pty();
    let stats = emulate_device(master, env.server.socket_path());
    let xs = Xs::connect(&slave_path).await.unwrap();
    assert_eq!(xs.endpoint(), &Endpoint::Xenbus(slave_path.clone()));
    // A value near the 4096-byte payload limit crosses the pty in several reads.
    let big = "x".repeat(4000);
    xs.write("/data/big", &big).await.unwrap();
    assert_eq!(xs.read("/data/big").await.unwrap(), big);
    assert_eq!(
        xs.directory("/data").await.unwrap(),
        vec!["big".to_string()]
    );
    assert_eq!(stats.overlapped.load(Ordering::SeqCst), 0);
    assert!(stats.requests.load(Ordering::SeqCst) >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_give_up_do_not_wedge_the_device() {
    let env = Env::new();
    let (xs, stats) = env.guest(0);
    xs.write("/c", "1").await.unwrap();
    // Each of these is polled once (its request queued or sent), then dropped.
    for _ in 0..20 {
        let _ = tokio::time::timeout(Duration::ZERO, xs.read("/c")).await;
    }
    let t = xs.transaction().await.unwrap();
    drop(t); // aborted in the background
    for i in 0..5 {
        xs.write("/c", &i.to_string()).await.unwrap();
        assert_eq!(xs.read("/c").await.unwrap(), i.to_string());
    }
    assert_eq!(stats.overlapped.load(Ordering::SeqCst), 0);
}
