//! The calls ddstor serves (xapi method names and parameter names) and their results.

use crate::error::{codes, StorageError};
use crate::ids::{Dbg, DpId, SrId, VdiId, VmId};
use crate::records::{AttachInfo, BackendInfo, DpStat, QueryResult, SrInfo, StringMap, VdiInfo};
use serde::{Deserialize, Serialize};

/// What a successful call returns, by kind (one [`Response`] variant each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResultKind {
    /// Nothing (xapi `unit`).
    Unit,
    /// A [`QueryResult`].
    Query,
    /// A human-readable text.
    Text,
    /// A `device_config` map.
    DeviceConfig,
    /// One [`VdiInfo`].
    VdiInfo,
    /// A list of [`VdiInfo`].
    VdiInfos,
    /// An [`SrInfo`].
    SrInfo,
    /// A list of SR ids.
    SrList,
    /// An [`AttachInfo`] (deprecated `VDI.attach`).
    AttachInfo,
    /// A [`BackendInfo`] (`VDI.attach2`/`attach3`).
    Backend,
    /// A [`DpStat`].
    DpStat,
}

macro_rules! calls {
    ($(
        $(#[$doc:meta])*
        $method:literal => $variant:ident {
            $( $(#[$fattr:meta])* $field:ident : $ty:ty ),* $(,)?
        } -> $kind:ident;
    )*) => {
        /// One call of xapi's storage interface, as ddstor serves it.
        ///
        /// serde form: externally tagged by xapi's method name, fields named as xapi's
        /// parameters, e.g. JSON `{"VDI.stat": {"dbg": "x", "sr": "…", "vdi": "…"}}`. `dbg` (and
        /// `vm`) may be left out. bincode carries the same enum (variant index + fields).
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub enum Call {
            $(
                $(#[$doc])*
                #[serde(rename = $method)]
                $variant {
                    $(
                        #[doc = concat!("xapi parameter `", stringify!($field), "`.")]
                        $(#[$fattr])*
                        $field: $ty,
                    )*
                },
            )*
        }

        impl Call {
            /// Every method name ddstor serves, as xapi spells it.
            pub const METHODS: &'static [&'static str] = &[$($method),*];

            /// xapi's name of this call's method (e.g. `VDI.create`).
            pub fn method(&self) -> &'static str {
                match self {
                    $( Call::$variant { .. } => $method, )*
                }
            }

            /// The kind of [`Response`] a successful call of `method` returns.
            pub fn result_kind_of(method: &str) -> Option<ResultKind> {
                match method {
                    $( $method => Some(ResultKind::$kind), )*
                    _ => None,
                }
            }

            /// The kind of [`Response`] this call returns on success.
            pub fn result_kind(&self) -> ResultKind {
                match self {
                    $( Call::$variant { .. } => ResultKind::$kind, )*
                }
            }
        }
    };
}

calls! {
    /// Describe the driver: name, version, features, configuration keys.
    "Query.query" => QueryQuery { #[serde(default)] dbg: Dbg } -> Query;
    /// A human-readable dump of the agent's state, for bug reports.
    "Query.diagnostics" => QueryDiagnostics { #[serde(default)] dbg: Dbg } -> Text;

    /// Format a new SR (device_config `path`: where; default a folder under the data dir).
    /// Returns the device_config to attach it with.
    "SR.create" => SrCreate {
        #[serde(default)] dbg: Dbg,
        sr: SrId,
        #[serde(default)] name_label: String,
        #[serde(default)] name_description: String,
        #[serde(default)] device_config: StringMap,
        #[serde(default, with = "crate::records::int64")] physical_size: i64,
    } -> DeviceConfig;
    /// Open an SR: take its lock, reconcile records with the files, replay the journal.
    "SR.attach" => SrAttach {
        #[serde(default)] dbg: Dbg,
        sr: SrId,
        #[serde(default)] device_config: StringMap,
    } -> Unit;
    /// Close an SR (tearing down its datapaths first).
    "SR.detach" => SrDetach { #[serde(default)] dbg: Dbg, sr: SrId } -> Unit;
    /// Erase an SR that holds no VDIs (hidden bases excepted).
    "SR.destroy" => SrDestroy { #[serde(default)] dbg: Dbg, sr: SrId } -> Unit;
    /// Every VDI of an attached SR.
    "SR.scan" => SrScan { #[serde(default)] dbg: Dbg, sr: SrId } -> VdiInfos;
    /// Name, space and health of an attached SR.
    "SR.stat" => SrStat { #[serde(default)] dbg: Dbg, sr: SrId } -> SrInfo;
    /// The attached SRs.
    "SR.list" => SrList { #[serde(default)] dbg: Dbg } -> SrList;
    /// Rename an SR.
    "SR.set_name_label" => SrSetNameLabel {
        #[serde(default)] dbg: Dbg, sr: SrId, new_name_label: String,
    } -> Unit;
    /// Change an SR's description.
    "SR.set_name_description" => SrSetNameDescription {
        #[serde(default)] dbg: Dbg, sr: SrId, new_name_description: String,
    } -> Unit;

    /// Create an empty VDI; the returned vdi_info carries the chosen id and rounded size.
    "VDI.create" => VdiCreate { #[serde(default)] dbg: Dbg, sr: SrId, vdi_info: VdiInfo } -> VdiInfo;
    /// Read-only snapshot of `vdi_info.vdi`; returns the snapshot.
    "VDI.snapshot" => VdiSnapshot { #[serde(default)] dbg: Dbg, sr: SrId, vdi_info: VdiInfo } -> VdiInfo;
    /// Read-write clone of `vdi_info.vdi`; returns the clone.
    "VDI.clone" => VdiClone { #[serde(default)] dbg: Dbg, sr: SrId, vdi_info: VdiInfo } -> VdiInfo;
    /// Remove a VDI (refused while attached).
    "VDI.destroy" => VdiDestroy { #[serde(default)] dbg: Dbg, sr: SrId, vdi: VdiId } -> Unit;
    /// A VDI's vdi_info.
    "VDI.stat" => VdiStat { #[serde(default)] dbg: Dbg, sr: SrId, vdi: VdiId } -> VdiInfo;
    /// Rename a VDI.
    "VDI.set_name_label" => VdiSetNameLabel {
        #[serde(default)] dbg: Dbg, sr: SrId, vdi: VdiId, new_name_label: String,
    } -> Unit;
    /// Change a VDI's description.
    "VDI.set_name_description" => VdiSetNameDescription {
        #[serde(default)] dbg: Dbg, sr: SrId, vdi: VdiId, new_name_description: String,
    } -> Unit;
    /// Set the persistent flag (non-persistent disks lose their writes each epoch).
    "VDI.set_persistent" => VdiSetPersistent {
        #[serde(default)] dbg: Dbg, sr: SrId, vdi: VdiId, persistent: bool,
    } -> Unit;
    /// Declare the VDI's content id.
    "VDI.set_content_id" => VdiSetContentId {
        #[serde(default)] dbg: Dbg, sr: SrId, vdi: VdiId, content_id: String,
    } -> Unit;
    /// A VM starts or reboots with the disk.
    "VDI.epoch_begin" => VdiEpochBegin {
        #[serde(default)] dbg: Dbg, sr: SrId, vdi: VdiId, #[serde(default)] vm: VmId, persistent: bool,
    } -> Unit;
    /// The VM shut down (non-persistent disks are reset).
    "VDI.epoch_end" => VdiEpochEnd {
        #[serde(default)] dbg: Dbg, sr: SrId, vdi: VdiId, #[serde(default)] vm: VmId,
    } -> Unit;
    /// Deprecated attach: returns `attach_info`.
    "VDI.attach" => VdiAttach {
        #[serde(default)] dbg: Dbg, dp: DpId, sr: SrId, vdi: VdiId, read_write: bool,
    } -> AttachInfo;
    /// Attach (I/O paused until activate); returns the backend implementations.
    "VDI.attach2" => VdiAttach2 {
        #[serde(default)] dbg: Dbg, dp: DpId, sr: SrId, vdi: VdiId, read_write: bool,
    } -> Backend;
    /// Attach for a VM; returns the backend implementations.
    "VDI.attach3" => VdiAttach3 {
        #[serde(default)] dbg: Dbg, dp: DpId, sr: SrId, vdi: VdiId, #[serde(default)] vm: VmId, read_write: bool,
    } -> Backend;
    /// Let I/O flow.
    "VDI.activate" => VdiActivate {
        #[serde(default)] dbg: Dbg, dp: DpId, sr: SrId, vdi: VdiId,
    } -> Unit;
    /// Let I/O flow (for a VM).
    "VDI.activate3" => VdiActivate3 {
        #[serde(default)] dbg: Dbg, dp: DpId, sr: SrId, vdi: VdiId, #[serde(default)] vm: VmId,
    } -> Unit;
    /// Let read I/O flow (for a VM), read-only.
    "VDI.activate_readonly" => VdiActivateReadonly {
        #[serde(default)] dbg: Dbg, dp: DpId, sr: SrId, vdi: VdiId, #[serde(default)] vm: VmId,
    } -> Unit;
    /// Complete and flush outstanding I/O, then pause.
    "VDI.deactivate" => VdiDeactivate {
        #[serde(default)] dbg: Dbg, dp: DpId, sr: SrId, vdi: VdiId, #[serde(default)] vm: VmId,
    } -> Unit;
    /// Disconnect the datapath.
    "VDI.detach" => VdiDetach {
        #[serde(default)] dbg: Dbg, dp: DpId, sr: SrId, vdi: VdiId, #[serde(default)] vm: VmId,
    } -> Unit;
    /// VDIs likely to share blocks with this one, nearest first.
    "VDI.similar_content" => VdiSimilarContent {
        #[serde(default)] dbg: Dbg, sr: SrId, vdi: VdiId,
    } -> VdiInfos;
    /// Layer vdi2's own updates on top of vdi1 (vdi1 = parent), modifying vdi2.
    "VDI.compose" => VdiCompose {
        #[serde(default)] dbg: Dbg, sr: SrId, vdi1: VdiId, vdi2: VdiId,
    } -> Unit;

    /// Tear down every VDI use of a datapath.
    "DP.destroy" => DpDestroy {
        #[serde(default)] dbg: Dbg, dp: DpId, #[serde(default)] allow_leak: bool,
    } -> Unit;
    /// A VDI's state from each datapath's point of view, and its superstate.
    "DP.stat_vdi" => DpStatVdi { #[serde(default)] dbg: Dbg, sr: SrId, vdi: VdiId } -> DpStat;
    /// ddstor extension: garbage-collect and coalesce the SR's chains now (`mode` `run`, the
    /// default: returns the report as JSON) or report the GC's progress (`mode` `status`).
    "SR.gc" => SrGc { #[serde(default)] dbg: Dbg, sr: SrId, #[serde(default)] mode: String } -> Text;
}

impl Call {
    /// Parses a call from xapi's method name and its parameters as a JSON object
    /// (`ddstor call VDI.stat '{"sr":"…","vdi":"…"}'`). Integers may also be decimal strings.
    /// Fails with `Backend_error(BAD_REQUEST, [method, reason])`.
    pub fn from_json(method: &str, params: serde_json::Value) -> Result<Call, StorageError> {
        let bad = |reason: String| {
            StorageError::backend(codes::BAD_REQUEST, vec![method.to_string(), reason])
        };
        if !Call::METHODS.contains(&method) {
            return Err(bad(format!(
                "unknown method; ddstor serves: {}",
                Call::METHODS.join(", ")
            )));
        }
        let params = match params {
            serde_json::Value::Null => serde_json::Value::Object(Default::default()),
            v @ serde_json::Value::Object(_) => v,
            other => {
                return Err(bad(format!(
                    "parameters must be a JSON object of xapi parameter names, not {other}"
                )))
            }
        };
        let mut tagged = serde_json::Map::new();
        tagged.insert(method.to_string(), params);
        serde_json::from_value(serde_json::Value::Object(tagged)).map_err(|e| bad(e.to_string()))
    }

    /// The call's parameters as a JSON object (the inverse of [`Call::from_json`]).
    pub fn params_json(&self) -> serde_json::Value {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(mut m)) => {
                m.remove(self.method()).unwrap_or(serde_json::Value::Null)
            }
            _ => serde_json::Value::Null,
        }
    }

    /// The caller's `dbg` string.
    pub fn dbg(&self) -> &str {
        self.fields().0
    }

    /// The SR the call is about, if any.
    pub fn sr(&self) -> Option<&SrId> {
        self.fields().1
    }

    /// The VDI the call is about, if any (`vdi`, `vdi_info.vdi`, or `vdi2` of compose).
    pub fn vdi(&self) -> Option<&VdiId> {
        self.fields().2
    }

    /// The datapath the call is about, if any.
    pub fn dp(&self) -> Option<&DpId> {
        match self {
            Call::VdiAttach { dp, .. }
            | Call::VdiAttach2 { dp, .. }
            | Call::VdiAttach3 { dp, .. }
            | Call::VdiActivate { dp, .. }
            | Call::VdiActivate3 { dp, .. }
            | Call::VdiActivateReadonly { dp, .. }
            | Call::VdiDeactivate { dp, .. }
            | Call::VdiDetach { dp, .. }
            | Call::DpDestroy { dp, .. } => Some(dp),
            _ => None,
        }
    }

    /// Replaces the call's `dbg` (clients fill it in when the caller left it empty).
    pub fn set_dbg(&mut self, new: Dbg) {
        match self {
            Call::QueryQuery { dbg }
            | Call::QueryDiagnostics { dbg }
            | Call::SrCreate { dbg, .. }
            | Call::SrAttach { dbg, .. }
            | Call::SrDetach { dbg, .. }
            | Call::SrDestroy { dbg, .. }
            | Call::SrScan { dbg, .. }
            | Call::SrStat { dbg, .. }
            | Call::SrList { dbg }
            | Call::SrSetNameLabel { dbg, .. }
            | Call::SrSetNameDescription { dbg, .. }
            | Call::VdiCreate { dbg, .. }
            | Call::VdiSnapshot { dbg, .. }
            | Call::VdiClone { dbg, .. }
            | Call::VdiDestroy { dbg, .. }
            | Call::VdiStat { dbg, .. }
            | Call::VdiSetNameLabel { dbg, .. }
            | Call::VdiSetNameDescription { dbg, .. }
            | Call::VdiSetPersistent { dbg, .. }
            | Call::VdiSetContentId { dbg, .. }
            | Call::VdiEpochBegin { dbg, .. }
            | Call::VdiEpochEnd { dbg, .. }
            | Call::VdiAttach { dbg, .. }
            | Call::VdiAttach2 { dbg, .. }
            | Call::VdiAttach3 { dbg, .. }
            | Call::VdiActivate { dbg, .. }
            | Call::VdiActivate3 { dbg, .. }
            | Call::VdiActivateReadonly { dbg, .. }
            | Call::VdiDeactivate { dbg, .. }
            | Call::VdiDetach { dbg, .. }
            | Call::VdiSimilarContent { dbg, .. }
            | Call::VdiCompose { dbg, .. }
            | Call::DpDestroy { dbg, .. }
            | Call::DpStatVdi { dbg, .. }
            | Call::SrGc { dbg, .. } => *dbg = new,
        }
    }

    fn fields(&self) -> (&str, Option<&SrId>, Option<&VdiId>) {
        match self {
            Call::QueryQuery { dbg } | Call::QueryDiagnostics { dbg } | Call::SrList { dbg } => {
                (dbg.as_str(), None, None)
            }
            Call::DpDestroy { dbg, .. } => (dbg.as_str(), None, None),
            Call::SrCreate { dbg, sr, .. }
            | Call::SrAttach { dbg, sr, .. }
            | Call::SrDetach { dbg, sr }
            | Call::SrDestroy { dbg, sr }
            | Call::SrScan { dbg, sr }
            | Call::SrStat { dbg, sr }
            | Call::SrGc { dbg, sr, .. }
            | Call::SrSetNameLabel { dbg, sr, .. }
            | Call::SrSetNameDescription { dbg, sr, .. } => (dbg.as_str(), Some(sr), None),
            Call::VdiCreate { dbg, sr, vdi_info }
            | Call::VdiSnapshot { dbg, sr, vdi_info }
            | Call::VdiClone { dbg, sr, vdi_info } => (dbg.as_str(), Some(sr), Some(&vdi_info.vdi)),
            Call::VdiCompose { dbg, sr, vdi2, .. } => (dbg.as_str(), Some(sr), Some(vdi2)),
            Call::VdiDestroy { dbg, sr, vdi }
            | Call::VdiStat { dbg, sr, vdi }
            | Call::VdiSetNameLabel { dbg, sr, vdi, .. }
            | Call::VdiSetNameDescription { dbg, sr, vdi, .. }
            | Call::VdiSetPersistent { dbg, sr, vdi, .. }
            | Call::VdiSetContentId { dbg, sr, vdi, .. }
            | Call::VdiEpochBegin { dbg, sr, vdi, .. }
            | Call::VdiEpochEnd { dbg, sr, vdi, .. }
            | Call::VdiAttach { dbg, sr, vdi, .. }
            | Call::VdiAttach2 { dbg, sr, vdi, .. }
            | Call::VdiAttach3 { dbg, sr, vdi, .. }
            | Call::VdiActivate { dbg, sr, vdi, .. }
            | Call::VdiActivate3 { dbg, sr, vdi, .. }
            | Call::VdiActivateReadonly { dbg, sr, vdi, .. }
            | Call::VdiDeactivate { dbg, sr, vdi, .. }
            | Call::VdiDetach { dbg, sr, vdi, .. }
            | Call::VdiSimilarContent { dbg, sr, vdi }
            | Call::DpStatVdi { dbg, sr, vdi } => (dbg.as_str(), Some(sr), Some(vdi)),
        }
    }
}

/// A successful call's result, one variant per [`ResultKind`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Nothing (xapi `unit`).
    Unit,
    /// `Query.query`'s result.
    Query(QueryResult),
    /// A text (`Query.diagnostics`).
    Text(String),
    /// A `device_config` map (`SR.create`).
    DeviceConfig(StringMap),
    /// One VDI (`VDI.create/snapshot/clone/stat`).
    VdiInfo(VdiInfo),
    /// Several VDIs (`SR.scan`, `VDI.similar_content`).
    VdiInfos(Vec<VdiInfo>),
    /// `SR.stat`'s result.
    SrInfo(SrInfo),
    /// `SR.list`'s result.
    SrList(Vec<SrId>),
    /// The deprecated `VDI.attach`'s result.
    AttachInfo(AttachInfo),
    /// `VDI.attach2/attach3`'s result.
    Backend(BackendInfo),
    /// `DP.stat_vdi`'s result.
    DpStat(DpStat),
}

impl Response {
    /// The kind of this response.
    pub fn kind(&self) -> ResultKind {
        match self {
            Response::Unit => ResultKind::Unit,
            Response::Query(_) => ResultKind::Query,
            Response::Text(_) => ResultKind::Text,
            Response::DeviceConfig(_) => ResultKind::DeviceConfig,
            Response::VdiInfo(_) => ResultKind::VdiInfo,
            Response::VdiInfos(_) => ResultKind::VdiInfos,
            Response::SrInfo(_) => ResultKind::SrInfo,
            Response::SrList(_) => ResultKind::SrList,
            Response::AttachInfo(_) => ResultKind::AttachInfo,
            Response::Backend(_) => ResultKind::Backend,
            Response::DpStat(_) => ResultKind::DpStat,
        }
    }
}

/// What travels back for each call on the native protocol.
pub type Reply = Result<Response, StorageError>;

/// The native protocol's request body: the call.
pub type Request = Call;
