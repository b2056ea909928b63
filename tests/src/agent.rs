//! `ddstor serve` as a child process, and `ddstor call` as the client, for the agent's
//! end-to-end tests (`tests/tests/agent_*.rs`).

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How `ddstor call` reaches the agent: connection arguments and environment.
#[derive(Debug, Clone, Default)]
pub struct ClientVia {
    /// Arguments placed before METHOD (e.g. `--vchan 1:ddstor`); empty = `--unix <socket>`.
    pub args: Vec<String>,
    /// Environment of the client (e.g. `XENSTORED_PATH`, `XEN_SIM_DIR`).
    pub env: Vec<(String, String)>,
}

/// A running test xenstored (`ddstor xenstored`) with a simulated-Xen directory beside it,
/// for agents serving vchan-sim. Killed when dropped.
#[derive(Debug)]
pub struct Xenstored {
    child: Child,
    /// The dom0 socket.
    pub socket: PathBuf,
    /// The simulated Xen directory (`XEN_SIM_DIR`).
    pub sim_dir: PathBuf,
}

/// The vchan port the test agents serve.
pub const VCHAN_PORT: &str = "ddstor";

impl Xenstored {
    /// Starts `ddstor xenstored --socket <root>/xenstored.sock` introducing `domains`, and
    /// creates `<root>/sim`.
    pub fn start(root: &Path, domains: &[u16]) -> Xenstored {
        let socket = root.join("xenstored.sock");
        let sim_dir = root.join("sim");
        std::fs::create_dir_all(&sim_dir).expect("sim dir");
        let mut cmd = Command::new(crate::bin("ddstor"));
        cmd.args(["xenstored", "--socket"]).arg(&socket);
        for d in domains {
            cmd.args(["--domain", &d.to_string()]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning ddstor xenstored");
        let me = Xenstored {
            child,
            socket,
            sim_dir,
        };
        let t0 = Instant::now();
        let ready = |p: &Path| p.exists();
        while !ready(&me.socket) || !domains.iter().all(|d| ready(&me.domain_socket(*d))) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "xenstored did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        me
    }

    /// The socket through which a connection acts as domain `d` (introduced at start).
    pub fn domain_socket(&self, d: u16) -> PathBuf {
        PathBuf::from(format!("{}.{d}", self.socket.display()))
    }

    /// `ddstor serve` arguments: serve vchan-sim as domain `domid` for client dom0 and
    /// register in xenstore.
    pub fn serve_args(&self, domid: u16) -> Vec<String> {
        let xs = if domid == 0 {
            self.socket.clone()
        } else {
            self.domain_socket(domid)
        };
        [
            "--xen",
            "sim",
            "--xen-sim-dir",
            self.sim_dir.to_str().unwrap(),
            "--domid",
            &domid.to_string(),
            "--vchan-client",
            "0",
            "--vchan-port",
            VCHAN_PORT,
            "--xenstore",
            "on",
            "--xenstore-socket",
            xs.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// The client environment (dom0's xenstore, the simulated Xen).
    pub fn client_env(&self) -> Vec<(String, String)> {
        vec![
            (
                "XENSTORED_PATH".into(),
                self.socket.to_str().unwrap().into(),
            ),
            ("XEN_SIM_DIR".into(), self.sim_dir.to_str().unwrap().into()),
            ("DDSTOR_XEN".into(), "sim".into()),
        ]
    }

    /// `ddstor call` over vchan to the agent in domain `domid`, as dom0.
    pub fn via_vchan(&self, domid: u16) -> ClientVia {
        ClientVia {
            args: vec!["--vchan".into(), format!("{domid}:{VCHAN_PORT}")],
            env: self.client_env(),
        }
    }

    /// `ddstor call --sr SR`: the agent found through the xenstore registry, as dom0.
    pub fn via_sr(&self, sr: &str) -> ClientVia {
        ClientVia {
            args: vec!["--sr".into(), sr.into()],
            env: self.client_env(),
        }
    }
}

impl Drop for Xenstored {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `ddstor serve`. Killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    /// How calls reach it (default: its unix socket).
    pub via: ClientVia,
    /// The agent's unix socket.
    pub socket: PathBuf,
    /// The agent's data directory (SRs are created under it).
    pub data_dir: PathBuf,
    /// The agent's stderr (its log).
    pub log: PathBuf,
}

/// How to start an agent.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Extra `ddstor serve` arguments.
    pub args: Vec<String>,
    /// Extra environment variables (e.g. `DDSTOR_FAILPOINT`).
    pub env: Vec<(String, String)>,
    /// How `ddstor call` reaches it (default: the unix socket).
    pub via: ClientVia,
}

impl AgentOptions {
    /// Serve vchan-sim as domain `domid` with `xsd`, and send calls over vchan.
    pub fn vchan(xsd: &Xenstored, domid: u16) -> AgentOptions {
        AgentOptions {
            args: xsd.serve_args(domid),
            env: Vec::new(),
            via: xsd.via_vchan(domid),
        }
    }
}

static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Agent {
    /// Starts `ddstor serve --data-dir <root>/data --unix <root>/run/agent.sock` and waits until
    /// it answers.
    pub fn start(root: &Path, opts: &AgentOptions) -> Agent {
        let agent = Self::spawn(root, opts);
        agent.wait_ready();
        agent
    }

    /// Starts the agent without waiting for it (for agents expected to die early).
    pub fn spawn(root: &Path, opts: &AgentOptions) -> Agent {
        let data_dir = root.join("data");
        let socket = root.join("run/agent.sock");
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = root.join(format!("agent-{n}.log"));
        let logf = std::fs::File::create(&log).expect("agent log file");
        let mut cmd = Command::new(crate::bin("ddstor"));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--unix")
            .arg(&socket)
            .arg("--log")
            .arg("info")
            .args(&opts.args)
            .env_remove("RUST_LOG")
            .env_remove("DDSTOR_FAILPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawning ddstor serve");
        Agent {
            child: Some(child),
            via: opts.via.clone(),
            socket,
            data_dir,
            log,
        }
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits (up to 30 s) until `Query.query` answers (by [`Agent::via`]); panics with the
    /// log if the agent died.
    pub fn wait_ready(&self) {
        let t0 = Instant::now();
        loop {
            if self.socket.exists() && self.try_call("Query.query", &Value::Null).is_ok() {
                return;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                panic!("agent not ready after 30 s; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn try_call(&self, method: &str, args: &Value) -> Result<Result<Value, Value>, String> {
        let text = if args.is_null() {
            "{}".to_string()
        } else {
            args.to_string()
        };
        // Large arguments go through stdin (`-`): argv strings are limited to 128 KiB.
        let big = text.len() > 64 << 10;
        let mut cmd = Command::new(crate::bin("ddstor"));
        cmd.arg("call");
        if self.via.args.is_empty() {
            cmd.arg("--unix").arg(&self.socket);
        } else {
            cmd.args(&self.via.args);
        }
        for (k, v) in &self.via.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .arg(method)
            .arg(if big { "-" } else { text.as_str() })
            .env_remove("RUST_LOG")
            .stdin(if big { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running ddstor call");
        if big {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(text.as_bytes()).expect("writing JSON-ARGS");
        }
        let out = child.wait_with_output().expect("ddstor call output");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => Ok(Ok(serde_json::from_str(&stdout).unwrap_or_else(|e| {
                panic!("{method}: stdout is not JSON ({e}): {stdout}")
            }))),
            Some(1) => {
                let v: Value = serde_json::from_str(stderr.trim()).unwrap_or_else(|e| {
                    panic!("{method}: stderr is not one JSON error ({e}): {stderr}")
                });
                Ok(Err(v["error"].clone()))
            }
            _ => Err(format!("{method}: {} {stderr}", out.status)),
        }
    }

    /// One call through `ddstor call`, or `None` when the agent could not be reached (it died).
    pub fn call_or_died(&self, method: &str, args: Value) -> Option<Result<Value, Value>> {
        self.try_call(method, &args).ok()
    }

    /// One call through `ddstor call`: Ok(result JSON) or Err(xapi error JSON, e.g.
    /// `["Sr_not_attached", "…"]`). Panics on a transport failure.
    pub fn call(&self, method: &str, args: Value) -> Result<Value, Value> {
        self.try_call(method, &args)
            .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", self.log_text()))
    }

    /// A call that must succeed.
    pub fn ok(&self, method: &str, args: Value) -> Value {
        self.call(method, args.clone()).unwrap_or_else(|e| {
            panic!(
                "{method} {args} failed: {e}\nagent log:\n{}",
                self.log_text()
            )
        })
    }

    /// A call that must fail; returns xapi's error name and payload.
    pub fn err(&self, method: &str, args: Value) -> (String, Value) {
        match self.call(method, args.clone()) {
            Ok(v) => panic!("{method} {args} succeeded with {v}, expected an error"),
            Err(e) => {
                let name = e
                    .get(0)
                    .and_then(Value::as_str)
                    .or_else(|| e.as_str())
                    .unwrap_or_default()
                    .to_string();
                (name, e.get(1).cloned().unwrap_or(Value::Null))
            }
        }
    }

    /// SR.create then SR.attach of a new SR; returns its uuid and directory.
    pub fn create_attached_sr(&self) -> (String, PathBuf) {
        let sr = new_uuid();
        let created = self.ok("SR.create", json!({ "sr": sr }));
        let dir = PathBuf::from(
            created["path"]
                .as_str()
                .unwrap_or_else(|| panic!("SR.create answered without a path: {created}")),
        );
        self.ok("SR.attach", json!({ "sr": sr }));
        (sr, dir)
    }

    /// VDI.create of a `size`-byte VDI labelled `label` in `sr`; returns its uuid.
    pub fn create_vdi(&self, sr: &str, label: &str, size: u64) -> String {
        let v = self.ok(
            "VDI.create",
            json!({"sr": sr, "vdi_info": {"name_label": label, "virtual_size": size}}),
        );
        v["vdi"]
            .as_str()
            .unwrap_or_else(|| panic!("VDI.create answered without a vdi: {v}"))
            .to_string()
    }

    /// Sends a signal (`TERM`, `KILL`, `INT`…) to the agent.
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(st.success(), "kill -{sig} failed");
    }

    /// Waits up to `timeout` for the agent to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let t0 = Instant::now();
        let child = self.child.as_mut()?;
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some(st);
            }
            if t0.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait (10 s) for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        match self.wait_exit(Duration::from_secs(10)) {
            Some(st) => st,
            None => panic!("agent ignored SIGTERM; log:\n{}", self.log_text()),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fresh random UUID (v4) as a string.
pub fn new_uuid() -> String {
    let mut b = [0u8; 16];
    let f = std::fs::File::open("/dev/urandom").and_then(|mut f| {
        use std::io::Read;
        f.read_exact(&mut b)
    });
    f.expect("reading /dev/urandom");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Reads the first `len` bytes of the flattened disk of the VHD chain whose leaf is `leaf`
/// through libvhdi's `vhdimount` (FUSE), the independent reader of differencing chains.
/// vhdimount exposes one file per layer, `vhdi1` the base: the leaf's view is the
/// highest-numbered one.
pub fn read_with_vhdimount(leaf: &Path, len: usize) -> Vec<u8> {
    let mnt = tempfile::tempdir().expect("mount point");
    let m = crate::libvhdi::VhdiMount::new(leaf, mnt.path());
    let data = (|| {
        use std::io::Read;
        let mut f = std::fs::File::open(m.leaf_view())?;
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf)?;
        Ok::<_, std::io::Error>(buf)
    })();
    drop(m);
    data.unwrap_or_else(|e| panic!("reading {} through vhdimount: {e}", leaf.display()))
}
