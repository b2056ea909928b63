//! The storage engine: SRs and VDIs, their metadata store and journal, and the concurrency rules.
//!
//! [`Storage`] is agent-wide (data directory, SR roots) and `Send + Sync` behind an `Arc`. Its
//! async methods are the xapi calls. Rules:
//! - calls on different VDIs run in parallel; calls that change one VDI are serialised by that
//!   VDI's async lock; reads (`VDI.stat`, `SR.scan`) never wait for a VDI's lock, so a snapshot of
//!   one VDI never blocks reads of another (or of itself);
//! - SR attach/detach/destroy exclude every other call on that SR (an async RwLock per SR);
//! - blocking file-system work runs on tokio's blocking pool;
//! - arguments are validated before anything touches the disk.

pub mod api;
pub mod datapath;
pub mod error;
pub mod meta;
pub mod sr;
pub mod sys;
pub mod time;
pub mod validate;

use crate::differencing::Format;
use crate::failpoint::Failpoints;
use datapath::{DatapathHooks, NoDatapaths};
use error::{backend, invalid, io, Error, Result};
use meta::{Epoch, SrMeta, VdiRecord, FORMAT_VERSION};
use sr::{AttachReport, Sr, Vdi};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::RwLock;

/// Agent-wide configuration of the engine.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// Where SRs are created by default (`<data_dir>/<sr-uuid>/`) and where the agent remembers
    /// SRs created elsewhere (`<data_dir>/.srs/<sr-uuid>`).
    pub data_dir: PathBuf,
    /// Extra directories searched by `SR.attach` without a path: each is either an SR itself or
    /// holds SRs as `<uuid>/` sub-directories.
    pub sr_roots: Vec<PathBuf>,
    /// Armed failpoint, if any (see [`crate::failpoint`]).
    pub failpoints: Failpoints,
}

impl StorageConfig {
    /// A configuration with `data_dir`, no extra roots, and failpoints from the environment.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            sr_roots: Vec::new(),
            failpoints: Failpoints::from_env(),
        }
    }
}

/// A VDI as callers see it: its record plus what is measured live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdiView {
    /// The persistent record.
    pub record: VdiRecord,
    /// Bytes used by the VDI's own file (not its hidden ancestors).
    pub physical_utilisation: u64,
}

/// An SR as callers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrView {
    /// The SR's uuid.
    pub uuid: String,
    /// xapi `name_label`.
    pub name_label: String,
    /// xapi `name_description`.
    pub name_description: String,
    /// Bytes of the file system holding the SR.
    pub total_space: u64,
    /// Bytes free on it.
    pub free_space: u64,
    /// Where it lives.
    pub path: PathBuf,
    /// VDIs served.
    pub vdi_count: usize,
    /// Records whose VHD was missing at attach.
    pub missing: Vec<String>,
}

/// Parameters of `VDI.create`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VdiCreate {
    /// xapi `name_label`.
    pub name_label: String,
    /// xapi `name_description`.
    pub name_description: String,
    /// xapi `ty` (default `user`).
    pub ty: String,
    /// Requested size in bytes (rounded up to the 2 MiB block size).
    pub virtual_size: i64,
    /// xapi `sm_config`.
    pub sm_config: BTreeMap<String, String>,
    /// xapi `read_only`.
    pub read_only: bool,
    /// xapi `persistent` (xapi's default is true).
    pub persistent: bool,
    /// xapi `sharable`.
    pub sharable: bool,
    /// xapi `metadata_of_pool`.
    pub metadata_of_pool: String,
}

/// Caller-chosen attributes of the VDI a snapshot or clone makes (None: taken from the source).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VdiDerive {
    /// Name of the new VDI.
    pub name_label: Option<String>,
    /// Description of the new VDI.
    pub name_description: Option<String>,
    /// Extra `sm_config` entries for the new VDI.
    pub sm_config: BTreeMap<String, String>,
}

type SrSlot = Arc<RwLock<Option<Arc<Sr>>>>;

/// The engine. Cheap to share: wrap it in an `Arc`.
#[derive(Debug)]
pub struct Storage {
    cfg: StorageConfig,
    format: Arc<dyn Format>,
    hooks: Arc<dyn DatapathHooks>,
    srs: Mutex<HashMap<String, SrSlot>>,
    /// Per SR: serialises SR.attach, SR.detach and SR.destroy (see [`Storage::sr_detach`]).
    admin: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

const FEATURES: &[&str] = &[
    "SR_CREATE",
    "SR_DELETE",
    "SR_ATTACH",
    "SR_DETACH",
    "SR_SCAN",
    "SR_UPDATE",
    "VDI_CREATE",
    "VDI_DELETE",
    "VDI_SNAPSHOT",
    "VDI_CLONE",
    "VDI_UPDATE",
    "VDI_COMPOSE",
];

impl Storage {
    /// An engine storing VHD chains, with no datapath layer.
    pub fn new(cfg: StorageConfig) -> Self {
        Self::with_format(cfg, Arc::new(crate::differencing::vhdfmt::VhdFormat))
    }

    /// An engine over another node format (tests).
    pub fn with_format(cfg: StorageConfig, format: Arc<dyn Format>) -> Self {
        Self {
            cfg,
            format,
            hooks: Arc::new(NoDatapaths),
            srs: Mutex::new(HashMap::new()),
            admin: Mutex::new(HashMap::new()),
        }
    }

    /// Installs the datapath layer's hooks (call before serving).
    pub fn set_datapath_hooks(&mut self, hooks: Arc<dyn DatapathHooks>) {
        self.hooks = hooks;
    }

    /// The configuration.
    pub fn config(&self) -> &StorageConfig {
        &self.cfg
    }

    /// The datapath layer's hooks (for `differencing`: compose and online merges pause exports).
    pub(crate) fn hooks(&self) -> &Arc<dyn DatapathHooks> {
        &self.hooks
    }

    /// The engine's failpoints (the datapath layer reports its own through them).
    pub fn failpoints(&self) -> &Failpoints {
        &self.cfg.failpoints
    }

    /// xapi feature strings of what works (for `Query.query`).
    pub fn features(&self) -> Vec<String> {
        FEATURES.iter().map(|s| s.to_string()).collect()
    }

    fn slot(&self, sr: &str) -> SrSlot {
        per_sr(&self.srs, sr)
    }

    /// The admin lock of `sr`: held for the whole of SR.attach, SR.detach and SR.destroy.
    fn admin(&self, sr: &str) -> Arc<tokio::sync::Mutex<()>> {
        per_sr(&self.admin, sr)
    }

    pub(crate) async fn attached(
        &self,
        sr: &str,
    ) -> Result<(tokio::sync::OwnedRwLockReadGuard<Option<Arc<Sr>>>, Arc<Sr>)> {
        let sr = validate::uuid("SR", sr)?;
        let guard = self.slot(&sr).read_owned().await;
        match guard.as_ref() {
            Some(s) => {
                let s = s.clone();
                Ok((guard, s))
            }
            None => Err(Error::SrNotAttached(sr)),
        }
    }

    fn known_file(&self, sr: &str) -> PathBuf {
        self.cfg.data_dir.join(".srs").join(sr)
    }

    /// Where SR `sr` lives: `device_config["path"]`, else where it was created, else
    /// `<data_dir>/<sr>`, else the first SR root holding it.
    fn resolve_path(&self, sr: &str, device_config: &BTreeMap<String, String>) -> Result<PathBuf> {
        if let Some(p) = device_config.get("path") {
            return checked_path(p);
        }
        if let Ok(p) = std::fs::read_to_string(self.known_file(sr)) {
            return Ok(PathBuf::from(p.trim_end_matches('\n')));
        }
        let default = self.cfg.data_dir.join(sr);
        if default.join(meta::META_DIR).exists() {
            return Ok(default);
        }
        for root in &self.cfg.sr_roots {
            for cand in [root.clone(), root.join(sr)] {
                if let Ok(m) = meta::MetaStore::new(&cand, Failpoints::none()).read_sr() {
                    if m.uuid == sr {
                        return Ok(cand);
                    }
                }
            }
        }
        Ok(default)
    }

    // ----------------------------------------------------------------------------------- SR --

    /// `SR.create`: formats a new SR at `device_config["path"]` (default `<data_dir>/<sr>`).
    /// Returns the path. The SR is not attached.
    pub async fn sr_create(
        &self,
        sr: &str,
        name_label: &str,
        name_description: &str,
        device_config: &BTreeMap<String, String>,
    ) -> Result<PathBuf> {
        let sr = validate::uuid("SR", sr)?;
        validate::name_label(name_label)?;
        validate::name_description(name_description)?;
        let path = match device_config.get("path") {
            Some(p) => checked_path(p)?,
            None => self.cfg.data_dir.join(&sr),
        };
        let slot = self.slot(&sr);
        let guard = slot.write().await;
        if guard.is_some() {
            return Err(Error::SrAttached(sr));
        }
        let info = SrMeta {
            format_version: FORMAT_VERSION,
            uuid: sr.clone(),
            name_label: name_label.to_string(),
            name_description: name_description.to_string(),
            created: time::now_rfc3339(),
        };
        let known = self.known_file(&sr);
        let data_dir = self.cfg.data_dir.clone();
        blocking(move || {
            let store = meta::MetaStore::new(&path, Failpoints::none());
            if store.exists() {
                let other = store.read_sr().map(|m| m.uuid).unwrap_or_default();
                return Err(backend(
                    "SR_EXISTS",
                    format!(
                        "{} already holds SR {other}; attach it, or choose another path",
                        path.display()
                    ),
                ));
            }
            if known.exists() {
                return Err(backend(
                    "SR_EXISTS",
                    format!(
                        "SR {} already exists at {}",
                        info.uuid,
                        std::fs::read_to_string(&known).unwrap_or_default()
                    ),
                ));
            }
            std::fs::create_dir_all(&path).map_err(|e| io("create SR directory", &path, e))?;
            store.format(&info)?;
            let dir = data_dir.join(".srs");
            std::fs::create_dir_all(&dir).map_err(|e| io("create", &dir, e))?;
            meta::write_atomic(
                &dir,
                &info.uuid,
                path.to_string_lossy().as_bytes(),
                &Failpoints::none(),
            )?;
            tracing::info!(sr = info.uuid, path = %path.display(), "SR created");
            Ok(path)
        })
        .await
    }

    /// `SR.attach`: takes the SR's lock, recovers interrupted operations, reconciles records
    /// with files. Attaching an attached SR is a no-op.
    pub async fn sr_attach(
        &self,
        sr: &str,
        device_config: &BTreeMap<String, String>,
    ) -> Result<AttachReport> {
        let sr = validate::uuid("SR", sr)?;
        let path = self.resolve_path(&sr, device_config)?;
        let _admin = self.admin(&sr).lock_owned().await;
        let slot = self.slot(&sr);
        let mut guard = slot.write().await;
        if let Some(s) = guard.as_ref() {
            return Ok(s.report.lock().unwrap_or_else(|p| p.into_inner()).clone());
        }
        let format = self.format.clone();
        let fp = self.cfg.failpoints.clone();
        let uuid = sr.clone();
        let attached = blocking(move || Sr::attach(&uuid, &path, format, fp)).await?;
        let report = attached
            .report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        tracing::info!(sr, path = %attached.root.display(), vdis = attached.all_vdis().len(),
            recovered = report.recovered.len(), adopted = report.adopted.len(),
            missing = report.missing.len(), "SR attached");
        *guard = Some(Arc::new(attached));
        Ok(report)
    }

    /// `SR.detach`: tears down datapaths (hooks), releases the lock. Detaching a detached SR is a
    /// no-op.
    ///
    /// The SR leaves its slot first (the slot's write lock is held only for that), then its
    /// datapaths are torn down, then the SR's lock is released. Tearing down under the write
    /// lock would deadlock with a datapath call in progress: it holds its VDI's datapath entry
    /// while it calls the engine, which waits for the slot behind this writer. Now such a call
    /// gets `Sr_not_attached` and lets go. SR.attach/detach/destroy of one SR are serialised by
    /// the SR's admin lock, so a new attach cannot start before the teardown is over.
    pub async fn sr_detach(&self, sr: &str) -> Result<()> {
        let sr = validate::uuid("SR", sr)?;
        let _admin = self.admin(&sr).lock_owned().await;
        let slot = self.slot(&sr);
        let Some(attached) = slot.write().await.take() else {
            return Ok(());
        };
        let res = self.hooks.before_sr_detach(&sr).await;
        // The SR (its lock file and open files) goes once no datapath serves it any more.
        drop(attached);
        if let Err(e) = &res {
            tracing::warn!(sr, error = %e, "tearing down the SR's datapaths failed");
        }
        tracing::info!(sr, "SR detached");
        res
    }

    /// `SR.destroy`: erases an SR that holds no VDIs (hidden bases only). Works attached or not.
    pub async fn sr_destroy(&self, sr: &str) -> Result<()> {
        let sr = validate::uuid("SR", sr)?;
        let _admin = self.admin(&sr).lock_owned().await;
        let slot = self.slot(&sr);
        let mut guard = slot.write().await;
        let attached = guard.clone();
        let path = match &attached {
            Some(s) => s.root.clone(),
            None => self.resolve_path(&sr, &BTreeMap::new())?,
        };
        let format = self.format.clone();
        let fp = self.cfg.failpoints.clone();
        let uuid = sr.clone();
        let known = self.known_file(&sr);
        blocking(move || {
            let s = match attached {
                Some(s) => s,
                None => Arc::new(Sr::attach(&uuid, &path, format, fp)?),
            };
            s.erase()?;
            let _ = std::fs::remove_file(&known);
            tracing::info!(sr = uuid, path = %path.display(), "SR destroyed");
            Ok(())
        })
        .await?;
        *guard = None;
        Ok(())
    }

    /// `SR.scan`: every VDI.
    pub async fn sr_scan(&self, sr: &str) -> Result<Vec<VdiView>> {
        let (_g, s) = self.attached(sr).await?;
        let mut out: Vec<VdiView> = s.all_vdis().iter().map(|v| view(&s, v)).collect();
        out.sort_by(|a, b| a.record.uuid.cmp(&b.record.uuid));
        Ok(out)
    }

    /// `SR.stat`.
    pub async fn sr_stat(&self, sr: &str) -> Result<SrView> {
        let (_g, s) = self.attached(sr).await?;
        let s2 = s.clone();
        let (total, free) = blocking(move || Ok(s2.space())).await?;
        let info = s.info.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let missing = s
            .report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .missing
            .clone();
        Ok(SrView {
            uuid: info.uuid,
            name_label: info.name_label,
            name_description: info.name_description,
            total_space: total,
            free_space: free,
            path: s.root.clone(),
            vdi_count: s.all_vdis().len(),
            missing,
        })
    }

    /// `SR.set_name_label`.
    pub async fn sr_set_name_label(&self, sr: &str, v: &str) -> Result<()> {
        validate::name_label(v)?;
        let (_g, s) = self.attached(sr).await?;
        let v = v.to_string();
        blocking(move || s.update_info(|m| m.name_label = v).map(|_| ())).await
    }

    /// `SR.set_name_description`.
    pub async fn sr_set_name_description(&self, sr: &str, v: &str) -> Result<()> {
        validate::name_description(v)?;
        let (_g, s) = self.attached(sr).await?;
        let v = v.to_string();
        blocking(move || s.update_info(|m| m.name_description = v).map(|_| ())).await
    }

    // ---------------------------------------------------------------------------------- VDI --

    /// Takes `vdi`'s lock for the datapath layer: while the returned guard lives, no snapshot,
    /// clone, destroy, record update or GC relink touches the VDI's chain, so its chain can be
    /// opened (and an export switched to it) without seeing a half-made change. While holding
    /// it, use the guard's accessors, not other engine calls: those take the SR's slot, and a
    /// slot read queued behind an SR.detach that waits for a GC round that waits for this VDI's
    /// lock would never be granted.
    pub async fn lock_vdi(&self, sr: &str, vdi: &str) -> Result<VdiLock> {
        let (_g, s, v, guard) = self.locked_vdi(sr, vdi).await?;
        Ok(VdiLock {
            sr: s,
            vdi: v,
            _guard: guard,
        })
    }

    /// Finds a VDI and takes its lock (re-checking it was not destroyed meanwhile).
    async fn locked_vdi(
        &self,
        sr: &str,
        vdi: &str,
    ) -> Result<(
        tokio::sync::OwnedRwLockReadGuard<Option<Arc<Sr>>>,
        Arc<Sr>,
        Arc<Vdi>,
        tokio::sync::OwnedMutexGuard<()>,
    )> {
        let vdi = validate::uuid("VDI", vdi)?;
        let (g, s) = self.attached(sr).await?;
        let v = s
            .vdi(&vdi)
            .ok_or_else(|| Error::VdiDoesNotExist(vdi.clone()))?;
        let lock = v.op.clone().lock_owned().await;
        if v.gone.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::VdiDoesNotExist(vdi));
        }
        Ok((g, s, v, lock))
    }

    /// `VDI.create`: an empty VDI; the returned record carries the rounded size.
    pub async fn vdi_create(&self, sr: &str, p: VdiCreate) -> Result<VdiView> {
        validate::name_label(&p.name_label)?;
        validate::name_description(&p.name_description)?;
        validate::sm_config(&p.sm_config)?;
        validate::name_label(&p.ty)?;
        validate::name_label(&p.metadata_of_pool)?;
        let size = validate::virtual_size(p.virtual_size)?;
        let (_g, s) = self.attached(sr).await?;
        let uuid = uuid::Uuid::new_v4().to_string();
        let mut rec = sr::new_record(&uuid, size);
        rec.name_label = p.name_label;
        rec.name_description = p.name_description;
        if !p.ty.is_empty() {
            rec.ty = p.ty;
        }
        rec.sm_config = p.sm_config;
        rec.read_only = p.read_only;
        rec.persistent = p.persistent;
        rec.sharable = p.sharable;
        rec.metadata_of_pool = p.metadata_of_pool;
        let s2 = s.clone();
        let rec = blocking(move || s2.create_vdi(rec)).await?;
        tracing::info!(sr, vdi = rec.uuid, size, "VDI created");
        Ok(VdiView {
            physical_utilisation: s.physical_utilisation(&rec.uuid),
            record: rec,
        })
    }

    /// `VDI.snapshot` (read-only) or `VDI.clone` (read-write) of `vdi`: O(1) in disk size.
    pub async fn vdi_snapshot(
        &self,
        sr: &str,
        vdi: &str,
        d: VdiDerive,
        clone: bool,
    ) -> Result<VdiView> {
        if let Some(l) = &d.name_label {
            validate::name_label(l)?;
        }
        if let Some(l) = &d.name_description {
            validate::name_description(l)?;
        }
        validate::sm_config(&d.sm_config)?;
        // Back-pressure: a long chain waits for the background GC first (issue 7).
        let s0 = self.attached(sr).await?.1;
        crate::differencing::online::wait_for_chain_room(&s0, vdi).await;
        drop(s0);
        let (_g, s, v, _lock) = self.locked_vdi(sr, vdi).await?;
        let src = v.record();
        let mut sm = src.sm_config.clone();
        sm.remove(sr::SM_ADOPTED);
        sm.extend(d.sm_config);
        validate::sm_config(&sm)?;
        let uuid = uuid::Uuid::new_v4().to_string();
        let mut new = sr::new_record(&uuid, src.virtual_size);
        new.name_label = d.name_label.unwrap_or_else(|| src.name_label.clone());
        new.name_description = d
            .name_description
            .unwrap_or_else(|| src.name_description.clone());
        new.ty = src.ty.clone();
        new.content_id = src.content_id.clone();
        new.metadata_of_pool = src.metadata_of_pool.clone();
        new.sm_config = sm;
        new.sharable = src.sharable;
        if clone {
            new.read_only = false;
            new.persistent = src.persistent;
        } else {
            new.is_a_snapshot = true;
            new.snapshot_of = src.uuid.clone();
            new.snapshot_time = time::now_xapi();
            new.read_only = true;
            new.persistent = true;
        }
        self.hooks.before_leaf_change(&s.uuid, &src.uuid).await?;
        let (s2, v2) = (s.clone(), v.clone());
        let res = blocking(move || s2.snapshot_vdi(&v2, new, clone)).await;
        let resumed = self
            .hooks
            .after_leaf_change(&s.uuid, &src.uuid, s.leaf_path(&src.uuid))
            .await;
        let rec = res?;
        resumed?;
        tracing::info!(
            sr,
            vdi,
            new = rec.uuid,
            clone,
            "VDI {}",
            if clone { "cloned" } else { "snapshotted" }
        );
        Ok(VdiView {
            physical_utilisation: s.physical_utilisation(&rec.uuid),
            record: rec,
        })
    }

    /// `VDI.destroy`: first the datapath layer tears down the VDI's datapaths
    /// ([`DatapathHooks::before_vdi_destroy`]); refused if one is still in use after that.
    pub async fn vdi_destroy(&self, sr: &str, vdi: &str) -> Result<()> {
        let vdi_id = validate::uuid("VDI", vdi)?;
        {
            let (_g, s) = self.attached(sr).await?;
            if s.vdi(&vdi_id).is_none() {
                let s2 = s.clone();
                let id = vdi_id.clone();
                if blocking(move || s2.forget_missing(&id)).await? {
                    tracing::info!(sr, vdi, "record of a missing VDI forgotten");
                    return Ok(());
                }
                return Err(Error::VdiDoesNotExist(vdi_id));
            }
        }
        // Not under the VDI's lock: datapath transitions take it to persist their states.
        self.hooks.before_vdi_destroy(self, sr, &vdi_id).await?;
        let (_g, s, v, _lock) = self.locked_vdi(sr, vdi).await?;
        let rec = v.record();
        s.refuse_if_in_use(&rec, self.hooks.is_attached(&s.uuid, &rec.uuid))?;
        let s2 = s.clone();
        blocking(move || s2.destroy_vdi(&v)).await?;
        tracing::info!(sr, vdi, "VDI destroyed");
        Ok(())
    }

    /// `VDI.stat`.
    pub async fn vdi_stat(&self, sr: &str, vdi: &str) -> Result<VdiView> {
        let vdi = validate::uuid("VDI", vdi)?;
        let (_g, s) = self.attached(sr).await?;
        let v = s.vdi(&vdi).ok_or(Error::VdiDoesNotExist(vdi))?;
        Ok(view(&s, &v))
    }

    async fn update(
        &self,
        sr: &str,
        vdi: &str,
        f: impl FnOnce(&mut VdiRecord) + Send + 'static,
    ) -> Result<VdiView> {
        let (_g, s, v, _lock) = self.locked_vdi(sr, vdi).await?;
        let (s2, v2) = (s.clone(), v.clone());
        blocking(move || s2.update_vdi(&v2, f)).await?;
        Ok(view(&s, &v))
    }

    /// `VDI.set_name_label`.
    pub async fn vdi_set_name_label(&self, sr: &str, vdi: &str, v: &str) -> Result<VdiView> {
        validate::name_label(v)?;
        let v = v.to_string();
        self.update(sr, vdi, move |r| r.name_label = v).await
    }

    /// `VDI.set_name_description`.
    pub async fn vdi_set_name_description(&self, sr: &str, vdi: &str, v: &str) -> Result<VdiView> {
        validate::name_description(v)?;
        let v = v.to_string();
        self.update(sr, vdi, move |r| r.name_description = v).await
    }

    /// `VDI.set_persistent`.
    pub async fn vdi_set_persistent(
        &self,
        sr: &str,
        vdi: &str,
        persistent: bool,
    ) -> Result<VdiView> {
        self.update(sr, vdi, move |r| r.persistent = persistent)
            .await
    }

    /// `VDI.set_content_id`.
    pub async fn vdi_set_content_id(
        &self,
        sr: &str,
        vdi: &str,
        content_id: &str,
    ) -> Result<VdiView> {
        validate::content_id(content_id)?;
        let c = content_id.to_string();
        self.update(sr, vdi, move |r| r.content_id = c).await
    }

    /// `VDI.epoch_begin`: records that `vm` starts using the VDI (the datapath layer resets
    /// non-persistent disks).
    pub async fn vdi_epoch_begin(
        &self,
        sr: &str,
        vdi: &str,
        vm: &str,
        persistent: bool,
    ) -> Result<VdiView> {
        validate::name_label(vm)?;
        let vm = vm.to_string();
        let v = self
            .update(sr, vdi, move |r| {
                r.epoch = Some(Epoch {
                    vm,
                    persistent,
                    began: time::now_rfc3339(),
                })
            })
            .await?;
        self.hooks.after_epoch_change(self, sr, vdi).await?;
        Ok(v)
    }

    /// `VDI.epoch_end`: records that the VM stopped using the VDI.
    pub async fn vdi_epoch_end(&self, sr: &str, vdi: &str, vm: &str) -> Result<VdiView> {
        validate::name_label(vm)?;
        let v = self.update(sr, vdi, |r| r.epoch = None).await?;
        self.hooks.after_epoch_change(self, sr, vdi).await?;
        Ok(v)
    }

    /// Updates the persisted datapath states of a VDI (for the datapath layer).
    pub async fn vdi_set_datapaths(
        &self,
        sr: &str,
        vdi: &str,
        f: impl FnOnce(&mut BTreeMap<String, String>) + Send + 'static,
    ) -> Result<VdiView> {
        self.update(sr, vdi, move |r| f(&mut r.datapaths)).await
    }

    /// Path of a VDI's leaf file and its chain (leaf first), for the datapath layer.
    pub async fn vdi_chain(&self, sr: &str, vdi: &str) -> Result<(PathBuf, Vec<String>)> {
        let vdi = validate::uuid("VDI", vdi)?;
        let (_g, s) = self.attached(sr).await?;
        s.vdi(&vdi)
            .ok_or_else(|| Error::VdiDoesNotExist(vdi.clone()))?;
        Ok((s.leaf_path(&vdi), s.ancestry(&vdi)))
    }

    /// Garbage collection and coalescing of `sr`'s chains (see [`crate::differencing::gc`]):
    /// on demand, online (attached VDIs keep serving I/O).
    pub async fn sr_gc(
        &self,
        sr: &str,
        opts: crate::differencing::gc::GcOptions,
    ) -> Result<crate::differencing::gc::GcReport> {
        let (_g, s) = self.attached(sr).await?;
        blocking(move || crate::differencing::gc::run(&s, &opts, &mut |_| {})).await
    }

    /// `Query.diagnostics`: a human-readable dump of the engine's state.
    pub async fn diagnostics(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "data_dir: {}", self.cfg.data_dir.display());
        if let Some(fp) = self.cfg.failpoints.armed() {
            let _ = writeln!(out, "failpoint armed: {fp}");
        }
        let slots: Vec<(String, SrSlot)> = self
            .srs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (uuid, slot) in slots {
            let Ok(g) = slot.try_read() else {
                let _ = writeln!(out, "SR {uuid}: busy (attach/detach in progress)");
                continue;
            };
            let Some(s) = g.as_ref() else { continue };
            let rep = s.report.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let chain = s.chain.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let _ = writeln!(
                out,
                "SR {uuid} at {}: {} VDIs, {} nodes ({} hidden); attach recovered {:?}, adopted {:?}, missing {:?}, unreadable {:?}, collected {:?}",
                s.root.display(),
                s.all_vdis().len(),
                chain.len(),
                chain.hidden_nodes().len(),
                rep.recovered,
                rep.adopted,
                rep.missing,
                rep.unreadable,
                rep.collected
            );
            let mut vdis: Vec<VdiRecord> = s.all_vdis().iter().map(|v| v.record()).collect();
            vdis.sort_by(|a, b| a.uuid.cmp(&b.uuid));
            for r in vdis {
                let _ = writeln!(
                    out,
                    "  VDI {} {:?} size {} chain {:?}{}{}",
                    r.uuid,
                    r.name_label,
                    r.virtual_size,
                    chain.ancestry(&r.uuid),
                    if r.datapaths.is_empty() {
                        String::new()
                    } else {
                        format!(" datapaths {:?}", r.datapaths)
                    },
                    if r.epoch.is_some() {
                        " (in an epoch)"
                    } else {
                        ""
                    }
                );
            }
        }
        out.push_str(&crate::differencing::gc::diagnostics());
        out.push_str(&crate::differencing::online::diagnostics());
        out
    }
}

/// The entry of `sr` in a per-SR map, made on first use.
fn per_sr<T: Default + Clone>(map: &Mutex<HashMap<String, T>>, sr: &str) -> T {
    map.lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(sr.to_string())
        .or_default()
        .clone()
}

/// A VDI's lock, held ([`Storage::lock_vdi`]).
pub struct VdiLock {
    sr: Arc<Sr>,
    vdi: Arc<Vdi>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl VdiLock {
    /// The VDI's leaf file (read without touching the SR's slot: see [`Storage::lock_vdi`]).
    pub fn leaf_path(&self) -> PathBuf {
        self.sr.leaf_path(&self.vdi.record().uuid)
    }

    /// The VDI's current record.
    pub fn record(&self) -> VdiRecord {
        self.vdi.record()
    }

    /// Updates the VDI's record (the lock is held already; the engine's own setters would wait
    /// for it).
    pub async fn update(&self, f: impl FnOnce(&mut VdiRecord) + Send + 'static) -> Result<()> {
        let (s, v) = (self.sr.clone(), self.vdi.clone());
        blocking(move || s.update_vdi(&v, f).map(|_| ())).await
    }
}

fn view(s: &Sr, v: &Vdi) -> VdiView {
    let record = v.record();
    VdiView {
        physical_utilisation: s.physical_utilisation(&record.uuid),
        record,
    }
}

/// An SR path from `device_config`: absolute, no `..` component.
fn checked_path(p: &str) -> Result<PathBuf> {
    let path = Path::new(p);
    if !path.is_absolute()
        || path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        || p.contains('\0')
    {
        return Err(invalid(
            "device_config.path",
            format!("device_config path {p:?} must be an absolute path without `..`"),
        ));
    }
    Ok(path.to_path_buf())
}

/// Runs blocking work on tokio's blocking pool; a panic inside (a failpoint in tests) becomes
/// an `Internal_error`.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(Error::InternalError(format!(
            "storage operation aborted: {e}"
        ))),
    }
}

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod vhd_tests;
