//! The registry of ddstor agents in xenstore (DESIGN.md §5).
//!
//! An agent in domain D owns `/local/domain/<D>/data/ddstor/`:
//!
//! | key | value |
//! |---|---|
//! | `version` | schema version, [`SCHEMA_VERSION`] |
//! | `agent` | agent name and version, e.g. `ddstor 0.1.0` |
//! | `interfaces` | comma-separated xapi interfaces served (`core,disk_differencing`) |
//! | `vchan-port` | the vchan port name dom0 connects to |
//! | `unix-path` | optional unix socket path (no-Xen set-ups) |
//! | `srs/<sr-uuid>` | one key per SR served (value `1`) |
//! | `load` | active datapaths (decimal) |
//! | `heartbeat` | seconds since the Unix epoch, rewritten every [`HEARTBEAT_INTERVAL`] |
//! | `state` | `starting` → `ready` (written last on start) → `stopping` (written first on stop) |
//!
//! The subtree's permissions are `n<D>`: D owns it, dom0 reads it (privileged), no other domain
//! reads or writes it.
//!
//! **Liveness rule.** An entry counts ([`AgentRecord::live`]) only while (1) its domain
//! exists (`/local/domain/<D>` is removed by the toolstack when a domain dies, which takes
//! the entry with it), (2) `state` is `ready`, and (3) `heartbeat` is no older than
//! [`Registry::stale_after`] (default [`STALE_AFTER`], three missed beats) and not in the
//! future by more than that. A crashed agent in a live domain therefore drops out of
//! `lookup` within `stale_after`.
//!
//! **Hostile entries.** Another domain's subtree is untrusted: values that are not UTF-8,
//! longer than [`MAX_VALUE_LEN`], unparsable, an unknown schema, or missing keys make that
//! entry skipped with a warning; nothing in it is fatal to `list`, `lookup` or `watch`.

use crate::client::{is_eagain, is_enoent, Xs};
use crate::store::Perm;
use crate::{DomId, Error, Result};
use futures::{FutureExt, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{debug, warn};

/// Schema version written to `version`.
pub const SCHEMA_VERSION: u32 = 1;
/// How often a registered agent rewrites `heartbeat`.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// Default age after which a heartbeat is stale.
pub const STALE_AFTER: Duration = Duration::from_secs(30);
/// Longest value accepted from another domain's entry.
pub const MAX_VALUE_LEN: usize = 1024;
/// Concurrent reads while listing.
const READ_CONCURRENCY: usize = 32;

/// The registry subtree of domain `dom`.
pub fn base_path(dom: DomId) -> String {
    format!("/local/domain/{}/data/ddstor", dom.0)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What an agent announces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// Agent name and version, e.g. `ddstor 0.1.0`.
    pub agent: String,
    /// xapi interfaces served.
    pub interfaces: Vec<String>,
    /// vchan port dom0 connects to.
    pub vchan_port: String,
    /// Optional unix socket path.
    pub unix_path: Option<String>,
    /// SR uuids served.
    pub srs: Vec<String>,
    /// Active datapaths.
    pub load: u32,
}

/// Registration state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    /// Writing its entry.
    Starting,
    /// Serving.
    Ready,
    /// Going away.
    Stopping,
}

impl AgentState {
    fn as_str(self) -> &'static str {
        match self {
            AgentState::Starting => "starting",
            AgentState::Ready => "ready",
            AgentState::Stopping => "stopping",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "starting" => Some(AgentState::Starting),
            "ready" => Some(AgentState::Ready),
            "stopping" => Some(AgentState::Stopping),
            _ => None,
        }
    }
}

/// One agent's entry as dom0 reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// The agent's domain.
    pub domid: DomId,
    /// Agent name and version.
    pub agent: String,
    /// Interfaces served.
    pub interfaces: Vec<String>,
    /// vchan port.
    pub vchan_port: String,
    /// Optional unix socket path.
    pub unix_path: Option<String>,
    /// SR uuids served, sorted.
    pub srs: Vec<String>,
    /// Active datapaths.
    pub load: u32,
    /// Registration state.
    pub state: AgentState,
    /// Last heartbeat (seconds since the epoch).
    pub heartbeat: u64,
    /// Whether the liveness rule holds.
    pub live: bool,
    /// Why it is not live, when it is not.
    pub not_live_because: Option<String>,
}

impl AgentRecord {
    /// The address dom0 connects to.
    pub fn addr(&self) -> AgentAddr {
        AgentAddr {
            domid: self.domid,
            vchan_port: self.vchan_port.clone(),
            unix_path: self.unix_path.clone(),
            interfaces: self.interfaces.clone(),
            load: self.load,
        }
    }
}

/// Where to reach an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentAddr {
    /// The agent's domain (the vchan server domain).
    pub domid: DomId,
    /// vchan port.
    pub vchan_port: String,
    /// Unix socket path, where the agent offers one.
    pub unix_path: Option<String>,
    /// Interfaces served.
    pub interfaces: Vec<String>,
    /// Load at lookup time.
    pub load: u32,
}

/// A change seen by [`Registry::watch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegistryEvent {
    /// A live agent appeared (or came back to life).
    Appeared(AgentRecord),
    /// A live agent's entry changed (SRs, load, …).
    Changed(AgentRecord),
    /// An agent left: entry removed, domain gone, stopping, or stale heartbeat.
    Left {
        /// Its domain.
        domid: DomId,
        /// Why.
        reason: String,
    },
}

/// An agent's own registration (agent side, connected as its domain).
#[derive(Debug, Clone)]
pub struct Registered {
    xs: Xs,
    domid: DomId,
    base: String,
}

fn check_key(what: &str, s: &str) -> Result<()> {
    if s.is_empty()
        || s.len() > 128
        || !s
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    {
        return Err(Error::Invalid(format!(
            "{what} {s:?} is not a valid xenstore key (letters, digits, '-', '_'; 1-128 chars)"
        )));
    }
    Ok(())
}

impl Registered {
    /// Registers: learns its domid (relative `domid`, as libxenvchan does), writes the entry
    /// with `state = starting` in one transaction (replacing any stale entry), then writes
    /// `state = ready` last.
    pub async fn register(xs: &Xs, reg: &Registration) -> Result<Registered> {
        for sr in &reg.srs {
            check_key("SR uuid", sr)?;
        }
        let dom_s = xs.read("domid").await?;
        let domid = DomId(dom_s.trim().parse().map_err(|_| {
            Error::Invalid(format!(
                "this domain's xenstore `domid` is {dom_s:?}, not a domain id"
            ))
        })?);
        let base = base_path(domid);
        let me = Registered {
            xs: xs.clone(),
            domid,
            base,
        };
        me.transact(|t, base| {
            let reg = reg.clone();
            async move {
                match t.rm(&base).await {
                    Err(e) if !is_enoent(&e) => return Err(e),
                    _ => {}
                }
                t.mkdir(&base).await?;
                t.set_perms(
                    &base,
                    &[Perm {
                        dom: domid,
                        bits: 0,
                    }],
                )
                .await?;
                let w = |k: &str, v: String| {
                    let p = format!("{base}/{k}");
                    let t = &t;
                    async move { t.write(&p, v.as_bytes()).await }
                };
                w("state", AgentState::Starting.as_str().into()).await?;
                w("version", SCHEMA_VERSION.to_string()).await?;
                w("agent", reg.agent.clone()).await?;
                w("interfaces", reg.interfaces.join(",")).await?;
                w("vchan-port", reg.vchan_port.clone()).await?;
                if let Some(u) = &reg.unix_path {
                    w("unix-path", u.clone()).await?;
                }
                w("load", reg.load.to_string()).await?;
                w("heartbeat", now_secs().to_string()).await?;
                t.mkdir(&format!("{base}/srs")).await?;
                for sr in &reg.srs {
                    w(&format!("srs/{sr}"), "1".into()).await?;
                }
                Ok(t)
            }
        })
        .await?;
        me.xs
            .write(&format!("{}/state", me.base), AgentState::Ready.as_str())
            .await?;
        debug!(dom = %domid, "registered in xenstore");
        Ok(me)
    }

    /// Runs `f` in a transaction, retrying on EAGAIN.
    async fn transact<F, Fut>(&self, f: F) -> Result<()>
    where
        F: Fn(crate::client::Transaction, String) -> Fut,
        Fut: std::future::Future<Output = Result<crate::client::Transaction>>,
    {
        for _ in 0..100 {
            let t = self.xs.transaction().await?;
            let t = f(t, self.base.clone()).await?;
            match t.commit().await {
                Ok(()) => return Ok(()),
                Err(e) if is_eagain(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Invalid(format!(
            "{}: transaction kept conflicting (EAGAIN 100 times)",
            self.base
        )))
    }

    /// The agent's domain.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// The registry subtree.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Replaces the set of SRs served (one transaction).
    pub async fn update_srs(&self, srs: &[String]) -> Result<()> {
        for sr in srs {
            check_key("SR uuid", sr)?;
        }
        let want: BTreeSet<String> = srs.iter().cloned().collect();
        self.transact(|t, base| {
            let want = want.clone();
            async move {
                let dir = format!("{base}/srs");
                let have: BTreeSet<String> = match t.directory(&dir).await {
                    Ok(v) => v.into_iter().collect(),
                    Err(e) if is_enoent(&e) => BTreeSet::new(),
                    Err(e) => return Err(e),
                };
                for gone in have.difference(&want) {
                    t.rm(&format!("{dir}/{gone}")).await?;
                }
                for new in want.difference(&have) {
                    t.write(&format!("{dir}/{new}"), b"1").await?;
                }
                Ok(t)
            }
        })
        .await
    }

    /// Publishes the number of active datapaths.
    pub async fn set_load(&self, load: u32) -> Result<()> {
        self.xs
            .write(&format!("{}/load", self.base), &load.to_string())
            .await
    }

    /// Rewrites `heartbeat` with the current time.
    pub async fn heartbeat(&self) -> Result<()> {
        self.xs
            .write(&format!("{}/heartbeat", self.base), &now_secs().to_string())
            .await
    }

    /// Spawns a task that rewrites `heartbeat` every `every` until aborted.
    pub fn spawn_heartbeat(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Err(e) = me.heartbeat().await {
                    warn!(dom = %me.domid, "xenstore heartbeat failed: {e}");
                }
            }
        })
    }

    /// Deregisters: `state = stopping` first, then the subtree is removed.
    pub async fn deregister(self) -> Result<()> {
        self.xs
            .write(
                &format!("{}/state", self.base),
                AgentState::Stopping.as_str(),
            )
            .await?;
        self.xs.rm(&self.base).await
    }
}

/// dom0's view of the registry.
#[derive(Debug, Clone)]
pub struct Registry {
    xs: Xs,
    /// Age after which a heartbeat is stale.
    pub stale_after: Duration,
}

/// The keys of an entry ([`RawEntry::values`]); `srs/` is listed separately.
pub const ENTRY_KEYS: [&str; 8] = [
    "version",
    "state",
    "agent",
    "interfaces",
    "vchan-port",
    "unix-path",
    "load",
    "heartbeat",
];

/// One entry as read from xenstore: whatever another domain wrote, unchecked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawEntry {
    /// Values by key ([`ENTRY_KEYS`]); a key that does not exist is absent.
    pub values: BTreeMap<String, Vec<u8>>,
    /// Child names of `srs/` (empty when it does not exist).
    pub srs: Vec<String>,
}

/// Checks and parses domain `dom`'s entry at time `now` (Unix seconds), applying the liveness
/// rule with `stale_after`. `Err` says why the entry is skipped. Never panics, whatever the
/// values (the registry fuzz target drives it).
pub fn parse_record(
    dom: DomId,
    raw: &RawEntry,
    now: u64,
    stale_after: Duration,
) -> std::result::Result<AgentRecord, String> {
    let opt = |key: &str| -> std::result::Result<Option<&str>, String> {
        let Some(v) = raw.values.get(key) else {
            return Ok(None);
        };
        if v.len() > MAX_VALUE_LEN {
            return Err(format!(
                "{key} is {} bytes long (max {MAX_VALUE_LEN})",
                v.len()
            ));
        }
        std::str::from_utf8(v)
            .map(Some)
            .map_err(|_| format!("{key} is not UTF-8"))
    };
    let value = |key: &str| opt(key)?.ok_or_else(|| format!("missing key {key}"));
    let version = value("version")?;
    if version.trim() != SCHEMA_VERSION.to_string() {
        return Err(format!("unknown schema version {:?}", truncate(version)));
    }
    let state_s = value("state")?;
    let state = AgentState::parse(state_s).ok_or_else(|| {
        format!(
            "state {:?} is not starting/ready/stopping",
            truncate(state_s)
        )
    })?;
    let agent = value("agent")?.to_string();
    let interfaces: Vec<String> = value("interfaces")?
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let vchan_port = value("vchan-port")?.to_string();
    let unix_path = opt("unix-path")?.map(str::to_string);
    let load_s = value("load")?;
    let load = load_s
        .trim()
        .parse::<u32>()
        .map_err(|_| format!("load {:?} is not a number", truncate(load_s)))?;
    let hb_s = value("heartbeat")?;
    let heartbeat = hb_s
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("heartbeat {:?} is not a number", truncate(hb_s)))?;
    let mut srs = raw.srs.clone();
    srs.sort();
    let stale = stale_after.as_secs();
    let not_live_because = if state != AgentState::Ready {
        Some(format!("state is {}", state.as_str()))
    } else if now.saturating_sub(heartbeat) > stale {
        Some(format!(
            "heartbeat is {} s old (stale after {stale} s)",
            now - heartbeat
        ))
    } else if heartbeat > now.saturating_add(stale) {
        Some(format!("heartbeat is {} s in the future", heartbeat - now))
    } else {
        None
    };
    Ok(AgentRecord {
        domid: dom,
        agent,
        interfaces,
        vchan_port,
        unix_path,
        srs,
        load,
        state,
        heartbeat,
        live: not_live_because.is_none(),
        not_live_because,
    })
}

/// Why an entry was skipped.
#[derive(Debug)]
enum Skip {
    /// Not an agent (no subtree): silent.
    Absent,
    /// Malformed or unreadable: warn.
    Bad(String),
}

impl From<Error> for Skip {
    fn from(e: Error) -> Self {
        Skip::Bad(e.to_string())
    }
}

impl Registry {
    /// A registry reader over `xs` (normally connected as dom0).
    pub fn new(xs: Xs) -> Registry {
        Registry {
            xs,
            stale_after: STALE_AFTER,
        }
    }

    /// Sets the stale-heartbeat age.
    pub fn with_stale_after(mut self, d: Duration) -> Registry {
        self.stale_after = d;
        self
    }

    async fn domains(&self) -> Result<Vec<DomId>> {
        let mut out = Vec::new();
        for d in self.xs.directory("/local/domain").await? {
            match d.parse::<u16>() {
                Ok(n) => out.push(DomId(n)),
                Err(_) => warn!(entry = %d, "ignoring /local/domain entry that is not a domain id"),
            }
        }
        Ok(out)
    }

    /// Reads domain `dom`'s entry as raw values, all keys at once (pipelined).
    async fn raw_entry(&self, dom: DomId) -> Result<RawEntry, Skip> {
        let base = base_path(dom);
        let reads = ENTRY_KEYS.iter().map(|k| {
            let p = format!("{base}/{k}");
            async move { (*k, self.xs.read_bytes(&p).await) }
        });
        let srs_path = format!("{base}/srs");
        let (values, srs) = futures::join!(
            futures::future::join_all(reads),
            self.xs.directory(&srs_path)
        );
        let mut raw = RawEntry::default();
        let mut missing = false;
        for (k, r) in values {
            match r {
                Ok(v) => {
                    raw.values.insert(k.to_string(), v);
                }
                Err(e) if is_enoent(&e) => missing |= k != "unix-path",
                Err(e) => return Err(Skip::Bad(format!("{k}: {e}"))),
            }
        }
        raw.srs = match srs {
            Ok(v) => v,
            Err(e) if is_enoent(&e) => Vec::new(),
            Err(e) => return Err(Skip::Bad(format!("srs: {e}"))),
        };
        if missing {
            // No entry at all, or one removed while we read it (deregistration): not malformed.
            if let Err(e) = self.xs.directory(&base).await {
                if is_enoent(&e) {
                    return Err(Skip::Absent);
                }
            }
        }
        Ok(raw)
    }

    async fn record(&self, dom: DomId) -> Result<AgentRecord, Skip> {
        let raw = self.raw_entry(dom).await?;
        parse_record(dom, &raw, now_secs(), self.stale_after).map_err(Skip::Bad)
    }

    async fn record_or_warn(&self, dom: DomId) -> Option<AgentRecord> {
        match self.record(dom).await {
            Ok(r) => Some(r),
            Err(Skip::Absent) => None,
            Err(Skip::Bad(why)) => {
                warn!(dom = %dom, "skipping malformed registry entry {}: {why}", base_path(dom));
                None
            }
        }
    }

    /// Every registered agent (live or not), by domid. Malformed entries are skipped with a
    /// warning.
    pub async fn list(&self) -> Result<Vec<AgentRecord>> {
        let doms = self.domains().await?;
        let mut out: Vec<AgentRecord> = futures::stream::iter(doms)
            .map(|d| self.record_or_warn(d))
            .buffer_unordered(READ_CONCURRENCY)
            .filter_map(|r| async move { r })
            .collect()
            .await;
        out.sort_by_key(|r| r.domid);
        Ok(out)
    }

    /// The live, ready agent serving `sr` with the least load (ties: lowest domid).
    /// `vm` is accepted for xapi's `load_balancing.lookup` signature; the choice does not
    /// depend on it yet.
    pub async fn lookup(&self, sr: &str, vm: Option<&str>) -> Result<Option<AgentAddr>> {
        check_key("SR uuid", sr)?;
        let _ = vm;
        let doms = self.domains().await?;
        let candidates: Vec<DomId> = futures::stream::iter(doms)
            .map(|d| async move {
                let p = format!("{}/srs/{sr}", base_path(d));
                match self.xs.read_opt(&p).await {
                    Ok(Some(_)) => Some(d),
                    Ok(None) => None,
                    Err(e) => {
                        debug!(dom = %d, "lookup: {p}: {e}");
                        None
                    }
                }
            })
            .buffer_unordered(READ_CONCURRENCY)
            .filter_map(|r| async move { r })
            .collect()
            .await;
        let mut live: Vec<AgentRecord> = futures::stream::iter(candidates)
            .map(|d| self.record_or_warn(d))
            .buffer_unordered(READ_CONCURRENCY)
            .filter_map(|r| async move { r.filter(|r| r.live && r.srs.iter().any(|s| s == sr)) })
            .collect()
            .await;
        live.sort_by_key(|r| (r.load, r.domid));
        Ok(live.first().map(AgentRecord::addr))
    }

    /// A stream of agents appearing, changing and leaving. Starts with `Appeared` for every
    /// live agent. Watches on this registry's own connection (its events are queued without
    /// bound, so the rescans' reads share it), which also works on a xenbus device handle;
    /// heartbeats are re-checked every `stale_after / 3`.
    pub async fn watch(
        &self,
    ) -> Result<impl Stream<Item = RegistryEvent> + Send + Unpin + 'static> {
        let conn = self.xs.clone();
        let mut w_dom = conn.watch("/local/domain").await?;
        let mut w_rel = conn.watch("@releaseDomain").await?;
        let me = Registry {
            xs: conn.clone(),
            stale_after: self.stale_after,
        };
        let (tx, rx) = futures::channel::mpsc::unbounded();
        tokio::spawn(async move {
            let mut known: BTreeMap<DomId, AgentRecord> = BTreeMap::new();
            let mut tick =
                tokio::time::interval((me.stale_after / 3).max(Duration::from_millis(100)));
            loop {
                let mut todo: BTreeSet<DomId> = BTreeSet::new();
                let mut all = false;
                let note = |p: &str, todo: &mut BTreeSet<DomId>, all: &mut bool| match p
                    .strip_prefix("/local/domain/")
                    .map(|r| r.split('/').next().unwrap_or(""))
                {
                    Some(d) => {
                        if let Ok(n) = d.parse::<u16>() {
                            todo.insert(DomId(n));
                        }
                    }
                    None => *all = true,
                };
                tokio::select! {
                    p = w_dom.next() => match p { Some(p) => note(&p, &mut todo, &mut all), None => break },
                    p = w_rel.next() => match p { Some(_) => all = true, None => break },
                    _ = tick.tick() => all = true,
                }
                // Coalesce whatever else is already queued.
                while let Some(Some(p)) = w_dom.next().now_or_never() {
                    note(&p, &mut todo, &mut all);
                }
                while let Some(Some(_)) = w_rel.next().now_or_never() {
                    all = true;
                }
                if all {
                    match me.domains().await {
                        Ok(d) => todo.extend(d),
                        Err(e) => warn!("registry watch: listing /local/domain: {e}"),
                    }
                    todo.extend(known.keys().copied());
                }
                debug!(?todo, all, "registry watch: rescanning");
                for d in todo {
                    let now = me.record_or_warn(d).await;
                    debug!(dom = %d, found = now.is_some(), "registry watch: rescanned");
                    let ev = match (known.get(&d), now) {
                        (None, Some(r)) if r.live => Some(RegistryEvent::Appeared(r)),
                        (Some(old), Some(r)) if r.live => {
                            let changed = old.srs != r.srs
                                || old.load != r.load
                                || old.interfaces != r.interfaces
                                || old.vchan_port != r.vchan_port
                                || old.unix_path != r.unix_path
                                || old.agent != r.agent;
                            changed.then_some(RegistryEvent::Changed(r))
                        }
                        (Some(_), Some(r)) => Some(RegistryEvent::Left {
                            domid: d,
                            reason: r.not_live_because.unwrap_or_default(),
                        }),
                        (Some(_), None) => Some(RegistryEvent::Left {
                            domid: d,
                            reason: "entry removed".into(),
                        }),
                        (None, _) => None,
                    };
                    if let Some(ev) = ev {
                        match &ev {
                            RegistryEvent::Appeared(r) | RegistryEvent::Changed(r) => {
                                known.insert(d, r.clone());
                            }
                            RegistryEvent::Left { .. } => {
                                known.remove(&d);
                            }
                        }
                        if tx.unbounded_send(ev).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(rx)
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(now: u64) -> RawEntry {
        let mut raw = RawEntry::default();
        for (k, v) in [
            ("version", "1".to_string()),
            ("state", "ready".into()),
            ("agent", "ddstor 0.1.0".into()),
            ("interfaces", "core,disk_differencing".into()),
            ("vchan-port", "ddstor".into()),
            ("load", "3".into()),
            ("heartbeat", now.to_string()),
        ] {
            raw.values.insert(k.into(), v.into_bytes());
        }
        raw.srs = vec!["sr-b".into(), "sr-a".into()];
        raw
    }

    #[test]
    fn a_well_formed_entry_parses_live_with_sorted_srs() {
        let r = parse_record(DomId(4), &entry(1000), 1005, STALE_AFTER).unwrap();
        assert!(r.live, "{:?}", r.not_live_because);
        assert_eq!(r.srs, ["sr-a", "sr-b"]);
        assert_eq!((r.load, r.unix_path.as_deref()), (3, None));
        assert_eq!(r.interfaces, ["core", "disk_differencing"]);
    }

    #[test]
    fn hostile_values_are_reasons_to_skip() {
        let bad = |k: &str, v: Option<&[u8]>| {
            let mut raw = entry(1000);
            match v {
                Some(v) => raw.values.insert(k.into(), v.to_vec()),
                None => raw.values.remove(k),
            };
            parse_record(DomId(4), &raw, 1000, STALE_AFTER).unwrap_err()
        };
        assert_eq!(bad("vchan-port", None), "missing key vchan-port");
        assert_eq!(bad("state", Some(b"\xff\xfe")), "state is not UTF-8");
        assert!(bad("agent", Some(&[b'x'; 3000])).contains("3000 bytes"));
        assert!(bad("load", Some(b"-1")).contains("not a number"));
        assert!(bad("version", Some(b"2")).contains("schema"));
        assert!(bad("state", Some(b"running")).contains("starting/ready/stopping"));
    }

    #[test]
    fn stale_and_future_heartbeats_are_not_live() {
        let old = parse_record(DomId(4), &entry(1000), 1031, STALE_AFTER).unwrap();
        assert!(!old.live && old.not_live_because.unwrap().contains("31 s old"));
        let future = parse_record(DomId(4), &entry(2000), 1000, STALE_AFTER).unwrap();
        assert!(future.not_live_because.unwrap().contains("in the future"));
    }

    /// Regression: a huge `stale_after` (e.g. `ddstor xs list --stale-after` with u64::MAX)
    /// overflowed `now + stale` in the future-heartbeat check (the `registry_record` fuzz
    /// target finds it within seconds when overflow checks are on).
    #[test]
    fn huge_stale_after_and_heartbeat_do_not_overflow() {
        let r = parse_record(DomId(4), &entry(u64::MAX), 1000, Duration::MAX).unwrap();
        assert!(r.live);
        let r = parse_record(DomId(4), &entry(u64::MAX), u64::MAX, Duration::ZERO).unwrap();
        assert!(r.live);
    }
}
