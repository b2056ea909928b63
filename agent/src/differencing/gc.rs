//! Garbage collection and coalescing of an SR's VHD chains, so chains stay short.
//!
//! Two kinds of work, repeated until none is left:
//! - a **hidden base with no child** is deleted;
//! - a **hidden node C whose parent P is a hidden base with exactly one child (C)** is merged:
//!   C's own sectors are copied into P ([`vhd::coalesce`], only allocated sectors, journaled and
//!   resumable), every child of C is re-pointed at P ([`vhd::relink`]), and C is deleted. The
//!   chain of every VDI below C shrinks by one.
//!
//! Why this is safe **online** (leaves below C attached and under I/O, no pause): P is read only
//! through C, and every sector copied into P is one C overrides with the same bytes, so no reader's
//! view changes at any moment; an open chain keeps reading C through its open file even after C
//! is unlinked; relinking rewrites only a child's header and locators, which the datapath never
//! writes. Leaves themselves are never merged into their base (that would need the export's
//! pause at a switch; a chain ends up as at most `base ← leaf` plus live snapshots).
//!
//! Candidates are chosen under the SR's chain-index lock and only when no journaled engine
//! operation (snapshot/clone/destroy) is in flight, so a base that a snapshot is still building
//! is never taken for garbage. Each merge is recorded in `.ddstor/gc-merge` before its first step;
//! every step is idempotent, so the next run (or `ddstor sr gc`) finishes an interrupted merge.

use crate::core::error::{backend, io, Result};
use crate::core::sr::Sr;
use crate::differencing::vhdfmt::VhdFormat;
use crate::differencing::{list_nodes, node_file, Format};
use crate::failpoint::Failpoints;
use interface::codes;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Failpoints of one merge, in execution order.
pub const GC_MERGE: &[&str] = &[
    "gc.merge_journaled",
    "gc.merge_copied",
    "gc.children_relinked",
    "gc.merged_node_removed",
];

/// How a collection runs.
#[derive(Debug, Clone, Default)]
pub struct GcOptions {
    /// Highest copy rate of merges, bytes per second (`None`: unlimited).
    pub rate_limit: Option<u64>,
    /// Crash injection (tests).
    pub failpoints: Failpoints,
    /// Set to stop between (and inside) merges; a stopped merge resumes on the next run.
    pub cancel: Option<Arc<AtomicBool>>,
}

/// What a collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GcReport {
    /// Hidden bases deleted because nothing depended on them.
    pub removed: Vec<String>,
    /// Merges done: (parent, merged child).
    pub merged: Vec<(String, String)>,
    /// Bytes copied by merges.
    pub bytes_copied: u64,
    /// Longest VDI chain before.
    pub depth_before: usize,
    /// Longest VDI chain after.
    pub depth_after: usize,
}

/// Progress of a collection, for progress bars and logs.
#[derive(Debug, Clone, Copy, Default)]
pub struct GcProgress {
    /// Merges and removals done so far.
    pub steps_done: u64,
    /// Bytes copied by the merge in progress.
    pub merge_bytes_done: u64,
    /// Bytes the merge in progress has to copy.
    pub merge_bytes_total: u64,
}

static STATUS: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

fn set_status(sr: &str, s: String) {
    STATUS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(sr.to_string(), s);
}

/// One line per SR on what its GC last did or is doing (for `Query.diagnostics`).
pub fn diagnostics() -> String {
    STATUS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(sr, s)| format!("SR {sr} gc: {s}\n"))
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn vhd_err(what: &str, e: vhd::Error) -> crate::core::error::Error {
    backend(codes::VHD_ERROR, format!("{what}: {}", e.full_text()))
}

fn merge_journal(sr: &Sr) -> PathBuf {
    sr.meta.dir().join("gc-merge")
}

/// The longest chain (in layers) of any VDI of `sr`.
pub fn max_depth(sr: &Sr) -> usize {
    sr.all_vdis()
        .iter()
        .map(|v| sr.ancestry(&v.record().uuid).len())
        .max()
        .unwrap_or(0)
}

enum Work {
    Remove(Vec<String>),
    Merge { parent: String, child: String },
}

/// Picks the next piece of work under the chain lock, only while no engine operation is
/// journaled (in flight).
fn next_work(sr: &Sr) -> Result<Option<Work>> {
    // Under a storm of snapshots and destroys a journal is pending most of the time: wait for
    // a gap (up to about a second) rather than give up, or chains outgrow the GC.
    let mut tries = 0;
    let mut ix = loop {
        let ix = lock(&sr.chain);
        if !sr.meta.journal_in_flight()? {
            break ix;
        }
        drop(ix);
        tries += 1;
        if tries > 50 {
            return Ok(None);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut probe = ix.clone();
    let garbage = probe.all_garbage();
    if !garbage.is_empty() {
        *ix = probe;
        return Ok(Some(Work::Remove(garbage)));
    }
    for c in ix.hidden_nodes() {
        let Some(p) = ix.parent_of(&c).map(str::to_string) else {
            continue;
        };
        if ix.is_hidden(&p) && ix.children_of(&p) == [c.clone()] && !ix.children_of(&c).is_empty() {
            return Ok(Some(Work::Merge {
                parent: p,
                child: c,
            }));
        }
    }
    Ok(None)
}

fn remove_file_durable(root: &Path, name: &str) -> Result<()> {
    let p = node_file(root, name);
    match std::fs::remove_file(&p) {
        Ok(()) => crate::core::meta::fsync_dir(root),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove", &p, e)),
    }
}

/// Whether any node file names `name` as its parent.
pub fn has_children_on_disk(root: &Path, name: &str) -> Result<bool> {
    Ok(!children_on_disk(root, name)?.is_empty())
}

/// Node files whose parent is `name`.
fn children_on_disk(root: &Path, name: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for n in list_nodes(root)? {
        if let Ok(info) = VhdFormat.inspect(&node_file(root, &n)) {
            if info.parent.as_deref() == Some(name) {
                out.push(n);
            }
        }
    }
    Ok(out)
}

/// Merges `child` into `parent` (see the module documentation); idempotent.
pub(crate) fn merge(
    sr: &Sr,
    parent: &str,
    child: &str,
    opts: &GcOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64> {
    let fp = &opts.failpoints;
    let journal = merge_journal(sr);
    // Settle lazily removed journal entries first (see MetaStore::settle).
    sr.meta.settle()?;
    crate::core::meta::write_atomic(
        sr.meta.dir(),
        "gc-merge",
        format!("{parent}\n{child}\n").as_bytes(),
        fp,
    )?;
    fp.hit("gc.merge_journaled");
    let cpath = node_file(&sr.root, child);
    let ppath = node_file(&sr.root, parent);
    let mut copied = 0;
    if cpath.exists() {
        let mut o = vhd::CoalesceOptions::new(&sr.root);
        o.rate_limit = opts.rate_limit;
        let r = vhd::coalesce(&cpath, &o, opts.cancel.as_deref(), &mut |p| {
            progress(p.bytes_copied, p.bytes_total)
        })
        .map_err(|e| vhd_err(&format!("merging {child} into {parent}"), e))?;
        copied = r.bytes_copied;
        fp.hit("gc.merge_copied");
        let cuuid = vhd::Disk::open(&cpath, false)
            .map_err(|e| vhd_err("opening the merged node", e))?
            .uuid();
        // A VDI leaf among the children may be renamed by a concurrent snapshot (or compose,
        // or leaf merge), and any VDI whose chain runs through a relinked node may have its
        // chain opened (snapshot, attach) while `relink` rewrites that node's parent uuid and
        // locators, which is not one atomic write: all of those hold the VDI's lock. So hold
        // the locks of every VDI below `child` while relinking.
        let _held = lock_vdis_below(sr, child)?;
        for g in children_on_disk(&sr.root, child)? {
            vhd::relink(&node_file(&sr.root, &g), cuuid, &ppath)
                .map_err(|e| vhd_err(&format!("re-pointing {g} at {parent}"), e))?;
            let hidden = sr_is_hidden(sr, &g);
            lock(&sr.chain).insert(&g, Some(parent.to_string()), hidden);
        }
        fp.hit("gc.children_relinked");
        let left = children_on_disk(&sr.root, child)?;
        if !left.is_empty() {
            return Err(backend(
                codes::VHD_ERROR,
                format!("{child}: still the parent of {left:?} after relinking; merge left for the next run"),
            ));
        }
        {
            let mut ix = lock(&sr.chain);
            for g in ix.children_of(child) {
                let h = ix.is_hidden(&g);
                ix.insert(&g, Some(parent.to_string()), h);
            }
            ix.remove(child);
        }
        remove_file_durable(&sr.root, child)?;
        fp.hit("gc.merged_node_removed");
    }
    crate::core::meta::remove_durable(sr.meta.dir(), "gc-merge")?;
    let _ = journal;
    Ok(copied)
}

/// The VDIs whose chain runs through `node`: below it in the index or on disk.
fn vdis_below(sr: &Sr, node: &str) -> Result<Vec<Arc<crate::core::sr::Vdi>>> {
    let mut below = children_on_disk(&sr.root, node)?;
    {
        let ix = lock(&sr.chain);
        below.extend(ix.children_of(node));
        let mut stack = below.clone();
        while let Some(n) = stack.pop() {
            for c in ix.children_of(&n) {
                if !below.contains(&c) {
                    below.push(c.clone());
                    stack.push(c);
                }
            }
        }
    }
    below.sort();
    below.dedup();
    Ok(below.iter().filter_map(|g| sr.vdi(g)).collect())
}

/// Takes the locks of every VDI whose chain runs through `node` (in uuid order, so two callers
/// cannot deadlock) and returns them once that set is stable: a snapshot or clone adds a VDI
/// below `node` only while holding the lock of one already below it (and updates the index
/// before releasing it), so if the set is the same after taking every lock, no VDI can join it
/// while they are held.
fn lock_vdis_below(sr: &Sr, node: &str) -> Result<Vec<tokio::sync::OwnedMutexGuard<()>>> {
    loop {
        let vdis = vdis_below(sr, node)?;
        let held: Vec<_> = vdis
            .iter()
            .map(|v| v.op.clone().blocking_lock_owned())
            .collect();
        let now = vdis_below(sr, node)?;
        let same = now.len() == vdis.len() && now.iter().zip(&vdis).all(|(a, b)| Arc::ptr_eq(a, b));
        if same {
            return Ok(held);
        }
        drop(held);
    }
}

fn sr_is_hidden(sr: &Sr, name: &str) -> bool {
    lock(&sr.chain).is_hidden(name)
}

/// Finishes a merge a crash interrupted (recorded in `.ddstor/gc-merge`).
fn resume(sr: &Sr, opts: &GcOptions, report: &mut GcReport) -> Result<()> {
    let j = merge_journal(sr);
    let text = match std::fs::read_to_string(&j) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("read", &j, e)),
    };
    let mut l = text.lines();
    let (Some(p), Some(c)) = (l.next(), l.next()) else {
        return Err(backend(
            codes::VHD_ERROR,
            format!("{}: malformed GC journal", j.display()),
        ));
    };
    tracing::warn!(
        sr = sr.uuid,
        parent = p,
        child = c,
        "resuming an interrupted merge"
    );
    report.bytes_copied += merge(sr, p, c, opts, &mut |_, _| {})?;
    report.merged.push((p.to_string(), c.to_string()));
    Ok(())
}

/// Re-reads who is whose parent from the node files (the truth) into the SR's chain index, if
/// no journaled operation is in flight; logs any divergence found. Returns whether it differed.
///
/// Consistent by construction: the files are read under the chain lock, between two checks that
/// no journaled operation is in flight. A snapshot/clone/destroy makes its entry visible before
/// its first visible change to the files and removes it only after updating the index (under
/// this lock), so if both checks pass, no such change happened while the files were read, and
/// none can be waiting to be applied to the index.
pub fn resync_index(sr: &Sr) -> Result<bool> {
    let mut ix = lock(&sr.chain);
    if sr.meta.journal_in_flight()? {
        return Ok(false);
    }
    let mut fresh = crate::differencing::ChainIndex::default();
    for n in list_nodes(&sr.root)? {
        match VhdFormat.inspect(&node_file(&sr.root, &n)) {
            Ok(i) => fresh.insert(&n, i.parent, i.hidden),
            Err(_) => return Ok(false), // being written or unreadable: leave the index alone
        }
    }
    if sr.meta.journal_in_flight()? {
        return Ok(false);
    }
    let differs = *ix != fresh;
    if differs {
        tracing::warn!(
            sr = sr.uuid,
            "chain index differed from the node files; re-read"
        );
        *ix = fresh;
    }
    Ok(differs)
}

/// Collects garbage and merges single-child hidden bases of `sr` until none is left.
pub fn run(sr: &Sr, opts: &GcOptions, progress: &mut dyn FnMut(GcProgress)) -> Result<GcReport> {
    let t0 = Instant::now();
    let mut report = GcReport {
        depth_before: max_depth(sr),
        ..Default::default()
    };
    set_status(&sr.uuid, "running".into());
    let res = (|| {
        resume(sr, opts, &mut report)?;
        let mut steps = 0u64;
        while let Some(w) = next_work(sr)? {
            if opts
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            {
                break;
            }
            match w {
                Work::Remove(names) => {
                    for n in names {
                        // The index can lag the files (a concurrent snapshot renames leaves):
                        // the files are the truth, so never delete a node one still names.
                        let users = children_on_disk(&sr.root, &n)?;
                        if !users.is_empty() {
                            tracing::warn!(
                                sr = sr.uuid,
                                node = n,
                                children = ?users,
                                "gc: the index said this base had no child, the files disagree; kept"
                            );
                            resync_index(sr)?;
                            continue;
                        }
                        tracing::info!(
                            sr = sr.uuid,
                            node = n,
                            "gc: deleting a hidden base with no child"
                        );
                        remove_file_durable(&sr.root, &n)?;
                        report.removed.push(n);
                    }
                }
                Work::Merge { parent, child } => {
                    tracing::info!(
                        sr = sr.uuid,
                        parent,
                        child,
                        "gc: merging a hidden node into its single-child parent"
                    );
                    let s = steps;
                    report.bytes_copied += merge(sr, &parent, &child, opts, &mut |d, t| {
                        progress(GcProgress {
                            steps_done: s,
                            merge_bytes_done: d,
                            merge_bytes_total: t,
                        })
                    })?;
                    report.merged.push((parent, child));
                }
            }
            steps += 1;
            progress(GcProgress {
                steps_done: steps,
                ..Default::default()
            });
        }
        Ok(())
    })();
    report.depth_after = max_depth(sr);
    let status = match &res {
        Ok(()) => format!(
            "last run removed {} bases, merged {} nodes, copied {} bytes in {:.3} s; longest chain {} -> {}",
            report.removed.len(),
            report.merged.len(),
            report.bytes_copied,
            t0.elapsed().as_secs_f64(),
            report.depth_before,
            report.depth_after
        ),
        Err(e) => format!("last run failed (resumes on the next run): {e}"),
    };
    tracing::info!(sr = sr.uuid, "{status}");
    set_status(&sr.uuid, status);
    res.map(|()| report)
}

#[cfg(test)]
mod tests;
