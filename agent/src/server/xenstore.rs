//! The server's xenstore side: its registration (`xs_registry::registry`) as an
//! [`Announcer`], and the xenstore vchan rendezvous.
//!
//! Order (DESIGN.md §5): the entry is written with `state = starting` and `ready` last, only
//! once the listeners are bound; on shutdown `state = stopping` is written first, in-flight
//! calls finish, then the entry is removed.

use super::{Announcer, BoxFuture};
use interface::SrId;
use xs_registry::client::Xs;
use xs_registry::registry::{Registered, Registration};

/// A registered agent.
#[derive(Debug, Clone)]
pub struct XsAnnouncer {
    xs: Xs,
    reg: Registered,
}

impl XsAnnouncer {
    /// Registers the agent (`state` ends `ready`).
    pub async fn register(xs: Xs, registration: &Registration) -> xs_registry::Result<Self> {
        let reg = Registered::register(&xs, registration).await?;
        tracing::info!(base = reg.base(), domid = %reg.domid(), "registered in xenstore");
        Ok(XsAnnouncer { xs, reg })
    }

    /// The registry subtree (`/local/domain/<D>/data/ddstor`).
    pub fn base(&self) -> &str {
        self.reg.base()
    }
}

fn srs(v: &[SrId]) -> Vec<String> {
    v.iter().map(|s| s.as_str().to_string()).collect()
}

impl Announcer for XsAnnouncer {
    fn ready<'a>(&'a self, list: &'a [SrId]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.reg
                .update_srs(&srs(list))
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn srs_changed<'a>(&'a self, list: &'a [SrId]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            tracing::debug!(srs = ?list, "publishing SR list");
            self.reg
                .update_srs(&srs(list))
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn heartbeat(&self, load: u64) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.reg
                .set_load(u32::try_from(load).unwrap_or(u32::MAX))
                .await
                .map_err(|e| e.to_string())?;
            self.reg.heartbeat().await.map_err(|e| e.to_string())
        })
    }

    fn stopping(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.xs
                .write(&format!("{}/state", self.reg.base()), "stopping")
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn deregister(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.reg
                .clone()
                .deregister()
                .await
                .map_err(|e| e.to_string())
        })
    }
}
