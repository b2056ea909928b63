//! `scripts/run.sh DIR` (the README's main-job command) with a temporary DIR: it starts the test
//! xenstored and the agent with vchan-sim and registration, answers calls by unix socket, by
//! `--vchan 0:ddstor` and by `--sr UUID`, and on SIGINT stops the agent cleanly (exit 0, entry
//! removed from xenstore, no process left).

use ddstor_e2e::agent::new_uuid;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/run.sh")
}

fn call(dir: &Path, via: &[&str], method: &str, args: &str) -> Value {
    let out = Command::new(ddstor_e2e::bin("ddstor"))
        .arg("call")
        .args(via)
        .arg(method)
        .arg(args)
        .env("XENSTORED_PATH", dir.join("xenstored.sock"))
        .env("XEN_SIM_DIR", dir.join("sim"))
        .env("DDSTOR_XEN", "sim")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{method} via {via:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn run_sh_serves_by_unix_vchan_and_sr_lookup_and_stops_cleanly_on_sigint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let mut child = Command::new("bash")
        .arg(script())
        .arg(&dir)
        .env("DDSTOR_BIN", ddstor_e2e::bin("ddstor"))
        .env("DDSTOR_XEN", "sim")
        .env_remove("XENSTORED_PATH")
        .env_remove("XEN_SIM_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    let t0 = Instant::now();
    while !banner.contains("Stop it with Ctrl-C") {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "run.sh ended before serving: {}\n{banner}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        banner.push_str(&line);
        assert!(t0.elapsed() < Duration::from_secs(60), "{banner}");
    }
    let sr = std::fs::read_to_string(dir.join("sr.uuid"))
        .unwrap()
        .trim()
        .to_string();
    assert!(banner.contains("--vchan 0:ddstor") && banner.contains(&format!("--sr {sr}")));

    let sock = dir.join("run/agent.sock");
    let q = call(
        &dir,
        &["--unix", sock.to_str().unwrap()],
        "Query.query",
        "{}",
    );
    assert_eq!(q["driver"], "ddstor");
    let args = format!(r#"{{"sr":"{sr}","vdi_info":{{"name_label":"v","virtual_size":1048576}}}}"#);
    let vdi = call(&dir, &["--vchan", "0:ddstor"], "VDI.create", &args);
    let stat = call(
        &dir,
        &["--sr", &sr],
        "VDI.stat",
        &format!(r#"{{"sr":"{sr}","vdi":{}}}"#, vdi["vdi"]),
    );
    assert_eq!(stat["name_label"], "v");
    let unknown = new_uuid();
    let out = Command::new(ddstor_e2e::bin("ddstor"))
        .args(["call", "--sr", &unknown, "Query.query"])
        .env("XENSTORED_PATH", dir.join("xenstored.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "an SR nobody serves");
    let reg = Command::new(ddstor_e2e::bin("ddstor"))
        .args(["xs", "list", "--json"])
        .env("XENSTORED_PATH", dir.join("xenstored.sock"))
        .output()
        .unwrap();
    let reg: Value = serde_json::from_slice(&reg.stdout).unwrap();
    assert_eq!(reg[0]["srs"][0], sr.as_str(), "{reg}");

    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "run.sh ignored SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{status}: {err}");
    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap();
    assert!(log.contains("deregistered from xenstore"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "no colour codes in a redirected log"
    );
    assert!(!sock.exists(), "the agent removed its socket");
    assert!(!dir.join("xenstored.sock").exists(), "xenstored stopped");
}
