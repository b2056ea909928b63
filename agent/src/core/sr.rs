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
        // Journal first: a committed snapshot may still need its staged `.part` files.
        for entry in sr.meta.journal_pending()? {
            tracing::warn!(
                sr = uuid,
                op = entry.id,
                "recovering an interrupted operation"
            );
            sr.recover(&entry)?;
            report.recovered.push(entry.id.clone());
        }
        sr.meta.remove_stale_temps()?;
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
                updated_record,
                ..
            } => self.complete_snapshot(vdi, base, new_record, updated_record.as_deref())?,
            JournalOp::Destroy { vdi } => {
                tracing::info!(vdi, "completing an interrupted destroy");
                self.meta.remove_vdi(vdi)?;
                self.remove_node(vdi)?;
                // Bases left without children are collected by reconcile.
            }
        }
        self.meta.journal_end_durable(&entry.id)
    }

    /// Recovery of a committed snapshot/clone (its journal entry is durable): brings every step
    /// to its end state, whichever of the unsynced steps reached the disk. Idempotent.
    fn complete_snapshot(
        &self,
        vdi: &str,
        base: &str,
        new_record: &VdiRecord,
        updated: Option<&VdiRecord>,
    ) -> Result<()> {
        tracing::info!(vdi, base, "completing a committed snapshot");
        let base_path = self.node(base);
        let base_part = self.part_path(base);
        let child_of_base = |p: &Path| {
            self.format
                .inspect(p)
                .map(|i| i.parent.as_deref() == Some(base))
                .unwrap_or(false)
        };
        // 1. The base: the staged link, or (if the crash came before the link was durable) the
        //    old leaf itself, which is then still `<vdi>.vhd` and not yet a child of the base.
        if !base_path.exists() {
            if base_part.exists() {
                fs::rename(&base_part, &base_path)
                    .map_err(|e| io("rename into place", &base_path, e))?;
            } else if self.node(vdi).exists() && !child_of_base(&self.node(vdi)) {
                fs::rename(self.node(vdi), &base_path)
                    .map_err(|e| io("rename leaf to base", &self.node(vdi), e))?;
            } else {
                return Err(backend(
                    "SNAPSHOT_BASE_MISSING",
                    format!(
                        "journaled snapshot of {vdi}: base {} and the old leaf are both gone;                          restore {} from backup and attach again",
                        base_path.display(),
                        base_path.display()
                    ),
                ));
            }
        }
        let _ = fs::remove_file(&base_part);
        // The base's name is durable before any name of the old leaf is replaced below.
        self.fsync_root()?;
        self.format.set_hidden(&base_path, true)?;
        // 2. Both children: keep a published child of the base (it may hold data already), else
        //    publish the staged one if it is whole, else make a new one. Each rename replaces
        //    `<x>.vhd` atomically (for the VDI: its old leaf name, whose inode is the base).
        for x in [vdi, new_record.uuid.as_str()] {
            if child_of_base(&self.node(x)) {
                continue;
            }
            let part = self.part_path(x);
            if !child_of_base(&part) {
                let _ = fs::remove_file(&part);
                self.format.create_child(&part, &base_path)?;
            }
            fs::rename(&part, self.node(x)).map_err(|e| io("rename into place", &part, e))?;
        }
        self.fsync_root()?;
        // 3. Both records, whole (nothing else can have changed them: see MetaStore::settle).
        self.meta.write_vdi(new_record)?;
        let upd = match updated {
            Some(r) => Some(r.clone()),
            None => self
                .meta
                .read_vdis()?
                .into_iter()
                .find(|r| r.uuid == vdi)
                .map(|mut r| {
                    r.sm_config.insert(SM_VHD_PARENT.into(), base.to_string());
                    r
                }),
        };
        if let Some(r) = upd {
            self.meta.write_vdi(&r)?;
        }
        Ok(())
    }

    fn reconcile(&self, report: &mut AttachReport) -> Result<()> {
        let mut index = ChainIndex::default();
        let mut infos = BTreeMap::new();
        for name in list_nodes(&self.root)? {
            match self.format.inspect(&self.node(&name)) {
                Ok(info) => {
                    infos.insert(name, info);
                }
                Err(e) => {
                    tracing::warn!(sr = self.uuid, node = name, error = %e, "unreadable node left alone");
                    report.unreadable.push(name);
                }
            }
        }
        // A node whose parent chain loops (a node that is its own parent, or a longer cycle)
        // can never be opened: it is unreadable, not a VDI or a base.
        for name in looping_nodes(&infos) {
            tracing::warn!(
                sr = self.uuid,
                node = name,
                "node whose parent chain loops back onto itself left alone"
            );
            infos.remove(&name);
            report.unreadable.push(name);
        }
        for (name, info) in &infos {
            index.insert(name, info.parent.clone(), info.hidden);
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
    ///
    /// # Commit protocol: two barriers
    ///
    /// A barrier is one set of fsyncs issued together ([`super::meta::barrier`]); nothing after
    /// it starts until all of them have completed. Between barriers nothing is synced, and the
    /// argument below assumes nothing about the order in which unsynced writes reach the disk.
    ///
    /// 1. **Stage** (invisible: dot-names that are not nodes, removed at attach unless a
    ///    committed entry needs them): hard-link the leaf as `.<base>.vhd.part`; write both
    ///    children at `.<vdi>.vhd.part` and `.<new>.vhd.part`, already pointing at `./<base>.vhd`
    ///    and the leaf's uuid; write the journal entry (with both final records) at
    ///    `journal/<id>.json`.
    /// 2. **Barrier 1 = commit**: the entry, the journal directory, both children's data and
    ///    the SR directory (the link). Before it completes, the leaf is untouched at `<vdi>.vhd`
    ///    and a crash leaves no entry (or a torn one, set aside): the snapshot never happened,
    ///    and attach deletes the staged files. After it, the operation is always completed.
    /// 3. **Apply** (unsynced): rename the link to `<base>.vhd`, each child over its name
    ///    (`<vdi>.vhd` is replaced atomically; the old leaf's inode stays reachable as the base,
    ///    and durably so through the link of barrier 1 even if this rename reaches the disk
    ///    first), set the base's hidden flag, write both records (temp + rename).
    /// 4. **Barrier 2**: the SR directory, the base's data, both records and their directory.
    ///    Only now is the reply sent (and the datapath resumed on the new leaf), so a guest write
    ///    can only land in a child whose name and content are durable.
    /// 5. The journal entry is removed without a directory fsync ([`MetaStore::journal_end`]).
    ///
    /// A crash after barrier 1 is repaired by [`Sr::recover`] from the entry alone (which link,
    /// part, name or record reached the disk does not matter). Cost: two barriers, i.e. about
    /// two device flushes, where each step used to be synced on its own (about nine).
    pub fn snapshot_vdi(&self, vdi: &Vdi, new_rec: VdiRecord, clone: bool) -> Result<VdiRecord> {
        let src = vdi.record();
        let base = uuid::Uuid::new_v4().to_string();
        let names: [&'static str; 7] = if clone {
            [
                "vdi_clone.staged",
                "vdi_clone.journal_written",
                "vdi_clone.base_published",
                "vdi_clone.leaf_renamed",
                "vdi_clone.children_created",
                "vdi_clone.base_hidden_records_written",
                "vdi_clone.synced",
            ]
        } else {
            [
                "vdi_snapshot.staged",
                "vdi_snapshot.journal_written",
                "vdi_snapshot.base_published",
                "vdi_snapshot.leaf_renamed",
                "vdi_snapshot.children_created",
                "vdi_snapshot.base_hidden_records_written",
                "vdi_snapshot.synced",
            ]
        };
        let [p_staged, p_commit, p_base, p_leaf, p_children, p_records, p_synced] = names;
        let mut new_rec = new_rec;
        new_rec.sm_config.insert(SM_VHD_PARENT.into(), base.clone());
        let mut updated = src.clone();
        updated.sm_config.insert(SM_VHD_PARENT.into(), base.clone());
        let entry = JournalEntry {
            id: uuid::Uuid::new_v4().to_string(),
            started: time::now_rfc3339(),
            op: JournalOp::Snapshot {
                vdi: src.uuid.clone(),
                base: base.clone(),
                clone,
                new_record: new_rec.clone(),
                updated_record: Some(Box::new(updated.clone())),
            },
        };
        let leaf = self.node(&src.uuid);
        let base_path = self.node(&base);
        let (base_part, leaf_part, new_part) = (
            self.part_path(&base),
            self.part_path(&src.uuid),
            self.part_path(&new_rec.uuid),
        );
        let journal_file = self
            .meta
            .journal_dir_path()
            .join(format!("{}.json", entry.id));

        // The base's parent is the leaf's parent now, read from the file (the truth; stable:
        // whatever re-points this leaf holds the VDI's lock, as the caller does), never from the
        // index at the end, which a concurrent re-read may already have moved on.
        let grandparent = self.format.inspect(&leaf)?.parent;

        // 1. Stage, 2. commit.
        let t0 = std::time::Instant::now();
        let staged = (|| -> Result<std::time::Duration> {
            for p in [&base_part, &leaf_part, &new_part] {
                let _ = fs::remove_file(p);
            }
            fs::hard_link(&leaf, &base_part)
                .map_err(|e| io("link the leaf as the future base", &base_part, e))?;
            let (a, b) = std::thread::scope(|sc| {
                let a = sc.spawn(|| self.format.stage_child(&leaf_part, &leaf, &base));
                let b = self.format.stage_child(&new_part, &leaf, &base);
                (a.join(), b)
            });
            let a = a.unwrap_or_else(|_| Err(Error::InternalError("staging panicked".into())))?;
            let b = b?;
            let j = self.meta.journal_stage(&entry)?;
            let t_staged = t0.elapsed();
            self.fp.hit(p_staged);
            super::meta::barrier(
                &[(&j, &journal_file), (&a, &leaf_part), (&b, &new_part)],
                &[&self.meta.journal_dir_path(), &self.root],
            )?;
            Ok(t_staged)
        })();
        let t_staged = match staged {
            Ok(t) => t,
            Err(e) => {
                // Not committed: nothing visible changed. Remove what was staged (attach would).
                tracing::warn!(vdi = src.uuid, error = %e, "snapshot failed before its commit");
                let _ = fs::remove_file(&journal_file);
                for p in [&base_part, &leaf_part, &new_part] {
                    let _ = fs::remove_file(p);
                }
                return Err(e);
            }
        };
        let t_committed = t0.elapsed();
        self.fp.hit(p_commit);

        // 3. Apply, 4. barrier 2.
        let res = (|| -> Result<()> {
            fs::rename(&base_part, &base_path)
                .map_err(|e| io("rename into place", &base_path, e))?;
            self.fp.hit(p_base);
            fs::rename(&leaf_part, &leaf).map_err(|e| io("rename into place", &leaf, e))?;
            self.fp.hit(p_leaf);
            let new_path = self.node(&new_rec.uuid);
            fs::rename(&new_part, &new_path).map_err(|e| io("rename into place", &new_path, e))?;
            self.fp.hit(p_children);
            let hb = self.format.stage_hidden(&base_path, true)?;
            let r1 = self.meta.stage_vdi(&new_rec)?;
            let r2 = self.meta.stage_vdi(&updated)?;
            self.fp.hit(p_records);
            let vdis_dir = self.meta.vdis_dir_path();
            let (r1p, r2p) = (
                vdis_dir.join(format!("{}.json", new_rec.uuid)),
                vdis_dir.join(format!("{}.json", updated.uuid)),
            );
            super::meta::barrier(
                &[(&hb, &base_path), (&r1, &r1p), (&r2, &r2p)],
                &[&self.root, &vdis_dir],
            )?;
            self.fp.hit(p_synced);
            Ok(())
        })();
        if let Err(e) = res {
            // Committed: recovery completes the operation (the VDI's data is in the base, so
            // completing is the only way back to a served leaf). Report the error all the same:
            // the caller sees the snapshot on its next scan.
            tracing::error!(vdi = src.uuid, error = %e, "snapshot step failed after its commit");
            self.undo_or_keep(&entry);
            self.reload_after_recovery(&src.uuid, &new_rec.uuid, &base);
            return Err(e);
        }
        {
            let mut ix = lock(&self.chain);
            ix.insert(&base, grandparent, true);
            ix.insert(&src.uuid, Some(base.clone()), false);
            ix.insert(&new_rec.uuid, Some(base.clone()), false);
        }
        self.meta.journal_end(&entry.id)?;
        tracing::debug!(
            vdi = src.uuid,
            staged_us = t_staged.as_micros() as u64,
            committed_us = t_committed.as_micros() as u64,
            done_us = t0.elapsed().as_micros() as u64,
            "snapshot phases"
        );
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

/// The nodes whose chain of parents, followed through `infos`, comes back to a node already on
/// it (the cycle itself and every node above one).
fn looping_nodes(infos: &BTreeMap<String, crate::differencing::NodeInfo>) -> Vec<String> {
    infos
        .keys()
        .filter(|start| {
            let mut seen = std::collections::HashSet::new();
            let mut cur = Some(start.as_str());
            while let Some(n) = cur {
                if !seen.insert(n) {
                    return true;
                }
                cur = infos.get(n).and_then(|i| i.parent.as_deref());
            }
            false
        })
        .cloned()
        .collect()
}
