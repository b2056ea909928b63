//! Exports: a named [`BlockBackend`] behind a pause gate, and the run-time registry of them.
//!
//! The gate is a fair (FIFO) read-write lock: every request holds a read guard while it does
//! its I/O; a paused export is one whose write guard is held. `pause()` therefore waits for the
//! in-flight requests to finish, then flushes; new requests queue (they do not fail) until
//! `resume()` drops the write guard. While paused, the backend may be swapped (the leaf switch
//! of a snapshot/clone) without any client noticing.

use crate::backend::BlockBackend;
use crate::Error;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::{watch, OwnedRwLockReadGuard, OwnedRwLockWriteGuard};

/// Options of a new export.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Start paused: requests wait until [`Export::resume`].
    pub paused: bool,
    /// Force read-only even if the backend is writable.
    pub read_only: bool,
    /// Human-readable description (`NBD_INFO_DESCRIPTION`).
    pub description: Option<String>,
}

/// One export: a name, a backend, a pause gate and a "closed" signal.
pub struct Export {
    name: String,
    backend: RwLock<Arc<dyn BlockBackend>>,
    /// Read-only whatever the backend ([`ExportOptions::read_only`]).
    forced_read_only: bool,
    /// Writes are refused: forced, or the current backend is read-only (follows
    /// [`Export::replace_backend`], so an RO -> RW switch of the VDI makes it writable).
    read_only: AtomicBool,
    description: Option<String>,
    gate: Arc<tokio::sync::RwLock<()>>,
    paused: Mutex<Option<OwnedRwLockWriteGuard<()>>>,
    control: tokio::sync::Mutex<()>,
    closed: watch::Sender<bool>,
}

/// Proof that a request passed the gate: the export cannot pause until it is dropped.
pub struct GatePass {
    _guard: OwnedRwLockReadGuard<()>,
    /// The backend current when the request passed the gate.
    pub backend: Arc<dyn BlockBackend>,
}

impl Export {
    /// A new export serving `backend` under `name`.
    pub fn new(name: &str, backend: Arc<dyn BlockBackend>, opts: ExportOptions) -> Arc<Export> {
        let gate = Arc::new(tokio::sync::RwLock::new(()));
        let paused = if opts.paused {
            Some(
                gate.clone()
                    .try_write_owned()
                    .expect("a fresh lock is free"),
            )
        } else {
            None
        };
        let read_only = opts.read_only || backend.read_only();
        Arc::new(Export {
            name: name.to_string(),
            backend: RwLock::new(backend),
            forced_read_only: opts.read_only,
            read_only: AtomicBool::new(read_only),
            description: opts.description,
            gate,
            paused: Mutex::new(paused),
            control: tokio::sync::Mutex::new(()),
            closed: watch::channel(false).0,
        })
    }

    /// The export's name (what clients ask for).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its description, if any.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// True when writes are refused (EPERM): the export was created read-only, or its
    /// current backend is. Connections negotiated earlier keep the transmission flags they
    /// were given; this is checked on every write.
    pub fn read_only(&self) -> bool {
        self.read_only.load(Ordering::SeqCst)
    }

    /// Virtual size of the current backend.
    pub fn size(&self) -> u64 {
        self.backend().size()
    }

    /// The current backend.
    pub fn backend(&self) -> Arc<dyn BlockBackend> {
        self.backend.read().expect("poisoned").clone()
    }

    /// True while paused.
    pub fn is_paused(&self) -> bool {
        self.paused.lock().expect("poisoned").is_some()
    }

    /// True once closed (removed).
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Waits until the gate is open, then returns a pass for one request. Fails with
    /// [`Error::Closed`] if the export is closed meanwhile.
    pub async fn enter(&self) -> Result<GatePass, Error> {
        let mut closed = self.closed.subscribe();
        if *closed.borrow_and_update() {
            return Err(Error::Closed(self.name.clone()));
        }
        let guard = tokio::select! {
            g = self.gate.clone().read_owned() => g,
            _ = closed.wait_for(|c| *c) => return Err(Error::Closed(self.name.clone())),
        };
        if self.is_closed() {
            return Err(Error::Closed(self.name.clone()));
        }
        Ok(GatePass {
            _guard: guard,
            backend: self.backend(),
        })
    }

    /// A pass for one request if the gate is open right now (no waiting), else `None`.
    pub fn try_enter(&self) -> Option<GatePass> {
        if self.is_closed() {
            return None;
        }
        let guard = self.gate.clone().try_read_owned().ok()?;
        Some(GatePass {
            _guard: guard,
            backend: self.backend(),
        })
    }

    /// Pauses I/O: new requests wait; in-flight ones complete; then the backend is flushed.
    /// Idempotent (pausing a paused export flushes again and returns).
    pub async fn pause(&self) -> Result<(), Error> {
        let _c = self.control.lock().await;
        if !self.is_paused() {
            let g = self.gate.clone().write_owned().await;
            *self.paused.lock().expect("poisoned") = Some(g);
        }
        let b = self.backend();
        tokio::task::spawn_blocking(move || b.flush())
            .await
            .map_err(|e| Error::Internal(format!("flush task: {e}")))?
    }

    /// Lets I/O flow again. Idempotent.
    pub async fn resume(&self) {
        let _c = self.control.lock().await;
        self.paused.lock().expect("poisoned").take();
    }

    /// Replaces the backend (e.g. after a snapshot switched the leaf). Only allowed while
    /// paused, so no request sees a half-switched disk; the new backend must have the same size.
    /// The export becomes read-only or writable with it (unless created read-only).
    pub fn replace_backend(&self, new: Arc<dyn BlockBackend>) -> Result<(), Error> {
        if !self.is_paused() {
            return Err(Error::NotPaused(self.name.clone()));
        }
        let read_only = self.forced_read_only || new.read_only();
        *self.backend.write().expect("poisoned") = new;
        self.read_only.store(read_only, Ordering::SeqCst);
        Ok(())
    }

    /// Closes the export: waiting and new requests fail with ESHUTDOWN, connections are
    /// dropped after their in-flight requests; returns once no request is doing I/O.
    pub async fn close(&self) {
        self.closed.send_replace(true);
        let _c = self.control.lock().await;
        if !self.is_paused() {
            // Wait for in-flight I/O, then keep the gate shut for good.
            let g = self.gate.clone().write_owned().await;
            *self.paused.lock().expect("poisoned") = Some(g);
        }
    }

    /// A receiver that turns `true` when the export is closed.
    pub fn closed_signal(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }
}

/// The set of exports a server offers, changed at run time.
#[derive(Default, Clone)]
pub struct Exports {
    inner: Arc<RwLock<BTreeMap<String, Arc<Export>>>>,
}

impl Exports {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an export; fails if the name is taken.
    pub fn add(
        &self,
        name: &str,
        backend: Arc<dyn BlockBackend>,
        opts: ExportOptions,
    ) -> Result<Arc<Export>, Error> {
        if name.len() > crate::proto::MAX_STRING || name.contains('\0') {
            return Err(Error::BadName(name.to_string()));
        }
        let mut m = self.inner.write().expect("poisoned");
        if m.contains_key(name) {
            return Err(Error::Exists(name.to_string()));
        }
        let e = Export::new(name, backend, opts);
        m.insert(name.to_string(), e.clone());
        tracing::info!(export = name, "export added");
        Ok(e)
    }

    /// Looks an export up by name.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.inner.read().expect("poisoned").get(name).cloned()
    }

    /// Names of all exports, sorted.
    pub fn names(&self) -> Vec<String> {
        self.inner
            .read()
            .expect("poisoned")
            .keys()
            .cloned()
            .collect()
    }

    /// Removes an export and closes it (see [`Export::close`]). Returns it, or `None` if absent.
    pub async fn remove(&self, name: &str) -> Option<Arc<Export>> {
        let e = self.inner.write().expect("poisoned").remove(name)?;
        e.close().await;
        tracing::info!(export = name, "export removed");
        Some(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemBackend;
    use std::time::Duration;

    fn mem(size: u64) -> Arc<MemBackend> {
        Arc::new(MemBackend::new(size, false))
    }

    #[tokio::test]
    async fn paused_export_holds_requests_until_resume() {
        let e = Export::new(
            "a",
            mem(4096),
            ExportOptions {
                paused: true,
                ..Default::default()
            },
        );
        let e2 = e.clone();
        let t = tokio::spawn(async move { e2.enter().await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!t.is_finished(), "request passed a paused gate");
        e.resume().await;
        t.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn pause_waits_for_in_flight_requests_then_flushes() {
        let b = mem(4096);
        let e = Export::new("a", b.clone(), ExportOptions::default());
        let pass = e.enter().await.unwrap();
        let e2 = e.clone();
        let p = tokio::spawn(async move { e2.pause().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!p.is_finished(), "pause returned with a request in flight");
        assert_eq!(b.flush_count(), 0);
        drop(pass);
        p.await.unwrap().unwrap();
        assert_eq!(b.flush_count(), 1);
        assert!(e.is_paused());
        e.resume().await;
        assert!(!e.is_paused());
    }

    #[tokio::test]
    async fn closing_fails_waiting_requests() {
        let e = Export::new(
            "a",
            mem(4096),
            ExportOptions {
                paused: true,
                ..Default::default()
            },
        );
        let e2 = e.clone();
        let t = tokio::spawn(async move { e2.enter().await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        e.close().await;
        assert!(matches!(t.await.unwrap(), Err(Error::Closed(_))));
    }

    #[tokio::test]
    async fn backend_swaps_only_while_paused() {
        let e = Export::new("a", mem(4096), ExportOptions::default());
        assert!(matches!(
            e.replace_backend(mem(4096)),
            Err(Error::NotPaused(_))
        ));
        e.pause().await.unwrap();
        let nb = mem(4096);
        nb.write_at(b"new", 0).unwrap();
        e.replace_backend(nb).unwrap();
        e.resume().await;
        let pass = e.enter().await.unwrap();
        let mut buf = [0u8; 3];
        pass.backend.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"new");
    }

    #[tokio::test]
    async fn a_read_only_export_becomes_writable_with_a_writable_backend_unless_forced() {
        let e = Export::new(
            "a",
            Arc::new(MemBackend::new(4096, true)),
            ExportOptions::default(),
        );
        assert!(e.read_only());
        e.pause().await.unwrap();
        e.replace_backend(mem(4096)).unwrap();
        assert!(
            !e.read_only(),
            "a writable backend left the export read-only"
        );
        e.replace_backend(Arc::new(MemBackend::new(4096, true)))
            .unwrap();
        assert!(
            e.read_only(),
            "a read-only backend left the export writable"
        );
        let forced = Export::new(
            "b",
            mem(4096),
            ExportOptions {
                read_only: true,
                paused: true,
                ..Default::default()
            },
        );
        forced.replace_backend(mem(4096)).unwrap();
        assert!(
            forced.read_only(),
            "a forced read-only export became writable"
        );
    }

    #[tokio::test]
    async fn registry_refuses_duplicate_names_and_removes() {
        let x = Exports::new();
        x.add("a", mem(512), ExportOptions::default()).unwrap();
        assert!(matches!(
            x.add("a", mem(512), ExportOptions::default()),
            Err(Error::Exists(_))
        ));
        assert_eq!(x.names(), vec!["a".to_string()]);
        let e = x.remove("a").await.unwrap();
        assert!(e.is_closed());
        assert!(x.get("a").is_none());
    }
}
