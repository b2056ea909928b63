//! `ddstor sr create|attach|detach|scan|stat|list|destroy|set-name-label|set-description`:
//! friendly verbs over the SR calls.

use super::call::{exit_client_error, print_response, runtime, ConnectArgs};
use crate::client::ClientError;
use clap::{Args, Subcommand};
use interface::{Call, Dbg, Response, SrId, StringMap, VdiInfo};
use std::path::PathBuf;

/// Arguments of `ddstor sr`.
#[derive(Debug, Args)]
pub struct SrArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(subcommand)]
    command: SrCommand,
}

#[derive(Debug, Subcommand)]
enum SrCommand {
    /// Garbage-collect and coalesce an SR's chains: an attached SR's uuid (the agent does it,
    /// online) or an SR's directory (offline).
    Gc(super::gc::GcArgs),
    /// Create an SR (SR.create); prints its uuid. Attach it with `ddstor sr attach UUID`.
    Create {
        /// The SR's uuid (default: a new random one).
        #[arg(long)]
        uuid: Option<String>,
        /// Human-readable name.
        #[arg(long, default_value = "")]
        name_label: String,
        /// Description.
        #[arg(long, default_value = "")]
        name_description: String,
        /// Directory for the SR (device_config `path`); default: under the agent's data dir.
        #[arg(long)]
        path: Option<PathBuf>,
        /// Attach it right away.
        #[arg(long)]
        attach: bool,
    },
    /// Attach an SR (SR.attach).
    Attach {
        /// The SR.
        sr: String,
        /// Directory of the SR, when the agent does not know it yet (device_config `path`).
        #[arg(long)]
        path: Option<PathBuf>,
    },
    /// Detach an SR (SR.detach).
    Detach {
        /// The SR.
        sr: String,
    },
    /// Destroy an empty SR (SR.destroy).
    Destroy {
        /// The SR.
        sr: String,
    },
    /// List the VDIs of an SR (SR.scan): a table, or JSON with --json.
    Scan {
        /// The SR.
        sr: String,
        /// Print xapi's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Name, space and health of an SR (SR.stat), as JSON.
    Stat {
        /// The SR.
        sr: String,
    },
    /// The attached SRs (SR.list), one per line.
    List,
    /// Rename an SR (SR.set_name_label).
    SetNameLabel {
        /// The SR.
        sr: String,
        /// New name.
        name_label: String,
    },
    /// Change an SR's description (SR.set_name_description).
    SetDescription {
        /// The SR.
        sr: String,
        /// New description.
        name_description: String,
    },
}

fn dc(path: Option<PathBuf>) -> StringMap {
    let mut m = StringMap::new();
    if let Some(p) = path {
        m.insert("path".into(), p.display().to_string());
    }
    m
}

/// Prints VDIs as a table: uuid, size, flags, name.
pub fn print_vdi_table(vdis: &[VdiInfo]) {
    println!(
        "{:<36}  {:>12}  {:<5}  {:<36}  NAME",
        "VDI", "SIZE", "FLAGS", "SNAPSHOT-OF"
    );
    for v in vdis {
        let flags = format!(
            "{}{}{}{}",
            if v.is_a_snapshot { 's' } else { '-' },
            if v.read_only { 'r' } else { '-' },
            if v.persistent { 'p' } else { '-' },
            if v.sharable { 'S' } else { '-' },
        );
        println!(
            "{:<36}  {:>12}  {:<5}  {:<36}  {}",
            v.vdi,
            v.virtual_size,
            flags,
            v.snapshot_of.as_str(),
            v.name_label
        );
    }
}

/// Runs `ddstor sr`.
pub fn run(a: SrArgs) -> anyhow::Result<()> {
    if let SrCommand::Gc(g) = &a.command {
        return super::gc::run(g, &a.connect);
    }
    let rt = runtime()?;
    let target = a.connect.describe();
    let result: Result<(), ClientError> = rt.block_on(async {
        let c = a.connect.connect().await?;
        let d = Dbg::default;
        match a.command {
            SrCommand::Create {
                uuid,
                name_label,
                name_description,
                path,
                attach,
            } => {
                let sr = SrId::new(uuid.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()));
                let cfg = c
                    .sr_create(&sr, &name_label, &name_description, dc(path))
                    .await?;
                if attach {
                    c.sr_attach(&sr, cfg).await?;
                }
                println!("{sr}");
            }
            SrCommand::Attach { sr, path } => c.sr_attach(&sr.into(), dc(path)).await?,
            SrCommand::Detach { sr } => c.sr_detach(&sr.into()).await?,
            SrCommand::Destroy { sr } => c.sr_destroy(&sr.into()).await?,
            SrCommand::Scan { sr, json } => {
                let vdis = c.sr_scan(&sr.into()).await?;
                if json {
                    let _ = print_response(&Response::VdiInfos(vdis));
                } else {
                    print_vdi_table(&vdis);
                }
            }
            SrCommand::Stat { sr } => {
                let r = c
                    .call(Call::SrStat {
                        dbg: d(),
                        sr: sr.into(),
                    })
                    .await?;
                let _ = print_response(&r);
            }
            SrCommand::List => {
                for sr in c.sr_list().await? {
                    println!("{sr}");
                }
            }
            SrCommand::SetNameLabel { sr, name_label } => {
                c.call(Call::SrSetNameLabel {
                    dbg: d(),
                    sr: sr.into(),
                    new_name_label: name_label,
                })
                .await?;
            }
            SrCommand::SetDescription {
                sr,
                name_description,
            } => {
                c.call(Call::SrSetNameDescription {
                    dbg: d(),
                    sr: sr.into(),
                    new_name_description: name_description,
                })
                .await?;
            }
            // Handled above, before connecting.
            SrCommand::Gc(_) => {}
        }
        Ok(())
    });
    // Drop the runtime (and with it the connection) before any exit: a vchan peer must see
    // the ring closed, or the agent keeps this domain's one vchan.
    drop(rt);
    match result {
        Ok(()) => Ok(()),
        Err(e) => exit_client_error(&e, &target),
    }
}
