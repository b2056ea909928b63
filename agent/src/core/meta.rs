//! The SR's metadata store and journal, in `<sr>/.ddstor/`.
//!
//! Layout (one small JSON file per record; see ARCHITECTURE.md for why not an embedded database):
//! ```text
//! <sr>/.ddstor/sr.json             the SR's identity and names             (SrMeta)
//! <sr>/.ddstor/vdis/<uuid>.json    one record per VDI                      (VdiRecord)
//! <sr>/.ddstor/journal/<op>.json   one intent record per multi-step op     (JournalEntry)
//! <sr>/.ddstor/lock                flock(2)ed by the agent that has the SR attached
//! ```
//! Every write is crash-safe: the bytes go to a temporary file in the same directory, which is
//! fsynced, renamed over the target, and the directory is fsynced. A reader therefore sees either
//! the old or the new record, never a torn one. Writes are incremental: a call rewrites only the
//! records it changes.

use super::error::{io, Error, Result};
use crate::failpoint::Failpoints;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Name of the metadata directory inside an SR.
pub const META_DIR: &str = ".ddstor";
/// Version of the on-disk metadata layout written by this agent.
pub const FORMAT_VERSION: u32 = 1;

/// The SR's identity and xapi-visible names (`.ddstor/sr.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SrMeta {
    /// Layout version ([`FORMAT_VERSION`]).
    pub format_version: u32,
    /// The SR's uuid.
    pub uuid: String,
    /// xapi `name_label`.
    pub name_label: String,
    /// xapi `name_description`.
    pub name_description: String,
    /// When the SR was created (RFC 3339).
    pub created: String,
}

/// One VDI's persistent record (`.ddstor/vdis/<uuid>.json`). Chain structure is not here: it
/// lives in the VHD headers, which are the truth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiRecord {
    /// The VDI's uuid; its leaf file is `<uuid>.vhd` at the SR's root.
    pub uuid: String,
    /// xapi `name_label`.
    pub name_label: String,
    /// xapi `name_description`.
    pub name_description: String,
    /// xapi `ty` (e.g. `user`, `system`).
    pub ty: String,
    /// xapi `content_id` (copied by snapshot and clone; empty when unknown).
    pub content_id: String,
    /// xapi `metadata_of_pool`.
    pub metadata_of_pool: String,
    /// xapi `is_a_snapshot`.
    pub is_a_snapshot: bool,
    /// xapi `snapshot_time` (xapi's `YYYYMMDDTHH:MM:SSZ`; the epoch for non-snapshots).
    pub snapshot_time: String,
    /// xapi `snapshot_of` (the source VDI's uuid, or empty).
    pub snapshot_of: String,
    /// xapi `read_only`.
    pub read_only: bool,
    /// xapi `cbt_enabled` (always false: not supported).
    pub cbt_enabled: bool,
    /// xapi `virtual_size` in bytes (already rounded up to the block size).
    pub virtual_size: u64,
    /// xapi `persistent`: false means writes vanish at the end of each epoch.
    pub persistent: bool,
    /// xapi `sharable`.
    pub sharable: bool,
    /// xapi `sm_config`.
    pub sm_config: BTreeMap<String, String>,
    /// False for VHDs found on disk without a record and adopted at attach.
    #[serde(default = "yes")]
    pub managed: bool,
    /// The current epoch (set by `VDI.epoch_begin`, cleared by `VDI.epoch_end`).
    #[serde(default)]
    pub epoch: Option<Epoch>,
    /// Datapaths using the VDI (`dp` → state, e.g. `attached-rw`, `activated-ro`), kept by the
    /// datapath layer so a restarted agent knows what is attached. Destroy is refused while any.
    #[serde(default)]
    pub datapaths: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

/// A VM's use of a VDI between `epoch_begin` and `epoch_end`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epoch {
    /// The VM that began the epoch.
    pub vm: String,
    /// Whether the disk was persistent when the epoch began.
    pub persistent: bool,
    /// When it began (RFC 3339).
    pub began: String,
}

/// A multi-step operation, recorded before its first step so that recovery can finish or undo it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum JournalOp {
    /// `VDI.create`: make `<record.uuid>.vhd` then write `record`. Undone unless the record exists.
    Create {
        /// The record to write once the VHD exists.
        record: VdiRecord,
    },
    /// `VDI.snapshot` / `VDI.clone`: the leaf `<vdi>.vhd` becomes the hidden base `<base>.vhd`
    /// with two new children, `<vdi>.vhd` and `<new_record.uuid>.vhd`. The entry is the commit
    /// point: once it is durable the operation is always completed (see `Sr::snapshot_vdi`).
    Snapshot {
        /// The VDI being snapshotted/cloned (keeps its uuid).
        vdi: String,
        /// The uuid/file name its current leaf becomes.
        base: String,
        /// True for clone, false for snapshot (chooses failpoint names only).
        clone: bool,
        /// The record of the new snapshot/clone.
        new_record: VdiRecord,
        /// The snapshotted VDI's record as the operation leaves it (`sm_config.vhd-parent` =
        /// base), so recovery can rewrite it whole. Absent in entries of older agents.
        #[serde(default)]
        updated_record: Option<Box<VdiRecord>>,
    },
    /// `VDI.destroy`: remove the record, then `<vdi>.vhd`, then garbage-collect hidden bases left
    /// with no child. Always completed.
    Destroy {
        /// The VDI being destroyed.
        vdi: String,
    },
}

/// One journal file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Unique id of the operation (the journal file's name).
    pub id: String,
    /// When it started (RFC 3339).
    pub started: String,
    /// What it does.
    pub op: JournalOp,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// fsyncs a directory so that a rename or unlink inside it is durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(|e| io("open directory", dir, e))?;
    f.sync_all().map_err(|e| io("fsync directory", dir, e))
}

/// Writes `bytes` to `dir/name` atomically and durably (temp + fsync + rename + dir fsync).
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8], fp: &Failpoints) -> Result<()> {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let target = dir.join(name);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io("create", &tmp, e))?;
        f.write_all(bytes).map_err(|e| io("write", &tmp, e))?;
        f.sync_all().map_err(|e| io("fsync", &tmp, e))?;
    }
    fp.hit("meta.temp_written");
    fs::rename(&tmp, &target).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io("rename into place", &target, e)
    })?;
    fp.hit("meta.renamed");
    fsync_dir(dir)
}

/// One barrier: makes the data of every `files` entry and every directory in `dirs` durable,
/// all at once (one thread each, so the file system can commit them together: on a journaling
/// file system concurrent fsyncs share a journal commit and cost about one device flush).
/// Returns after every one has completed; the first error is returned.
pub fn barrier(files: &[(&File, &Path)], dirs: &[&Path]) -> Result<()> {
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (f, p) in files {
            let (f, p) = (*f, *p);
            handles.push(s.spawn(move || f.sync_data().map_err(|e| io("fsync", p, e))));
        }
        for d in dirs {
            let d = *d;
            handles.push(s.spawn(move || fsync_dir(d)));
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::InternalError("fsync thread panicked".into())))
            })
            .collect()
    });
    results.into_iter().collect()
}

/// Removes `dir/name` durably; a file already gone is not an error.
pub fn remove_durable(dir: &Path, name: &str) -> Result<()> {
    let path = dir.join(name);
    match fs::remove_file(&path) {
        Ok(()) => fsync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove", &path, e)),
    }
}

/// The `.ddstor/` directory of one SR.
#[derive(Debug, Clone)]
pub struct MetaStore {
    dir: PathBuf,
    fp: Failpoints,
    /// Set when a journal entry was removed without a directory fsync ([`MetaStore::journal_end`]);
    /// cleared by [`MetaStore::settle`].
    journal_dirty: Arc<AtomicBool>,
}

impl MetaStore {
    /// The store of the SR at `sr_root` (nothing is read or created yet).
    pub fn new(sr_root: &Path, fp: Failpoints) -> Self {
        Self {
            dir: sr_root.join(META_DIR),
            fp,
            journal_dirty: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Makes the removal of finished journal entries durable (one fsync of the journal
    /// directory, only if [`MetaStore::journal_end`] left one pending).
    ///
    /// Why removal may be lazy: an entry is removed only once every effect of its operation is
    /// durable, so replaying it is a no-op unless later changes were made to the same records
    /// or nodes. Every later change goes through this store first ([`MetaStore::write_vdi`],
    /// [`MetaStore::write_vdis`], [`MetaStore::remove_vdi`], [`MetaStore::write_sr`],
    /// [`MetaStore::journal_begin`], and [`MetaStore::journal_in_flight`], which GC consults before
    /// touching a chain), and each of those settles before it writes. So an entry can only come
    /// back after a crash when nothing has changed since its operation completed.
    pub fn settle(&self) -> Result<()> {
        if self.journal_dirty.swap(false, Ordering::SeqCst) {
            if let Err(e) = fsync_dir(&self.journal_dir()) {
                self.journal_dirty.store(true, Ordering::SeqCst);
                return Err(e);
            }
        }
        Ok(())
    }

    /// The `.ddstor` directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn vdis_dir(&self) -> PathBuf {
        self.dir.join("vdis")
    }

    fn journal_dir(&self) -> PathBuf {
        self.dir.join("journal")
    }

    /// The lock file's path.
    pub fn lock_path(&self) -> PathBuf {
        self.dir.join("lock")
    }

    /// Whether an SR has been formatted here.
    pub fn exists(&self) -> bool {
        self.dir.join("sr.json").exists()
    }

    /// Formats a new SR: creates the directories and writes `sr.json` last (its presence marks a
    /// complete SR).
    pub fn format(&self, meta: &SrMeta) -> Result<()> {
        for d in [self.dir.clone(), self.vdis_dir(), self.journal_dir()] {
            fs::create_dir_all(&d).map_err(|e| io("create directory", &d, e))?;
        }
        fsync_dir(&self.dir)?;
        if let Some(parent) = self.dir.parent() {
            fsync_dir(parent)?;
        }
        self.write_sr(meta)
    }

    /// Reads `sr.json`.
    pub fn read_sr(&self) -> Result<SrMeta> {
        let path = self.dir.join("sr.json");
        let bytes = fs::read(&path).map_err(|e| io("read SR identity", &path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| corrupt(&path, e))
    }

    /// Writes `sr.json`.
    pub fn write_sr(&self, meta: &SrMeta) -> Result<()> {
        self.settle()?;
        write_atomic(&self.dir, "sr.json", &to_json(meta)?, &self.fp)
    }

    /// Reads every VDI record (skipping nothing: an unreadable record is an error naming it).
    pub fn read_vdis(&self) -> Result<Vec<VdiRecord>> {
        let mut out = Vec::new();
        for (path, name) in json_files(&self.vdis_dir())? {
            let bytes = fs::read(&path).map_err(|e| io("read VDI record", &path, e))?;
            let rec: VdiRecord = serde_json::from_slice(&bytes).map_err(|e| corrupt(&path, e))?;
            if rec.uuid != name {
                return Err(corrupt(&path, "record uuid differs from its file name"));
            }
            out.push(rec);
        }
        Ok(out)
    }

    /// Writes one VDI record.
    pub fn write_vdi(&self, rec: &VdiRecord) -> Result<()> {
        self.settle()?;
        write_atomic(
            &self.vdis_dir(),
            &format!("{}.json", rec.uuid),
            &to_json(rec)?,
            &self.fp,
        )
    }

    /// Writes several VDI records with one directory fsync: the temporary files are written and
    /// fsynced concurrently (so the file system can commit them together), then renamed. Each
    /// record is still atomically old or new.
    pub fn write_vdis(&self, recs: &[&VdiRecord]) -> Result<()> {
        self.settle()?;
        let dir = self.vdis_dir();
        let temps: Vec<Result<(PathBuf, PathBuf)>> = std::thread::scope(|s| {
            let handles: Vec<_> = recs
                .iter()
                .map(|rec| {
                    let dir = &dir;
                    s.spawn(move || -> Result<(PathBuf, PathBuf)> {
                        let (f, tmp, target) = write_temp_record(dir, rec)?;
                        f.sync_all().map_err(|e| io("fsync", &tmp, e))?;
                        Ok((tmp, target))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::InternalError("record writer panicked".into()))
                    })
                })
                .collect()
        });
        let mut pairs = Vec::new();
        let mut first_err = None;
        for t in temps {
            match t {
                Ok(p) => pairs.push(p),
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        if let Some(e) = first_err {
            for (tmp, _) in pairs {
                let _ = fs::remove_file(tmp);
            }
            return Err(e);
        }
        self.fp.hit("meta.temp_written");
        for (tmp, target) in &pairs {
            fs::rename(tmp, target).map_err(|e| io("rename into place", target, e))?;
        }
        self.fp.hit("meta.renamed");
        fsync_dir(&dir)
    }

    /// Whether a record exists for `uuid`.
    pub fn has_vdi(&self, uuid: &str) -> bool {
        self.vdis_dir().join(format!("{uuid}.json")).exists()
    }

    /// Writes one VDI record **without syncing** (temp file renamed over the record) and
    /// returns the open file: the caller's barrier syncs it and [`MetaStore::vdis_dir`]. Used
    /// only inside a journaled operation whose entry holds the record, so a crash before the
    /// barrier is repaired by replaying the entry.
    pub fn stage_vdi(&self, rec: &VdiRecord) -> Result<File> {
        let (f, tmp, target) = write_temp_record(&self.vdis_dir(), rec)?;
        fs::rename(&tmp, &target).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io("rename into place", &target, e)
        })?;
        Ok(f)
    }

    /// The directory of the VDI records.
    pub fn vdis_dir_path(&self) -> PathBuf {
        self.vdis_dir()
    }

    /// The directory of the journal.
    pub fn journal_dir_path(&self) -> PathBuf {
        self.journal_dir()
    }

    /// Removes one VDI record (idempotent).
    pub fn remove_vdi(&self, uuid: &str) -> Result<()> {
        self.settle()?;
        remove_durable(&self.vdis_dir(), &format!("{uuid}.json"))
    }

    /// Writes the intent of a multi-step operation **without syncing** and returns the open file.
    /// The entry is written whole at a temporary dot-name and only then renamed to
    /// `journal/<id>.json`, so a concurrent reader ([`MetaStore::journal_in_flight`], GC) never
    /// sees a partly written entry: an operation is visible as in flight from before its first
    /// visible change until after its last. The entry is committed once the caller's barrier has
    /// synced this file and the journal directory; a crash before that can leave a torn entry
    /// (the rename reached the disk, the data did not), which [`MetaStore::journal_pending`]
    /// sets aside at attach as never committed.
    pub fn journal_stage(&self, entry: &JournalEntry) -> Result<File> {
        let dir = self.journal_dir();
        let path = dir.join(format!("{}.json", entry.id));
        let tmp = dir.join(format!(".{}.json.tmp", entry.id));
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io("create journal entry", &tmp, e))?;
        self.fp.hit("meta.journal_entry_created");
        let staged = f
            .write_all(&to_json(entry)?)
            .map_err(|e| io("write", &tmp, e))
            .and_then(|()| fs::rename(&tmp, &path).map_err(|e| io("rename into place", &path, e)));
        if let Err(e) = staged {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(f)
    }

    /// Records the intent of a multi-step operation and commits it (one barrier: the entry's
    /// data and the journal directory synced together). Also settles earlier removals.
    pub fn journal_begin(&self, entry: &JournalEntry) -> Result<()> {
        let f = self.journal_stage(entry)?;
        self.journal_dirty.store(false, Ordering::SeqCst);
        let path = self.journal_dir().join(format!("{}.json", entry.id));
        let r = barrier(&[(&f, &path)], &[&self.journal_dir()]);
        if r.is_err() {
            self.journal_dirty.store(true, Ordering::SeqCst);
        }
        r
    }

    /// Marks an operation complete: removes its journal file **without** a directory fsync (see
    /// [`MetaStore::settle`] for why that is safe; the next change to the SR makes it durable).
    pub fn journal_end(&self, id: &str) -> Result<()> {
        let path = self.journal_dir().join(format!("{id}.json"));
        match fs::remove_file(&path) {
            Ok(()) => {
                self.journal_dirty.store(true, Ordering::SeqCst);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", &path, e)),
        }
    }

    /// [`MetaStore::journal_end`], made durable at once (recovery).
    pub fn journal_end_durable(&self, id: &str) -> Result<()> {
        self.journal_end(id)?;
        self.settle()
    }

    /// Whether any journaled operation is in flight (or left by a crash): any entry at all,
    /// parsed or not. For running code (GC) deciding whether the chain index may lag the files;
    /// unlike [`MetaStore::journal_pending`] it never sets an entry aside. Settles first.
    pub fn journal_in_flight(&self) -> Result<bool> {
        self.settle()?;
        Ok(!json_files(&self.journal_dir())?.is_empty())
    }

    /// Every pending journal entry, oldest first, **for recovery at attach** (no operation may
    /// be running). Settles removed entries first. An entry that does not parse was torn by a
    /// crash before its commit barrier (nothing of its operation had happened): it is renamed to
    /// `<id>.json.torn` and skipped, with an error logged.
    pub fn journal_pending(&self) -> Result<Vec<JournalEntry>> {
        self.settle()?;
        let mut out = Vec::new();
        for (path, _) in json_files(&self.journal_dir())? {
            let bytes = fs::read(&path).map_err(|e| io("read journal entry", &path, e))?;
            match serde_json::from_slice::<JournalEntry>(&bytes) {
                Ok(e) => out.push(e),
                Err(e) => {
                    let aside = path.with_extension("json.torn");
                    tracing::error!(entry = %path.display(), error = %e,
                        "journal entry does not parse: never committed (torn by a crash); set aside");
                    fs::rename(&path, &aside).map_err(|e| io("set aside", &path, e))?;
                    fsync_dir(&self.journal_dir())?;
                }
            }
        }
        out.sort_by(|a, b| a.started.cmp(&b.started).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Removes temporary files left by writes interrupted by a crash.
    pub fn remove_stale_temps(&self) -> Result<usize> {
        let mut n = 0;
        let root = self.dir.parent().map(Path::to_path_buf);
        for d in [self.dir.clone(), self.vdis_dir(), self.journal_dir()]
            .into_iter()
            .chain(root)
        {
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for ent in rd.flatten() {
                let name = ent.file_name().to_string_lossy().to_string();
                if name.starts_with('.') && (name.ends_with(".tmp") || name.ends_with(".vhd.part"))
                {
                    fs::remove_file(ent.path()).map_err(|e| io("remove", &ent.path(), e))?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}

/// Creates a unique temporary file beside `<uuid>.json` in `dir` and writes `rec` into it,
/// unsynced; returns the open file, the temporary path and the record's final path.
fn write_temp_record(dir: &Path, rec: &VdiRecord) -> Result<(File, PathBuf, PathBuf)> {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{}.json", rec.uuid);
    let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| io("create", &tmp, e))?;
    f.write_all(&to_json(rec)?)
        .map_err(|e| io("write", &tmp, e))?;
    Ok((f, tmp, dir.join(name)))
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v)
        .map_err(|e| Error::InternalError(format!("serialising metadata: {e}")))
}

fn corrupt(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::backend(
        "METADATA_CORRUPT",
        vec![format!(
            "{}: {e}; move the file aside (or restore it from backup) and attach the SR again",
            path.display()
        )],
    )
}

/// `(path, stem)` of every `*.json` file (not temporaries) in `dir`, sorted by name.
fn json_files(dir: &Path) -> Result<Vec<(PathBuf, String)>> {
    let rd = fs::read_dir(dir).map_err(|e| io("list", dir, e))?;
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| io("list", dir, e))?;
        let name = ent.file_name().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue;
        }
        if let Some(stem) = name.strip_suffix(".json") {
            out.push((ent.path(), stem.to_string()));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record(uuid: &str) -> VdiRecord {
        VdiRecord {
            uuid: uuid.into(),
            name_label: "l".into(),
            name_description: String::new(),
            ty: "user".into(),
            content_id: String::new(),
            metadata_of_pool: String::new(),
            is_a_snapshot: false,
            snapshot_time: "1970-01-01T00:00:00Z".into(),
            snapshot_of: String::new(),
            read_only: false,
            cbt_enabled: false,
            virtual_size: 2 << 20,
            persistent: true,
            sharable: false,
            sm_config: BTreeMap::new(),
            managed: true,
            epoch: None,
            datapaths: BTreeMap::new(),
        }
    }

    fn sr_meta() -> SrMeta {
        SrMeta {
            format_version: FORMAT_VERSION,
            uuid: "u".into(),
            name_label: "n".into(),
            name_description: "d".into(),
            created: "now".into(),
        }
    }

    #[test]
    fn records_round_trip_and_are_written_one_file_each() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::new(dir.path(), Failpoints::none());
        store.format(&sr_meta()).unwrap();
        assert_eq!(store.read_sr().unwrap(), sr_meta());
        store.write_vdi(&record("a")).unwrap();
        store.write_vdi(&record("b")).unwrap();
        let mut b = record("b");
        b.name_label = "changed".into();
        store.write_vdi(&b).unwrap();
        assert_eq!(store.read_vdis().unwrap(), vec![record("a"), b]);
        store.remove_vdi("a").unwrap();
        store.remove_vdi("a").unwrap();
        assert_eq!(store.read_vdis().unwrap().len(), 1);
        let files: Vec<_> = fs::read_dir(store.vdis_dir()).unwrap().collect();
        assert_eq!(files.len(), 1, "no temporaries left behind");
    }

    #[test]
    fn a_crash_before_rename_leaves_the_old_record_and_a_temp_that_attach_removes() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::new(dir.path(), Failpoints::none());
        store.format(&sr_meta()).unwrap();
        store.write_vdi(&record("a")).unwrap();
        let crashing = MetaStore::new(dir.path(), Failpoints::panic_at("meta.temp_written"));
        let mut changed = record("a");
        changed.name_label = "new".into();
        let r = std::panic::catch_unwind(|| crashing.write_vdi(&changed));
        assert!(r.is_err());
        assert_eq!(store.read_vdis().unwrap(), vec![record("a")]);
        assert_eq!(store.remove_stale_temps().unwrap(), 1);
    }

    #[test]
    fn journal_entries_are_listed_until_ended() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::new(dir.path(), Failpoints::none());
        store.format(&sr_meta()).unwrap();
        let e = JournalEntry {
            id: "op1".into(),
            started: "2026-11-25T00:00:00Z".into(),
            op: JournalOp::Destroy { vdi: "a".into() },
        };
        store.journal_begin(&e).unwrap();
        assert_eq!(store.journal_pending().unwrap(), vec![e]);
        store.journal_end("op1").unwrap();
        assert!(store.journal_pending().unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_record_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetaStore::new(dir.path(), Failpoints::none());
        store.format(&sr_meta()).unwrap();
        fs::write(store.vdis_dir().join("x.json"), b"{not json").unwrap();
        let err = store.read_vdis().unwrap_err().to_string();
        assert!(
            err.contains("METADATA_CORRUPT") && err.contains("x.json"),
            "{err}"
        );
    }
}
