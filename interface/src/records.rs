//! xapi's records: `vdi_info`, `sr_info`, `query_result`, attach results and datapath state.
//!
//! Field names and defaults are xapi's (`storage_interface.ml`). Every type derives serde in
//! a form that bincode (the native protocol) can carry: no `flatten`, no `untagged`, no
//! skipped fields. xapi's own JSON/XML-RPC shape of the variant types (`["Nbd", {…}]`) is
//! produced and parsed by [`crate::xapi`].

use crate::ids::VdiId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A string-to-string map (xapi's `(string * string) list`: `sm_config`, `device_config`, …).
pub type StringMap = BTreeMap<String, String>;

/// xapi's `Date.never`, the default `snapshot_time` of a VDI that is not a snapshot.
pub const SNAPSHOT_TIME_NEVER: &str = "19700101T00:00:00Z";

/// int64 fields: plain integers in bincode; in human-readable formats (JSON) also accept a
/// decimal string, because xapi's XML-RPC carries int64 as strings.
pub mod int64 {
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    /// Serializes as an integer.
    pub fn serialize<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(*v)
    }

    /// Deserializes an integer, or (human-readable formats only) a decimal string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = i64;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a 64-bit signed integer (number or decimal string)")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
                Ok(v)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
                i64::try_from(v).map_err(|_| E::custom(format!("{v} does not fit in an int64")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
                Err(E::custom(format!("{v} is not an integer")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<i64, E> {
                v.trim()
                    .parse()
                    .map_err(|_| E::custom(format!("{v:?} is not a 64-bit integer")))
            }
        }
        if d.is_human_readable() {
            d.deserialize_any(V)
        } else {
            d.deserialize_i64(V)
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_ty() -> String {
    "user".to_string()
}
fn default_snapshot_time() -> String {
    SNAPSHOT_TIME_NEVER.to_string()
}

/// xapi's `vdi_info`: what a caller passes to create/snapshot/clone and gets back from
/// stat/scan. Missing JSON fields take xapi's defaults (`vdi` and `name_label` included, as
/// `VDI.create` callers usually leave `vdi` empty for the backend to choose).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiInfo {
    /// The VDI's key in its SR.
    #[serde(default)]
    pub vdi: VdiId,
    /// Optional separate UUID (xapi: `string option`).
    #[serde(default)]
    pub uuid: Option<String>,
    /// Identifies the VDI's content; equal ids mean equal content.
    #[serde(default)]
    pub content_id: String,
    /// Human-readable name.
    #[serde(default)]
    pub name_label: String,
    /// Human-readable description.
    #[serde(default)]
    pub name_description: String,
    /// xapi VDI type (`user`, `system`, `suspend`, `crashdump`, `metadata`…). Default `user`.
    #[serde(default = "default_ty")]
    pub ty: String,
    /// Pool whose metadata this VDI holds (metadata VDIs only).
    #[serde(default)]
    pub metadata_of_pool: String,
    /// True for snapshots.
    #[serde(default)]
    pub is_a_snapshot: bool,
    /// When the snapshot was taken (xapi's `Date.never` otherwise).
    #[serde(default = "default_snapshot_time")]
    pub snapshot_time: String,
    /// The VDI this one is a snapshot of (empty otherwise).
    #[serde(default)]
    pub snapshot_of: VdiId,
    /// True when the VDI can never be written.
    #[serde(default)]
    pub read_only: bool,
    /// Changed-block tracking enabled (ddstor does not implement CBT; always false).
    #[serde(default)]
    pub cbt_enabled: bool,
    /// Size of the disk as the VM sees it, in bytes.
    #[serde(default, with = "int64")]
    pub virtual_size: i64,
    /// Bytes used on the SR's storage.
    #[serde(default, with = "int64")]
    pub physical_utilisation: i64,
    /// False: writes vanish at the end of each epoch. Default true.
    #[serde(default = "default_true")]
    pub persistent: bool,
    /// May be attached by several VMs at once.
    #[serde(default)]
    pub sharable: bool,
    /// Backend-private key/values (ddstor records chain details here).
    #[serde(default)]
    pub sm_config: StringMap,
}

impl Default for VdiInfo {
    /// xapi's `default_vdi_info` (with an empty name label).
    fn default() -> Self {
        VdiInfo {
            vdi: VdiId::default(),
            uuid: None,
            content_id: String::new(),
            name_label: String::new(),
            name_description: String::new(),
            ty: default_ty(),
            metadata_of_pool: String::new(),
            is_a_snapshot: false,
            snapshot_time: default_snapshot_time(),
            snapshot_of: VdiId::default(),
            read_only: false,
            cbt_enabled: false,
            virtual_size: 0,
            physical_utilisation: 0,
            persistent: true,
            sharable: false,
            sm_config: StringMap::new(),
        }
    }
}

/// xapi's `sr_health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SrHealth {
    /// The SR is fine.
    Healthy,
    /// The SR is recovering (e.g. replaying its journal).
    Recovering,
}

/// xapi's `sr_info`: the answer of `SR.stat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SrInfo {
    /// The SR's UUID when known.
    #[serde(default)]
    pub sr_uuid: Option<String>,
    /// Human-readable name.
    pub name_label: String,
    /// Human-readable description.
    pub name_description: String,
    /// Total bytes of the storage substrate.
    #[serde(with = "int64")]
    pub total_space: i64,
    /// Free bytes of the storage substrate.
    #[serde(with = "int64")]
    pub free_space: i64,
    /// Clustered SR (always false for ddstor).
    pub clustered: bool,
    /// Health.
    pub health: SrHealth,
}

/// xapi's `query_result`: the answer of `Query.query`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryResult {
    /// Driver name (e.g. `ddstor`).
    pub driver: String,
    /// Human-readable name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Vendor.
    pub vendor: String,
    /// Copyright.
    pub copyright: String,
    /// Version of the driver.
    pub version: String,
    /// Storage API version the driver needs.
    pub required_api_version: String,
    /// xapi feature strings (`SR_CREATE`, `VDI_SNAPSHOT`, `VDI_RESET_ON_BOOT/2`…): only what works.
    pub features: Vec<String>,
    /// Configuration keys accepted in `device_config`, with their descriptions.
    pub configuration: StringMap,
    /// Cluster stacks required (none for ddstor).
    #[serde(default)]
    pub required_cluster_stack: Vec<String>,
}

/// Read-only or read-write (xapi's `Vdi_automaton.ro_rw`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RoRw {
    /// Read-only.
    RO,
    /// Read-write.
    RW,
}

/// The state of a VDI from the point of view of one datapath, or the VDI's overall state
/// (xapi's `Vdi_automaton.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DpState {
    /// Not attached.
    Detached,
    /// Attached (I/O paused).
    Attached(RoRw),
    /// Activated (I/O flows).
    Activated(RoRw),
}

/// xapi's `dp_stat_t`: the answer of `DP.stat_vdi`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DpStat {
    /// The VDI's overall state (any dp activated → activated; any RW → RW).
    pub superstate: DpState,
    /// Each datapath's state.
    pub dps: BTreeMap<String, DpState>,
}

/// The deprecated `VDI.attach`'s result (xapi's `attach_info`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachInfo {
    /// Put into the `params` key in xenstore.
    pub params: String,
    /// Whether the backend should use O_DIRECT.
    pub o_direct: bool,
    /// Why (not) O_DIRECT.
    pub o_direct_reason: String,
    /// Extra xenstore keys.
    pub xenstore_data: StringMap,
}

/// One way to reach an attached VDI (xapi's `implementation`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Implementation {
    /// A Xen disk backend.
    XenDisk {
        /// Put into the `params` key in xenstore.
        params: String,
        /// Key/values for the backend's `extra` subdirectory.
        extra: StringMap,
        /// Backend type (e.g. `vbd3`).
        backend_type: String,
    },
    /// A block device.
    BlockDevice {
        /// Path of the device.
        path: String,
    },
    /// A raw file.
    File {
        /// Path of the file.
        path: String,
    },
    /// An NBD export.
    Nbd {
        /// `nbd:unix:<socket>:exportname=<name>`.
        uri: String,
    },
}

/// The answer of `VDI.attach2`/`attach3` (xapi's `backend`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendInfo {
    /// Ways to reach the VDI, preferred first.
    pub implementations: Vec<Implementation>,
}
