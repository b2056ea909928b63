//! `ddstor sr gc TARGET`: garbage-collect and coalesce an SR's VHD chains on demand, with a
//! progress bar. TARGET is either an SR uuid — the running agent (reached by `--unix`) runs a
//! round online (`SR.gc`; leaves of attached VDIs are merged with a short pause), and the bar
//! follows its progress (`SR.gc` in `status` mode, polled) — or the SR's directory: offline, the
//! command takes the SR's lock itself (the SR must not be attached by a running agent).

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::Arc;

/// Arguments of `ddstor sr gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// An SR uuid (online, through the agent at --unix), or the SR's directory (offline).
    #[arg(value_name = "SR|DIR")]
    target: String,
    /// Highest copy rate of merges, bytes per second (K/M/G suffixes).
    #[arg(long, value_parser = super::vhd::parse_size, value_name = "BYTES")]
    rate_limit: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `ddstor sr gc`.
pub fn run(a: &GcArgs, connect: &super::call::ConnectArgs) -> Result<()> {
    let dir = PathBuf::from(&a.target);
    if !dir.is_dir() {
        return run_online(a, connect);
    }
    run_offline(a, &dir)
}

fn print_report(json: bool, report: &crate::differencing::gc::GcReport) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        println!(
            "removed {} hidden bases, merged {} nodes ({} bytes copied); longest chain {} -> {}",
            report.removed.len(),
            report.merged.len(),
            report.bytes_copied,
            report.depth_before,
            report.depth_after
        );
    }
    Ok(())
}

fn run_online(a: &GcArgs, connect: &super::call::ConnectArgs) -> Result<()> {
    use crate::differencing::gc::GcReport;
    use crate::differencing::online::GcStatus;
    use interface::{Call, Response, SrId};
    if uuid::Uuid::parse_str(&a.target).is_err() {
        anyhow::bail!(
            "{}: neither an SR directory nor an SR uuid; give the uuid of an SR the agent has attached, or the SR's directory",
            a.target
        );
    }
    if a.rate_limit.is_some() {
        tracing::warn!("--rate-limit applies offline only; the agent uses its [gc] rate_limit");
    }
    let rt = super::call::runtime()?;
    let target = connect.describe();
    let sr = SrId::new(a.target.clone());
    let r: std::result::Result<GcReport, crate::client::ClientError> = rt.block_on(async {
        let c = connect.connect().await?;
        let call = |mode: &str| Call::SrGc {
            dbg: Default::default(),
            sr: sr.clone(),
            mode: mode.to_string(),
        };
        let text = |r: Response| match r {
            Response::Text(t) => t,
            _ => String::new(),
        };
        let pb = ProgressBar::new(0);
        pb.set_style(
            ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let c2 = c.clone();
        let run = call("run");
        let mut job = tokio::spawn(async move { c2.call(run).await });
        let res = loop {
            tokio::select! {
                r = &mut job => break r.map_err(|e| crate::client::ClientError::Storage(
                    interface::StorageError::InternalError(format!("GC call task: {e}"))))?,
                _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {
                    if let Ok(st) = c.call(call("status")).await {
                        if let Ok(s) = serde_json::from_str::<GcStatus>(&text(st)) {
                            pb.set_message(format!("gc: {}", if s.phase.is_empty() { "starting" } else { &s.phase }));
                            pb.set_length(s.bytes_total);
                            pb.set_position(s.bytes_done);
                        }
                    }
                }
            }
        };
        pb.finish_and_clear();
        let t = text(res?);
        serde_json::from_str::<GcReport>(&t).map_err(|e| {
            crate::client::ClientError::Storage(interface::StorageError::InternalError(format!(
                "unreadable SR.gc report {t:?}: {e}"
            )))
        })
    });
    match r {
        Ok(report) => print_report(a.json, &report),
        Err(e) => super::call::exit_client_error(&e, &target),
    }
}

fn run_offline(a: &GcArgs, dir: &std::path::Path) -> Result<()> {
    let fp = crate::failpoint::Failpoints::from_env();
    let meta = crate::core::meta::MetaStore::new(dir, fp.clone());
    let info = meta
        .read_sr()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| {
            format!(
                "{} is not an SR directory (no readable .ddstor/)",
                dir.display()
            )
        })?;
    let sr = crate::core::sr::Sr::attach(
        &info.uuid,
        dir,
        Arc::new(crate::differencing::vhdfmt::VhdFormat),
        fp.clone(),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))
    .with_context(|| {
        format!(
            "opening SR {} at {} (is it attached by a running agent? detach it there first)",
            info.uuid,
            dir.display()
        )
    })?;
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let opts = crate::differencing::gc::GcOptions {
        rate_limit: a.rate_limit,
        failpoints: fp,
        cancel: None,
    };
    let report = crate::differencing::gc::run(&sr, &opts, &mut |p| {
        pb.set_message(format!("gc: step {}", p.steps_done + 1));
        pb.set_length(p.merge_bytes_total);
        pb.set_position(p.merge_bytes_done);
    })
    .map_err(|e| anyhow::anyhow!("{e}"))
    .with_context(|| {
        format!(
            "collecting SR {} (run again to resume an interrupted merge)",
            dir.display()
        )
    })?;
    pb.finish_and_clear();
    print_report(a.json, &report)
}
