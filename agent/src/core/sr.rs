//! One attached SR: its lock, records, chain index, and the synchronous (blocking) steps of every
//! operation, each journaled and recoverable. The async front end in `core/mod.rs` serialises
//! calls per VDI and runs these on tokio's blocking pool.

use super::error::{backend, io, Error, Result};
use super::meta::{JournalEntry, JournalOp, MetaStore, SrMeta, VdiRecord};
use super::{sys, time, validate};
use crate::differencing::{list_nodes, node_file, ChainIndex, Format};
use crate::failpoint::Failpoints;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// `sm_config` key naming a VDI's hidden parent base (set by snapshot/clone).
pub const SM_VHD_PARENT: &str = "vhd-parent";
/// `sm_config` key marking a VDI adopted at attach (a VHD found without a record).
pub const SM_ADOPTED: &str = "adopted";

/// One VDI of an attached SR.
#[derive(Debug)]
pub struct Vdi {
    /// Serialises every mutating call on this VDI (held across the blocking work).
    pub op: Arc<tokio::sync::Mutex<()>>,
    /// The current record (reads never wait for `op`).
    pub rec: RwLock<VdiRecord>,
    /// Set once destroyed: a caller that queued on `op` must then report it missing.
    pub gone: AtomicBool,
}

impl Vdi {
    fn new(rec: VdiRecord) -> Arc<Self> {
        Arc::new(Self {
            op: Arc::new(tokio::sync::Mutex::new(())),
            rec: RwLock::new(rec),
            gone: AtomicBool::new(false),
        })
    }

    /// A copy of the record.
    pub fn record(&self) -> VdiRecord {
        self.rec.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What attach found while reconciling records with files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachReport {
    /// Journal entries completed or undone.
    pub recovered: Vec<String>,
    /// VHDs without a record, adopted as unmanaged VDIs.
    pub adopted: Vec<String>,
    /// Records whose `<uuid>.vhd` is missing (not served; `VDI.destroy` removes the record).
    pub missing: Vec<String>,
    /// Node files that could not be read (left alone).
    pub unreadable: Vec<String>,
    /// Hidden bases left without children, deleted.
    pub collected: Vec<String>,
}

/// An attached SR. Dropping it releases the SR's lock.
#[derive(Debug)]
pub struct Sr {
    /// The SR's uuid.
    pub uuid: String,
    /// Its directory.
    pub root: PathBuf,
    /// Its metadata store.
    pub meta: MetaStore,
    format: Arc<dyn Format>,
    fp: Failpoints,
    _lock: File,
    /// Identity and names.
    pub info: Mutex<SrMeta>,
    /// Managed VDIs by uuid.
    pub vdis: RwLock<HashMap<String, Arc<Vdi>>>,
    /// Who is whose parent.
    pub chain: Mutex<ChainIndex>,
    /// What the attach found.
    pub report: Mutex<AttachReport>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sr {
    /// Attaches the SR at `root`: takes its lock, finishes or undoes every journaled operation,
    /// and reconciles records with the node files.
    pub fn attach(
        uuid: &str,
        root: &Path,
        format: Arc<dyn Format>,
        fp: Failpoints,
    ) -> Result<Self> {
        let meta = MetaStore::new(root, fp.clone());
        if !meta.exists() {
            return Err(backend(
                interface::codes::SR_DOES_NOT_EXIST,
                format!(
                    "no SR {uuid} at {}: create it with SR.create, or pass device_config path",
                    root.display()
                ),
            ));
        }
        let info = meta.read_sr()?;
        if info.uuid != uuid {
            return Err(backend(
                "SR_UUID_MISMATCH",
                format!(
                    "{} holds SR {}, not {uuid}; pass the right device_config path",
                    root.display(),
                    info.uuid
                ),
            ));
        }
        let lock_path = meta.lock_path();
        let mut lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| io("open SR lock", &lock_path, e))?;
        if !sys::try_lock_exclusive(&lock_file).map_err(|e| io("lock", &lock_path, e))? {
            let holder = fs::read_to_string(&lock_path).unwrap_or_default();
            return Err(backend(
                "SR_LOCKED",
                format!(
                    "SR {uuid} at {} is attached by another agent or process ({}); detach it there first",
                    root.display(),
                    holder.trim()
                ),
            ));
        }
        let _ = lock_file.set_len(0);
        let _ = writeln!(lock_file, "pid {}", std::process::id());

        let sr = Sr {
            uuid: uuid.to_string(),
            root: root.to_path_buf(),
            meta,
            format,
            fp,
            _lock: lock_file,
            info: Mutex::new(info),
            vdis: RwLock::new(HashMap::new()),
            chain: Mutex::new(ChainIndex::default()),
            report: Mutex::new(AttachReport::default()),
        };
        let mut report = AttachReport::default();
        sr.meta.remove_stale_temps()?;
        for entry in sr.meta.journal_pending()? {
            tracing::warn!(
                sr = uuid,
                op = entry.id,
                "recovering an interrupted operation"
            );
            sr.recover(&entry)?;
            report.recovered.push(entry.id.clone());
        }
        // differencing's own journals (compose, online leaf merge), before reconcile reads nodes.
        report
            .recovered
            .extend(crate::differencing::recover_at_attach(&sr)?);
        sr.reconcile(&mut report)?;
        *lock(&sr.report) = report;
        Ok(sr)
    }

    fn node(&self, name: &str) -> PathBuf {
        node_file(&self.root, name)
    }

    fn fsync_root(&self) -> Result<()> {
        super::meta::fsync_dir(&self.root)
    }

    fn remove_node(&self, name: &str) -> Result<()> {
        let p = self.node(name);
        match fs::remove_file(&p) {
            Ok(()) => self.fsync_root(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", &p, e)),
        }
    }

    /// Creates node `name` through `make` at a temporary name (`.<name>.vhd.part`, never listed
    /// as a node) and renames it into place, so a `<name>.vhd` that exists is always complete.
    fn create_node(&self, name: &str, make: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let tmp = self.root.join(format!(".{name}.vhd.part"));
        let _ = fs::remove_file(&tmp);
        make(&tmp)?;
        let target = self.node(name);
        fs::rename(&tmp, &target).map_err(|e| io("rename into place", &target, e))?;
        self.fsync_root()
    }

    fn part_path(&self, name: &str) -> PathBuf {
        self.root.join(format!(".{name}.vhd.part"))
    }

    /// Creates `.<name>.vhd.part` as a child of `parent` (durable file, not yet published).
    fn make_part(&self, name: &str, parent: &str) -> Result<()> {
        let tmp = self.part_path(name);
        let _ = fs::remove_file(&tmp);
        self.format.create_child(&tmp, &self.node(parent))
    }

    /// Renames parts into place, then one directory fsync.
    fn publish_parts(&self, names: &[&str]) -> Result<()> {
        for n in names {
            let target = self.node(n);
            fs::rename(self.part_path(n), &target)
                .map_err(|e| io("rename into place", &target, e))?;
        }
        self.fsync_root()
    }

    fn create_child_node(&self, name: &str, parent: &str) -> Result<()> {
        let parent_path = self.node(parent);
        self.create_node(name, |tmp| self.format.create_child(tmp, &parent_path))
    }

    /// Recovery: makes sure `name` exists as a child of `parent`. An existing, complete child of
    /// `parent` is kept (it may already hold data if only the journal's removal was lost).
    fn ensure_child_node(&self, name: &str, parent: &str) -> Result<()> {
        if let Ok(info) = self.format.inspect(&self.node(name)) {
            if info.parent.as_deref() == Some(parent) {
                return Ok(());
            }
        }
        self.remove_node(name)?;
        self.create_child_node(name, parent)
    }

    /// Finishes or undoes one journaled operation (idempotent: may itself be interrupted and run
    /// again).
    pub fn recover(&self, entry: &JournalEntry) -> Result<()> {
        match &entry.op {
            JournalOp::Create { record } => {
                if self.meta.has_vdi(&record.uuid) {
                    tracing::info!(vdi = record.uuid, "create had finished: keeping it");
                } else {
                    tracing::info!(vdi = record.uuid, "create had not finished: undoing it");
                    self.remove_node(&record.uuid)?;
                }
            }
            JournalOp::Snapshot {
                vdi,
                base,
                new_record,
                ..
            } => {
                if self.node(base).exists() {
                    tracing::info!(vdi, base, "snapshot had renamed the leaf: completing it");
                    self.format.set_hidden(&self.node(base), true)?;
                    self.ensure_child_node(vdi, base)?;
                    self.ensure_child_node(&new_record.uuid, base)?;
                    self.meta.write_vdi(new_record)?;
                    if let Some(mut rec) =
                        self.meta.read_vdis()?.into_iter().find(|r| &r.uuid == vdi)
                    {
                        rec.sm_config.insert(SM_VHD_PARENT.into(), base.clone());
                        self.meta.write_vdi(&rec)?;
                    }
                } else {
                    tracing::info!(vdi, "snapshot had not renamed the leaf: undoing it");
                    self.meta.remove_vdi(&new_record.uuid)?;
                    self.remove_node(&new_record.uuid)?;
                }
            }
            JournalOp::Destroy { vdi } => {
                tracing::info!(vdi, "completing an interrupted destroy");
                self.meta.remove_vdi(vdi)?;
                self.remove_node(vdi)?;
                // Bases left without children are collected by reconcile.
            }
        }
        self.meta.journal_end(&entry.id)
    }

    fn reconcile(&self, report: &mut AttachReport) -> Result<()> {
        let mut index = ChainIndex::default();
        let mut infos = BTreeMap::new();
        for name in list_nodes(&self.root)? {
            match self.format.inspect(&self.node(&name)) {
                Ok(info) => {
                    index.insert(&name, info.parent.clone(), info.hidden);
                    infos.insert(name, info);
                }
                Err(e) => {
                    tracing::warn!(sr = self.uuid, node = name, error = %e, "unreadable node left alone");
                    report.unreadable.push(name);
                }
            }
        }
        // Hidden bases no one depends on any more (their last child was destroyed, possibly by an
        // interrupted destroy) are deleted; never while an unreadable node might be a child.
        if report.unreadable.is_empty() {
            for g in index.all_garbage() {
                tracing::info!(
                    sr = self.uuid,
                    node = g,
                    "deleting a hidden base with no child"
                );
                self.remove_node(&g)?;
                report.collected.push(g);
            }
        }
        let mut vdis = HashMap::new();
        for rec in self.meta.read_vdis()? {
            if index.contains(&rec.uuid) && !index.is_hidden(&rec.uuid) {
                vdis.insert(rec.uuid.clone(), Vdi::new(rec));
            } else {
                tracing::warn!(
                    sr = self.uuid,
                    vdi = rec.uuid,
                    "record without its VHD: reported missing"
                );
                report.missing.push(rec.uuid);
            }
        }
        for (name, info) in &infos {
            if info.hidden || vdis.contains_key(name) || report.missing.contains(name) {
                continue;
            }
            let Ok(uuid) = validate::uuid("VDI", name) else {
                tracing::warn!(
                    sr = self.uuid,
                    node = name,
                    "VHD not named <uuid>.vhd: not adopted"
                );
                report.unreadable.push(name.clone());
                continue;
            };
            if &uuid != name {
                report.unreadable.push(name.clone());
                continue;
            }
            let mut rec = new_record(&uuid, info.virtual_size);
            rec.name_label = format!("{name}.vhd");
            rec.managed = false;
            rec.sm_config.insert(SM_ADOPTED.into(), "true".into());
            if let Some(p) = &info.parent {
                rec.sm_config.insert(SM_VHD_PARENT.into(), p.clone());
            }
            self.meta.write_vdi(&rec)?;
            tracing::info!(
                sr = self.uuid,
                vdi = uuid,
                "adopted an unknown VHD as unmanaged"
            );
            report.adopted.push(uuid.clone());
            vdis.insert(uuid, Vdi::new(rec));
        }
        *self.vdis.write().unwrap_or_else(|p| p.into_inner()) = vdis;
        *lock(&self.chain) = index;
        Ok(())
    }

    /// The VDI `uuid`, if managed here.
    pub fn vdi(&self, uuid: &str) -> Option<Arc<Vdi>> {
        self.vdis
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(uuid)
            .cloned()
    }

    /// Every VDI.
    pub fn all_vdis(&self) -> Vec<Arc<Vdi>> {
        self.vdis
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Bytes used by a VDI's own file.
    pub fn physical_utilisation(&self, uuid: &str) -> u64 {
        fs::metadata(self.node(uuid)).map(|m| m.len()).unwrap_or(0)
    }

    /// Path of a VDI's leaf file.
    pub fn leaf_path(&self, uuid: &str) -> PathBuf {
        self.node(uuid)
    }

    /// The chain of `uuid`, leaf first.
    pub fn ancestry(&self, uuid: &str) -> Vec<String> {
        lock(&self.chain).ancestry(uuid)
    }

    /// Creates a VDI from `rec` (uuid and rounded size already set). Journaled.
    pub fn create_vdi(&self, rec: VdiRecord) -> Result<VdiRecord> {
        let entry = JournalEntry {
            id: uuid::Uuid::new_v4().to_string(),
            started: time::now_rfc3339(),
            op: JournalOp::Create {
                record: rec.clone(),
            },
        };
        self.meta.journal_begin(&entry)?;
        self.fp.hit("vdi_create.journal_written");
        let res = (|| {
            let size = rec.virtual_size;
            self.create_node(&rec.uuid, |tmp| self.format.create_base(tmp, size))?;
            self.fp.hit("vdi_create.vhd_created");
            self.meta.write_vdi(&rec)?;
            self.fp.hit("vdi_create.record_written");
            Ok(())
        })();
        if let Err(e) = res {
            tracing::warn!(vdi = rec.uuid, error = %e, "create failed: undoing it");
            let _ = self.meta.remove_vdi(&rec.uuid);
            self.undo_or_keep(&entry);
            return Err(e);
        }
        self.meta.journal_end(&entry.id)?;
        lock(&self.chain).insert(&rec.uuid, None, false);
        self.vdis
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec.uuid.clone(), Vdi::new(rec.clone()));
        Ok(rec)
    }

    /// After a failed step, runs recovery for the entry right away; if even that fails, the
    /// entry stays in the journal and the next attach finishes the job.
    fn undo_or_keep(&self, entry: &JournalEntry) {
        if let Err(e) = self.recover(entry) {
            tracing::error!(sr = self.uuid, op = entry.id, error = %e,
                "could not clean up after a failed operation; the next SR.attach will");
        }
    }

    /// Snapshot (`clone == false`) or clone of `vdi` (the caller holds its lock): its leaf becomes
    /// a hidden base with two new empty children, the VDI's new leaf and `new_rec`'s. Journaled.
    pub fn snapshot_vdi(&self, vdi: &Vdi, new_rec: VdiRecord, clone: bool) -> Result<VdiRecord> {
        let src = vdi.record();
        let base = uuid::Uuid::new_v4().to_string();
        let (p_journal, p_renamed, p_children, p_done) = if clone {
            (
                "vdi_clone.journal_written",
                "vdi_clone.leaf_renamed",
                "vdi_clone.children_created",
                "vdi_clone.base_hidden_records_written",
            )
        } else {
            (
                "vdi_snapshot.journal_written",
                "vdi_snapshot.leaf_renamed",
                "vdi_snapshot.children_created",
                "vdi_snapshot.base_hidden_records_written",
            )
        };
        let mut new_rec = new_rec;
        new_rec.sm_config.insert(SM_VHD_PARENT.into(), base.clone());
        let entry = JournalEntry {
            id: uuid::Uuid::new_v4().to_string(),
            started: time::now_rfc3339(),
            op: JournalOp::Snapshot {
                vdi: src.uuid.clone(),
                base: base.clone(),
                clone,
                new_record: new_rec.clone(),
            },
        };
        self.meta.journal_begin(&entry)?;
        self.fp.hit(p_journal);
        let leaf = self.node(&src.uuid);
        let base_path = self.node(&base);
        if let Err(e) = fs::rename(&leaf, &base_path)
            .map_err(|e| io("rename leaf to base", &leaf, e))
            .and_then(|()| self.fsync_root())
        {
            self.undo_or_keep(&entry);
            return Err(e);
        }
        lock(&self.chain).rename(&src.uuid, &base, false);
        self.fp.hit(p_renamed);
        let mut updated = src.clone();
        updated.sm_config.insert(SM_VHD_PARENT.into(), base.clone());
        let res = (|| {
            // Both children at once (their fsyncs overlap), one directory fsync for both.
            let (a, b) = std::thread::scope(|sc| {
                let a = sc.spawn(|| self.make_part(&src.uuid, &base));
                let b = self.make_part(&new_rec.uuid, &base);
                (a.join(), b)
            });
            let a =
                a.unwrap_or_else(|_| Err(Error::InternalError("child creation panicked".into())));
            a.and(b)?;
            self.publish_parts(&[&src.uuid, &new_rec.uuid])?;
            {
                let mut ix = lock(&self.chain);
                ix.insert(&src.uuid, Some(base.clone()), false);
                ix.insert(&new_rec.uuid, Some(base.clone()), false);
            }
            self.fp.hit(p_children);
            // Hide the base while the two records are written (independent fsyncs, overlapped).
            let (hidden, recs) = std::thread::scope(|sc| {
                let h = sc.spawn(|| self.format.set_hidden(&base_path, true));
                let r = self.meta.write_vdis(&[&new_rec, &updated]);
                (h.join(), r)
            });
            hidden.unwrap_or_else(|_| Err(Error::InternalError("set_hidden panicked".into())))?;
            recs?;
            {
                let mut ix = lock(&self.chain);
                let grandparent = ix.parent_of(&base).map(str::to_string);
                ix.insert(&base, grandparent, true);
            }
            self.fp.hit(p_done);
            Ok(())
        })();
        if let Err(e) = res {
            // The leaf was renamed: recovery completes the operation (the VDI's data is in the
            // base, so completing is the only way back to a served leaf). Report the error all the
            // same: the caller sees the snapshot on its next scan.
            tracing::error!(vdi = src.uuid, error = %e, "snapshot step failed after the rename");
            self.undo_or_keep(&entry);
            self.reload_after_recovery(&src.uuid, &new_rec.uuid, &base);
            return Err(e);
        }
        self.meta.journal_end(&entry.id)?;
        *vdi.rec.write().unwrap_or_else(|p| p.into_inner()) = updated;
        self.vdis
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(new_rec.uuid.clone(), Vdi::new(new_rec.clone()));
        Ok(new_rec)
    }

    /// After an in-line recovery of a snapshot, refresh the in-memory view from disk.
    fn reload_after_recovery(&self, vdi: &str, new_vdi: &str, base: &str) {
        let recs = self.meta.read_vdis().unwrap_or_default();
        let mut ix = lock(&self.chain);
        for name in [base, vdi, new_vdi] {
            match self.format.inspect(&self.node(name)) {
                Ok(i) => ix.insert(name, i.parent, i.hidden),
                Err(_) => ix.remove(name),
            }
        }
        drop(ix);
        let mut map = self.vdis.write().unwrap_or_else(|p| p.into_inner());
        for r in recs
            .into_iter()
            .filter(|r| r.uuid == vdi || r.uuid == new_vdi)
        {
            match map.get(&r.uuid) {
                Some(v) => *v.rec.write().unwrap_or_else(|p| p.into_inner()) = r,
                None => {
                    map.insert(r.uuid.clone(), Vdi::new(r));
                }
            }
        }
    }

    /// Destroys `vdi` (the caller holds its lock and checked it is not attached). Journaled.
    pub fn destroy_vdi(&self, vdi: &Vdi) -> Result<()> {
        let uuid = vdi.record().uuid;
        let entry = JournalEntry {
            id: uuid::Uuid::new_v4().to_string(),
            started: time::now_rfc3339(),
            op: JournalOp::Destroy { vdi: uuid.clone() },
        };
        self.meta.journal_begin(&entry)?;
        self.fp.hit("vdi_destroy.journal_written");
        vdi.gone.store(true, Ordering::SeqCst);
        self.vdis
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&uuid);
        let res = (|| {
            self.meta.remove_vdi(&uuid)?;
            self.fp.hit("vdi_destroy.record_removed");
            self.remove_node(&uuid)?;
            self.fp.hit("vdi_destroy.vhd_removed");
            let garbage = {
                let mut ix = lock(&self.chain);
                let parent = ix.parent_of(&uuid).map(str::to_string);
                ix.remove(&uuid);
                ix.collect_garbage_from(parent)
            };
            for g in garbage {
                tracing::debug!(node = g, "deleting a hidden base left without children");
                self.remove_node(&g)?;
            }
            self.fp.hit("vdi_destroy.base_collected");
            Ok(())
        })();
        if let Err(e) = res {
            tracing::error!(vdi = uuid, error = %e, "destroy failed part-way; will be completed");
            self.undo_or_keep(&entry);
            return Err(e);
        }
        self.meta.journal_end(&entry.id)
    }

    /// Forgets a record whose VHD is missing (reported at attach).
    pub fn forget_missing(&self, uuid: &str) -> Result<bool> {
        let mut rep = lock(&self.report);
        if let Some(pos) = rep.missing.iter().position(|m| m == uuid) {
            self.meta.remove_vdi(uuid)?;
            rep.missing.remove(pos);
            return Ok(true);
        }
        Ok(false)
    }

    /// Applies `f` to the VDI's record and persists it (the caller holds the VDI's lock).
    pub fn update_vdi(&self, vdi: &Vdi, f: impl FnOnce(&mut VdiRecord)) -> Result<VdiRecord> {
        let mut rec = vdi.record();
        f(&mut rec);
        self.meta.write_vdi(&rec)?;
        *vdi.rec.write().unwrap_or_else(|p| p.into_inner()) = rec.clone();
        Ok(rec)
    }

    /// Applies `f` to the SR's identity record and persists it.
    pub fn update_info(&self, f: impl FnOnce(&mut SrMeta)) -> Result<SrMeta> {
        let mut info = lock(&self.info);
        let mut new = info.clone();
        f(&mut new);
        self.meta.write_sr(&new)?;
        *info = new.clone();
        Ok(new)
    }

    /// `(total, free)` bytes of the SR's file system.
    pub fn space(&self) -> (u64, u64) {
        sys::space(&self.root).unwrap_or((0, 0))
    }

    /// Erases the SR's files (nodes and `.ddstor/`), refusing while VDIs have records. Removes
    /// the directory itself when it is then empty.
    pub fn erase(&self) -> Result<()> {
        let records = self.meta.read_vdis()?;
        if !records.is_empty() {
            return Err(backend(
                "SR_NOT_EMPTY",
                format!(
                    "SR {} still holds {} VDI(s) (e.g. {}); destroy them first",
                    self.uuid,
                    records.len(),
                    records[0].uuid
                ),
            ));
        }
        let nodes = list_nodes(&self.root)?;
        for n in &nodes {
            let hidden = self
                .format
                .inspect(&self.node(n))
                .map(|i| i.hidden)
                .unwrap_or(false);
            if !hidden {
                return Err(backend(
                    "SR_NOT_EMPTY",
                    format!(
                        "SR {} holds {} which is not a hidden base; destroy it first",
                        self.uuid,
                        self.node(n).display()
                    ),
                ));
            }
        }
        for n in &nodes {
            self.remove_node(n)?;
        }
        // sr.json first: without it the directory is no longer an SR, whatever else remains.
        super::meta::remove_durable(self.meta.dir(), "sr.json")?;
        fs::remove_dir_all(self.meta.dir()).map_err(|e| io("remove", self.meta.dir(), e))?;
        let _ = fs::remove_dir(&self.root);
        Ok(())
    }

    /// Whether a VDI's persisted record or the datapath layer says it is in use.
    pub fn refuse_if_in_use(&self, rec: &VdiRecord, attached_now: bool) -> Result<()> {
        if attached_now || !rec.datapaths.is_empty() {
            return Err(backend(
                "VDI_IN_USE",
                format!(
                    "VDI {} is attached by datapath(s) {:?}; detach it (VDI.deactivate, VDI.detach) first",
                    rec.uuid,
                    rec.datapaths.keys().collect::<Vec<_>>()
                ),
            ));
        }
        Ok(())
    }
}

/// A fresh record with xapi's defaults.
pub fn new_record(uuid: &str, virtual_size: u64) -> VdiRecord {
    VdiRecord {
        uuid: uuid.to_string(),
        name_label: String::new(),
        name_description: String::new(),
        ty: "user".into(),
        content_id: String::new(),
        metadata_of_pool: String::new(),
        is_a_snapshot: false,
        snapshot_time: interface::SNAPSHOT_TIME_NEVER.into(),
        snapshot_of: String::new(),
        read_only: false,
        cbt_enabled: false,
        virtual_size,
        persistent: true,
        sharable: false,
        sm_config: BTreeMap::new(),
        managed: true,
        epoch: None,
        datapaths: BTreeMap::new(),
    }
}
