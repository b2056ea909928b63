//! GC inside the running agent: the background task, `SR.gc` over RPC, and the **online
//! leaf merge** that folds a VDI's leaf into its hidden parent while the VDI is activated and
//! under I/O, pausing its export only around the final switch.
//!
//! A round ([`gc_round`]) runs under the SR's differencing lock ([`super::sr_op_lock`]): first
//! the hidden-node work of [`super::gc::run`] (garbage, hidden merges: no pause needed), then a
//! leaf merge for every VDI leaf L whose parent P is a hidden base with L as its only child:
//! 1. *(only when L holds more than `freeze_above` bytes)* **freeze**: under the VDI's lock and
//!    a pause of its export (metadata only), L's file becomes a hidden node F and a new empty
//!    leaf (same VDI uuid) is created on top of it; the export resumes on the new leaf. F is
//!    then merged into P with the online-safe hidden merge ([`super::gc::merge`], rate-limited),
//!    while the guest keeps writing into the new, small leaf.
//! 2. **switch**: under the VDI's lock, the export is paused (in-flight requests complete, new
//!    ones wait — none fails), the leaf's own sectors (only what was written since the freeze)
//!    are copied into P, P's file is renamed over the leaf's name and un-hidden, and the export
//!    resumes on the new one-layer-shorter chain.
//!
//! Each merge is journaled in `.ddstor/gc-leaf` ({vdi, parent, frozen}) before its first step;
//! [`recover`] (at SR.attach, before the chain index is rebuilt) decides from the files alone:
//! P gone → the switch happened (un-hide the leaf); F present without a leaf → undo the freeze;
//! F present under the leaf → the freeze happened (hide F; the hidden merge finishes later);
//! otherwise nothing visible happened (a partial copy into P is harmless: P is read only
//! through the leaf; an unfinished coalesce of the live leaf is restarted from scratch).
//! Failpoints: [`GC_LEAF`].

use super::gc::{self, GcOptions, GcReport};
use super::vhdfmt::VhdFormat;
use super::{node_file, Format};
use crate::core::error::{backend, io, Error, Result};
use crate::core::meta::{fsync_dir, remove_durable, write_atomic};
use crate::core::sr::{Sr, SM_VHD_PARENT};
use crate::core::Storage;
use crate::failpoint::Failpoints;
use interface::codes;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Failpoints of an online leaf merge, in execution order.
pub const GC_LEAF: &[&str] = &[
    "gc_leaf.journaled",
    "gc_leaf.leaf_renamed",
    "gc_leaf.frozen",
    "gc_leaf.copied",
    "gc_leaf.switched",
    "gc_leaf.unhidden",
];

const JOURNAL: &str = "gc-leaf";

/// How the agent's GC runs.
#[derive(Debug, Clone)]
pub struct OnlineOptions {
    /// Options of the hidden-node work (rate limit of merges, failpoints).
    pub gc: GcOptions,
    /// Merge VDI leaves into their single-child parents (online, short pause).
    pub leaf_merge: bool,
    /// Leaves holding more than this many bytes are frozen first, so the pause only covers
    /// what the guest writes during the merge.
    pub freeze_above: u64,
}

impl Default for OnlineOptions {
    fn default() -> Self {
        OnlineOptions {
            gc: GcOptions::default(),
            leaf_merge: true,
            freeze_above: 4 << 20,
        }
    }
}

/// Configuration of the background GC task.
#[derive(Debug, Clone)]
pub struct BackgroundGc {
    /// Time between rounds (a round also starts when kicked, e.g. after a compose).
    pub interval: Duration,
    /// What each round does.
    pub options: OnlineOptions,
    /// A snapshot or clone of a VDI whose chain has this many layers or more waits for a round
    /// first ([`wait_for_chain_room`]); 0 = never wait.
    pub snapshot_wait_depth: usize,
}

/// What `SR.gc` (status mode) and `Query.diagnostics` show for one SR.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct GcStatus {
    /// The SR.
    pub sr: String,
    /// A round is running.
    pub running: bool,
    /// Rounds finished since the agent started.
    pub rounds: u64,
    /// What the running round is doing.
    pub phase: String,
    /// Bytes copied by the merge in progress.
    pub bytes_done: u64,
    /// Bytes the merge in progress has to copy.
    pub bytes_total: u64,
    /// Leaf merges done since the agent started.
    pub leaf_merges: u64,
    /// Export pause of the last leaf switch, milliseconds.
    pub last_pause_ms: f64,
    /// Longest export pause of a leaf switch, milliseconds.
    pub max_pause_ms: f64,
    /// The last round's report.
    pub last_report: Option<GcReport>,
    /// The last round's error, if it failed (it resumes on the next round).
    pub last_error: Option<String>,
}

static STATE: Mutex<BTreeMap<String, GcStatus>> = Mutex::new(BTreeMap::new());
static KICK: tokio::sync::Notify = tokio::sync::Notify::const_new();

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn update(sr: &str, f: impl FnOnce(&mut GcStatus)) {
    let mut m = lock(&STATE);
    let s = m.entry(sr.to_string()).or_insert_with(|| GcStatus {
        sr: sr.to_string(),
        ..Default::default()
    });
    f(s);
}

/// The GC status of `sr`.
pub fn status(sr: &str) -> GcStatus {
    lock(&STATE).get(sr).cloned().unwrap_or_else(|| GcStatus {
        sr: sr.to_string(),
        ..Default::default()
    })
}

/// One line per SR for `Query.diagnostics`.
pub fn diagnostics() -> String {
    lock(&STATE)
        .values()
        .map(|s| {
            format!(
                "SR {} online gc: {} rounds, {} leaf merges, last/max switch pause {:.1}/{:.1} ms{}{}\n",
                s.sr,
                s.rounds,
                s.leaf_merges,
                s.last_pause_ms,
                s.max_pause_ms,
                if s.running {
                    format!(", running: {} {}/{} bytes", s.phase, s.bytes_done, s.bytes_total)
                } else {
                    String::new()
                },
                s.last_error
                    .as_ref()
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default()
            )
        })
        .collect()
}

/// Default of `[gc] snapshot_wait_depth`: a snapshot or clone of a VDI whose chain has at least
/// this many layers first waits for the background GC to shorten it ([`wait_for_chain_room`]).
pub const DEFAULT_SNAPSHOT_WAIT_DEPTH: usize = 16;

/// The running background GC's [`BackgroundGc::snapshot_wait_depth`] (0 = never wait).
static WAIT_DEPTH: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(DEFAULT_SNAPSHOT_WAIT_DEPTH);

static BACKGROUND_ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Back-pressure that keeps chains short by construction rather than by GC winning a race:
/// while VDI `vdi`'s chain has `[gc] snapshot_wait_depth` layers or more and the background GC
/// runs, kick it and wait for a whole round that started after the kick; stop waiting as soon
/// as the chain is short enough, or when a round did not shorten it (what is left is branch
/// points that no merge can remove: the snapshot then proceeds), or after two minutes (a round
/// stuck on something else; logged). Without a background GC this returns at once.
pub async fn wait_for_chain_room(s: &Sr, vdi: &str) {
    if !BACKGROUND_ON.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let limit = WAIT_DEPTH.load(std::sync::atomic::Ordering::SeqCst);
    if limit == 0 {
        return;
    }
    let t0 = Instant::now();
    let mut depth = s.ancestry(vdi).len();
    while depth >= limit {
        let st = status(&s.uuid);
        let target = st.rounds + if st.running { 2 } else { 1 };
        KICK.notify_one();
        while status(&s.uuid).rounds < target {
            if t0.elapsed() > Duration::from_secs(120) {
                tracing::warn!(
                    sr = s.uuid,
                    vdi,
                    depth,
                    "snapshot waited 120 s for GC to shorten the chain; going ahead"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let now = s.ancestry(vdi).len();
        tracing::info!(
            sr = s.uuid,
            vdi,
            before = depth,
            after = now,
            waited_ms = t0.elapsed().as_millis() as u64,
            "snapshot waited for GC to shorten a long chain"
        );
        if now >= depth {
            return;
        }
        depth = now;
    }
}

/// Asks the background GC for a round soon.
pub fn kick(_sr: &str) {
    KICK.notify_one();
}

fn vhd_err(what: &str, e: vhd::Error) -> Error {
    backend(codes::VHD_ERROR, format!("{what}: {}", e.full_text()))
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct LeafJournal {
    vdi: String,
    parent: String,
    frozen: Option<String>,
}

fn write_journal(sr: &Sr, j: &LeafJournal, fp: &Failpoints) -> Result<()> {
    let b = serde_json::to_vec_pretty(j)
        .map_err(|e| Error::InternalError(format!("serialising the leaf-merge journal: {e}")))?;
    // Settle lazily removed journal entries first (see MetaStore::settle).
    sr.meta.settle()?;
    write_atomic(sr.meta.dir(), JOURNAL, &b, fp)
}

/// Finishes or undoes a leaf merge a crash interrupted (module docs). Runs at attach, before
/// the chain index is built, and in-line after a failed step.
pub fn recover(sr: &Sr) -> Result<Option<String>> {
    let path = sr.meta.dir().join(JOURNAL);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("read", &path, e)),
    };
    let j: LeafJournal = serde_json::from_slice(&bytes).map_err(|e| {
        backend(
            "METADATA_CORRUPT",
            format!("{}: {e}; inspect the SR by hand", path.display()),
        )
    })?;
    let root = &sr.root;
    let p = node_file(root, &j.parent);
    let v = node_file(root, &j.vdi);
    let f = j.frozen.as_deref().map(|n| node_file(root, n));
    let what = if !p.exists() {
        if v.exists() {
            VhdFormat.set_hidden(&v, false)?;
        }
        "completed (the switch had happened)"
    } else if let Some(f) = f.filter(|f| f.exists()) {
        if !v.exists() {
            std::fs::rename(&f, &v).map_err(|e| io("rename back", &f, e))?;
            fsync_dir(root)?;
            VhdFormat.set_hidden(&v, false)?;
            "undone (the freeze had not finished)"
        } else {
            let vi = VhdFormat.inspect(&v)?;
            if vi.parent.as_deref() == j.frozen.as_deref() {
                VhdFormat.set_hidden(&f, true)?;
            }
            "kept the freeze (the hidden merge finishes it)"
        }
    } else {
        // Before the freeze, or before the switch's rename: any copy into the parent is
        // harmless, but a coalesce of the live leaf must restart from its first block (the
        // guest may have written below the journal's checkpoint since).
        let cj = vhd::coalesce::default_journal(&p);
        if let (Ok(Some(c)), Ok(d)) = (
            vhd::coalesce::Journal::load(&cj),
            vhd::Disk::open(&v, false),
        ) {
            if c.child == d.uuid() {
                vhd::coalesce::Journal::remove(&cj)
                    .map_err(|e| vhd_err("removing the live leaf's coalesce journal", e))?;
            }
        }
        "undone (nothing visible had happened)"
    };
    tracing::warn!(
        sr = sr.uuid,
        vdi = j.vdi,
        parent = j.parent,
        "interrupted leaf merge {what}"
    );
    remove_durable(sr.meta.dir(), JOURNAL)?;
    Ok(Some(format!(
        "leaf merge of {} into {}: {what}",
        j.vdi, j.parent
    )))
}

/// Whether VDI `vdi` has an epoch layer (`.<vdi>.epoch.vhd`, a non-persistent disk during an
/// epoch): a child of the leaf that the index does not list, live or left on disk while the
/// VDI is detached within the epoch. Such a leaf is never merged: a freeze or a switch gives
/// the leaf a new identity, and the layer would then name a parent that no longer exists.
/// Hidden merges below it are fine (the leaf keeps its uuid and name).
fn has_epoch_layer(sr: &Sr, vdi: &str) -> bool {
    crate::datapath::manager::overlay_path(&node_file(&sr.root, vdi), vdi).exists()
}

/// The VDI leaves whose parent is a hidden base with them as only child (and no epoch layer).
fn leaf_candidates(sr: &Sr) -> Vec<(String, String)> {
    let ix = lock(&sr.chain).clone();
    let mut out = Vec::new();
    for v in sr.all_vdis() {
        let u = v.record().uuid;
        if ix.is_hidden(&u) || has_epoch_layer(sr, &u) {
            continue;
        }
        let Some(p) = ix.parent_of(&u) else { continue };
        if ix.is_hidden(p) && ix.children_of(p) == [u.clone()] && ix.children_of(&u).is_empty() {
            out.push((u.clone(), p.to_string()));
        }
    }
    out.sort();
    out
}

fn still_candidate(sr: &Sr, vdi: &str, parent: &str) -> bool {
    if has_epoch_layer(sr, vdi) {
        return false;
    }
    let ix = lock(&sr.chain);
    ix.parent_of(vdi) == Some(parent)
        && ix.is_hidden(parent)
        && ix.children_of(parent) == [vdi.to_string()]
        && !ix.is_hidden(vdi)
}

fn allocated_bytes(path: &Path) -> u64 {
    vhd::Disk::open(path, false)
        .map(|d| d.allocated_blocks() * d.block_size())
        .unwrap_or(0)
}

/// Step 1 (files): `<vdi>.vhd` → `<frozen>.vhd`, new empty `<vdi>.vhd` on top, frozen hidden.
fn freeze_files(sr: &Sr, vdi: &str, frozen: &str, fp: &Failpoints) -> Result<()> {
    let root = &sr.root;
    let v = node_file(root, vdi);
    let f = node_file(root, frozen);
    std::fs::rename(&v, &f).map_err(|e| io("rename the leaf to a frozen node", &v, e))?;
    fsync_dir(root)?;
    lock(&sr.chain).rename(vdi, frozen, false);
    fp.hit("gc_leaf.leaf_renamed");
    let tmp = root.join(format!(".{vdi}.vhd.part"));
    let _ = std::fs::remove_file(&tmp);
    VhdFormat.create_child(&tmp, &f)?;
    std::fs::rename(&tmp, &v).map_err(|e| io("rename into place", &v, e))?;
    fsync_dir(root)?;
    VhdFormat.set_hidden(&f, true)?;
    {
        let mut ix = lock(&sr.chain);
        let p = ix.parent_of(frozen).map(str::to_string);
        ix.insert(frozen, p, true);
        ix.insert(vdi, Some(frozen.to_string()), false);
    }
    fp.hit("gc_leaf.frozen");
    Ok(())
}

/// Step 2 (files, export paused): the leaf's own sectors into the parent, the parent renamed
/// over the leaf and un-hidden. Returns bytes copied.
fn switch_files(sr: &Sr, vdi: &str, parent: &str, fp: &Failpoints) -> Result<u64> {
    let root = &sr.root;
    let v = node_file(root, vdi);
    let p = node_file(root, parent);
    let r = vhd::coalesce(&v, &vhd::CoalesceOptions::new(root), None, &mut |_| {})
        .map_err(|e| vhd_err(&format!("merging leaf {vdi} into {parent}"), e))?;
    fp.hit("gc_leaf.copied");
    std::fs::rename(&p, &v).map_err(|e| io("rename the merged parent over the leaf", &p, e))?;
    fsync_dir(root)?;
    fp.hit("gc_leaf.switched");
    VhdFormat.set_hidden(&v, false)?;
    let grand = {
        let mut ix = lock(&sr.chain);
        let g = ix.parent_of(parent).map(str::to_string);
        ix.remove(parent);
        ix.insert(vdi, g.clone(), false);
        g
    };
    fp.hit("gc_leaf.unhidden");
    if let Some(vv) = sr.vdi(vdi) {
        sr.update_vdi(&vv, |r| match &grand {
            Some(g) => {
                r.sm_config.insert(SM_VHD_PARENT.into(), g.clone());
            }
            None => {
                r.sm_config.remove(SM_VHD_PARENT);
            }
        })?;
    }
    Ok(r.bytes_copied)
}

/// Re-reads the index entries of `names` from the files (after a failed step).
fn refresh_index(sr: &Sr, names: &[&str]) {
    let mut ix = lock(&sr.chain);
    for n in names {
        match VhdFormat.inspect(&node_file(&sr.root, n)) {
            Ok(i) => ix.insert(n, i.parent, i.hidden),
            Err(_) => ix.remove(n),
        }
    }
}

/// Merges VDI `vdi`'s leaf into its single-child hidden parent, online. Returns the bytes
/// copied, or `None` when the VDI is no longer a candidate.
async fn leaf_merge(
    st: &Storage,
    s: &Arc<Sr>,
    vdi: &str,
    parent: &str,
    opts: &OnlineOptions,
) -> Result<Option<u64>> {
    let fp = opts.gc.failpoints.clone();
    let Some(v) = s.vdi(vdi) else { return Ok(None) };
    if s.meta.journal_in_flight()? || !still_candidate(s, vdi, parent) {
        return Ok(None);
    }
    let sr = s.uuid.clone();
    let mut copied = 0u64;
    let big = allocated_bytes(&node_file(&s.root, vdi)) > opts.freeze_above;
    let frozen = big.then(|| uuid::Uuid::new_v4().to_string());
    let j = LeafJournal {
        vdi: vdi.to_string(),
        parent: parent.to_string(),
        frozen: frozen.clone(),
    };
    {
        let (s2, j2, fp2) = (s.clone(), j.clone(), fp.clone());
        super::compose::blocking(move || {
            write_journal(&s2, &j2, &fp2)?;
            fp2.hit("gc_leaf.journaled");
            Ok(())
        })
        .await?;
    }
    // After a failed step, recover in-line (the journal says what to do) — unless the step
    // "crashed" (an in-process failpoint panicked): then, as after a real crash, the next
    // SR.attach recovers.
    let fail = |e: Error| {
        let s = s.clone();
        async move {
            if !matches!(&e, Error::InternalError(m) if m.contains("aborted")) {
                let s2 = s.clone();
                if let Err(r) = super::compose::blocking(move || recover(&s2)).await {
                    tracing::error!(sr = s.uuid, error = %r, "could not recover a failed leaf merge; the next SR.attach will");
                }
            }
            e
        }
    };
    if let Some(fz) = &frozen {
        update(&sr, |g| g.phase = format!("freezing VDI {vdi}"));
        let _l = v.op.clone().lock_owned().await;
        if v.gone.load(std::sync::atomic::Ordering::SeqCst) || !still_candidate(s, vdi, parent) {
            let s2 = s.clone();
            super::compose::blocking(move || recover(&s2)).await?;
            return Ok(None);
        }
        let t = Instant::now();
        st.hooks().before_leaf_change(&sr, vdi).await?;
        let paused = t.elapsed();
        let (s2, v2, f2, fp2) = (s.clone(), vdi.to_string(), fz.clone(), fp.clone());
        let r = super::compose::blocking(move || freeze_files(&s2, &v2, &f2, &fp2)).await;
        let frozen_at = t.elapsed();
        let resumed = st
            .hooks()
            .after_leaf_change(&sr, vdi, s.leaf_path(vdi))
            .await;
        tracing::info!(
            sr,
            vdi,
            pause_wait_ms = paused.as_millis() as u64,
            freeze_ms = (frozen_at - paused).as_millis() as u64,
            total_ms = t.elapsed().as_millis() as u64,
            "gc: leaf frozen (export paused around it)"
        );
        if let Err(e) = r {
            let e = fail(e).await;
            refresh_index(s, &[vdi, fz, parent]);
            return Err(e);
        }
        resumed?;
        drop(_l);
        update(&sr, |g| {
            g.phase = format!("merging VDI {vdi}'s frozen layer")
        });
        let (s2, p2, f2, o2, sr2) = (
            s.clone(),
            parent.to_string(),
            fz.clone(),
            opts.gc.clone(),
            sr.clone(),
        );
        copied += super::compose::blocking(move || {
            gc::merge(&s2, &p2, &f2, &o2, &mut |d, t| {
                update(&sr2, |g| {
                    g.bytes_done = d;
                    g.bytes_total = t;
                })
            })
        })
        .await?;
    }
    update(&sr, |g| g.phase = format!("switching VDI {vdi}"));
    let _l = v.op.clone().lock_owned().await;
    if v.gone.load(std::sync::atomic::Ordering::SeqCst) || !still_candidate(s, vdi, parent) {
        let s2 = s.clone();
        super::compose::blocking(move || recover(&s2)).await?;
        return Ok(if copied > 0 { Some(copied) } else { None });
    }
    let t0 = Instant::now();
    st.hooks().before_leaf_change(&sr, vdi).await?;
    let (s2, v2, p2, fp2) = (s.clone(), vdi.to_string(), parent.to_string(), fp.clone());
    let r = super::compose::blocking(move || {
        let n = switch_files(&s2, &v2, &p2, &fp2)?;
        remove_durable(s2.meta.dir(), JOURNAL)?;
        Ok(n)
    })
    .await;
    let r = match r {
        Ok(n) => Ok(n),
        Err(e) => {
            let e = fail(e).await;
            refresh_index(s, &[vdi, parent]);
            Err(e)
        }
    };
    let resumed = st
        .hooks()
        .after_leaf_change(&sr, vdi, s.leaf_path(vdi))
        .await;
    let pause = t0.elapsed().as_secs_f64() * 1000.0;
    let n = r?;
    resumed?;
    copied += n;
    update(&sr, |g| {
        g.leaf_merges += 1;
        g.last_pause_ms = pause;
        g.max_pause_ms = g.max_pause_ms.max(pause);
    });
    tracing::info!(
        sr,
        vdi,
        parent,
        bytes = copied,
        pause_ms = pause,
        frozen = big,
        "gc: leaf merged into its parent"
    );
    Ok(Some(copied))
}

/// One GC round on `sr`: hidden-node work, then online leaf merges (module docs).
pub async fn gc_round(st: &Storage, sr: &str, opts: &OnlineOptions) -> Result<GcReport> {
    let s = {
        let (_g, s) = st.attached(sr).await?;
        s
    };
    let _op = super::sr_op_lock(&s.uuid).lock_owned().await;
    update(&s.uuid, |g| {
        g.running = true;
        g.phase = "collecting hidden nodes".into();
        g.bytes_done = 0;
        g.bytes_total = 0;
    });
    let res = async {
        let (s2, o2, sr2) = (s.clone(), opts.gc.clone(), s.uuid.clone());
        let mut report = super::compose::blocking(move || {
            gc::resync_index(&s2)?;
            gc::run(&s2, &o2, &mut |p| {
                update(&sr2, |g| {
                    g.bytes_done = p.merge_bytes_done;
                    g.bytes_total = p.merge_bytes_total;
                })
            })
        })
        .await?;
        if opts.leaf_merge {
            for (vdi, parent) in leaf_candidates(&s) {
                if let Some(n) = leaf_merge(st, &s, &vdi, &parent, opts).await? {
                    report.bytes_copied += n;
                    report.merged.push((parent, vdi));
                }
            }
            report.depth_after = gc::max_depth(&s);
        }
        Ok::<_, Error>(report)
    }
    .await;
    update(&s.uuid, |g| {
        g.running = false;
        g.rounds += 1;
        g.phase = String::new();
        match &res {
            Ok(r) => {
                g.last_report = Some(r.clone());
                g.last_error = None;
            }
            Err(e) => g.last_error = Some(e.to_string()),
        }
    });
    res
}

/// Starts the background GC: a round on every attached SR each `interval` (or when kicked).
pub fn spawn_background(st: Arc<Storage>, cfg: BackgroundGc) -> tokio::task::JoinHandle<()> {
    tracing::info!(interval_s = cfg.interval.as_secs_f64(), rate_limit = ?cfg.options.gc.rate_limit, "background GC started");
    WAIT_DEPTH.store(cfg.snapshot_wait_depth, std::sync::atomic::Ordering::SeqCst);
    BACKGROUND_ON.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(cfg.interval) => {}
                _ = KICK.notified() => {}
            }
            for sr in st.attached_srs() {
                if let Err(e) = gc_round(&st, sr.as_str(), &cfg.options).await {
                    tracing::warn!(sr = %sr, error = %e, "background GC round failed; it resumes on the next round");
                }
            }
        }
    })
}

static DEFAULTS: Mutex<Option<OnlineOptions>> = Mutex::new(None);

/// Sets the options of `SR.gc` calls (the agent's configuration; the background GC has its own
/// copy in [`BackgroundGc`]).
pub fn set_defaults(o: OnlineOptions) {
    *lock(&DEFAULTS) = Some(o);
}

impl Storage {
    /// Options for `SR.gc`: the configured defaults with this engine's failpoints.
    pub fn gc_options(&self) -> OnlineOptions {
        let mut o = lock(&DEFAULTS).clone().unwrap_or_default();
        o.gc.failpoints = self.config().failpoints.clone();
        o
    }

    /// `SR.gc` (a ddstor extension): `mode` `run` (default) runs a round now (waiting for a
    /// running one first) and returns its report as JSON; `status` returns the SR's
    /// [`GcStatus`] as JSON (for progress bars polling while a `run` call is in flight).
    pub async fn sr_gc_call(&self, sr: &str, mode: &str, opts: OnlineOptions) -> Result<String> {
        let sr = crate::core::validate::uuid("SR", sr)?;
        drop(self.attached(&sr).await?);
        let json = |r: serde_json::Result<String>| {
            r.map_err(|e| Error::InternalError(format!("serialising the GC status: {e}")))
        };
        match mode {
            "" | "run" => {
                let r = gc_round(self, &sr, &opts).await?;
                json(serde_json::to_string(&r))
            }
            "status" => json(serde_json::to_string(&status(&sr))),
            other => Err(crate::core::error::invalid(
                "mode",
                format!("SR.gc mode {other:?}: use run or status"),
            )),
        }
    }
}

#[cfg(test)]
mod tests;
