//! `ddstor vhd coalesce`: merge a differencing disk into its parent offline, like
//! `vhd-util coalesce`, optionally re-pointing its children at the parent and removing it.

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Arguments of `ddstor vhd coalesce`.
#[derive(Debug, Args)]
pub struct CoalesceArgs {
    /// The differencing disk whose own data is merged into its parent. It must not be in use,
    /// and its parent must not be used on its own (no other children, not a user disk) until
    /// the merge completes: mid-merge the parent holds a mix of old and merged sectors.
    child: PathBuf,
    /// A child of CHILD to re-point at the parent after the merge (repeat for each).
    #[arg(long, value_name = "VHD")]
    relink: Vec<PathBuf>,
    /// Remove CHILD after the merge (refused while any VHD beside it still names it as parent).
    #[arg(long)]
    delete: bool,
    /// Highest copy rate, bytes per second (K/M/G suffixes).
    #[arg(long, value_parser = super::vhd::parse_size, value_name = "BYTES")]
    rate_limit: Option<u64>,
    /// Journal file (default: `.<parent>.coalesce` beside the parent). A merge interrupted by a
    /// crash resumes from it when run again.
    #[arg(long, value_name = "PATH")]
    journal: Option<PathBuf>,
    /// Bytes copied between durable checkpoints (parent fsync + journal update): less work is
    /// redone after a crash, at the cost of more fsyncs.
    #[arg(long, value_parser = super::vhd::parse_size, value_name = "BYTES", default_value = "64M")]
    checkpoint: u64,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `ddstor vhd coalesce` with parents confined to `root`.
pub fn run(args: &CoalesceArgs, root: PathBuf) -> Result<()> {
    let child = &args.child;
    let mut opts = vhd::CoalesceOptions::new(root);
    opts.rate_limit = args.rate_limit;
    opts.journal = args.journal.clone();
    opts.checkpoint_bytes = args.checkpoint;
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template(
            "coalescing [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t0 = Instant::now();
    let report = vhd::coalesce(child, &opts, None, &mut |p| {
        pb.set_length(p.bytes_total);
        pb.set_position(p.bytes_copied);
    })
    .with_context(|| {
        format!(
            "merging {} into its parent (run the same command again to resume an interrupted merge)",
            child.display()
        )
    })?;
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    for g in &args.relink {
        vhd::relink(g, report.child, &report.parent_path).with_context(|| {
            format!(
                "re-pointing {} at {}",
                g.display(),
                report.parent_path.display()
            )
        })?;
    }
    if args.delete {
        let still = children_of(child, report.child)?;
        if !still.is_empty() {
            bail!(
                "not removing {}: {} still name it as parent (pass each with --relink)",
                child.display(),
                still
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        std::fs::remove_file(child).with_context(|| format!("removing {}", child.display()))?;
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "child": report.child.to_string(),
                "parent": report.parent.to_string(),
                "parent_path": report.parent_path,
                "bytes_copied": report.bytes_copied,
                "child_blocks": report.child_blocks,
                "resumed_from_block": report.resumed_from,
                "seconds": secs,
                "relinked": args.relink,
                "deleted": args.delete,
            })
        );
    } else {
        println!(
            "merged {} into {}: {} bytes in {} blocks copied in {:.3} s{}",
            child.display(),
            report.parent_path.display(),
            report.bytes_copied,
            report.child_blocks,
            secs,
            if report.resumed_from > 0 {
                format!(" (resumed at block {})", report.resumed_from)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

/// VHD files in `child`'s directory whose header names `uuid` as parent.
fn children_of(child: &Path, uuid: uuid::Uuid) -> Result<Vec<PathBuf>> {
    let dir = match child.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        if !p.is_file() {
            continue;
        }
        if let Ok(d) = vhd::Disk::open(&p, false) {
            if d.disk_type() == vhd::DiskType::Differencing
                && d.header().is_some_and(|h| h.parent_uuid == uuid)
            {
                out.push(p);
            }
        }
    }
    Ok(out)
}

impl CoalesceArgs {
    /// The disk being merged.
    pub fn child(&self) -> &Path {
        &self.child
    }
}
