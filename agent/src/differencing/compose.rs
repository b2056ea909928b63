//! `VDI.similar_content` and `VDI.compose` (xapi's `disk_differencing`).
//!
//! **similar_content(vdi)**: every VDI of the SR connected to `vdi` through the chain graph
//! (its ancestors' other descendants: clones, snapshots, siblings), nearest first (by the number
//! of parent/child steps between the two leaves), then VDIs with the same non-empty
//! `content_id`. Hidden bases are never listed: only VDI records are.
//!
//! **compose(vdi1 = parent P, vdi2 = child C)**: C's own layer (its leaf file) is put on top of
//! P's current content, modifying C. P's leaf is frozen into a new hidden base B exactly as a
//! snapshot does (P keeps its uuid on a new empty leaf child of B; an activated P is paused
//! around the switch and resumed on its new leaf); then C's leaf is re-pointed at B. Steps, each
//! idempotent, with the failpoints of [`COMPOSE`]:
//! 1. journal `.ddstor/compose` = {parent, child, base} (`compose.journal_written`);
//! 2. rename `<P>.vhd` → `<B>.vhd` + directory fsync (`compose.parent_renamed`): the commit
//!    point — recovery completes the compose iff `<B>.vhd` exists, else it drops the journal
//!    (nothing had changed);
//! 3. hide B, create `<P>.vhd` as an empty child of B (`compose.base_created`);
//! 4. re-point `<C>.vhd` at B (`compose.child_reparented`);
//! 5. both records' `sm_config.vhd-parent` = B (`compose.records_written`); journal removed;
//!    C's old parent, if it is left a hidden base without children, is deleted.
//!
//! Refused (typed `Backend_error`s, nothing changed): vdi1 in another SR
//! ([`ACROSS_SRS`]), vdi1 = vdi2 ([`SAME_VDI`]), sizes that differ ([`SIZE_MISMATCH`]), a child
//! that is attached ([`codes::VDI_IN_USE`]), a child whose updates are not one layer — a
//! standalone disk holding data (whole blocks present: layering it would hide P's data around
//! every write), or a layer on top of ancestors only it uses ([`NOT_A_DELTA`]), and a child that
//! is a delta against a chain that is neither P's nor empty ([`UNRELATED`]).

use crate::core::error::{backend, io, Error, Result};
use crate::core::meta::{fsync_dir, remove_durable, write_atomic};
use crate::core::sr::{Sr, SM_VHD_PARENT};
use crate::core::Storage;
use crate::differencing::vhdfmt::VhdFormat;
use crate::differencing::{node_file, Format};
use crate::failpoint::Failpoints;
use interface::codes;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;

/// Failpoints of `VDI.compose`, in execution order.
pub const COMPOSE: &[&str] = &[
    "compose.journal_written",
    "compose.parent_renamed",
    "compose.base_created",
    "compose.child_reparented",
    "compose.records_written",
];

/// `Backend_error` code: vdi1 and vdi2 are in different SRs.
pub const ACROSS_SRS: &str = "COMPOSE_ACROSS_SRS";
/// `Backend_error` code: vdi1 = vdi2.
pub const SAME_VDI: &str = "COMPOSE_SAME_VDI";
/// `Backend_error` code: the virtual sizes differ.
pub const SIZE_MISMATCH: &str = "COMPOSE_SIZE_MISMATCH";
/// `Backend_error` code: the child's updates are not a single differencing layer.
pub const NOT_A_DELTA: &str = "COMPOSE_NOT_A_DELTA";
/// `Backend_error` code: the child is a delta against a chain unrelated to the parent.
pub const UNRELATED: &str = "COMPOSE_UNRELATED";

const JOURNAL: &str = "compose";

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct ComposeJournal {
    parent: String,
    child: String,
    base: String,
    /// The child's parent before the compose (garbage-collected afterwards if left childless).
    old_parent: Option<String>,
}

fn vhd_err(what: &str, e: vhd::Error) -> Error {
    backend(codes::VHD_ERROR, format!("{what}: {}", e.full_text()))
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs blocking work on tokio's blocking pool (a panic, e.g. an in-process failpoint, becomes
/// an `Internal_error`).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(Error::InternalError(format!(
            "storage operation aborted: {e}"
        ))),
    }
}

/// VDIs of `sr` likely to share blocks with `vdi`, nearest first (see the module docs).
pub fn similar(sr: &Sr, vdi: &str) -> Vec<String> {
    let ix = lock(&sr.chain).clone();
    let vdis: BTreeMap<String, String> = sr
        .all_vdis()
        .iter()
        .map(|v| {
            let r = v.record();
            (r.uuid, r.content_id)
        })
        .collect();
    // Breadth-first over the undirected parent/child graph: distance in chain steps.
    let mut dist: BTreeMap<String, usize> = BTreeMap::new();
    let mut q = VecDeque::new();
    dist.insert(vdi.to_string(), 0);
    q.push_back(vdi.to_string());
    while let Some(n) = q.pop_front() {
        let d = dist[&n];
        let mut next = ix.children_of(&n);
        if let Some(p) = ix.parent_of(&n) {
            next.push(p.to_string());
        }
        for m in next {
            if !dist.contains_key(&m) {
                dist.insert(m.clone(), d + 1);
                q.push_back(m);
            }
        }
    }
    let mut near: Vec<(usize, String)> = dist
        .into_iter()
        .filter(|(n, _)| n != vdi && vdis.contains_key(n) && !ix.is_hidden(n))
        .map(|(n, d)| (d, n))
        .collect();
    near.sort();
    let mut out: Vec<String> = near.into_iter().map(|(_, n)| n).collect();
    let listed: BTreeSet<String> = out.iter().cloned().collect();
    if let Some(cid) = vdis.get(vdi).filter(|c| !c.is_empty()) {
        for (u, c) in &vdis {
            if c == cid && u != vdi && !listed.contains(u) {
                out.push(u.clone());
            }
        }
    }
    out
}

/// Allocated blocks of node `name` (0 when unreadable).
fn allocated(root: &Path, name: &str) -> u64 {
    vhd::Disk::open(&node_file(root, name), false)
        .map(|d| d.allocated_blocks())
        .unwrap_or(u64::MAX)
}

/// Checks that composing `child` onto `parent` gives a correct result (module docs).
fn check_structure(sr: &Sr, parent: &str, child: &str) -> Result<()> {
    let ix = lock(&sr.chain).clone();
    let root = &sr.root;
    if !ix.children_of(child).is_empty() {
        return Err(backend(
            NOT_A_DELTA,
            format!(
                "VDI {child} is the parent of other disks {:?}; its layer cannot move",
                ix.children_of(child)
            ),
        ));
    }
    let p_anc = ix.ancestry(parent);
    if p_anc.iter().any(|n| n == child) {
        return Err(backend(
            NOT_A_DELTA,
            format!("VDI {child} is an ancestor of VDI {parent}"),
        ));
    }
    let c_anc = ix.ancestry(child);
    let Some(q) = c_anc.get(1) else {
        // A standalone (dynamic) disk: its allocated blocks are wholly present, so only an
        // empty one is a delta that can be layered without hiding the parent's data.
        let n = allocated(root, child);
        if n != 0 {
            return Err(backend(
                NOT_A_DELTA,
                format!(
                    "VDI {child} is a standalone disk holding {n} allocated blocks (whole blocks present): layering it on VDI {parent} would hide {parent}'s data around every write; receive into a differencing leaf (VDI.clone of an empty or similar VDI) instead"
                ),
            ));
        }
        return Ok(());
    };
    if p_anc.iter().any(|n| n == q) {
        return Ok(()); // a delta against (an ancestor of) the parent's own chain
    }
    if c_anc[1..].iter().all(|n| allocated(root, n) == 0) {
        return Ok(()); // a delta against an empty chain: effectively standalone, sector-exact
    }
    if ix.children_of(q) == [child.to_string()] {
        return Err(backend(
            NOT_A_DELTA,
            format!(
                "VDI {child}'s own updates span {} layers ({:?} hold data only it uses); compose needs a single-layer delta: run SR GC to merge them first",
                c_anc.len(),
                &c_anc[..c_anc.len() - 1]
            ),
        ));
    }
    Err(backend(
        UNRELATED,
        format!(
            "VDI {child} is a delta against {q}, which is neither in VDI {parent}'s chain {p_anc:?} nor empty: its content outside its own layer would be lost"
        ),
    ))
}

fn journal_path(sr: &Sr) -> std::path::PathBuf {
    sr.meta.dir().join(JOURNAL)
}

/// Creates `<name>.vhd` as an empty child of `parent` unless it already is one.
fn ensure_child(root: &Path, name: &str, parent: &str) -> Result<()> {
    let target = node_file(root, name);
    if let Ok(i) = VhdFormat.inspect(&target) {
        if i.parent.as_deref() == Some(parent) {
            return Ok(());
        }
    }
    let tmp = root.join(format!(".{name}.vhd.part"));
    let _ = std::fs::remove_file(&tmp);
    VhdFormat.create_child(&tmp, &node_file(root, parent))?;
    std::fs::rename(&tmp, &target).map_err(|e| io("rename into place", &target, e))?;
    fsync_dir(root)
}

/// Sets `sm_config.vhd-parent` of VDI `uuid` (in memory too when the VDI is loaded).
fn set_parent_record(sr: &Sr, uuid: &str, base: &str) -> Result<()> {
    if let Some(v) = sr.vdi(uuid) {
        sr.update_vdi(&v, |r| {
            r.sm_config.insert(SM_VHD_PARENT.into(), base.to_string());
        })?;
        return Ok(());
    }
    if let Some(mut rec) = sr.meta.read_vdis()?.into_iter().find(|r| r.uuid == uuid) {
        rec.sm_config.insert(SM_VHD_PARENT.into(), base.to_string());
        sr.meta.write_vdi(&rec)?;
    }
    Ok(())
}

/// Completes a compose whose parent leaf was renamed to the base (idempotent).
fn complete(sr: &Sr, j: &ComposeJournal, fp: &Failpoints) -> Result<()> {
    let root = &sr.root;
    let base_path = node_file(root, &j.base);
    VhdFormat.set_hidden(&base_path, true)?;
    ensure_child(root, &j.parent, &j.base)?;
    fp.hit("compose.base_created");
    let cpath = node_file(root, &j.child);
    let cinfo = VhdFormat.inspect(&cpath)?;
    if cinfo.parent.is_none() {
        // An empty standalone disk (checked before): replace it by an empty child of the base.
        let tmp = root.join(format!(".{}.vhd.part", j.child));
        let _ = std::fs::remove_file(&tmp);
        VhdFormat.create_child(&tmp, &base_path)?;
        std::fs::rename(&tmp, &cpath).map_err(|e| io("rename into place", &cpath, e))?;
        fsync_dir(root)?;
    } else {
        vhd::set_parent(&cpath, &base_path)
            .map_err(|e| vhd_err(&format!("re-pointing {} at {}", j.child, j.base), e))?;
    }
    fp.hit("compose.child_reparented");
    set_parent_record(sr, &j.parent, &j.base)?;
    set_parent_record(sr, &j.child, &j.base)?;
    fp.hit("compose.records_written");
    Ok(())
}

/// Deletes `start` and its ancestors while they are hidden bases with no child left (on disk).
fn collect_from(sr: &Sr, start: Option<String>) -> Result<Vec<String>> {
    let garbage = lock(&sr.chain).collect_garbage_from(start);
    for g in &garbage {
        tracing::info!(
            sr = sr.uuid,
            node = g,
            "deleting a hidden base left without children"
        );
        let p = node_file(&sr.root, g);
        match std::fs::remove_file(&p) {
            Ok(()) => fsync_dir(&sr.root)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove", &p, e)),
        }
    }
    Ok(garbage)
}

/// Finishes (or drops, if its commit point was not reached) a compose a crash interrupted.
/// Runs at attach, before the chain index is built. Returns a description if there was one.
pub fn recover(sr: &Sr, fp: &Failpoints) -> Result<Option<String>> {
    let path = journal_path(sr);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("read", &path, e)),
    };
    let j: ComposeJournal = serde_json::from_slice(&bytes).map_err(|e| {
        backend(
            "METADATA_CORRUPT",
            format!("{}: {e}; inspect the SR by hand", path.display()),
        )
    })?;
    let done = if node_file(&sr.root, &j.base).exists() {
        tracing::warn!(
            sr = sr.uuid,
            parent = j.parent,
            child = j.child,
            base = j.base,
            "completing an interrupted compose"
        );
        complete(sr, &j, fp)?;
        if let Some(q) = &j.old_parent {
            // Delete the child's old parent if nothing depends on it any more (reconcile would
            // too; done here so the compose leaves nothing behind).
            let q = node_file(&sr.root, q);
            if let Ok(i) = VhdFormat.inspect(&q) {
                let name = q.file_stem().map(|s| s.to_string_lossy().to_string());
                if i.hidden
                    && name.is_some()
                    && !super::gc::has_children_on_disk(&sr.root, name.as_deref().unwrap_or(""))?
                {
                    let _ = std::fs::remove_file(&q);
                    fsync_dir(&sr.root)?;
                }
            }
        }
        format!("compose {} onto {} (completed)", j.child, j.parent)
    } else {
        tracing::warn!(
            sr = sr.uuid,
            parent = j.parent,
            child = j.child,
            "dropping a compose interrupted before its commit point"
        );
        format!("compose {} onto {} (undone)", j.child, j.parent)
    };
    remove_durable(sr.meta.dir(), JOURNAL)?;
    Ok(Some(done))
}

/// The file steps of a compose (the caller holds both VDIs' locks, has checked the call and
/// paused the parent's datapath). Returns the new base.
fn compose_files(sr: &Sr, parent: &str, child: &str, fp: &Failpoints) -> Result<String> {
    let base = uuid::Uuid::new_v4().to_string();
    let old_parent = lock(&sr.chain).parent_of(child).map(str::to_string);
    let j = ComposeJournal {
        parent: parent.to_string(),
        child: child.to_string(),
        base: base.clone(),
        old_parent: old_parent.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&j)
        .map_err(|e| Error::InternalError(format!("serialising the compose journal: {e}")))?;
    // Make any lazily removed snapshot journal entry's removal durable first, so recovery can
    // never replay a finished snapshot over the nodes this compose changes (MetaStore::settle).
    sr.meta.settle()?;
    write_atomic(sr.meta.dir(), JOURNAL, &bytes, fp)?;
    fp.hit("compose.journal_written");
    let leaf = node_file(&sr.root, parent);
    let base_path = node_file(&sr.root, &base);
    std::fs::rename(&leaf, &base_path)
        .map_err(|e| io("rename the parent's leaf to a base", &leaf, e))
        .and_then(|()| fsync_dir(&sr.root))
        .inspect_err(|_| {
            let _ = remove_durable(sr.meta.dir(), JOURNAL);
        })?;
    {
        let mut ix = lock(&sr.chain);
        ix.rename(parent, &base, true);
    }
    fp.hit("compose.parent_renamed");
    let res = complete(sr, &j, fp);
    // Whatever happened, the index follows the files.
    {
        let mut ix = lock(&sr.chain);
        for n in [&base, &j.parent, &j.child] {
            match VhdFormat.inspect(&node_file(&sr.root, n)) {
                Ok(i) => ix.insert(n, i.parent, i.hidden),
                Err(_) => ix.remove(n),
            }
        }
    }
    if let Err(e) = res {
        tracing::error!(sr = sr.uuid, parent, child, error = %e, "compose step failed after its commit point; the next SR.attach completes it");
        return Err(e);
    }
    remove_durable(sr.meta.dir(), JOURNAL)?;
    collect_from(sr, old_parent)?;
    Ok(base)
}

fn refuse(code: &str, msg: String) -> Error {
    backend(code, msg)
}

impl Storage {
    /// `VDI.similar_content`: VDIs likely to share blocks with `vdi`, nearest first.
    pub async fn vdi_similar_content(
        &self,
        sr: &str,
        vdi: &str,
    ) -> Result<Vec<crate::core::VdiView>> {
        let vdi = crate::core::validate::uuid("VDI", vdi)?;
        let (_g, s) = self.attached(sr).await?;
        if s.vdi(&vdi).is_none() {
            return Err(Error::VdiDoesNotExist(vdi));
        }
        Ok(similar(&s, &vdi)
            .into_iter()
            .filter_map(|u| s.vdi(&u))
            .map(|v| {
                let record = v.record();
                crate::core::VdiView {
                    physical_utilisation: s.physical_utilisation(&record.uuid),
                    record,
                }
            })
            .collect())
    }

    /// `VDI.compose(vdi1 = parent, vdi2 = child)`: see the module documentation.
    pub async fn vdi_compose(&self, sr: &str, vdi1: &str, vdi2: &str) -> Result<()> {
        let sr_id = crate::core::validate::uuid("SR", sr)?;
        let parent = crate::core::validate::uuid("VDI", vdi1)?;
        let child = crate::core::validate::uuid("VDI", vdi2)?;
        if parent == child {
            return Err(refuse(
                SAME_VDI,
                format!("VDI.compose of VDI {parent} with itself: vdi1 (parent) and vdi2 (child) must differ"),
            ));
        }
        {
            let (_g, s) = self.attached(&sr_id).await?;
            for v in [&parent, &child] {
                if s.vdi(v).is_some() {
                    continue;
                }
                for other in self.attached_srs() {
                    if other.as_str() == sr_id {
                        continue;
                    }
                    if let Ok((_g2, s2)) = self.attached(other.as_str()).await {
                        if s2.vdi(v).is_some() {
                            return Err(refuse(
                                ACROSS_SRS,
                                format!("VDI {v} is in SR {other}, not in SR {sr_id}: compose works within one SR; copy the disk into SR {sr_id} first"),
                            ));
                        }
                    }
                }
                return Err(Error::VdiDoesNotExist(v.clone()));
            }
        }
        let (_g, s) = self.attached(&sr_id).await?;
        let _sr_op = super::sr_op_lock(&s.uuid).lock_owned().await;
        // Both VDIs' locks, in a fixed order (no deadlock with another compose). The SR's read
        // guard `_g` is held once: a second one could deadlock behind a queued SR.detach.
        let vp = s
            .vdi(&parent)
            .ok_or_else(|| Error::VdiDoesNotExist(parent.clone()))?;
        let vc = s
            .vdi(&child)
            .ok_or_else(|| Error::VdiDoesNotExist(child.clone()))?;
        let (first, second) = if parent < child {
            (&vp, &vc)
        } else {
            (&vc, &vp)
        };
        let _l1 = first.op.clone().lock_owned().await;
        let _l2 = second.op.clone().lock_owned().await;
        for (v, id) in [(&vp, &parent), (&vc, &child)] {
            if v.gone.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(Error::VdiDoesNotExist(id.clone()));
            }
        }
        let (rp, rc) = (vp.record(), vc.record());
        if rp.virtual_size != rc.virtual_size {
            return Err(refuse(
                SIZE_MISMATCH,
                format!(
                    "VDI {parent} is {} bytes but VDI {child} is {} bytes: compose needs equal virtual sizes",
                    rp.virtual_size, rc.virtual_size
                ),
            ));
        }
        s.refuse_if_in_use(&rc, self.hooks().is_attached(&sr_id, &child))?;
        {
            let (s2, p2, c2) = (s.clone(), parent.clone(), child.clone());
            blocking(move || check_structure(&s2, &p2, &c2)).await?;
        }
        let fp = self.config().failpoints.clone();
        self.hooks().before_leaf_change(&sr_id, &parent).await?;
        let (s2, p2, c2) = (s.clone(), parent.clone(), child.clone());
        let res = blocking(move || compose_files(&s2, &p2, &c2, &fp)).await;
        let resumed = self
            .hooks()
            .after_leaf_change(&sr_id, &parent, s.leaf_path(&parent))
            .await;
        let base = res?;
        resumed?;
        tracing::info!(sr, parent, child, base, "VDI composed");
        super::online::kick(&sr_id);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
