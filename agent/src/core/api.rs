//! The engine behind xapi's calls: [`Storage::handle`] maps one [`interface::Call`] to the engine
//! and its result to an [`interface::Response`].

use super::{SrView, Storage, VdiCreate, VdiDerive, VdiView};
use interface::{
    Call, QueryResult, Reply, Response, SrHealth, SrId, SrInfo, StorageError, StringMap, VdiId,
    VdiInfo,
};

/// Converts an engine view into xapi's `vdi_info`.
pub fn vdi_info(v: &VdiView) -> VdiInfo {
    let r = &v.record;
    VdiInfo {
        vdi: VdiId::new(r.uuid.clone()),
        uuid: Some(r.uuid.clone()),
        content_id: r.content_id.clone(),
        name_label: r.name_label.clone(),
        name_description: r.name_description.clone(),
        ty: r.ty.clone(),
        metadata_of_pool: r.metadata_of_pool.clone(),
        is_a_snapshot: r.is_a_snapshot,
        snapshot_time: r.snapshot_time.clone(),
        snapshot_of: VdiId::new(r.snapshot_of.clone()),
        read_only: r.read_only,
        cbt_enabled: r.cbt_enabled,
        virtual_size: i64::try_from(r.virtual_size).unwrap_or(i64::MAX),
        physical_utilisation: i64::try_from(v.physical_utilisation).unwrap_or(i64::MAX),
        persistent: r.persistent,
        sharable: r.sharable,
        sm_config: r.sm_config.clone(),
    }
}

/// Converts an engine view into xapi's `sr_info`.
pub fn sr_info(s: &SrView) -> SrInfo {
    SrInfo {
        sr_uuid: Some(s.uuid.clone()),
        name_label: s.name_label.clone(),
        name_description: s.name_description.clone(),
        total_space: i64::try_from(s.total_space).unwrap_or(i64::MAX),
        free_space: i64::try_from(s.free_space).unwrap_or(i64::MAX),
        clustered: false,
        health: SrHealth::Healthy,
    }
}

fn derive(info: &VdiInfo) -> VdiDerive {
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    VdiDerive {
        name_label: non_empty(&info.name_label),
        name_description: non_empty(&info.name_description),
        sm_config: info.sm_config.clone(),
    }
}

impl Storage {
    /// `Query.query`'s answer: only features that work.
    pub fn query(&self) -> QueryResult {
        let configuration: StringMap = [(
            "path".to_string(),
            "directory holding the SR (default: <data-dir>/<sr-uuid>)".to_string(),
        )]
        .into();
        QueryResult {
            driver: "ddstor".into(),
            name: "ddstor".into(),
            description: "VHD chains in a directory, served by a Xen driver domain's storage agent"
                .into(),
            vendor: "ddstor".into(),
            copyright: "GPL-3.0-only".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            required_api_version: "2.0".into(),
            features: self.features(),
            configuration,
            required_cluster_stack: Vec::new(),
        }
    }

    /// The attached SRs.
    pub fn attached_srs(&self) -> Vec<SrId> {
        let slots: Vec<(String, super::SrSlot)> = self
            .srs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out: Vec<SrId> = slots
            .into_iter()
            .filter(|(_, slot)| slot.try_read().map(|g| g.is_some()).unwrap_or(true))
            .map(|(k, _)| SrId::new(k))
            .collect();
        out.sort();
        out
    }

    /// Handles one xapi call. Datapath calls (`VDI.attach*`, `activate*`, `deactivate`,
    /// `detach`, `DP.*`) go to the datapath hooks; `similar_content`, `compose` and `SR.gc` to
    /// [`crate::differencing`].
    pub async fn handle(&self, call: Call) -> Reply {
        let unit = |r: Result<(), StorageError>| r.map(|()| Response::Unit);
        let vdi = |r: Result<VdiView, StorageError>| r.map(|v| Response::VdiInfo(vdi_info(&v)));
        let unit_v = |r: Result<VdiView, StorageError>| r.map(|_| Response::Unit);
        match call {
            Call::QueryQuery { .. } => Ok(Response::Query(self.query())),
            Call::QueryDiagnostics { .. } => Ok(Response::Text(self.diagnostics().await)),
            Call::SrCreate {
                sr,
                name_label,
                name_description,
                device_config,
                ..
            } => {
                let path = self
                    .sr_create(sr.as_str(), &name_label, &name_description, &device_config)
                    .await?;
                let dc: StringMap = [("path".to_string(), path.display().to_string())].into();
                Ok(Response::DeviceConfig(dc))
            }
            Call::SrAttach {
                sr, device_config, ..
            } => unit(
                self.sr_attach(sr.as_str(), &device_config)
                    .await
                    .map(|_| ()),
            ),
            Call::SrDetach { sr, .. } => unit(self.sr_detach(sr.as_str()).await),
            Call::SrDestroy { sr, .. } => unit(self.sr_destroy(sr.as_str()).await),
            Call::SrScan { sr, .. } => self
                .sr_scan(sr.as_str())
                .await
                .map(|vs| Response::VdiInfos(vs.iter().map(vdi_info).collect())),
            Call::SrStat { sr, .. } => self
                .sr_stat(sr.as_str())
                .await
                .map(|s| Response::SrInfo(sr_info(&s))),
            Call::SrList { .. } => Ok(Response::SrList(self.attached_srs())),
            Call::SrSetNameLabel {
                sr, new_name_label, ..
            } => unit(self.sr_set_name_label(sr.as_str(), &new_name_label).await),
            Call::SrSetNameDescription {
                sr,
                new_name_description,
                ..
            } => unit(
                self.sr_set_name_description(sr.as_str(), &new_name_description)
                    .await,
            ),
            Call::VdiCreate {
                sr, vdi_info: i, ..
            } => {
                let p = VdiCreate {
                    name_label: i.name_label,
                    name_description: i.name_description,
                    ty: i.ty,
                    virtual_size: i.virtual_size,
                    sm_config: i.sm_config,
                    read_only: i.read_only,
                    persistent: i.persistent,
                    sharable: i.sharable,
                    metadata_of_pool: i.metadata_of_pool,
                };
                vdi(self.vdi_create(sr.as_str(), p).await)
            }
            Call::VdiSnapshot {
                sr, vdi_info: i, ..
            } => vdi(self
                .vdi_snapshot(sr.as_str(), i.vdi.as_str(), derive(&i), false)
                .await),
            Call::VdiClone {
                sr, vdi_info: i, ..
            } => vdi(self
                .vdi_snapshot(sr.as_str(), i.vdi.as_str(), derive(&i), true)
                .await),
            Call::VdiDestroy { sr, vdi: v, .. } => {
                unit(self.vdi_destroy(sr.as_str(), v.as_str()).await)
            }
            Call::VdiStat { sr, vdi: v, .. } => vdi(self.vdi_stat(sr.as_str(), v.as_str()).await),
            Call::VdiSetNameLabel {
                sr,
                vdi: v,
                new_name_label,
                ..
            } => unit_v(
                self.vdi_set_name_label(sr.as_str(), v.as_str(), &new_name_label)
                    .await,
            ),
            Call::VdiSetNameDescription {
                sr,
                vdi: v,
                new_name_description,
                ..
            } => unit_v(
                self.vdi_set_name_description(sr.as_str(), v.as_str(), &new_name_description)
                    .await,
            ),
            Call::VdiSetPersistent {
                sr,
                vdi: v,
                persistent,
                ..
            } => unit_v(
                self.vdi_set_persistent(sr.as_str(), v.as_str(), persistent)
                    .await,
            ),
            Call::VdiSetContentId {
                sr,
                vdi: v,
                content_id,
                ..
            } => unit_v(
                self.vdi_set_content_id(sr.as_str(), v.as_str(), &content_id)
                    .await,
            ),
            Call::VdiEpochBegin {
                sr,
                vdi: v,
                vm,
                persistent,
                ..
            } => unit_v(
                self.vdi_epoch_begin(sr.as_str(), v.as_str(), vm.as_str(), persistent)
                    .await,
            ),
            Call::VdiEpochEnd { sr, vdi: v, vm, .. } => unit_v(
                self.vdi_epoch_end(sr.as_str(), v.as_str(), vm.as_str())
                    .await,
            ),
            c @ (Call::VdiAttach { .. }
            | Call::VdiAttach2 { .. }
            | Call::VdiAttach3 { .. }
            | Call::VdiActivate { .. }
            | Call::VdiActivate3 { .. }
            | Call::VdiActivateReadonly { .. }
            | Call::VdiDeactivate { .. }
            | Call::VdiDetach { .. }
            | Call::DpDestroy { .. }
            | Call::DpStatVdi { .. }) => self.hooks.call(self, c).await,
            Call::VdiSimilarContent { sr, vdi: v, .. } => self
                .vdi_similar_content(sr.as_str(), v.as_str())
                .await
                .map(|vs| Response::VdiInfos(vs.iter().map(vdi_info).collect())),
            Call::VdiCompose { sr, vdi1, vdi2, .. } => unit(
                self.vdi_compose(sr.as_str(), vdi1.as_str(), vdi2.as_str())
                    .await,
            ),
            Call::SrGc { sr, mode, .. } => self
                .sr_gc_call(sr.as_str(), &mode, self.gc_options())
                .await
                .map(Response::Text),
        }
    }
}
