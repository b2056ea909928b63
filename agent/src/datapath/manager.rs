//! Per-datapath state of every VDI (xapi's `vdi_automaton`) and the NBD exports behind it.
//!
//! For each VDI the manager keeps the state of every datapath `dp` (Detached | Attached RO/RW |
//! Activated RO/RW). A call changes one dp's state by the automaton's rules ([`apply`]); backend
//! work happens only when the VDI's *superstate* ([`superstate`]: any dp activated → activated;
//! any RW → RW) changes:
//! - Detached → Attached: open the chain, create the export **paused**;
//! - Attached → Activated: open the gate; Activated → Attached: complete in-flight I/O, flush,
//!   close the gate;
//! - RO ↔ RW: re-open the chain in the new mode behind a paused gate;
//! - → Detached: remove the export.
//!
//! Where kernel nbd devices are enabled ([`KernelDevices`]), a new export is also connected to
//! a free `/dev/nbdN` (returned as `BlockDevice` by `VDI.attach*`, for blkback), disconnected
//! before the export is removed.
//!
//! The dp states are persisted in the VDI's record (`VdiRecord::datapaths`), so a restarted
//! agent re-creates its exports ([`Datapaths::restore`]). The manager is the engine's
//! [`DatapathHooks`]: snapshot/clone pause the export around the leaf switch and resume it on
//! the new leaf; `SR.detach` tears its datapaths down first.

use super::chain::ChainBackend;
use crate::core::datapath::{CallFuture, DatapathHooks, HookFuture};
use crate::core::error::{backend, Result};
use crate::core::{Storage, VdiLock};
use interface::{
    AttachInfo, BackendInfo, Call, DpStat, DpState, Implementation, Response, RoRw, StorageError,
};
use nbd::kernel::{KernelDevice, KernelDevices, KernelNbd};
use nbd::{Export, ExportOptions, Exports, NbdServer, ServerOptions};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// An operation on one datapath (xapi's `Vdi_automaton.op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `VDI.attach*` read-only or read-write.
    Attach(RoRw),
    /// `VDI.activate*`.
    Activate,
    /// `VDI.deactivate`.
    Deactivate,
    /// `VDI.detach`.
    Detach,
}

/// The state one dp reaches from `from` by `op`, or `Illegal_transition`. Repeating a call is
/// a no-op; attaching RO then RW (or RW then RO) on one dp, activating a detached dp and
/// detaching an activated dp are illegal.
pub fn apply(from: DpState, op: Op) -> std::result::Result<DpState, StorageError> {
    use DpState::*;
    let illegal = |to| StorageError::IllegalTransition { from, to };
    match (from, op) {
        (Detached, Op::Attach(x)) => Ok(Attached(x)),
        (Attached(x), Op::Attach(y)) if x == y => Ok(Attached(x)),
        (Attached(_), Op::Attach(y)) => Err(illegal(Attached(y))),
        (Activated(x), Op::Attach(y)) if x == y => Ok(Activated(x)),
        (Activated(_), Op::Attach(y)) => Err(illegal(Attached(y))),
        (Detached, Op::Activate) => Err(illegal(Activated(RoRw::RO))),
        (Attached(x) | Activated(x), Op::Activate) => Ok(Activated(x)),
        (Detached, Op::Deactivate) => Ok(Detached),
        (Attached(x) | Activated(x), Op::Deactivate) => Ok(Attached(x)),
        (Detached | Attached(_), Op::Detach) => Ok(Detached),
        (Activated(_), Op::Detach) => Err(illegal(Detached)),
    }
}

/// The VDI's overall state from its dps' states.
pub fn superstate<'a>(states: impl IntoIterator<Item = &'a DpState>) -> DpState {
    let mut any = false;
    let mut active = false;
    let mut rw = false;
    for s in states {
        match s {
            DpState::Detached => {}
            DpState::Attached(m) | DpState::Activated(m) => {
                any = true;
                active |= matches!(s, DpState::Activated(_));
                rw |= *m == RoRw::RW;
            }
        }
    }
    let m = if rw { RoRw::RW } else { RoRw::RO };
    match (any, active) {
        (false, _) => DpState::Detached,
        (true, false) => DpState::Attached(m),
        (true, true) => DpState::Activated(m),
    }
}

/// A datapath state as persisted in the VDI record and shown by `ddstor vdi datapaths`
/// (`detached`, `attached-ro`, `attached-rw`, `activated-ro`, `activated-rw`).
pub fn state_to_string(s: DpState) -> &'static str {
    match s {
        DpState::Detached => "detached",
        DpState::Attached(RoRw::RO) => "attached-ro",
        DpState::Attached(RoRw::RW) => "attached-rw",
        DpState::Activated(RoRw::RO) => "activated-ro",
        DpState::Activated(RoRw::RW) => "activated-rw",
    }
}

fn state_from_string(s: &str) -> Option<DpState> {
    Some(match s {
        "detached" => DpState::Detached,
        "attached-ro" => DpState::Attached(RoRw::RO),
        "attached-rw" => DpState::Attached(RoRw::RW),
        "activated-ro" => DpState::Activated(RoRw::RO),
        "activated-rw" => DpState::Activated(RoRw::RW),
        _ => return None,
    })
}

fn rw_of(s: DpState) -> Option<RoRw> {
    match s {
        DpState::Detached => None,
        DpState::Attached(m) | DpState::Activated(m) => Some(m),
    }
}

type Key = (String, String);

/// One VDI's datapaths and export.
#[derive(Default)]
struct VdiDps {
    dps: BTreeMap<String, DpState>,
    export: Option<Arc<Export>>,
    /// The export serves the epoch overlay (non-persistent disk), not the leaf.
    overlay: bool,
    /// The kernel nbd device connected to the export, if any (for blkback).
    kernel: Option<KernelDevice>,
}

/// A live export, readable without the per-VDI lock.
#[derive(Clone)]
struct Live {
    export: Arc<Export>,
    state: DpState,
    overlay: bool,
}

/// Failpoints of the datapath layer (see [`crate::failpoint`]): reached in a transition that
/// creates or changes an export, right after taking the VDI's lock.
pub const DATAPATH: &[&str] = &["datapath.vdi_locked"];

/// Opens the chain the export of `vdi` serves (the VDI's lock is held: no engine call from
/// here, which could wait behind an SR.detach that waits for a GC holding the lock order the
/// other way round).
async fn open_chain(
    vl: &VdiLock,
    vdi: &str,
    rw: bool,
) -> Result<(Arc<dyn nbd::BlockBackend>, bool)> {
    let (leaf, overlay) = serving_leaf(vl, vdi).await?;
    Ok((open_leaf(leaf, rw).await?, overlay))
}

/// The top of the chain the export of `vdi` serves: during an epoch of a non-persistent disk
/// its overlay (created if missing, e.g. when the agent restarted), else its leaf.
async fn serving_leaf(vl: &VdiLock, vdi: &str) -> Result<(PathBuf, bool)> {
    let leaf = vl.leaf_path();
    if !vl.record().epoch.as_ref().is_some_and(|e| !e.persistent) {
        return Ok((leaf, false));
    }
    let ov = overlay_path(&leaf, vdi);
    if !ov.exists() {
        create_overlay(leaf, ov.clone()).await?;
    }
    Ok((ov, true))
}

/// The file that holds a non-persistent VDI's writes during an epoch: `.<vdi>.epoch.vhd`, an
/// empty differencing child of the leaf created at `VDI.epoch_begin` and deleted at
/// `VDI.epoch_end`. Dot-named, so SR scans and the GC never take it for a chain node.
pub fn overlay_path(leaf: &Path, vdi: &str) -> PathBuf {
    leaf.with_file_name(format!(".{vdi}.epoch.vhd"))
}

/// Creates a fresh empty overlay of `leaf` at `ov` (at a temporary name, then renamed, so an
/// overlay that exists is complete).
async fn create_overlay(leaf: PathBuf, ov: PathBuf) -> Result<()> {
    let what = format!("creating the epoch layer {}", ov.display());
    tokio::task::spawn_blocking(move || -> std::result::Result<(), String> {
        let tmp = ov.with_extension("vhd.part");
        let _ = std::fs::remove_file(&tmp);
        vhd::create_differencing(&tmp, &leaf, &vhd::CreateOptions::default())
            .map_err(|e| e.full_text())?;
        std::fs::rename(&tmp, &ov).map_err(|e| e.to_string())?;
        if let Some(d) = ov.parent() {
            std::fs::File::open(d)
                .and_then(|f| f.sync_all())
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    })
    .await
    .map_err(|e| backend(interface::codes::IO_ERROR, format!("{what}: task: {e}")))?
    .map_err(|e| backend(interface::codes::IO_ERROR, format!("{what}: {e}")))
}

/// Deletes an epoch overlay (the writes of the epoch are thrown away).
fn remove_overlay(ov: &Path) -> Result<()> {
    match std::fs::remove_file(ov) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(backend(
            interface::codes::IO_ERROR,
            format!("deleting the epoch layer {}: {e}", ov.display()),
        )),
    }
}

/// The datapath layer of the agent: the NBD server, its exports, and every VDI's dp states.
pub struct Datapaths {
    socket: PathBuf,
    /// The NBD server of the listeners (offering `exports`).
    server: NbdServer,
    exports: Exports,
    vdis: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<VdiDps>>>>,
    /// Live exports by VDI, readable without the per-VDI lock (hooks run under the engine's
    /// VDI lock, which transitions take after the per-VDI lock: never wait for it there).
    live: Mutex<HashMap<Key, Live>>,
    /// Kernel nbd devices (`[nbd] kernel_devices`).
    kernel: KernelNbd,
    /// Held while a stopped listener is replaced (one attach re-listens, not several).
    relisten: Mutex<()>,
}

impl std::fmt::Debug for Datapaths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapaths")
            .field("socket", &self.socket)
            .field("exports", &self.exports.names())
            .finish()
    }
}

fn export_name(sr: &str, vdi: &str) -> String {
    format!("{sr}/{vdi}")
}

fn dp_error(what: &str, e: nbd::Error) -> StorageError {
    backend(interface::codes::IO_ERROR, format!("datapath: {what}: {e}"))
}

impl Datapaths {
    /// A datapath layer whose NBD server will listen on `socket` (see [`Self::listen`]), with
    /// no kernel nbd devices.
    pub fn new(socket: impl Into<PathBuf>) -> Arc<Self> {
        Self::with_kernel(socket, KernelNbd::new(KernelDevices::Off))
    }

    /// Like [`Self::new`], attaching kernel nbd devices as `kernel` says.
    pub fn with_kernel(socket: impl Into<PathBuf>, kernel: KernelNbd) -> Arc<Self> {
        Self::with_options(socket, kernel, ServerOptions::default())
    }

    /// Like [`Self::with_kernel`], serving NBD (listeners and kernel devices) with `options`
    /// (`[nbd]` configuration).
    pub fn with_options(
        socket: impl Into<PathBuf>,
        kernel: KernelNbd,
        options: ServerOptions,
    ) -> Arc<Self> {
        let kernel = kernel.with_server_options(options);
        match kernel.mode() {
            KernelDevices::Auto if !kernel.enabled() => tracing::info!(
                "no kernel nbd device (/dev/nbd0 missing: nbd module not loaded): \
                 VDI.attach returns the NBD URI only, no block device for blkback"
            ),
            KernelDevices::Off => tracing::debug!("kernel nbd devices disabled"),
            _ => {
                tracing::info!(
                    timeout_secs = kernel.timeout_secs(),
                    "VDI.attach connects a kernel nbd device for blkback"
                );
                if kernel.timeout_secs() > 0 {
                    tracing::warn!(
                        timeout_secs = kernel.timeout_secs(),
                        "kernel nbd devices time requests out: a request held longer by a \
                         paused export (attach before activate, snapshot, deactivate) shuts \
                         its device down until the VDI is re-attached"
                    );
                }
            }
        }
        let exports = Exports::new();
        Arc::new(Datapaths {
            socket: socket.into(),
            server: NbdServer::with_options(exports.clone(), options),
            exports,
            vdis: Mutex::default(),
            live: Mutex::default(),
            kernel,
            relisten: Mutex::default(),
        })
    }

    /// The NBD socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The exports (for introspection and tests).
    pub fn exports(&self) -> &Exports {
        &self.exports
    }

    /// Binds the NBD socket (replacing a stale one) and serves it in a background task.
    pub fn listen(&self) -> std::io::Result<tokio::task::JoinHandle<()>> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(m) = std::fs::symlink_metadata(&self.socket) {
            if m.file_type().is_socket() {
                std::fs::remove_file(&self.socket)?;
            }
        }
        if let Some(d) = self.socket.parent() {
            std::fs::create_dir_all(d)?;
        }
        let listener = tokio::net::UnixListener::bind(&self.socket)?;
        {
            // Whoever can connect can read and write every attached disk: owner only.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.socket, std::fs::Permissions::from_mode(0o600))?;
        }
        tracing::info!(socket = %self.socket.display(), "NBD datapath listening");
        Ok(self.serve_listener(listener))
    }

    /// Serves NBD on `listener`, bound at [`Self::socket`], in a background task. Transient
    /// accept errors (descriptors exhausted…) are retried by the server; if the listening
    /// socket fails for good, the next `VDI.attach*` listens again ([`Self::ensure_listening`]).
    pub fn serve_listener(
        &self,
        listener: tokio::net::UnixListener,
    ) -> tokio::task::JoinHandle<()> {
        let server = self.server.clone();
        tokio::spawn(async move {
            if let Err(e) = server.serve_unix(listener).await {
                tracing::error!(error = %e, "NBD listener stopped; the next VDI.attach listens again");
            }
        })
    }

    /// The status of the NBD unix listener, if one was started.
    fn unix_listener(&self) -> Option<nbd::ListenerStatus> {
        let name = format!("unix {}", self.socket.display());
        self.server.listeners().into_iter().find(|l| l.name == name)
    }

    /// Before handing out a URI: if the NBD unix listener stopped for good, bind and serve the
    /// socket again; if that fails too, fail (the URI would reach nobody).
    fn ensure_listening(&self) -> Result<()> {
        let _one = self.relisten.lock().unwrap_or_else(|p| p.into_inner());
        let Some(nbd::ListenerStatus {
            state: nbd::ListenerState::Stopped { error },
            ..
        }) = self.unix_listener()
        else {
            return Ok(());
        };
        tracing::warn!(socket = %self.socket.display(), stopped = error, "NBD listener had stopped; listening again");
        self.listen().map(drop).map_err(|e| {
            backend(
                interface::codes::IO_ERROR,
                format!(
                    "datapath: the NBD listener on {} stopped ({error}) and listening again failed \
                     ({e}): its URIs would reach nobody; restart the agent",
                    self.socket.display()
                ),
            )
        })
    }

    /// For `Query.diagnostics`: one line per NBD listener (state, connections, refusals,
    /// accept errors).
    pub fn diagnostics(&self) -> String {
        let lines: Vec<String> = self
            .server
            .listeners()
            .iter()
            .map(|l| format!("\n  {l}"))
            .collect();
        format!("{} listener(s){}", lines.len(), lines.concat())
    }

    /// Also serves NBD on a TCP address (loopback only; the caller checks) in a background task.
    pub async fn listen_tcp(
        &self,
        addr: std::net::SocketAddr,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let server = self.server.clone();
        tracing::info!(%addr, "NBD datapath listening on TCP");
        Ok(tokio::spawn(async move {
            if let Err(e) = server.serve_tcp(listener).await {
                tracing::error!(error = %e, "NBD TCP listener stopped");
            }
        }))
    }

    /// The URI a client uses for the export of `vdi` of `sr`.
    pub fn uri(&self, sr: &str, vdi: &str) -> String {
        format!(
            "nbd:unix:{}:exportname={}",
            self.socket.display(),
            export_name(sr, vdi)
        )
    }

    fn entry(&self, sr: &str, vdi: &str) -> Arc<tokio::sync::Mutex<VdiDps>> {
        self.vdis
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((sr.to_string(), vdi.to_string()))
            .or_default()
            .clone()
    }

    /// Applies `op` on `dp` of `vdi`, doing backend work if the superstate changes, and
    /// persisting the new state.
    pub async fn transition(
        &self,
        st: &Storage,
        sr: &str,
        vdi: &str,
        dp: &str,
        op: Op,
    ) -> Result<()> {
        let entry = self.entry(sr, vdi);
        let mut g = entry.lock().await;
        let old = g.dps.get(dp).copied().unwrap_or(DpState::Detached);
        let new = apply(old, op)?;
        if new == old {
            return Ok(());
        }
        let mut dps = g.dps.clone();
        if new == DpState::Detached {
            dps.remove(dp);
        } else {
            dps.insert(dp.to_string(), new);
        }
        let from = superstate(g.dps.values());
        let to = superstate(dps.values());
        self.realise(st, sr, vdi, &mut g, from, to).await?;
        let dp_s = dp.to_string();
        st.vdi_set_datapaths(sr, vdi, move |m| {
            if new == DpState::Detached {
                m.remove(&dp_s);
            } else {
                m.insert(dp_s, state_to_string(new).to_string());
            }
        })
        .await?;
        g.dps = dps;
        tracing::info!(sr, vdi, dp, from = ?old, to = ?new, superstate = ?to, "datapath transition");
        Ok(())
    }

    /// Makes the backend match superstate `to` (from `from`).
    async fn realise(
        &self,
        st: &Storage,
        sr: &str,
        vdi: &str,
        g: &mut VdiDps,
        from: DpState,
        to: DpState,
    ) -> Result<()> {
        let key = (sr.to_string(), vdi.to_string());
        if from == to {
            return Ok(());
        }
        if to == DpState::Detached {
            self.drop_export(&key, g).await;
            return Ok(());
        }
        // The VDI's lock, until the export is registered as live: no snapshot, clone or GC
        // relink changes the chain while it is opened, and a snapshot that follows finds the
        // export to pause and switch.
        let vdi_lock = st.lock_vdi(sr, vdi).await?;
        st.failpoints().hit("datapath.vdi_locked");
        let rw = rw_of(to) == Some(RoRw::RW);
        let export = match g.export.clone() {
            None => {
                let (backend, overlay) = open_chain(&vdi_lock, vdi, rw).await?;
                g.overlay = overlay;
                let e = self
                    .exports
                    .add(
                        &export_name(sr, vdi),
                        backend,
                        ExportOptions {
                            paused: true,
                            read_only: false,
                            description: Some(format!("VDI {vdi} of SR {sr}")),
                        },
                    )
                    .map_err(|e| dp_error("creating the NBD export", e))?;
                g.export = Some(e.clone());
                if let Err(x) = self.connect_kernel(sr, vdi, g, &e) {
                    self.drop_export(&key, g).await;
                    return Err(x);
                }
                e
            }
            Some(e) => {
                if rw_of(from) != rw_of(to) {
                    // RO <-> RW: re-open the chain in the new mode behind the paused gate.
                    // The kernel device stays connected (a blkback may hold it open) and
                    // follows the mode: writable before the chain is, read-only after.
                    if rw {
                        self.kernel_mode(sr, vdi, g, false)?;
                    }
                    e.pause().await.map_err(|x| dp_error("pausing I/O", x))?;
                    let (backend, overlay) = open_chain(&vdi_lock, vdi, rw).await?;
                    g.overlay = overlay;
                    e.replace_backend(backend)
                        .map_err(|x| dp_error("switching the chain", x))?;
                    if !rw {
                        if let Err(x) = self.kernel_mode(sr, vdi, g, true) {
                            // The export refuses writes anyway (EPERM).
                            tracing::warn!(sr, vdi, error = %x, "kernel nbd device left writable");
                        }
                    }
                }
                e
            }
        };
        match to {
            DpState::Activated(m) => {
                if !matches!(from, DpState::Activated(RoRw::RW)) && m == RoRw::RW {
                    // xapi clears content_id when a VDI is activated read-write.
                    vdi_lock.update(|r| r.content_id.clear()).await?;
                }
                export.resume().await;
            }
            _ => export
                .pause()
                .await
                .map_err(|x| dp_error("completing and flushing I/O", x))?,
        }
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(
            key,
            Live {
                export,
                state: to,
                overlay: g.overlay,
            },
        );
        drop(vdi_lock);
        Ok(())
    }

    /// Removes the export of `key` (and disconnects its kernel nbd device first, if any).
    async fn drop_export(&self, key: &Key, g: &mut VdiDps) {
        let dev = g.kernel.take();
        if let Some(d) = &dev {
            d.request_disconnect();
        }
        if let Some(e) = g.export.take() {
            self.live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(key);
            self.exports.remove(e.name()).await;
        }
        if let Some(d) = dev {
            self.kernel.release(d).await;
        }
    }

    /// Makes the VDI's kernel nbd device (if any) read-only or writable.
    fn kernel_mode(&self, sr: &str, vdi: &str, g: &VdiDps, read_only: bool) -> Result<()> {
        match &g.kernel {
            None => Ok(()),
            Some(d) => d.set_read_only(read_only).map_err(|x| {
                backend(
                    interface::codes::IO_ERROR,
                    format!(
                        "making the kernel nbd device {} of VDI {vdi} of SR {sr} {}: {x}",
                        d.path().display(),
                        if read_only { "read-only" } else { "writable" }
                    ),
                )
            }),
        }
    }

    /// Connects a kernel nbd device to a new export where configured; see [`KernelDevices`].
    fn connect_kernel(&self, sr: &str, vdi: &str, g: &mut VdiDps, e: &Arc<Export>) -> Result<()> {
        if !self.kernel.enabled() {
            return Ok(());
        }
        match self.kernel.connect(e.clone()) {
            Ok(d) => {
                tracing::info!(sr, vdi, device = %d.path().display(), "kernel nbd device connected");
                g.kernel = Some(d);
                Ok(())
            }
            Err(x) if self.kernel.mode() == KernelDevices::On => Err(backend(
                interface::codes::IO_ERROR,
                format!(
                    "connecting a kernel nbd device for VDI {vdi} ([nbd] kernel_devices = true; \
                     load the nbd module or set it to auto/false): {x}"
                ),
            )),
            Err(x) => {
                tracing::warn!(sr, vdi, error = %x, "no kernel nbd device connected (NBD URI only)");
                Ok(())
            }
        }
    }

    /// After `VDI.epoch_begin`/`epoch_end`: a non-persistent disk's previous epoch layer is
    /// thrown away, and a new epoch of one starts with a fresh empty layer; a live export is
    /// paused (in-flight I/O completes), switched, and resumed if it was activated.
    pub async fn sync_epoch(&self, st: &Storage, sr: &str, vdi: &str) -> Result<()> {
        let entry = self.entry(sr, vdi);
        let mut g = entry.lock().await;
        // The layer is made on, and the export switched to, a leaf no snapshot moves meanwhile.
        let vdi_lock = st.lock_vdi(sr, vdi).await?;
        let leaf = vdi_lock.leaf_path();
        let rec = vdi_lock.record();
        let fresh = rec.epoch.as_ref().is_some_and(|e| !e.persistent);
        let ov = overlay_path(&leaf, vdi);
        if !fresh && !g.overlay && !ov.exists() {
            return Ok(());
        }
        let export = g.export.clone();
        if let Some(e) = &export {
            e.pause()
                .await
                .map_err(|x| dp_error("pausing I/O for the epoch change", x))?;
        }
        remove_overlay(&ov)?;
        let top = if fresh {
            create_overlay(leaf.clone(), ov.clone()).await?;
            ov
        } else {
            leaf
        };
        g.overlay = fresh;
        tracing::info!(sr, vdi, non_persistent_epoch = fresh, top = %top.display(), "epoch change");
        if let Some(e) = export {
            let state = superstate(g.dps.values());
            let b = open_leaf(top, rw_of(state) == Some(RoRw::RW)).await?;
            e.replace_backend(b)
                .map_err(|x| dp_error("switching the export for the epoch", x))?;
            self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(
                (sr.to_string(), vdi.to_string()),
                Live {
                    export: e.clone(),
                    state,
                    overlay: fresh,
                },
            );
            if matches!(state, DpState::Activated(_)) {
                e.resume().await;
            }
        }
        Ok(())
    }

    /// `VDI.attach2/3`: the backend implementations (the NBD URI; no kernel nbd device here).
    pub async fn attach(
        &self,
        st: &Storage,
        sr: &str,
        vdi: &str,
        dp: &str,
        read_write: bool,
    ) -> Result<BackendInfo> {
        self.ensure_listening()?;
        let m = if read_write { RoRw::RW } else { RoRw::RO };
        self.transition(st, sr, vdi, dp, Op::Attach(m)).await?;
        let mut implementations = vec![Implementation::Nbd {
            uri: self.uri(sr, vdi),
        }];
        let dev = self
            .entry(sr, vdi)
            .lock()
            .await
            .kernel
            .as_ref()
            .map(|d| d.path().to_path_buf());
        match dev {
            Some(p) => implementations.push(Implementation::BlockDevice {
                path: p.display().to_string(),
            }),
            None => tracing::debug!(sr, vdi, "no kernel nbd device for blkback (NBD URI only)"),
        }
        Ok(BackendInfo { implementations })
    }

    /// `DP.stat_vdi`: each dp's state and the superstate.
    pub async fn stat_vdi(&self, sr: &str, vdi: &str) -> DpStat {
        let entry = self.entry(sr, vdi);
        let g = entry.lock().await;
        DpStat {
            superstate: superstate(g.dps.values()),
            dps: g.dps.clone(),
        }
    }

    /// `DP.destroy`: deactivates and detaches `dp` from every VDI. With `allow_leak`, failures
    /// are logged and the dp forgotten anyway.
    pub async fn dp_destroy(&self, st: &Storage, dp: &str, allow_leak: bool) -> Result<()> {
        let keys: Vec<Key> = self
            .vdis
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for (sr, vdi) in keys {
            let has = self.entry(&sr, &vdi).lock().await.dps.contains_key(dp);
            if !has {
                continue;
            }
            for op in [Op::Deactivate, Op::Detach] {
                if let Err(e) = self.transition(st, &sr, &vdi, dp, op).await {
                    if !allow_leak {
                        return Err(e);
                    }
                    tracing::warn!(sr, vdi, dp, error = %e, "DP.destroy: leaking");
                    self.entry(&sr, &vdi).lock().await.dps.remove(dp);
                }
            }
        }
        Ok(())
    }

    /// Before `VDI.destroy`: deactivates (flushing) and detaches every datapath of `vdi`, each
    /// with a warning (at the storage layer a datapath left on a destroyed VDI is a leaked
    /// one: xapi refuses to destroy an in-use VDI at its own layer), clears dp states the
    /// record still lists, and deletes the layer of a non-persistent epoch.
    pub async fn teardown_vdi(&self, st: &Storage, sr: &str, vdi: &str) -> Result<()> {
        let held: Vec<String> = {
            let entry = self.entry(sr, vdi);
            let g = entry.lock().await;
            g.dps.keys().cloned().collect()
        };
        for dp in &held {
            tracing::warn!(
                sr,
                vdi,
                dp,
                "VDI.destroy of a VDI with a datapath: deactivating (flush) and detaching it"
            );
            for op in [Op::Deactivate, Op::Detach] {
                self.transition(st, sr, vdi, dp, op).await?;
            }
        }
        let rec = st.vdi_stat(sr, vdi).await?.record;
        if !rec.datapaths.is_empty() {
            for dp in rec.datapaths.keys() {
                tracing::warn!(
                    sr,
                    vdi,
                    dp,
                    "VDI.destroy: forgetting a recorded datapath that has no export"
                );
            }
            st.vdi_set_datapaths(sr, vdi, |m| m.clear()).await?;
        }
        match st.vdi_chain(sr, vdi).await {
            Ok((leaf, _)) => {
                let ov = overlay_path(&leaf, vdi);
                if ov.exists() {
                    tracing::info!(sr, vdi, layer = %ov.display(), "VDI.destroy: deleting the epoch layer");
                    remove_overlay(&ov)?;
                }
            }
            Err(e) => tracing::debug!(sr, vdi, error = %e, "no chain to look for an epoch layer"),
        }
        self.vdis
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(sr.to_string(), vdi.to_string()));
        Ok(())
    }

    /// Tears down every datapath of `sr` (before `SR.detach`).
    pub async fn teardown_sr(&self, sr: &str) -> Result<()> {
        let keys: Vec<Key> = self
            .vdis
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .filter(|(s, _)| s == sr)
            .cloned()
            .collect();
        for key in keys {
            let entry = self.entry(&key.0, &key.1);
            let mut g = entry.lock().await;
            self.drop_export(&key, &mut g).await;
            // The persisted states stay: re-attaching the SR (or restarting) restores them.
            g.dps.clear();
        }
        Ok(())
    }

    /// Re-creates the exports of every attached SR's VDIs from their persisted dp states
    /// (after an agent restart).
    pub async fn restore(&self, st: &Storage) -> Result<()> {
        for sr in st.attached_srs() {
            self.restore_sr(st, sr.as_str()).await?;
        }
        Ok(())
    }

    /// Re-creates the exports of one SR's VDIs from their persisted dp states.
    pub async fn restore_sr(&self, st: &Storage, sr: &str) -> Result<()> {
        for v in st.sr_scan(sr).await? {
            let r = &v.record;
            if r.datapaths.is_empty() {
                continue;
            }
            let dps: BTreeMap<String, DpState> = r
                .datapaths
                .iter()
                .filter_map(|(dp, s)| state_from_string(s).map(|s| (dp.clone(), s)))
                .collect();
            let entry = self.entry(sr, &r.uuid);
            let mut g = entry.lock().await;
            if g.export.is_some() {
                continue;
            }
            let to = superstate(dps.values());
            self.realise(st, sr, &r.uuid, &mut g, DpState::Detached, to)
                .await?;
            g.dps = dps;
            tracing::info!(sr, vdi = %r.uuid, superstate = ?to, "datapath restored");
        }
        Ok(())
    }

    async fn handle(&self, st: &Storage, call: Call) -> interface::Reply {
        let unit = |r: Result<()>| r.map(|()| Response::Unit);
        match call {
            Call::VdiAttach {
                dp,
                sr,
                vdi,
                read_write,
                ..
            } => {
                let b = self
                    .attach(st, sr.as_str(), vdi.as_str(), dp.as_str(), read_write)
                    .await?;
                let uri = match b.implementations.first() {
                    Some(Implementation::Nbd { uri }) => uri.clone(),
                    _ => String::new(),
                };
                Ok(Response::AttachInfo(AttachInfo {
                    params: uri,
                    o_direct: false,
                    o_direct_reason: "served over NBD by the agent".into(),
                    xenstore_data: Default::default(),
                }))
            }
            Call::VdiAttach2 {
                dp,
                sr,
                vdi,
                read_write,
                ..
            }
            | Call::VdiAttach3 {
                dp,
                sr,
                vdi,
                read_write,
                ..
            } => self
                .attach(st, sr.as_str(), vdi.as_str(), dp.as_str(), read_write)
                .await
                .map(Response::Backend),
            Call::VdiActivate { dp, sr, vdi, .. }
            | Call::VdiActivate3 { dp, sr, vdi, .. }
            | Call::VdiActivateReadonly { dp, sr, vdi, .. } => unit(
                self.transition(st, sr.as_str(), vdi.as_str(), dp.as_str(), Op::Activate)
                    .await,
            ),
            Call::VdiDeactivate { dp, sr, vdi, .. } => unit(
                self.transition(st, sr.as_str(), vdi.as_str(), dp.as_str(), Op::Deactivate)
                    .await,
            ),
            Call::VdiDetach { dp, sr, vdi, .. } => unit(
                self.transition(st, sr.as_str(), vdi.as_str(), dp.as_str(), Op::Detach)
                    .await,
            ),
            Call::DpDestroy { dp, allow_leak, .. } => {
                unit(self.dp_destroy(st, dp.as_str(), allow_leak).await)
            }
            Call::DpStatVdi { sr, vdi, .. } => Ok(Response::DpStat(
                self.stat_vdi(sr.as_str(), vdi.as_str()).await,
            )),
            other => Err(StorageError::Unimplemented(other.method().to_string())),
        }
    }
}

async fn open_leaf(leaf: PathBuf, rw: bool) -> Result<Arc<dyn nbd::BlockBackend>> {
    let root = leaf
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    let l2 = leaf.clone();
    let b = tokio::task::spawn_blocking(move || ChainBackend::open(&l2, &root, rw))
        .await
        .map_err(|e| backend(interface::codes::IO_ERROR, format!("open task: {e}")))?
        .map_err(|e| dp_error(&format!("opening the chain of {}", leaf.display()), e))?;
    Ok(Arc::new(b))
}

impl DatapathHooks for Datapaths {
    fn is_attached(&self, sr: &str, vdi: &str) -> bool {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&(sr.to_string(), vdi.to_string()))
    }

    fn before_leaf_change<'a>(&'a self, sr: &'a str, vdi: &'a str) -> HookFuture<'a> {
        Box::pin(async move {
            let live = self
                .live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&(sr.to_string(), vdi.to_string()))
                .cloned();
            if let Some(Live { export: e, .. }) = live {
                e.pause()
                    .await
                    .map_err(|x| dp_error("pausing I/O for the leaf switch", x))?;
            }
            Ok(())
        })
    }

    fn after_leaf_change<'a>(&'a self, sr: &'a str, vdi: &'a str, leaf: PathBuf) -> HookFuture<'a> {
        Box::pin(async move {
            let live = self
                .live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&(sr.to_string(), vdi.to_string()))
                .cloned();
            if let Some(Live {
                export: e,
                state,
                overlay,
            }) = live
            {
                let rw = rw_of(state) == Some(RoRw::RW);
                let top = if overlay {
                    // The epoch layer's parent was the old leaf (now the hidden base, same
                    // content as the new empty leaf): re-point it at the new leaf.
                    let ov = overlay_path(&leaf, vdi);
                    let (o2, l2) = (ov.clone(), leaf.clone());
                    tokio::task::spawn_blocking(move || vhd::set_parent(&o2, &l2))
                        .await
                        .map_err(|e| backend(interface::codes::IO_ERROR, format!("task: {e}")))?
                        .map_err(|e| {
                            backend(
                                interface::codes::IO_ERROR,
                                format!("re-pointing the epoch layer {}: {e}", ov.display()),
                            )
                        })?;
                    ov
                } else {
                    leaf
                };
                let b = open_leaf(top, rw).await?;
                e.replace_backend(b)
                    .map_err(|x| dp_error("switching the export to the new leaf", x))?;
                if matches!(state, DpState::Activated(_)) {
                    e.resume().await;
                }
            }
            Ok(())
        })
    }

    fn after_epoch_change<'a>(
        &'a self,
        storage: &'a Storage,
        sr: &'a str,
        vdi: &'a str,
    ) -> HookFuture<'a> {
        Box::pin(self.sync_epoch(storage, sr, vdi))
    }

    fn before_vdi_destroy<'a>(
        &'a self,
        storage: &'a Storage,
        sr: &'a str,
        vdi: &'a str,
    ) -> HookFuture<'a> {
        Box::pin(self.teardown_vdi(storage, sr, vdi))
    }

    fn before_sr_detach<'a>(&'a self, sr: &'a str) -> HookFuture<'a> {
        Box::pin(self.teardown_sr(sr))
    }

    fn call<'a>(&'a self, storage: &'a Storage, call: Call) -> CallFuture<'a> {
        Box::pin(self.handle(storage, call))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DpState::*;
    use RoRw::*;

    use crate::core::{StorageConfig, VdiCreate, VdiDerive};
    use nbd::kernel::fake::{Call as Ioctl, FakeKernel};
    use nbd::proto;
    use nbd::BlockBackend;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    const SR: &str = "11111111-2222-3333-4444-555555555555";

    /// A minimal NBD client: fixed newstyle, NBD_OPT_GO, simple replies.
    async fn nbd_connect(sock: &Path, name: &str) -> UnixStream {
        let mut s = UnixStream::connect(sock).await.unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).await.unwrap();
        s.write_all(&3u32.to_be_bytes()).await.unwrap();
        let mut m = proto::IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        m.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        m.extend_from_slice(&(name.len() as u32).to_be_bytes());
        m.extend_from_slice(name.as_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&m).await.unwrap();
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).await.unwrap();
            let kind = proto::be32(&h[12..]);
            let mut d = vec![0u8; proto::be32(&h[16..]) as usize];
            s.read_exact(&mut d).await.unwrap();
            assert!(
                kind == proto::REP_ACK || kind == proto::REP_INFO,
                "GO: {kind:#x}"
            );
            if kind == proto::REP_ACK {
                return s;
            }
        }
    }

    /// One request; returns (error, data).
    async fn nbd_io(
        s: &mut UnixStream,
        kind: u16,
        offset: u64,
        data: &[u8],
        len: u32,
    ) -> (u32, Vec<u8>) {
        let req = proto::Request {
            flags: 0,
            kind,
            cookie: 9,
            offset,
            length: u64::from(len),
        };
        let mut m = proto::encode_request(&req, false);
        m.extend_from_slice(data);
        s.write_all(&m).await.unwrap();
        let mut h = [0u8; 16];
        s.read_exact(&mut h).await.unwrap();
        let err = proto::be32(&h[4..]);
        let mut d = vec![];
        if err == 0 && kind == proto::CMD_READ {
            d = vec![0u8; len as usize];
            s.read_exact(&mut d).await.unwrap();
        }
        (err, d)
    }

    struct Env {
        _dir: tempfile::TempDir,
        data: PathBuf,
        sock: PathBuf,
    }

    impl Env {
        fn new() -> Env {
            let dir = tempfile::tempdir().unwrap();
            Env {
                data: dir.path().join("data"),
                sock: dir.path().join("nbd.sock"),
                _dir: dir,
            }
        }
        async fn start(&self) -> (Arc<Storage>, Arc<Datapaths>) {
            self.start_with(Datapaths::new(&self.sock)).await
        }

        /// Starts with kernel nbd devices played by a [`FakeKernel`] (one device, `nbd0`).
        async fn start_with_fake_kernel(&self) -> (Arc<Storage>, Arc<Datapaths>, Arc<FakeKernel>) {
            let (dev, sys) = (self._dir.path().join("dev"), self._dir.path().join("sys"));
            FakeKernel::lay_out(&dev, &sys);
            let fake = Arc::new(FakeKernel::default());
            let k = KernelNbd::with(KernelDevices::On, dev, sys, fake.clone());
            let (st, dps) = self.start_with(Datapaths::with_kernel(&self.sock, k)).await;
            (st, dps, fake)
        }

        async fn start_with(&self, dps: Arc<Datapaths>) -> (Arc<Storage>, Arc<Datapaths>) {
            self.start_with_failpoints(dps, crate::failpoint::Failpoints::none())
                .await
        }

        async fn start_with_failpoints(
            &self,
            dps: Arc<Datapaths>,
            failpoints: crate::failpoint::Failpoints,
        ) -> (Arc<Storage>, Arc<Datapaths>) {
            let mut cfg = StorageConfig::new(&self.data);
            cfg.failpoints = failpoints;
            let mut st = Storage::new(cfg);
            dps.listen().unwrap();
            st.set_datapath_hooks(dps.clone());
            let st = Arc::new(st);
            if st.sr_attach(SR, &BTreeMap::new()).await.is_err() {
                st.sr_create(SR, "sr", "", &BTreeMap::new()).await.unwrap();
                st.sr_attach(SR, &BTreeMap::new()).await.unwrap();
            }
            dps.restore(&st).await.unwrap();
            (st, dps)
        }
    }

    async fn new_vdi(st: &Storage) -> String {
        let v = st
            .vdi_create(
                SR,
                VdiCreate {
                    name_label: "d".into(),
                    virtual_size: 8 << 20,
                    persistent: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        v.record.uuid
    }

    /// Attaches `vdi` read-write on `dp`, activates it, and connects an NBD client to it.
    async fn activate_and_connect(
        env: &Env,
        st: &Storage,
        dps: &Datapaths,
        vdi: &str,
        dp: &str,
    ) -> UnixStream {
        dps.attach(st, SR, vdi, dp, true).await.unwrap();
        dps.transition(st, SR, vdi, dp, Op::Activate).await.unwrap();
        nbd_connect(&env.sock, &export_name(SR, vdi)).await
    }

    /// Writes `data` at `offset` through `c`; the write must succeed.
    async fn write_ok(c: &mut UnixStream, offset: u64, data: &[u8]) {
        let r = nbd_io(c, proto::CMD_WRITE, offset, data, data.len() as u32).await;
        assert_eq!(r.0, 0, "write of {} bytes at {offset}", data.len());
    }

    /// Deactivates and detaches `dp` of `vdi`.
    async fn deactivate_and_detach(st: &Storage, dps: &Datapaths, vdi: &str, dp: &str) {
        for op in [Op::Deactivate, Op::Detach] {
            dps.transition(st, SR, vdi, dp, op).await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_attach_after_the_nbd_listener_stopped_listens_again_and_its_uri_works() {
        let env = Env::new();
        let (st, dps) = env.start().await;
        // The listener's socket fails for good: a socket at the path that cannot accept
        // (bound, never listening: accept says EINVAL, connect is refused).
        std::fs::remove_file(&env.sock).unwrap();
        let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        s.bind(&socket2::SockAddr::unix(&env.sock).unwrap())
            .unwrap();
        s.set_nonblocking(true).unwrap();
        let broken: std::os::unix::net::UnixListener = s.into();
        dps.serve_listener(tokio::net::UnixListener::from_std(broken).unwrap());
        let t0 = std::time::Instant::now();
        while !dps.diagnostics().contains("STOPPED") {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{}",
                dps.diagnostics()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            UnixStream::connect(&env.sock).await.is_err(),
            "nobody listens"
        );

        let vdi = new_vdi(&st).await;
        let mut c = activate_and_connect(&env, &st, &dps, &vdi, "dp1").await;
        write_ok(&mut c, 0, &[7; 512]).await;
        let d = dps.diagnostics();
        assert!(d.contains("accepting") && !d.contains("STOPPED"), "{d}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sr_detach_during_a_datapath_call_that_calls_the_engine_again_completes_both() {
        let env = Env::new();
        let (st, dps) = env.start().await;
        let vdi = new_vdi(&st).await;
        dps.attach(&st, SR, &vdi, "dp1", true).await.unwrap();
        // A datapath call in progress holds its VDI's entry between two engine calls.
        let entry = dps.entry(SR, &vdi);
        let held = entry.lock().await;
        let st2 = st.clone();
        let detach = tokio::spawn(async move { st2.sr_detach(SR).await });
        // SR.detach is under way: it wants that entry to tear the datapath down.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let next = tokio::time::timeout(Duration::from_secs(10), st.vdi_chain(SR, &vdi))
            .await
            .expect("the datapath call's next engine call hangs behind SR.detach (deadlock)");
        assert!(
            matches!(next, Err(StorageError::SrNotAttached(_))),
            "{next:?}"
        );
        drop(held);
        tokio::time::timeout(Duration::from_secs(10), detach)
            .await
            .expect("SR.detach hangs")
            .unwrap()
            .unwrap();
        assert!(!dps.is_attached(SR, &vdi), "the export outlived SR.detach");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 3)]
    async fn an_attach_holding_the_vdi_lock_never_waits_for_the_sr_slot_behind_a_detach() {
        // A GC round holds the SR's slot (read) and wants the VDI's lock; an SR.detach waits for
        // the slot (write); the attach holds the VDI's lock. If the attach then asked for the
        // slot, it would queue behind the detach: three-way deadlock.
        let (reached_tx, reached_rx) = std::sync::mpsc::channel::<()>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let go_rx = std::sync::Mutex::new(go_rx);
        let reached_tx = std::sync::Mutex::new(reached_tx);
        let fp = crate::failpoint::Failpoints::none().with_hook(Arc::new(move |name| {
            if name == "datapath.vdi_locked" {
                let _ = reached_tx.lock().unwrap().send(());
                let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(20));
            }
        }));
        let env = Env::new();
        let (st, dps) = env
            .start_with_failpoints(Datapaths::new(&env.sock), fp)
            .await;
        let vdi = new_vdi(&st).await;
        let (st2, dps2, v2) = (st.clone(), dps.clone(), vdi.clone());
        let attach =
            tokio::spawn(async move { dps2.attach(&st2, SR, &v2, "dp1", true).await.map(|_| ()) });
        tokio::task::spawn_blocking(move || reached_rx.recv_timeout(Duration::from_secs(10)))
            .await
            .unwrap()
            .expect("the attach did not reach its failpoint");
        // The "GC round": the SR's slot, read.
        let (slot, sr) = st.attached(SR).await.unwrap();
        let st3 = st.clone();
        let detach = tokio::spawn(async move { st3.sr_detach(SR).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        go_tx.send(()).unwrap();
        // The "GC round" now wants the VDI's lock: the attach must finish without the slot.
        let op = sr.vdi(&vdi).unwrap().op.clone();
        let vdi_lock = tokio::time::timeout(Duration::from_secs(10), op.lock_owned())
            .await
            .expect("the attach holding the VDI's lock waits for the SR's slot (deadlock)");
        drop(vdi_lock);
        drop(slot);
        tokio::time::timeout(Duration::from_secs(10), detach)
            .await
            .expect("SR.detach hangs")
            .unwrap()
            .unwrap();
        // The attach may have lost the race with the detach; either way it ended, and no
        // export outlives the SR.
        let _ = tokio::time::timeout(Duration::from_secs(10), attach)
            .await
            .expect("the attach hangs");
        assert!(!dps.is_attached(SR, &vdi), "an export outlived SR.detach");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attach_opens_the_chain_only_under_the_vdi_lock() {
        let env = Env::new();
        let (st, dps) = env.start().await;
        let vdi = new_vdi(&st).await;
        // A snapshot, clone or GC relink of the VDI's chain holds the VDI's lock meanwhile.
        let lock = st.lock_vdi(SR, &vdi).await.unwrap();
        let (st2, dps2, v2) = (st.clone(), dps.clone(), vdi.clone());
        let attach =
            tokio::spawn(async move { dps2.attach(&st2, SR, &v2, "dp1", true).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !attach.is_finished(),
            "attach did not wait for the VDI's lock"
        );
        assert!(
            !dps.is_attached(SR, &vdi),
            "an export appeared under a held VDI lock"
        );
        drop(lock);
        tokio::time::timeout(Duration::from_secs(10), attach)
            .await
            .expect("attach hangs after the lock is released")
            .unwrap()
            .unwrap();
        assert!(dps.is_attached(SR, &vdi));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attach_pauses_io_until_activate_and_deactivate_flushes_to_the_file() {
        let env = Env::new();
        let (st, dps) = env.start().await;
        let vdi = new_vdi(&st).await;
        let b = dps.attach(&st, SR, &vdi, "dp1", true).await.unwrap();
        let uri = match &b.implementations[0] {
            Implementation::Nbd { uri } => uri.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            uri,
            format!("nbd:unix:{}:exportname={SR}/{vdi}", env.sock.display())
        );
        let mut c = nbd_connect(&env.sock, &export_name(SR, &vdi)).await;
        let w = tokio::spawn(async move {
            let r = nbd_io(&mut c, proto::CMD_WRITE, 4096, &[0xab; 4096], 4096).await;
            (c, r)
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!w.is_finished(), "a write went through before activate");
        dps.transition(&st, SR, &vdi, "dp1", Op::Activate)
            .await
            .unwrap();
        let (mut c, (err, _)) = w.await.unwrap();
        assert_eq!(err, 0);
        dps.transition(&st, SR, &vdi, "dp1", Op::Deactivate)
            .await
            .unwrap();
        // Flushed: the file, opened independently, holds the write.
        let (leaf, _) = st.vdi_chain(SR, &vdi).await.unwrap();
        let ch = vhd::Chain::open(&leaf, &vhd::ChainOptions::new(leaf.parent().unwrap())).unwrap();
        let mut buf = vec![0u8; 4096];
        ch.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, vec![0xab; 4096]);
        // Reads wait again while deactivated.
        let r = tokio::spawn(async move { nbd_io(&mut c, proto::CMD_READ, 4096, &[], 16).await });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!r.is_finished());
        dps.transition(&st, SR, &vdi, "dp1", Op::Activate)
            .await
            .unwrap();
        assert_eq!(r.await.unwrap(), (0, vec![0xab; 16]));
    }

    /// The `BlockDevice` among a `VDI.attach*` answer.
    fn block_device(b: &BackendInfo) -> Option<String> {
        b.implementations.iter().find_map(|i| match i {
            Implementation::BlockDevice { path } => Some(path.clone()),
            _ => None,
        })
    }

    /// `fake.io(...)` off the async runtime (it blocks on the socket).
    async fn kio(fake: &Arc<FakeKernel>, kind: u16, offset: u64, data: &[u8]) -> (u32, Vec<u8>) {
        let (f, d) = (fake.clone(), data.to_vec());
        let len = if kind == proto::CMD_READ {
            4096
        } else {
            d.len() as u32
        };
        tokio::task::spawn_blocking(move || f.io(kind, offset, &d, len))
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rw_attach_beside_a_ro_one_makes_the_same_kernel_device_writable_and_back() {
        let env = Env::new();
        let (st, dps, fake) = env.start_with_fake_kernel().await;
        let vdi = new_vdi(&st).await;
        let ro = dps.attach(&st, SR, &vdi, "ro", false).await.unwrap();
        let dev = block_device(&ro).expect("no BlockDevice");
        dps.transition(&st, SR, &vdi, "ro", Op::Activate)
            .await
            .unwrap();
        assert_eq!(fake.read_only(), Some(true));
        assert_eq!(
            kio(&fake, proto::CMD_WRITE, 0, &[1; 4096]).await.0,
            proto::errno::EPERM
        );
        // A second dp attaches RW: the same device, still connected, now takes writes.
        let rw = dps.attach(&st, SR, &vdi, "rw", true).await.unwrap();
        assert_eq!(block_device(&rw).as_ref(), Some(&dev));
        assert_eq!(fake.count(&Ioctl::DoIt), 1, "the device was reconnected");
        assert_eq!(fake.read_only(), Some(false));
        assert_eq!(kio(&fake, proto::CMD_WRITE, 0, &[0x5a; 4096]).await.0, 0);
        assert_eq!(kio(&fake, proto::CMD_FLUSH, 0, &[]).await.0, 0);
        assert_eq!(
            kio(&fake, proto::CMD_READ, 0, &[]).await,
            (0, vec![0x5a; 4096])
        );
        // The RW dp goes: read-only again, on the same connection.
        deactivate_and_detach(&st, &dps, &vdi, "rw").await;
        assert_eq!(fake.read_only(), Some(true));
        assert_eq!(
            kio(&fake, proto::CMD_WRITE, 0, &[2; 4096]).await.0,
            proto::errno::EPERM
        );
        assert_eq!(
            kio(&fake, proto::CMD_READ, 0, &[]).await,
            (0, vec![0x5a; 4096])
        );
        deactivate_and_detach(&st, &dps, &vdi, "ro").await;
        assert_eq!(fake.count(&Ioctl::DoIt), 1);
        assert_eq!(fake.count(&Ioctl::Disconnect), 1);
        assert_eq!(
            fake.read_only(),
            Some(false),
            "the device was left read-only"
        );
        // What the kernel wrote is in the VHD.
        let (leaf, _) = st.vdi_chain(SR, &vdi).await.unwrap();
        let ch = vhd::Chain::open(&leaf, &vhd::ChainOptions::new(leaf.parent().unwrap())).unwrap();
        let mut buf = vec![0u8; 4096];
        ch.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, vec![0x5a; 4096]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn detach_of_a_never_activated_vdi_fails_a_waiting_probe_of_its_device_and_returns() {
        let env = Env::new();
        let (st, dps, fake) = env.start_with_fake_kernel().await;
        let vdi = new_vdi(&st).await;
        let b = dps.attach(&st, SR, &vdi, "dp", true).await.unwrap();
        assert!(block_device(&b).is_some());
        // udev's blkid (or the kernel's partition scan) reads the first sector: it waits.
        let f = fake.clone();
        let cookie = tokio::task::spawn_blocking(move || f.send(proto::CMD_READ, 0, &[], 512))
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!fake.reply_pending(), "a read passed the paused gate");
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            dps.transition(&st, SR, &vdi, "dp", Op::Detach),
        )
        .await
        .expect("VDI.detach hung on a probe waiting at the paused export")
        .unwrap();
        let rest = fake
            .after_disconnect()
            .expect("the connection was not closed");
        assert!(rest.len() >= 16, "no reply to the probe: {rest:?}");
        assert_eq!(proto::be32(&rest[..4]), proto::SIMPLE_REPLY_MAGIC);
        assert_eq!(proto::be32(&rest[4..8]), proto::errno::ESHUTDOWN);
        assert_eq!(u64::from_be_bytes(rest[8..16].try_into().unwrap()), cookie);
        assert!(dps.exports().names().is_empty());
    }

    /// Wraps an export's backend: counts flushes, and records how many writes had completed
    /// and whether the export was already closed when the last flush ran.
    struct FlushWitness {
        inner: Arc<dyn BlockBackend>,
        closed: tokio::sync::watch::Receiver<bool>,
        writes: AtomicU64,
        flushes: AtomicU64,
        writes_at_flush: AtomicU64,
        closed_at_flush: std::sync::atomic::AtomicBool,
    }

    impl BlockBackend for FlushWitness {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_only(&self) -> bool {
            self.inner.read_only()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::result::Result<(), nbd::Error> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::result::Result<(), nbd::Error> {
            self.inner.write_at(buf, offset)?;
            self.writes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn flush(&self) -> std::result::Result<(), nbd::Error> {
            self.inner.flush()?;
            self.writes_at_flush
                .store(self.writes.load(Ordering::SeqCst), Ordering::SeqCst);
            self.closed_at_flush
                .store(*self.closed.borrow(), Ordering::SeqCst);
            self.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn trim(&self, offset: u64, len: u64) -> std::result::Result<(), nbd::Error> {
            self.inner.trim(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> std::result::Result<(), nbd::Error> {
            self.inner.write_zeroes(offset, len)
        }
        fn block_status(
            &self,
            offset: u64,
            len: u64,
        ) -> std::result::Result<Vec<nbd::Extent>, nbd::Error> {
            self.inner.block_status(offset, len)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vdi_destroy_flushes_an_activated_export_after_its_writes_and_before_removing_it() {
        let env = Env::new();
        let (st, dps) = env.start().await;
        let vdi = new_vdi(&st).await;
        let mut c = activate_and_connect(&env, &st, &dps, &vdi, "dp").await;
        let e = dps.exports().get(&export_name(SR, &vdi)).unwrap();
        e.pause().await.unwrap();
        let w = Arc::new(FlushWitness {
            inner: e.backend(),
            closed: e.closed_signal(),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            writes_at_flush: AtomicU64::new(0),
            closed_at_flush: Default::default(),
        });
        e.replace_backend(w.clone()).unwrap();
        e.resume().await;
        write_ok(&mut c, 0, &[8; 4096]).await;
        write_ok(&mut c, 1 << 20, &[9; 4096]).await;
        assert_eq!(
            w.flushes.load(Ordering::SeqCst),
            0,
            "flushed before the test asked"
        );
        st.vdi_destroy(SR, &vdi).await.unwrap();
        assert!(e.is_closed(), "the export survived VDI.destroy");
        assert_eq!(
            w.flushes.load(Ordering::SeqCst),
            1,
            "VDI.destroy's teardown did not flush the export"
        );
        assert_eq!(w.writes_at_flush.load(Ordering::SeqCst), 2);
        assert!(
            !w.closed_at_flush.load(Ordering::SeqCst),
            "the flush came after the export was closed"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn read_only_datapath_refuses_writes_with_eperm() {
        let env = Env::new();
        let (st, dps) = env.start().await;
        let vdi = new_vdi(&st).await;
        dps.attach(&st, SR, &vdi, "dp", false).await.unwrap();
        dps.transition(&st, SR, &vdi, "dp", Op::Activate)
            .await
            .unwrap();
        let mut c = nbd_connect(&env.sock, &export_name(SR, &vdi)).await;
        assert_eq!(
            nbd_io(&mut c, proto::CMD_WRITE, 0, &[1; 512], 512).await.0,
            proto::errno::EPERM
        );
        assert_eq!(
            nbd_io(&mut c, proto::CMD_READ, 0, &[], 512).await,
            (0, vec![0; 512])
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_through_the_engine_follow_the_automaton_and_are_persisted() {
        let env = Env::new();
        let (st, dps) = env.start().await;
        let vdi = new_vdi(&st).await;
        let call = |j: serde_json::Value| -> Call { serde_json::from_value(j).unwrap() };
        let attach = |dp: &str, rw: bool| {
            call(
                serde_json::json!({"VDI.attach2": {"dp": dp, "sr": SR, "vdi": vdi, "read_write": rw}}),
            )
        };
        let r = st.handle(attach("a", false)).await;
        assert!(matches!(r, Ok(Response::Backend(_))), "{r:?}");
        assert!(matches!(
            st.handle(attach("a", false)).await,
            Ok(Response::Backend(_))
        ));
        assert!(matches!(
            st.handle(attach("a", true)).await,
            Err(StorageError::IllegalTransition { .. })
        ));
        assert!(matches!(
            st.handle(attach("b", true)).await,
            Ok(Response::Backend(_))
        ));
        let act =
            |dp: &str| call(serde_json::json!({"VDI.activate3": {"dp": dp, "sr": SR, "vdi": vdi}}));
        assert!(st.handle(act("b")).await.is_ok());
        assert!(st.handle(act("a")).await.is_ok());
        let stat = st
            .handle(call(
                serde_json::json!({"DP.stat_vdi": {"sr": SR, "vdi": vdi}}),
            ))
            .await
            .unwrap();
        let Response::DpStat(stat) = stat else {
            panic!("{stat:?}")
        };
        assert_eq!(stat.superstate, DpState::Activated(RoRw::RW));
        assert_eq!(stat.dps.len(), 2);
        let detach =
            |dp: &str| call(serde_json::json!({"VDI.detach": {"dp": dp, "sr": SR, "vdi": vdi}}));
        assert!(matches!(
            st.handle(detach("b")).await,
            Err(StorageError::IllegalTransition { .. })
        ));
        let rec = st.vdi_stat(SR, &vdi).await.unwrap().record;
        assert_eq!(
            rec.datapaths.get("a").map(String::as_str),
            Some("activated-ro")
        );
        assert_eq!(
            rec.datapaths.get("b").map(String::as_str),
            Some("activated-rw")
        );
        st.handle(call(
            serde_json::json!({"DP.destroy": {"dp": "b", "allow_leak": false}}),
        ))
        .await
        .unwrap();
        let stat = dps.stat_vdi(SR, &vdi).await;
        assert_eq!(stat.superstate, DpState::Activated(RoRw::RO));
        assert!(!st
            .vdi_stat(SR, &vdi)
            .await
            .unwrap()
            .record
            .datapaths
            .contains_key("b"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restarted_agent_re_exports_activated_datapaths_with_data_intact() {
        let env = Env::new();
        let vdi;
        {
            let (st, dps) = env.start().await;
            vdi = new_vdi(&st).await;
            let mut c = activate_and_connect(&env, &st, &dps, &vdi, "dp").await;
            write_ok(&mut c, 0, &[7; 4096]).await;
            assert_eq!(nbd_io(&mut c, proto::CMD_FLUSH, 0, &[], 0).await.0, 0);
            st.sr_detach(SR).await.unwrap();
            assert!(dps.exports().names().is_empty(), "SR.detach left exports");
        }
        let (st, dps) = env.start().await;
        assert_eq!(
            dps.stat_vdi(SR, &vdi).await.superstate,
            DpState::Activated(RoRw::RW)
        );
        let mut c = nbd_connect(&env.sock, &export_name(SR, &vdi)).await;
        assert_eq!(
            nbd_io(&mut c, proto::CMD_READ, 0, &[], 4096).await,
            (0, vec![7; 4096])
        );
        deactivate_and_detach(&st, &dps, &vdi, "dp").await;
        assert!(st.vdi_destroy(SR, &vdi).await.is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn destroying_a_vdi_in_use_tears_down_its_datapaths_and_epoch_layer_first() {
        let env = Env::new();
        let (st, dps) = env.start().await;
        let vdi = new_vdi(&st).await;
        st.vdi_set_persistent(SR, &vdi, false).await.unwrap();
        st.vdi_epoch_begin(SR, &vdi, "vm1", false).await.unwrap();
        let mut c = activate_and_connect(&env, &st, &dps, &vdi, "a").await;
        dps.attach(&st, SR, &vdi, "b", false).await.unwrap();
        write_ok(&mut c, 0, &[4; 4096]).await;
        let (leaf, _) = st.vdi_chain(SR, &vdi).await.unwrap();
        let ov = overlay_path(&leaf, &vdi);
        assert!(ov.exists());
        st.vdi_destroy(SR, &vdi).await.unwrap();
        assert!(dps.exports().names().is_empty(), "the export survived");
        assert!(!dps.is_attached(SR, &vdi));
        assert_eq!(dps.stat_vdi(SR, &vdi).await.superstate, DpState::Detached);
        assert!(!ov.exists(), "the epoch layer survived");
        assert!(!leaf.exists(), "the leaf survived");
        // The client's next request fails cleanly (the connection is closed).
        let mut h = [0u8; 16];
        let _ = c
            .write_all(&proto::encode_request(
                &proto::Request {
                    flags: 0,
                    kind: proto::CMD_READ,
                    cookie: 1,
                    offset: 0,
                    length: 512,
                },
                false,
            ))
            .await;
        assert!(c.read_exact(&mut h).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshot_of_an_activated_vdi_never_fails_a_request() {
        let env = Env::new();
        let (st, dps) = env.start().await;
        let vdi = new_vdi(&st).await;
        let mut c = activate_and_connect(&env, &st, &dps, &vdi, "dp").await;
        write_ok(&mut c, 0, &[1; 4096]).await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let io = tokio::spawn(async move {
            let mut n = 0u32;
            while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                assert_eq!(
                    nbd_io(&mut c, proto::CMD_READ, 0, &[], 4096).await,
                    (0, vec![1; 4096])
                );
                write_ok(&mut c, 8192, &[2; 4096]).await;
                n += 1;
            }
            (c, n)
        });
        let snap = st
            .vdi_snapshot(SR, &vdi, VdiDerive::default(), false)
            .await
            .unwrap();
        let clone = st
            .vdi_snapshot(SR, &vdi, VdiDerive::default(), true)
            .await
            .unwrap();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (mut c, n) = io.await.unwrap();
        assert!(n > 0);
        // After the switch, writes go to the VDI's new leaf, not into the snapshot.
        write_ok(&mut c, 0, &[3; 4096]).await;
        assert_eq!(nbd_io(&mut c, proto::CMD_FLUSH, 0, &[], 0).await.0, 0);
        let (sleaf, _) = st.vdi_chain(SR, &snap.record.uuid).await.unwrap();
        let ch =
            vhd::Chain::open(&sleaf, &vhd::ChainOptions::new(sleaf.parent().unwrap())).unwrap();
        let mut buf = vec![0u8; 4096];
        ch.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, vec![1; 4096]);
        assert!(!clone.record.uuid.is_empty());
        assert_eq!(
            nbd_io(&mut c, proto::CMD_READ, 0, &[], 4096).await,
            (0, vec![3; 4096])
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn non_persistent_epoch_writes_vanish_at_epoch_end_and_next_epoch_starts_fresh() {
        let env = Env::new();
        let (st, dps) = env.start().await;
        let vdi = new_vdi(&st).await;
        let mut c = activate_and_connect(&env, &st, &dps, &vdi, "dp").await;
        write_ok(&mut c, 0, &[5; 4096]).await;
        st.vdi_set_persistent(SR, &vdi, false).await.unwrap();
        // Epoch begins while the datapath is live: the export switches to a fresh layer.
        st.vdi_epoch_begin(SR, &vdi, "vm1", false).await.unwrap();
        let (leaf, _) = st.vdi_chain(SR, &vdi).await.unwrap();
        let ov = overlay_path(&leaf, &vdi);
        assert!(ov.exists());
        assert_eq!(
            nbd_io(&mut c, proto::CMD_READ, 0, &[], 4096).await,
            (0, vec![5; 4096])
        );
        write_ok(&mut c, 0, &[6; 4096]).await;
        assert_eq!(
            nbd_io(&mut c, proto::CMD_READ, 0, &[], 4096).await,
            (0, vec![6; 4096])
        );
        // A reboot: epoch_end + epoch_begin, still attached — the epoch's writes are gone.
        st.vdi_epoch_end(SR, &vdi, "vm1").await.unwrap();
        assert!(!ov.exists());
        assert_eq!(
            nbd_io(&mut c, proto::CMD_READ, 0, &[], 4096).await,
            (0, vec![5; 4096])
        );
        st.vdi_epoch_begin(SR, &vdi, "vm1", false).await.unwrap();
        write_ok(&mut c, 8192, &[7; 512]).await;
        drop(c);
        // Detached and re-attached within the epoch: the epoch's writes are still there.
        deactivate_and_detach(&st, &dps, &vdi, "dp").await;
        let mut c = activate_and_connect(&env, &st, &dps, &vdi, "dp").await;
        assert_eq!(
            nbd_io(&mut c, proto::CMD_READ, 8192, &[], 512).await,
            (0, vec![7; 512])
        );
        drop(c);
        deactivate_and_detach(&st, &dps, &vdi, "dp").await;
        st.vdi_epoch_end(SR, &vdi, "vm1").await.unwrap();
        assert!(!ov.exists());
        // The leaf itself never saw the epochs' writes.
        let ch = vhd::Chain::open(&leaf, &vhd::ChainOptions::new(leaf.parent().unwrap())).unwrap();
        let mut buf = vec![0u8; 512];
        ch.read_at(&mut buf, 8192).unwrap();
        assert_eq!(buf, vec![0; 512]);
        ch.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, vec![5; 512]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshot_during_a_non_persistent_epoch_keeps_the_epoch_layer_on_the_new_leaf() {
        let env = Env::new();
        let (st, dps) = env.start().await;
        let vdi = new_vdi(&st).await;
        st.vdi_set_persistent(SR, &vdi, false).await.unwrap();
        st.vdi_epoch_begin(SR, &vdi, "vm1", false).await.unwrap();
        let mut c = activate_and_connect(&env, &st, &dps, &vdi, "dp").await;
        write_ok(&mut c, 0, &[9; 4096]).await;
        let snap = st
            .vdi_snapshot(SR, &vdi, VdiDerive::default(), false)
            .await
            .unwrap();
        assert_eq!(
            nbd_io(&mut c, proto::CMD_READ, 0, &[], 4096).await,
            (0, vec![9; 4096])
        );
        // The snapshot holds the persistent content, not the epoch's writes.
        let (sleaf, _) = st.vdi_chain(SR, &snap.record.uuid).await.unwrap();
        let ch =
            vhd::Chain::open(&sleaf, &vhd::ChainOptions::new(sleaf.parent().unwrap())).unwrap();
        let mut buf = vec![1u8; 4096];
        ch.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, vec![0; 4096]);
        st.vdi_epoch_end(SR, &vdi, "vm1").await.unwrap();
        assert_eq!(
            nbd_io(&mut c, proto::CMD_READ, 0, &[], 4096).await,
            (0, vec![0; 4096])
        );
    }

    #[test]
    fn automaton_allows_repeats_and_refuses_mode_changes_and_detach_while_active() {
        assert_eq!(apply(Detached, Op::Attach(RO)), Ok(Attached(RO)));
        assert_eq!(apply(Attached(RO), Op::Attach(RO)), Ok(Attached(RO)));
        assert!(matches!(
            apply(Attached(RO), Op::Attach(RW)),
            Err(StorageError::IllegalTransition { .. })
        ));
        assert!(apply(Attached(RW), Op::Attach(RO)).is_err());
        assert!(apply(Activated(RW), Op::Attach(RO)).is_err());
        assert_eq!(apply(Activated(RW), Op::Attach(RW)), Ok(Activated(RW)));
        assert!(apply(Detached, Op::Activate).is_err());
        assert_eq!(apply(Attached(RW), Op::Activate), Ok(Activated(RW)));
        assert_eq!(apply(Activated(RW), Op::Activate), Ok(Activated(RW)));
        assert_eq!(apply(Activated(RO), Op::Deactivate), Ok(Attached(RO)));
        assert_eq!(apply(Attached(RO), Op::Deactivate), Ok(Attached(RO)));
        assert_eq!(apply(Detached, Op::Deactivate), Ok(Detached));
        assert_eq!(
            apply(Activated(RW), Op::Detach),
            Err(StorageError::IllegalTransition {
                from: Activated(RW),
                to: Detached
            })
        );
        assert_eq!(apply(Attached(RW), Op::Detach), Ok(Detached));
        assert_eq!(apply(Detached, Op::Detach), Ok(Detached));
    }

    #[test]
    fn every_state_and_operation_has_the_automaton_outcome_and_illegal_ones_name_both_states() {
        // xapi's Vdi_automaton, written out: Some(state) = legal, None = Illegal_transition.
        let a = |m| Some(Attached(m));
        let v = |m| Some(Activated(m));
        #[rustfmt::skip]
        let table: [(DpState, [Option<DpState>; 5]); 5] = [
            //               Attach RO     Attach RW     Activate      Deactivate      Detach
            (Detached,      [a(RO),        a(RW),        None,         Some(Detached), Some(Detached)]),
            (Attached(RO),  [a(RO),        None,         v(RO),        a(RO),          Some(Detached)]),
            (Attached(RW),  [None,         a(RW),        v(RW),        a(RW),          Some(Detached)]),
            (Activated(RO), [v(RO),        None,         v(RO),        a(RO),          None]),
            (Activated(RW), [None,         v(RW),        v(RW),        a(RW),          None]),
        ];
        let ops = [
            Op::Attach(RO),
            Op::Attach(RW),
            Op::Activate,
            Op::Deactivate,
            Op::Detach,
        ];
        for (from, row) in table {
            for (op, want) in ops.into_iter().zip(row) {
                match (apply(from, op), want) {
                    (Ok(got), Some(want)) => assert_eq!(got, want, "{from:?} + {op:?}"),
                    (Err(StorageError::IllegalTransition { from: f, .. }), None) => {
                        assert_eq!(f, from, "{from:?} + {op:?}")
                    }
                    (got, want) => panic!("{from:?} + {op:?}: {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn superstate_is_activated_if_any_and_rw_if_any() {
        assert_eq!(superstate(&[]), Detached);
        assert_eq!(superstate(&[Attached(RO), Detached]), Attached(RO));
        assert_eq!(superstate(&[Attached(RO), Attached(RW)]), Attached(RW));
        assert_eq!(superstate(&[Attached(RW), Activated(RO)]), Activated(RW));
        assert_eq!(superstate(&[Activated(RO)]), Activated(RO));
    }

    #[test]
    fn persisted_state_names_round_trip() {
        for s in [
            Detached,
            Attached(RO),
            Attached(RW),
            Activated(RO),
            Activated(RW),
        ] {
            assert_eq!(state_from_string(state_to_string(s)), Some(s));
        }
        assert_eq!(state_from_string("bogus"), None);
    }
}
