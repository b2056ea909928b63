//! Registry benchmark driver (run by `scripts/bench/xs.sh` against `ddstor xenstored`).
//!
//! `xs_bench SOCKET [LOOKUPS] [SECONDS]`: introduces 100 domains, registers one agent per
//! domain with 10 SRs each, then measures `lookup` latency (p50/p99) and sequential READ
//! round-trips per second through one client connection. Prints `key=value` lines.

use ddstor_xs_registry::client::Xs;
use ddstor_xs_registry::registry::{Registered, Registration, Registry};
use ddstor_xs_registry::server::domain_socket_path;
use ddstor_xs_registry::DomId;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const AGENTS: u16 = 100;
const SRS_PER_AGENT: usize = 10;
const SR_POOL: usize = 200;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let socket = PathBuf::from(
        args.next()
            .ok_or("usage: xs_bench SOCKET [LOOKUPS] [SECONDS]")?,
    );
    let lookups: usize = args.next().map_or(Ok(1000), |s| s.parse())?;
    let seconds: f64 = args.next().map_or(Ok(2.0), |s| s.parse())?;
    let dom0 = Xs::connect(&socket).await?;
    let t0 = Instant::now();
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let d = DomId(100 + i);
        dom0.introduce_domain(d).await?;
        let xs = Xs::connect(&domain_socket_path(&socket, d)).await?;
        let srs = (0..SRS_PER_AGENT)
            .map(|j| format!("sr-{:03}", (usize::from(i) * 7 + j * 13) % SR_POOL))
            .collect();
        let reg = Registration {
            agent: "ddstor bench".into(),
            interfaces: vec!["core".into()],
            vchan_port: "ddstor".into(),
            unix_path: None,
            srs,
            load: u32::from(i % 13),
        };
        agents.push(Registered::register(&xs, &reg).await?);
    }
    println!("register_100_agents_ms={}", t0.elapsed().as_millis());
    let registry = Registry::new(dom0.clone());
    let mut lat = Vec::with_capacity(lookups);
    let mut found = 0;
    for k in 0..lookups {
        let sr = format!("sr-{:03}", (k * 37) % SR_POOL);
        let t = Instant::now();
        if registry.lookup(&sr, None).await?.is_some() {
            found += 1;
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    println!("lookups={lookups} found={found}");
    println!("lookup_p50_us={}", pct(&lat, 0.50).as_micros());
    println!("lookup_p99_us={}", pct(&lat, 0.99).as_micros());
    let t = Instant::now();
    let list = registry.list().await?;
    println!(
        "list_agents={} list_ms={}",
        list.len(),
        t.elapsed().as_millis()
    );
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut n = 0u64;
    let t = Instant::now();
    while Instant::now() < deadline {
        dom0.read("/local/domain/0/domid").await?;
        n += 1;
    }
    println!("read_rtt_per_s={:.0}", n as f64 / t.elapsed().as_secs_f64());
    Ok(())
}
