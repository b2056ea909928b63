//! Debian's `xenstore-utils` (libxenstore, honouring `XENSTORED_PATH`) against `ddstor xenstored`.

use ddstor_e2e::{bin, require_tool};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Xenstored {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Xenstored {
    fn start(extra: &[&str]) -> Xenstored {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("xs.sock");
        let child = Command::new(bin("ddstor"))
            .arg("xenstored")
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ddstor xenstored");
        let t0 = Instant::now();
        while !socket.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "xenstored did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Xenstored {
            child,
            socket,
            _dir: dir,
        }
    }

    fn dom_socket(&self, dom: u16) -> PathBuf {
        PathBuf::from(format!("{}.{dom}", self.socket.display()))
    }
}

impl Drop for Xenstored {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tool(socket: &Path, name: &str, args: &[&str]) -> Output {
    let path = require_tool(name, "xenstore-utils");
    Command::new(path)
        .env("XENSTORED_PATH", socket)
        .args(args)
        .output()
        .expect(name)
}

fn ok(socket: &Path, name: &str, args: &[&str]) -> String {
    let o = tool(socket, name, args);
    assert!(
        o.status.success(),
        "{name} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn fails(socket: &Path, name: &str, args: &[&str]) {
    let o = tool(socket, name, args);
    assert!(
        !o.status.success(),
        "{name} {args:?} unexpectedly succeeded"
    );
}

#[test]
fn dom0_tree_is_what_xen_init_dom0_leaves() {
    let xs = Xenstored::start(&[]);
    assert_eq!(
        ok(&xs.socket, "xenstore-read", &["/local/domain/0/domid"]),
        "0\n"
    );
    assert_eq!(
        ok(&xs.socket, "xenstore-read", &["domid"]),
        "0\n",
        "relative to dom0's path"
    );
    assert_eq!(
        ok(&xs.socket, "xenstore-read", &["/local/domain/0/name"]),
        "Domain-0\n"
    );
}

#[test]
fn write_read_ls_list_exists_rm_round_trip() {
    let xs = Xenstored::start(&[]);
    let s = &xs.socket;
    ok(s, "xenstore-write", &["/t/a", "hello world", "/t/b/c", "x"]);
    assert_eq!(
        ok(s, "xenstore-read", &["/t/a", "/t/b/c"]),
        "hello world\nx\n"
    );
    assert_eq!(ok(s, "xenstore-list", &["/t"]), "a\nb\n");
    let ls = ok(s, "xenstore-ls", &["/t"]);
    assert!(ls.contains("a = \"hello world\""), "{ls}");
    assert!(ls.contains(" c = \"x\""), "{ls}");
    ok(s, "xenstore-exists", &["/t/b"]);
    fails(s, "xenstore-exists", &["/t/nope"]);
    fails(s, "xenstore-read", &["/t/nope"]);
    ok(s, "xenstore-rm", &["/t/b"]);
    fails(s, "xenstore-exists", &["/t/b/c"]);
    assert_eq!(ok(s, "xenstore-list", &["/t"]), "a\n");
}

#[test]
fn chmod_controls_what_another_domain_may_do() {
    let xs = Xenstored::start(&["--domain", "5", "--domain", "7"]);
    let s = &xs.socket;
    let d5 = xs.dom_socket(5);
    let d7 = xs.dom_socket(7);
    ok(s, "xenstore-write", &["/shared/k", "v"]);
    fails(&d5, "xenstore-read", &["/shared/k"]);
    ok(s, "xenstore-chmod", &["/shared", "n0", "r5"]);
    ok(s, "xenstore-chmod", &["/shared/k", "n0", "r5"]);
    assert_eq!(ok(&d5, "xenstore-read", &["/shared/k"]), "v\n");
    fails(&d5, "xenstore-write", &["/shared/k", "w"]);
    fails(&d7, "xenstore-read", &["/shared/k"]);
    let ls = ok(s, "xenstore-ls", &["-p", "/shared"]);
    assert!(ls.contains("(n0,r5)"), "{ls}");
    // A domain owns what it creates in its own data/ and may share it.
    ok(&d5, "xenstore-write", &["data/x", "1"]);
    fails(&d7, "xenstore-read", &["/local/domain/5/data/x"]);
    ok(&d5, "xenstore-chmod", &["data/x", "n5", "r7"]);
    assert_eq!(ok(&d7, "xenstore-read", &["/local/domain/5/data/x"]), "1\n");
    // …but may not give it away, nor write outside its own tree.
    fails(&d5, "xenstore-chmod", &["data/x", "n7"]);
    fails(&d5, "xenstore-write", &["/local/domain/7/data/y", "1"]);
    fails(&d5, "xenstore-write", &["/elsewhere", "1"]);
}

#[test]
fn watch_sees_initial_event_then_changes() {
    let xs = Xenstored::start(&[]);
    let s = xs.socket.clone();
    let watch = require_tool("xenstore-watch", "xenstore-utils");
    let mut child = Command::new(watch)
        .env("XENSTORED_PATH", &s)
        .args(["-n", "3", "/w"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Give the watch time to register; events after it are then guaranteed.
    std::thread::sleep(Duration::from_millis(300));
    ok(&s, "xenstore-write", &["/w/x", "1"]);
    ok(&s, "xenstore-rm", &["/w"]);
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "xenstore-watch did not see 3 events"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "/w\n/w/x\n/w\n");
}
