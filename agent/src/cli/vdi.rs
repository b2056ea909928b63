//! `ddstor vdi create|snapshot|clone|stat|list|destroy|set-…`: friendly verbs over the VDI calls,
//! and `attach|activate|deactivate|detach|datapaths|dp-destroy` over the datapath calls.

use super::call::{exit_client_error, print_response, runtime, ConnectArgs};
use super::sr::print_vdi_table;
use crate::client::ClientError;
use crate::datapath::manager::state_to_string;
use clap::{Args, Subcommand};
use interface::{Call, Dbg, DpId, DpStat, Implementation, Response, SrId, VdiId, VdiInfo};

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

/// The VDI and datapath a datapath verb acts on.
#[derive(Debug, Args)]
struct DpTarget {
    /// The VDI.
    vdi: String,
    /// The datapath (any name; every call on one datapath is idempotent).
    #[arg(long)]
    dp: String,
    /// The VM the datapath is for (informational).
    #[arg(long, default_value = "")]
    vm: String,
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
    /// Attach a VDI on a datapath, I/O paused (VDI.attach3); prints how to reach it, one per
    /// line: the NBD URI (`nbd:unix:SOCKET:exportname=SR/VDI`), then the kernel nbd block
    /// device where the agent connected one.
    Attach {
        #[command(flatten)]
        on: DpTarget,
        /// Attach read-only (writes fail with EPERM).
        #[arg(long)]
        read_only: bool,
        /// Print xapi's backend JSON.
        #[arg(long)]
        json: bool,
    },
    /// Let I/O flow on an attached datapath (VDI.activate3, or VDI.activate_readonly).
    Activate {
        #[command(flatten)]
        on: DpTarget,
        /// Activate read-only (VDI.activate_readonly).
        #[arg(long)]
        read_only: bool,
    },
    /// Complete and flush in-flight I/O, then pause it (VDI.deactivate).
    Deactivate {
        #[command(flatten)]
        on: DpTarget,
    },
    /// Remove the datapath's access to the VDI (VDI.detach; the export goes with the last one).
    Detach {
        #[command(flatten)]
        on: DpTarget,
    },
    /// Every datapath's state of a VDI and its overall state (DP.stat_vdi), as a table (or
    /// JSON with --json).
    Datapaths {
        /// The VDI.
        vdi: String,
        /// Print xapi's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Deactivate and detach whatever a datapath holds, on every VDI (DP.destroy).
    DpDestroy {
        /// The datapath.
        dp: String,
        /// Report success even if something could not be released.
        #[arg(long)]
        allow_leak: bool,
    },
}

/// A datapath call `method` (VDI.activate3, VDI.deactivate, …) on `on` in `sr`, with `extra`
/// parameters (VDI.attach3's `read_write`).
fn dp_call(
    method: &str,
    sr: &SrId,
    on: &DpTarget,
    extra: &[(&str, serde_json::Value)],
) -> Result<Call, ClientError> {
    let mut args = serde_json::json!({"sr": sr.as_str(), "vdi": on.vdi, "dp": on.dp, "vm": on.vm});
    for (k, v) in extra {
        args[*k] = v.clone();
    }
    Call::from_json(method, args).map_err(ClientError::Storage)
}

/// The lines `ddstor vdi datapaths` prints for `st`.
fn datapath_table(st: &DpStat) -> Vec<String> {
    let mut out = vec![format!("{:<36} {}", "DATAPATH", "STATE")];
    for (dp, s) in &st.dps {
        out.push(format!("{dp:<36} {}", state_to_string(*s)));
    }
    out.push(format!(
        "{:<36} {}",
        "(overall)",
        state_to_string(st.superstate)
    ));
    out
}

/// How to reach an attached VDI, one line each.
fn implementation_line(i: &Implementation) -> String {
    match i {
        Implementation::Nbd { uri } => uri.clone(),
        Implementation::BlockDevice { path } | Implementation::File { path } => path.clone(),
        Implementation::XenDisk { params, .. } => params.clone(),
    }
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
            VdiCommand::Attach {
                on,
                read_only,
                json,
            } => {
                let rw = [("read_write", serde_json::Value::Bool(!read_only))];
                let r = c.call(dp_call("VDI.attach3", &sr, &on, &rw)?).await?;
                match (&r, json) {
                    (Response::Backend(b), false) => {
                        for i in &b.implementations {
                            println!("{}", implementation_line(i));
                        }
                    }
                    _ => {
                        let _ = print_response(&r);
                    }
                }
            }
            VdiCommand::Activate { on, read_only } => {
                let method = if read_only {
                    "VDI.activate_readonly"
                } else {
                    "VDI.activate3"
                };
                c.call(dp_call(method, &sr, &on, &[])?).await?;
            }
            VdiCommand::Deactivate { on } => {
                c.call(dp_call("VDI.deactivate", &sr, &on, &[])?).await?;
            }
            VdiCommand::Detach { on } => {
                c.call(dp_call("VDI.detach", &sr, &on, &[])?).await?;
            }
            VdiCommand::Datapaths { vdi, json } => {
                let r = c
                    .call(Call::DpStatVdi {
                        dbg: d(),
                        sr: sr.clone(),
                        vdi: vdi.into(),
                    })
                    .await?;
                match (&r, json) {
                    (Response::DpStat(st), false) => {
                        for l in datapath_table(st) {
                            println!("{l}");
                        }
                    }
                    _ => {
                        let _ = print_response(&r);
                    }
                }
            }
            VdiCommand::DpDestroy { dp, allow_leak } => {
                c.call(Call::DpDestroy {
                    dbg: d(),
                    dp: DpId::new(dp),
                    allow_leak,
                })
                .await?;
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
    use super::*;
    use interface::{DpState, RoRw};

    #[test]
    fn the_datapath_table_lists_each_dp_and_the_overall_state() {
        let st = DpStat {
            superstate: DpState::Activated(RoRw::RW),
            dps: [
                ("vbd/1/xvda".to_string(), DpState::Activated(RoRw::RW)),
                ("backup".to_string(), DpState::Attached(RoRw::RO)),
            ]
            .into_iter()
            .collect(),
        };
        let t = datapath_table(&st);
        assert_eq!(t.len(), 4);
        assert!(t[1].starts_with("backup") && t[1].ends_with("attached-ro"));
        assert!(t[2].starts_with("vbd/1/xvda") && t[2].ends_with("activated-rw"));
        assert!(t[3].starts_with("(overall)") && t[3].ends_with("activated-rw"));
    }

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
