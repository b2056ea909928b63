//! Helpers for the NBD tests: run `ddstor nbd serve` on a private socket, run peer tools,
//! and speak raw NBD to play a hostile client.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `ddstor nbd serve`, killed on drop.
pub struct NbdServe {
    child: Child,
    /// The unix socket it listens on.
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl NbdServe {
    /// Serves `file` with extra `ddstor nbd serve` arguments (e.g. `--read-only`).
    pub fn start(file: &Path, extra: &[&str]) -> NbdServe {
        Self::start_env(file, extra, &[])
    }

    /// Like [`NbdServe::start`], with extra environment variables.
    pub fn start_env(file: &Path, extra: &[&str], env: &[(&str, &str)]) -> NbdServe {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("nbd.sock");
        let child = Command::new(crate::bin("ddstor"))
            .arg("nbd")
            .arg("serve")
            .arg(file)
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn ddstor nbd serve");
        let mut s = NbdServe {
            child,
            socket,
            _dir: dir,
        };
        let t0 = Instant::now();
        while UnixStream::connect(&s.socket).is_err() {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("ddstor nbd serve exited early: {st}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "ddstor nbd serve did not listen on {} within 20 s",
                s.socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// NBD URI of the default (empty-named) export, understood by qemu and libnbd.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the server process is alive.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for NbdServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command, panics with its stderr when it fails, returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command expected to fail; returns stdout+stderr.
pub fn run_fail(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "{cmd:?} unexpectedly succeeded: {text}"
    );
    text
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    let data = std::fs::read(path).expect("read file");
    hex::encode(sha2::Sha256::digest(&data))
}

/// A minimal raw NBD client (fixed newstyle, optional structured replies) for hostile tests.
pub struct RawClient {
    /// The socket.
    pub s: UnixStream,
}

/// One option reply: (option, reply type, data).
pub type OptReply = (u32, u32, Vec<u8>);

impl RawClient {
    /// Connects and reads the greeting; sends client flags FIXED_NEWSTYLE|NO_ZEROES.
    pub fn connect(socket: &Path) -> RawClient {
        let s = UnixStream::connect(socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = RawClient { s };
        let mut g = [0u8; 18];
        c.s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        c.s.write_all(&3u32.to_be_bytes()).unwrap();
        c
    }

    /// Sends one option with `data`.
    pub fn send_opt(&mut self, opt: u32, data: &[u8]) {
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    /// Reads one option reply.
    pub fn read_opt_reply(&mut self) -> std::io::Result<OptReply> {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h)?;
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            0x0003_e889_0455_65a9
        );
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d)?;
        Ok((opt, kind, d))
    }

    /// Reads option replies up to and including the first that is not REP_INFO/SERVER/META.
    pub fn read_opt_final(&mut self) -> std::io::Result<OptReply> {
        loop {
            let r = self.read_opt_reply()?;
            if !(2..=4).contains(&r.1) {
                return Ok(r);
            }
        }
    }

    /// NBD_OPT_GO on `name` (simple replies unless structured was negotiated); panics unless ACKed.
    pub fn go(&mut self, name: &str) {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.send_opt(7, &d);
        let r = self.read_opt_final().expect("GO reply");
        assert_eq!(r.1, 1, "GO not acknowledged: {r:?}");
    }

    /// Sends a compact request header (and `payload`).
    pub fn request(
        &mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.s.write_all(&m).unwrap();
    }

    /// Reads a simple reply: (error, cookie), then `data_len` bytes of data if error == 0.
    pub fn simple_reply(&mut self, data_len: usize) -> std::io::Result<(u32, u64, Vec<u8>)> {
        self.simple_reply_for(|_| data_len)
    }

    /// Reads a simple reply whose data length depends on its cookie (pipelined requests are
    /// answered in any order): (error, cookie, data).
    pub fn simple_reply_for(
        &mut self,
        data_len: impl Fn(u64) -> usize,
    ) -> std::io::Result<(u32, u64, Vec<u8>)> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            0x6744_6698,
            "simple reply magic"
        );
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut d = vec![];
        let data_len = data_len(cookie);
        if err == 0 && data_len > 0 {
            d = vec![0u8; data_len];
            self.s.read_exact(&mut d)?;
        }
        Ok((err, cookie, d))
    }

    /// True when the server has closed the connection (EOF on read).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}
