//! Storage-engine benchmark (run by `scripts/bench/core.sh`; `cargo bench -p ddstor --bench core`).
//!
//! Prints, in one run:
//! - the cost of one fsync on the SR's file system (the floor of any durable change);
//! - `VDI.snapshot` and `VDI.clone` latency (p50/p99, engine API, every fsync included) on a
//!   1 GiB and a 2040 GiB (the VHD maximum, "2 TiB") virtual disk, beside the physical floor
//!   measured on the same file system in the same run: writing and fsyncing the two new
//!   children's block tables (BAT: 4 bytes per 2 MiB block, so 2 KiB at 1 GiB and ~4 MiB at
//!   2040 GiB, each) concurrently with their directory, and the ratio;
//! - the agent's memory (RSS) with 1,000 VDIs in an attached SR, and the attach time.
//!
//! Environment: `BENCH_DIR` (default: a temporary directory under the target directory, i.e.
//! on the same disk as the SRs would be), `BENCH_ITERS` (default 100), `BENCH_VDIS` (1000).

use ddstor::core::{Storage, StorageConfig, VdiCreate, VdiDerive};
use ddstor::failpoint::Failpoints;
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SR: &str = "bbbbbbbb-0000-4000-8000-000000000001";
const SR2: &str = "bbbbbbbb-0000-4000-8000-000000000002";

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Stats {
    p50: Duration,
    p99: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    Stats {
        p50: pct(&v, 0.5),
        p99: pct(&v, 0.99),
    }
}

/// The cost of one durable write on this file system: overwrite 4 KiB of an existing file and
/// fdatasync it (one device flush; nothing can be durable for less).
fn fsync_floor(dir: &Path, iters: usize) -> Stats {
    let p = dir.join("fsync-floor");
    let f = std::fs::File::create(&p).unwrap();
    let buf = vec![0x5Au8; 4096];
    f.write_all_at(&buf, 0).unwrap();
    f.sync_all().unwrap();
    let mut out = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f.write_all_at(&buf, 0).unwrap();
        f.sync_data().unwrap();
        out.push(t.elapsed());
    }
    let _ = std::fs::remove_file(&p);
    stats(out)
}

/// The physical floor of one snapshot: create the two children's files, write a BAT-sized
/// buffer into each and make both durable with their directory entries, all three syncs issued
/// together (as the engine's barrier does; the minimum any snapshot must write and sync).
fn floor(dir: &Path, bat_bytes: usize, iters: usize) -> Stats {
    let buf = vec![0xFFu8; bat_bytes];
    let mut out = Vec::with_capacity(iters);
    for i in 0..iters {
        let t = Instant::now();
        let files: Vec<std::fs::File> = (0..2)
            .map(|c| {
                let p = dir.join(format!("floor-{i}-{c}"));
                let mut f = std::fs::File::create(&p).unwrap();
                f.write_all(&buf).unwrap();
                f
            })
            .collect();
        std::thread::scope(|s| {
            for f in &files {
                s.spawn(move || f.sync_data().unwrap());
            }
            s.spawn(|| std::fs::File::open(dir).unwrap().sync_all().unwrap());
        });
        out.push(t.elapsed());
        for c in 0..2 {
            let _ = std::fs::remove_file(dir.join(format!("floor-{i}-{c}")));
        }
    }
    stats(out)
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

async fn snapshot_latencies(st: &Storage, size: i64, iters: usize, clone: bool) -> Stats {
    let v = st
        .vdi_create(
            SR,
            VdiCreate {
                name_label: "bench".into(),
                virtual_size: size,
                persistent: true,
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .record
        .uuid;
    let mut out = Vec::with_capacity(iters);
    let mut made = Vec::new();
    for _ in 0..iters {
        let t = Instant::now();
        let s = st
            .vdi_snapshot(SR, &v, VdiDerive::default(), clone)
            .await
            .unwrap();
        out.push(t.elapsed());
        made.push(s.record.uuid);
    }
    for m in made {
        st.vdi_destroy(SR, &m).await.unwrap();
    }
    st.vdi_destroy(SR, &v).await.unwrap();
    stats(out)
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let iters: usize = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let nvdis: usize = std::env::var("BENCH_VDIS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let base: PathBuf = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().unwrap();
            exe.parent().unwrap().parent().unwrap().to_path_buf()
        });
    std::fs::create_dir_all(&base).unwrap();
    let tmp = tempfile::tempdir_in(&base).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let st = Storage::new(StorageConfig {
        data_dir: tmp.path().to_path_buf(),
        sr_roots: vec![],
        failpoints: Failpoints::none(),
    });
    rt.block_on(async {
        st.sr_create(SR, "bench", "", &BTreeMap::new())
            .await
            .unwrap();
        st.sr_attach(SR, &BTreeMap::new()).await.unwrap();
    });
    let floor_dir = tmp.path().join(SR);
    println!(
        "core benchmark: {iters} iterations per figure, SR on {}",
        tmp.path().display()
    );
    let one = fsync_floor(&floor_dir, iters.max(20));
    println!(
        "one fsync on this file system (4 KiB overwrite + fdatasync): p50 {:.3} ms, p99 {:.3} ms \
         (a snapshot makes two barriers of concurrent fsyncs: expect about 2x this)",
        ms(one.p50),
        ms(one.p99)
    );
    println!(
        "{:<24} {:>10} {:>10} | {:>13} {:>13} | {:>9}",
        "operation", "p50 ms", "p99 ms", "floor p50 ms", "floor p99 ms", "p50/floor"
    );
    println!("(floor: both children's BATs written and synced concurrently with their directory)");
    for (label, size) in [("1 GiB", 1i64 << 30), ("2040 GiB", 2040i64 << 30)] {
        // 4 bytes per 2 MiB block, rounded up to a 512-byte sector.
        let bat = ((size as u64 / (2 << 20)) * 4).div_ceil(512) * 512;
        let fl = floor(&floor_dir, bat as usize, iters);
        for clone in [false, true] {
            let s = rt.block_on(snapshot_latencies(&st, size, iters, clone));
            let name = format!("VDI.{} {label}", if clone { "clone" } else { "snapshot" });
            println!(
                "{:<24} {:>10.3} {:>10.3} | {:>13.3} {:>13.3} | {:>8.2}x",
                name,
                ms(s.p50),
                ms(s.p99),
                ms(fl.p50),
                ms(fl.p99),
                s.p50.as_secs_f64() / fl.p50.as_secs_f64()
            );
        }
    }

    // Memory with many VDIs: fill a second SR, detach, and measure a fresh attach.
    let rss_before = rss_kib();
    let t_fill = Instant::now();
    rt.block_on(async {
        st.sr_create(SR2, "many", "", &BTreeMap::new())
            .await
            .unwrap();
        st.sr_attach(SR2, &BTreeMap::new()).await.unwrap();
        for _ in 0..nvdis {
            st.vdi_create(
                SR2,
                VdiCreate {
                    name_label: "many".into(),
                    virtual_size: 1 << 30,
                    persistent: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
        st.sr_detach(SR2).await.unwrap();
    });
    let fill = t_fill.elapsed();
    let rss_detached = rss_kib();
    let t = Instant::now();
    rt.block_on(st.sr_attach(SR2, &BTreeMap::new())).unwrap();
    let attach = t.elapsed();
    let n = rt.block_on(st.sr_scan(SR2)).unwrap().len();
    let rss_attached = rss_kib();
    println!(
        "{n} VDIs: created in {:.2} s; attach (read {n} records, open {n} VHD headers) {:.1} ms; \
         RSS {} KiB before, {} KiB detached, {} KiB attached ({} KiB for the SR's state)",
        fill.as_secs_f64(),
        ms(attach),
        rss_before,
        rss_detached,
        rss_attached,
        rss_attached.saturating_sub(rss_detached)
    );
}
