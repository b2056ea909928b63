//! `ddstor vdi create|snapshot|clone|stat|list|destroy|set-…`: friendly verbs over the VDI calls.

use super::call::{exit_client_error, print_response, runtime, ConnectArgs};
use super::sr::print_vdi_table;
use crate::client::ClientError;
use clap::{Args, Subcommand};
use interface::{Call, Dbg, Response, SrId, VdiId, VdiInfo};

/// Arguments of `ddstor vdi`.
#[derive(Debug, Args)]
pub struct VdiArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// The SR holding the VDIs.
    #[arg(long, env = "DDSTOR_SR", global = true)]
    sr: Option<String>,
    /// Find the agent serving --sr through the xenstore registry (as --lookup-sr SR).
    #[arg(long, global = true)]
    lookup: bool,
    #[command(subcommand)]
    command: VdiCommand,
}

#[derive(Debug, Subcommand)]
enum VdiCommand {
    /// Create an empty VDI (VDI.create); prints its uuid (or its vdi_info with --json).
    Create {
        /// Virtual size: bytes, or with a suffix K, M, G, T (powers of 1024), e.g. `10G`.
        #[arg(long, value_parser = parse_size)]
        size: i64,
        /// Human-readable name.
        #[arg(long, default_value = "")]
        name_label: String,
        /// Description.
        #[arg(long, default_value = "")]
        name_description: String,
        /// Make it non-persistent (writes vanish at the end of each epoch).
        #[arg(long)]
        non_persistent: bool,
        /// May be attached by several VMs at once.
        #[arg(long)]
        sharable: bool,
        /// Print the vdi_info as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Read-only snapshot of a VDI (VDI.snapshot); prints the snapshot's uuid.
    Snapshot {
        /// The VDI.
        vdi: String,
        /// Name of the snapshot (default: the VDI's).
        #[arg(long)]
        name_label: Option<String>,
        /// Print the vdi_info as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Read-write clone of a VDI (VDI.clone); prints the clone's uuid.
    Clone {
        /// The VDI.
        vdi: String,
        /// Name of the clone (default: the VDI's).
        #[arg(long)]
        name_label: Option<String>,
        /// Print the vdi_info as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A VDI's vdi_info (VDI.stat), as JSON.
    Stat {
        /// The VDI.
        vdi: String,
    },
    /// The VDIs of the SR (SR.scan), as a table (or JSON with --json).
    List {
        /// Print xapi's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a VDI (VDI.destroy).
    Destroy {
        /// The VDI.
        vdi: String,
    },
    /// Rename a VDI (VDI.set_name_label).
    SetNameLabel {
        /// The VDI.
        vdi: String,
        /// New name.
        name_label: String,
    },
    /// Change a VDI's description (VDI.set_name_description).
    SetDescription {
        /// The VDI.
        vdi: String,
        /// New description.
        name_description: String,
    },
    /// Set a VDI's persistent flag (VDI.set_persistent).
    SetPersistent {
        /// The VDI.
        vdi: String,
        /// true or false.
        #[arg(action = clap::ArgAction::Set)]
        persistent: bool,
    },
    /// Declare a VDI's content id (VDI.set_content_id).
    SetContentId {
        /// The VDI.
        vdi: String,
        /// The content id.
        content_id: String,
    },
    /// VDIs likely to share blocks with this one, nearest first (VDI.similar_content).
    Similar {
        /// The VDI.
        vdi: String,
    },
}

/// Parses a size: plain bytes or a number with a K/M/G/T suffix (binary units; `KiB`, `GB`…
/// are read the same). Refuses zero, negatives and overflow.
pub fn parse_size(s: &str) -> Result<i64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: i64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 1048576, 512M, 10G)"))?;
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        other => return Err(format!("unknown size unit {other:?} (use K, M, G or T)")),
    };
    let v = n
        .checked_mul(1i64 << shift)
        .ok_or_else(|| format!("{s} is too large"))?;
    if v <= 0 {
        return Err(format!("size must be positive, got {s}"));
    }
    Ok(v)
}

fn print_new(v: VdiInfo, json: bool) {
    if json {
        let _ = print_response(&Response::VdiInfo(v));
    } else {
        println!("{}", v.vdi);
    }
}

/// Runs `ddstor vdi`.
pub fn run(mut a: VdiArgs) -> anyhow::Result<()> {
    let Some(sr) = a.sr.clone() else {
        anyhow::bail!("which SR? pass --sr UUID (or set DDSTOR_SR)");
    };
    if a.lookup {
        a.connect.lookup_sr = Some(sr.clone());
    }
    let sr = SrId::new(sr);
    let rt = runtime()?;
    let target = a.connect.describe();
    let result: Result<(), ClientError> = rt.block_on(async {
        let c = a.connect.connect().await?;
        let d = Dbg::default;
        let derive = |vdi: String, name_label: Option<String>| VdiInfo {
            vdi: VdiId::new(vdi),
            name_label: name_label.unwrap_or_default(),
            ..VdiInfo::default()
        };
        match a.command {
            VdiCommand::Create {
                size,
                name_label,
                name_description,
                non_persistent,
                sharable,
                json,
            } => {
                let info = VdiInfo {
                    name_label,
                    name_description,
                    virtual_size: size,
                    persistent: !non_persistent,
                    sharable,
                    ..VdiInfo::default()
                };
                print_new(c.vdi_create(&sr, info).await?, json);
            }
            VdiCommand::Snapshot {
                vdi,
                name_label,
                json,
            } => print_new(c.vdi_snapshot(&sr, derive(vdi, name_label)).await?, json),
            VdiCommand::Clone {
                vdi,
                name_label,
                json,
            } => print_new(c.vdi_clone(&sr, derive(vdi, name_label)).await?, json),
            VdiCommand::Stat { vdi } => {
                let v = c.vdi_stat(&sr, &vdi.into()).await?;
                let _ = print_response(&Response::VdiInfo(v));
            }
            VdiCommand::List { json } => {
                let vdis = c.sr_scan(&sr).await?;
                if json {
                    let _ = print_response(&Response::VdiInfos(vdis));
                } else {
                    print_vdi_table(&vdis);
                }
            }
            VdiCommand::Destroy { vdi } => c.vdi_destroy(&sr, &vdi.into()).await?,
            VdiCommand::SetNameLabel { vdi, name_label } => {
                c.vdi_set_name_label(&sr, &vdi.into(), &name_label).await?
            }
            VdiCommand::SetDescription {
                vdi,
                name_description,
            } => {
                c.call(Call::VdiSetNameDescription {
                    dbg: d(),
                    sr: sr.clone(),
                    vdi: vdi.into(),
                    new_name_description: name_description,
                })
                .await?;
            }
            VdiCommand::SetPersistent { vdi, persistent } => {
                c.call(Call::VdiSetPersistent {
                    dbg: d(),
                    sr: sr.clone(),
                    vdi: vdi.into(),
                    persistent,
                })
                .await?;
            }
            VdiCommand::SetContentId { vdi, content_id } => {
                c.call(Call::VdiSetContentId {
                    dbg: d(),
                    sr: sr.clone(),
                    vdi: vdi.into(),
                    content_id,
                })
                .await?;
            }
            VdiCommand::Similar { vdi } => {
                let r = c
                    .call(Call::VdiSimilarContent {
                        dbg: d(),
                        sr: sr.clone(),
                        vdi: vdi.into(),
                    })
                    .await?;
                let _ = print_response(&r);
            }
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

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_suffixes_and_refuse_nonsense() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        assert_eq!(parse_size("1gb"), Ok(1 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("10X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
