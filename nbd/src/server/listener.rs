//! Accept loops of the listeners, with what keeps a listener alive and bounded:
//!
//! - **Accept errors are retried.** Running out of descriptors (`EMFILE`, `ENFILE`) or kernel
//!   memory (`ENOBUFS`, `ENOMEM`) is transient: the loop pauses (10 ms, doubling up to 1 s, reset
//!   by the next success; the pending connection waits in the kernel's backlog) and tries again.
//!   Errors of one pending connection (`ECONNABORTED`, `EPROTO`, network errors, `EINTR`) are
//!   retried at once. Only errors that say the listening socket itself is unusable (`EBADF`,
//!   `EINVAL` — e.g. shut down —, `ENOTSOCK`, `EFAULT`) stop it: the loop returns the error and
//!   the listener's state says [`ListenerState::Stopped`], so its owner can re-listen or refuse
//!   to hand out addresses nobody can reach.
//! - **Connections per listener are bounded** ([`super::ServerOptions::max_connections`]). A
//!   connection over the bound is accepted and closed at once (the client reads EOF instead of
//!   the greeting), with a log line at most every [`LOG_EVERY`]: a client left waiting in the
//!   backlog would hang without a word until its own timeout, and later clients would queue
//!   behind it even once slots free up; closing costs one descriptor for an instant.
//! - **Memory freed by closed connections goes back to the kernel**: a second after a
//!   connection closes (at most once a second), [`crate::splice::release_free_memory`] runs.
//! - Every listener has a [`ListenerStatus`] (state, connections, counters) that
//!   [`super::NbdServer::listeners`] reports, for health checks and diagnostics.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// First pause after a transient accept error.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between accept attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Warnings about one kind of event (accept errors, refused connections) are logged at most
/// this often; the lines say how many were left out.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// What a listener is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerState {
    /// Accepting connections.
    Accepting,
    /// The last accept failed with a transient error; it tries again after a pause.
    Retrying {
        /// The error.
        error: String,
    },
    /// Stopped for good (an error of the listening socket itself, or its loop was dropped).
    Stopped {
        /// Why.
        error: String,
    },
}

/// A snapshot of one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerStatus {
    /// What it listens on: `unix <path>` or `tcp <address>`.
    pub name: String,
    /// What it is doing.
    pub state: ListenerState,
    /// Connections open now.
    pub connections: usize,
    /// The bound on them.
    pub max_connections: usize,
    /// Connections served since it started.
    pub accepted: u64,
    /// Connections closed at once because `max_connections` were open.
    pub refused: u64,
    /// Failed accepts since it started.
    pub accept_errors: u64,
    /// The last accept error, if any.
    pub last_error: Option<String>,
}

impl std::fmt::Display for ListenerStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ", self.name)?;
        match &self.state {
            ListenerState::Accepting => write!(f, "accepting")?,
            ListenerState::Retrying { error } => write!(f, "accept failing, retrying ({error})")?,
            ListenerState::Stopped { error } => write!(f, "STOPPED ({error})")?,
        }
        write!(
            f,
            ", connections {} open (max {}) / {} served, {} refused over the bound, {} accept errors",
            self.connections, self.max_connections, self.accepted, self.refused, self.accept_errors
        )?;
        if let Some(e) = &self.last_error {
            write!(f, " (last: {e})")?;
        }
        Ok(())
    }
}

/// At most one log line per [`LOG_EVERY`]; counts the events left out meanwhile.
#[derive(Default)]
struct RateLimit {
    last: Mutex<Option<Instant>>,
    skipped: AtomicU64,
}

impl RateLimit {
    /// `Some(events left out since the last line)` when a line may be logged now.
    fn admit(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.skipped.swap(0, Ordering::Relaxed))
    }
}

/// The shared state of one listener.
pub(super) struct Listener {
    name: String,
    max_connections: usize,
    state: Mutex<ListenerState>,
    connections: AtomicUsize,
    accepted: AtomicU64,
    refused: AtomicU64,
    accept_errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    error_log: RateLimit,
    refusal_log: RateLimit,
}

impl Listener {
    pub(super) fn new(name: String, max_connections: usize) -> Arc<Listener> {
        Arc::new(Listener {
            name,
            max_connections: max_connections.max(1),
            state: Mutex::new(ListenerState::Accepting),
            connections: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
            error_log: RateLimit::default(),
            refusal_log: RateLimit::default(),
        })
    }

    pub(super) fn name(&self) -> &str {
        &self.name
    }

    fn set_state(&self, s: ListenerState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    pub(super) fn status(&self) -> ListenerStatus {
        ListenerStatus {
            name: self.name.clone(),
            state: self.state.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            connections: self.connections.load(Ordering::SeqCst),
            max_connections: self.max_connections,
            accepted: self.accepted.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            accept_errors: self.accept_errors.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

/// Counts one open connection of a listener until dropped (the connection's task holds it).
pub(super) struct ConnSlot(Arc<Listener>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
        release_memory_soon();
    }
}

/// A release of free memory is scheduled (one at a time, process-wide like the heap).
static RELEASE_PENDING: AtomicBool = AtomicBool::new(false);
/// Delay of that release after a connection closes: the rest of a burst closes meanwhile, and
/// connections coming and going cost at most one release per this period.
const RELEASE_AFTER: Duration = Duration::from_secs(1);

/// After a connection closed: gives the heap's free memory back to the kernel
/// ([`crate::splice::release_free_memory`]) within [`RELEASE_AFTER`], on the blocking pool.
fn release_memory_soon() {
    if RELEASE_PENDING.swap(true, Ordering::SeqCst) {
        return;
    }
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        RELEASE_PENDING.store(false, Ordering::SeqCst);
        return;
    };
    rt.spawn(async {
        tokio::time::sleep(RELEASE_AFTER).await;
        RELEASE_PENDING.store(false, Ordering::SeqCst);
        let t0 = Instant::now();
        if let Ok(released) = tokio::task::spawn_blocking(crate::splice::release_free_memory).await
        {
            tracing::debug!(released, took = ?t0.elapsed(), "free heap memory given back");
        }
    });
}

/// Marks the listener stopped if its loop ends without saying why (the future was dropped).
struct StopGuard(Arc<Listener>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(*s, ListenerState::Stopped { .. }) {
            *s = ListenerState::Stopped {
                error: "the listener was shut down".into(),
            };
        }
    }
}

/// What to do after a failed accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AcceptError {
    /// One pending connection failed: try the next at once.
    Retry,
    /// Out of a resource (descriptors, memory): pause, then try again.
    Pause,
    /// The listening socket is unusable.
    Fatal,
}

/// Classifies an accept error (see the module's first point).
pub(super) fn classify(e: &io::Error) -> AcceptError {
    match e.raw_os_error() {
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EFAULT) => AcceptError::Fatal,
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EAGAIN) => {
            AcceptError::Pause
        }
        Some(
            libc::ECONNABORTED
            | libc::EINTR
            | libc::EPROTO
            | libc::EPERM
            | libc::ECONNRESET
            | libc::ETIMEDOUT
            | libc::ENETDOWN
            | libc::ENETUNREACH
            | libc::EHOSTDOWN
            | libc::EHOSTUNREACH
            | libc::ENONET
            | libc::ENOPROTOOPT
            | libc::EOPNOTSUPP,
        ) => AcceptError::Retry,
        // Anything unforeseen: keep the listener, but do not spin on it.
        _ => AcceptError::Pause,
    }
}

/// Accepts with `accept` until the listening socket fails for good (then returns that error);
/// each accepted stream goes to `serve` with its [`ConnSlot`], unless the listener is full.
pub(super) async fn run<S>(
    l: Arc<Listener>,
    mut accept: impl FnMut(&mut Context<'_>) -> Poll<io::Result<S>>,
    serve: impl Fn(S, ConnSlot),
) -> io::Result<()> {
    let _guard = StopGuard(l.clone());
    let mut backoff = BACKOFF_MIN;
    let mut failing = false;
    loop {
        match std::future::poll_fn(&mut accept).await {
            Ok(stream) => {
                backoff = BACKOFF_MIN;
                if failing {
                    failing = false;
                    l.set_state(ListenerState::Accepting);
                    tracing::info!(listener = l.name, "NBD listener accepting again");
                }
                if l.connections.fetch_add(1, Ordering::SeqCst) >= l.max_connections {
                    l.connections.fetch_sub(1, Ordering::SeqCst);
                    l.refused.fetch_add(1, Ordering::Relaxed);
                    drop(stream);
                    if let Some(skipped) = l.refusal_log.admit() {
                        tracing::warn!(
                            listener = l.name,
                            max_connections = l.max_connections,
                            refused_since_last_line = skipped + 1,
                            "NBD connection closed at once: the listener has max_connections \
                             open ([nbd] max_connections)"
                        );
                    }
                    continue;
                }
                l.accepted.fetch_add(1, Ordering::Relaxed);
                serve(stream, ConnSlot(l.clone()));
            }
            Err(e) => {
                l.accept_errors.fetch_add(1, Ordering::Relaxed);
                *l.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                let kind = classify(&e);
                if kind == AcceptError::Fatal {
                    tracing::error!(listener = l.name, error = %e, "NBD listener stopped");
                    l.set_state(ListenerState::Stopped {
                        error: e.to_string(),
                    });
                    return Err(e);
                }
                failing = true;
                l.set_state(ListenerState::Retrying {
                    error: e.to_string(),
                });
                if let Some(skipped) = l.error_log.admit() {
                    tracing::warn!(listener = l.name, error = %e, errors_since_last_line = skipped + 1,
                        "NBD accept failed; retrying");
                }
                if kind == AcceptError::Pause {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_and_memory_shortages_pause_socket_errors_stop_and_the_rest_retry() {
        let c = |n| classify(&io::Error::from_raw_os_error(n));
        for n in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert_eq!(c(n), AcceptError::Pause, "{n}");
        }
        for n in [
            libc::ECONNABORTED,
            libc::EINTR,
            libc::EPROTO,
            libc::ENETDOWN,
        ] {
            assert_eq!(c(n), AcceptError::Retry, "{n}");
        }
        for n in [libc::EBADF, libc::EINVAL, libc::ENOTSOCK] {
            assert_eq!(c(n), AcceptError::Fatal, "{n}");
        }
    }

    #[test]
    fn rate_limited_lines_count_what_they_left_out() {
        let r = RateLimit::default();
        assert_eq!(r.admit(), Some(0));
        assert_eq!(r.admit(), None);
        assert_eq!(r.admit(), None);
        *r.last.lock().unwrap() = Some(Instant::now() - LOG_EVERY);
        assert_eq!(r.admit(), Some(2));
    }
}
