//! `ddstor sr gc DIR`: garbage-collect and coalesce an SR's VHD chains on demand, with a progress
//! bar. Works on the SR's directory directly (it takes the SR's lock, so the SR must not be
//! attached by a running agent: the agent's own GC covers attached SRs).

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::Arc;

/// Arguments of `ddstor sr gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// The SR's directory (holding `<uuid>.vhd` nodes and `.ddstor/`).
    dir: PathBuf,
    /// Highest copy rate of merges, bytes per second (K/M/G suffixes).
    #[arg(long, value_parser = super::vhd::parse_size, value_name = "BYTES")]
    rate_limit: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `ddstor sr gc`.
pub fn run(a: &GcArgs) -> Result<()> {
    let fp = crate::failpoint::Failpoints::from_env();
    let meta = crate::core::meta::MetaStore::new(&a.dir, fp.clone());
    let info = meta
        .read_sr()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| {
            format!(
                "{} is not an SR directory (no readable .ddstor/)",
                a.dir.display()
            )
        })?;
    let sr = crate::core::sr::Sr::attach(
        &info.uuid,
        &a.dir,
        Arc::new(crate::differencing::vhdfmt::VhdFormat),
        fp.clone(),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))
    .with_context(|| {
        format!(
            "opening SR {} at {} (is it attached by a running agent? detach it there first)",
            info.uuid,
            a.dir.display()
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
            a.dir.display()
        )
    })?;
    pb.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
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
