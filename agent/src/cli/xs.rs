//! `ddstor xs …` (dom0's view of the registry) and `ddstor xenstored` (the test server).

use clap::Args;

/// Arguments of `ddstor xs`.
#[derive(Debug, Args)]
pub struct XsArgs {}

/// Arguments of `ddstor xenstored`.
#[derive(Debug, Args)]
pub struct XenstoredArgs {}

/// Runs `ddstor xs`.
pub fn run(_args: XsArgs) -> anyhow::Result<()> {
    anyhow::bail!("ddstor xs: not built yet")
}

/// Runs `ddstor xenstored`.
pub fn run_xenstored(_args: XenstoredArgs) -> anyhow::Result<()> {
    anyhow::bail!("ddstor xenstored: not built yet")
}
