//! `ddstor vhd …`: offline tools on VHD files and chains, modelled on vhd-util and qemu-img.

use clap::Args;

/// Arguments of `ddstor vhd`.
#[derive(Debug, Args)]
pub struct VhdArgs {}

/// Runs `ddstor vhd`.
pub fn run(_args: VhdArgs) -> anyhow::Result<()> {
    anyhow::bail!("ddstor vhd: not built yet")
}
