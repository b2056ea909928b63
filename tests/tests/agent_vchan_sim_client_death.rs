//! A `ddstor call --xen sim` client SIGKILLed while it holds the agent's vchan: the simulated
//! Xen's death notification (the grant owner clears the dead mapper's live byte and signals
//! for it, as Xen's unmap notification does) frees the vchan, so the next client is served
//! instead of waiting for the agent to restart.

use ddstor_e2e::agent::{Agent, AgentOptions, Xenstored, VCHAN_PORT};
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use xs_registry::client::Xs;

const DOM: u16 = 1;

#[test]
fn a_sigkilled_vchan_sim_client_does_not_block_the_next_client() {
    let root = tempfile::tempdir().unwrap();
    let xsd = Xenstored::start(root.path(), &[DOM]);
    let mut agent = Agent::start(root.path(), &AgentOptions::vchan(&xsd, DOM));
    let (sr, _) = agent.create_attached_sr();
    agent.via = xsd.via_vchan(DOM);
    agent.ok("SR.stat", json!({ "sr": sr }));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let xs = rt.block_on(Xs::connect(&xsd.socket)).unwrap();
    // Published while the agent waits for a client; removed once one has connected.
    let key = format!("/local/domain/{DOM}/data/vchan/0/{VCHAN_PORT}/ring-ref");
    let published = || rt.block_on(xs.read_opt(&key)).unwrap().is_some();

    let mut killed_connected = 0;
    for attempt in 0..40 {
        let t0 = Instant::now();
        while !published() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "attempt {attempt}: the agent never offered its vchan again after a killed \
                 client (the dead client still holds it)\nagent log:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut client = Command::new(ddstor_e2e::bin("ddstor"))
            .args(["call", "--vchan", &format!("{DOM}:{VCHAN_PORT}")])
            .args(["--connect-timeout", "30", "SR.stat"])
            .arg(json!({ "sr": sr }).to_string())
            .envs(xsd.client_env())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ddstor call");
        // Kill it as soon as it has connected (the rendezvous is gone), before it is done.
        let t0 = Instant::now();
        let mut connected = false;
        while t0.elapsed() < Duration::from_secs(20) {
            if client.try_wait().unwrap().is_some() {
                break;
            }
            if !published() {
                connected = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = client.kill();
        let st = client.wait().unwrap();
        if connected && st.code().is_none() {
            killed_connected += 1;
            // The next client is served, well within its own connect timeout.
            let t = Instant::now();
            let stat = agent.ok("SR.stat", json!({ "sr": sr }));
            assert!(stat.is_object(), "{stat}");
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the next client waited {:?}",
                t.elapsed()
            );
        }
        if killed_connected >= 3 {
            break;
        }
    }
    assert!(
        killed_connected >= 1,
        "no client was ever killed while connected: the test did not exercise the death path"
    );
    eprintln!("{killed_connected} clients killed while holding the vchan; the next was served");
}
