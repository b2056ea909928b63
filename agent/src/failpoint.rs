//! Failpoints: named places inside every multi-step operation of the storage engine where a
//! crash can be injected, so tests can prove that recovery on `SR.attach` completes or undoes
//! each operation from every intermediate state.
//!
//! Two ways to arm one:
//! - **Process-wide, from the environment** (for crash-injection tests that run `ddstor serve`
//!   as a process): `DDSTOR_FAILPOINT=<name>` makes the process kill itself with `SIGKILL` the
//!   first time execution reaches that point. `DDSTOR_FAILPOINT_ACTION=abort|panic|kill` picks
//!   another action (`kill` is the default).
//! - **Per engine instance** (in-process tests): [`Failpoints::panic_at`] makes the engine panic at
//!   that point; nothing after it runs and no clean-up happens, exactly as in a crash. The test then
//!   drops the engine and re-attaches the SR with a fresh one.
//!
//! [`ALL`] lists every name; the per-operation lists ([`VDI_CREATE`], [`VDI_SNAPSHOT`],
//! [`VDI_CLONE`], [`VDI_DESTROY`]) are in execution order.

use std::sync::Arc;

/// Failpoints of `VDI.create`, in execution order.
pub const VDI_CREATE: &[&str] = &[
    "vdi_create.journal_written",
    "vdi_create.vhd_created",
    "vdi_create.record_written",
];

/// Failpoints of `VDI.snapshot`, in execution order.
pub const VDI_SNAPSHOT: &[&str] = &[
    "vdi_snapshot.staged",
    "vdi_snapshot.journal_written",
    "vdi_snapshot.base_published",
    "vdi_snapshot.leaf_renamed",
    "vdi_snapshot.children_created",
    "vdi_snapshot.base_hidden_records_written",
    "vdi_snapshot.synced",
];

/// Failpoints of `VDI.clone`, in execution order.
pub const VDI_CLONE: &[&str] = &[
    "vdi_clone.staged",
    "vdi_clone.journal_written",
    "vdi_clone.base_published",
    "vdi_clone.leaf_renamed",
    "vdi_clone.children_created",
    "vdi_clone.base_hidden_records_written",
    "vdi_clone.synced",
];

/// Failpoints of `VDI.destroy`, in execution order.
pub const VDI_DESTROY: &[&str] = &[
    "vdi_destroy.journal_written",
    "vdi_destroy.record_removed",
    "vdi_destroy.vhd_removed",
    "vdi_destroy.base_collected",
];

/// Failpoints of the atomic metadata-file writer (temp file + fsync + rename + directory fsync),
/// reached by every record and journal write.
pub const METADATA_WRITE: &[&str] = &["meta.temp_written", "meta.renamed"];

/// Failpoint of journal staging: the entry's file is created (at a temporary name) but its
/// content is not yet written.
pub const JOURNAL_STAGE: &[&str] = &["meta.journal_entry_created"];

/// Every failpoint name, per operation in execution order.
pub const ALL: &[&str] = &[
    "vdi_create.journal_written",
    "vdi_create.vhd_created",
    "vdi_create.record_written",
    "vdi_snapshot.staged",
    "vdi_snapshot.journal_written",
    "vdi_snapshot.base_published",
    "vdi_snapshot.leaf_renamed",
    "vdi_snapshot.children_created",
    "vdi_snapshot.base_hidden_records_written",
    "vdi_snapshot.synced",
    "vdi_clone.staged",
    "vdi_clone.journal_written",
    "vdi_clone.base_published",
    "vdi_clone.leaf_renamed",
    "vdi_clone.children_created",
    "vdi_clone.base_hidden_records_written",
    "vdi_clone.synced",
    "vdi_destroy.journal_written",
    "vdi_destroy.record_removed",
    "vdi_destroy.vhd_removed",
    "vdi_destroy.base_collected",
    "meta.temp_written",
    "meta.renamed",
    "meta.journal_entry_created",
    "gc.merge_journaled",
    "gc.merge_copied",
    "gc.children_relinked",
    "gc.merged_node_removed",
    "compose.journal_written",
    "compose.parent_renamed",
    "compose.base_created",
    "compose.child_reparented",
    "compose.records_written",
    "gc_leaf.journaled",
    "gc_leaf.leaf_renamed",
    "gc_leaf.frozen",
    "gc_leaf.copied",
    "gc_leaf.switched",
    "gc_leaf.unhidden",
    "datapath.vdi_locked",
];

/// Environment variable naming the failpoint that crashes the process.
pub const ENV_NAME: &str = "DDSTOR_FAILPOINT";
/// Environment variable choosing what happens at the armed failpoint: `kill` (default: SIGKILL
/// to self), `abort`, or `panic`.
pub const ENV_ACTION: &str = "DDSTOR_FAILPOINT_ACTION";

/// What an armed failpoint does when reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `SIGKILL` to the own process: nothing runs after it, like a power cut of the agent.
    Kill,
    /// `std::process::abort()`.
    Abort,
    /// Panic (unwinds to the caller; used by in-process tests to simulate a crash).
    Panic,
}

/// A test hook called with the name of every failpoint reached (see [`Failpoints::with_hook`]).
pub type Hook = Arc<dyn Fn(&'static str) + Send + Sync + std::panic::RefUnwindSafe>;

/// The armed failpoint of one engine instance (or none).
#[derive(Clone, Default)]
pub struct Failpoints {
    armed: Option<Arc<(String, Action)>>,
    hook: Option<Hook>,
}

impl std::fmt::Debug for Failpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Failpoints")
            .field("armed", &self.armed)
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

impl Failpoints {
    /// No failpoint armed.
    pub fn none() -> Self {
        Self::default()
    }

    /// Reads [`ENV_NAME`] and [`ENV_ACTION`]. An unknown name is reported with a warning (so a
    /// typo in a test does not silently arm nothing).
    pub fn from_env() -> Self {
        let Ok(name) = std::env::var(ENV_NAME) else {
            return Self::none();
        };
        if name.is_empty() {
            return Self::none();
        }
        if !ALL.contains(&name.as_str()) {
            tracing::warn!(failpoint = %name, "{ENV_NAME} names no known failpoint; see failpoint::ALL");
        }
        let action = match std::env::var(ENV_ACTION).as_deref() {
            Ok("abort") => Action::Abort,
            Ok("panic") => Action::Panic,
            _ => Action::Kill,
        };
        tracing::warn!(failpoint = %name, ?action, "failpoint armed");
        Self {
            armed: Some(Arc::new((name, action))),
            hook: None,
        }
    }

    /// Arms `name` to panic when reached (in-process crash simulation).
    pub fn panic_at(name: &str) -> Self {
        Self {
            armed: Some(Arc::new((name.to_string(), Action::Panic))),
            hook: None,
        }
    }

    /// Calls `hook` with the name of every failpoint reached, before any armed action: lets a
    /// test pause an operation at a named step (e.g. block on a channel) and interleave another
    /// one there deterministically.
    pub fn with_hook(mut self, hook: Hook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// The armed failpoint's name, if any.
    pub fn armed(&self) -> Option<&str> {
        self.armed.as_ref().map(|a| a.0.as_str())
    }

    /// Marks that execution reached failpoint `name`; performs the armed action if it is `name`.
    pub fn hit(&self, name: &'static str) {
        debug_assert!(
            ALL.contains(&name),
            "failpoint {name} missing from failpoint::ALL"
        );
        if let Some(h) = &self.hook {
            h(name);
        }
        let Some(armed) = &self.armed else { return };
        if armed.0 != name {
            return;
        }
        tracing::error!(failpoint = name, action = ?armed.1, "failpoint reached: crashing");
        match armed.1 {
            Action::Panic => panic!("failpoint {name} reached"),
            Action::Abort => std::process::abort(),
            Action::Kill => {
                // SIGKILL cannot be caught: no destructor, no flush, no clean-up runs.
                // SAFETY: kill(2) on our own pid with a valid signal number has no memory effects.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
                // Unreachable in practice; make sure nothing else runs either way.
                std::process::abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_per_operation_name_exactly_once() {
        let per_op: Vec<&str> = [
            VDI_CREATE,
            VDI_SNAPSHOT,
            VDI_CLONE,
            VDI_DESTROY,
            METADATA_WRITE,
            JOURNAL_STAGE,
            crate::differencing::gc::GC_MERGE,
            crate::differencing::compose::COMPOSE,
            crate::differencing::online::GC_LEAF,
            crate::datapath::manager::DATAPATH,
        ]
        .concat();
        assert_eq!(per_op.len(), ALL.len());
        for name in &per_op {
            assert_eq!(ALL.iter().filter(|n| *n == name).count(), 1, "{name}");
        }
    }

    #[test]
    fn unarmed_and_other_failpoints_do_nothing() {
        Failpoints::none().hit("vdi_create.vhd_created");
        Failpoints::panic_at("vdi_create.record_written").hit("vdi_create.vhd_created");
    }

    #[test]
    #[should_panic(expected = "failpoint vdi_destroy.vhd_removed reached")]
    fn armed_failpoint_panics_in_process() {
        Failpoints::panic_at("vdi_destroy.vhd_removed").hit("vdi_destroy.vhd_removed");
    }
}
