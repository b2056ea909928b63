//! `ddstor serve --xenstore on` against the project's test xenstored (`ddstor xenstored`):
//! the agent registers as its domain once listening (state `ready`, its unix path, the
//! interfaces), publishes attached SRs so dom0's lookup finds it, and on SIGTERM writes
//! `stopping` and removes its entry.

use ddstor_e2e::agent::{new_uuid, Agent, AgentOptions};
use serde_json::json;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use xs_registry::client::Xs;
use xs_registry::registry::{AgentState, Registry};

struct Xenstored(std::process::Child);
impl Drop for Xenstored {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn xenstored(sock: &Path, domain: u16) -> Xenstored {
    let child = Command::new(ddstor_e2e::bin("ddstor"))
        .args(["xenstored", "--socket"])
        .arg(sock)
        .args(["--domain", &domain.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !Path::new(&format!("{}.{domain}", sock.display())).exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "xenstored did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Xenstored(child)
}

async fn poll<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let t0 = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn the_agent_registers_publishes_its_srs_and_deregisters_on_sigterm() {
    let root = tempfile::tempdir().unwrap();
    let sock = root.path().join("xenstored.sock");
    let _xsd = xenstored(&sock, 3);
    let mut agent = Agent::start(
        root.path(),
        &AgentOptions {
            args: vec![
                "--xenstore".into(),
                "on".into(),
                "--xenstore-socket".into(),
                format!("{}.3", sock.display()),
                "--domid".into(),
                "3".into(),
            ],
            ..Default::default()
        },
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reg = rt.block_on(async { Registry::new(Xs::connect(&sock).await.unwrap()) });
    let rec = rt.block_on(poll("the registration", || async {
        reg.list()
            .await
            .unwrap()
            .into_iter()
            .find(|r| r.domid.0 == 3)
    }));
    assert_eq!(rec.state, AgentState::Ready);
    assert!(rec.live, "{:?}", rec.not_live_because);
    assert_eq!(
        rec.unix_path.as_deref(),
        Some(agent.socket.to_str().unwrap())
    );
    assert_eq!(rec.interfaces, vec!["core", "disk_differencing"]);
    assert!(rec.srs.is_empty());

    let sr = new_uuid();
    agent.ok("SR.create", json!({"sr": sr}));
    agent.ok("SR.attach", json!({"sr": sr}));
    let addr = rt.block_on(poll("lookup of the attached SR", || async {
        reg.lookup(&sr, None).await.unwrap()
    }));
    assert_eq!(addr.domid.0, 3);
    assert_eq!(
        addr.unix_path.as_deref(),
        Some(agent.socket.to_str().unwrap())
    );
    agent.ok("SR.detach", json!({"sr": sr}));
    rt.block_on(poll("the SR to leave the registry", || async {
        reg.lookup(&sr, None).await.unwrap().is_none().then_some(())
    }));

    let st = agent.terminate();
    assert!(st.success(), "{st}\n{}", agent.log_text());
    let gone = rt.block_on(async { reg.list().await.unwrap() });
    assert!(
        gone.iter().all(|r| r.domid.0 != 3),
        "entry left behind: {gone:?}"
    );
    assert!(
        agent.log_text().contains("deregistered"),
        "{}",
        agent.log_text()
    );
}
