//! The test xenstored's data model: a tree of nodes with values and permissions, transactions
//! with isolation (a commit that conflicts with a change made since the transaction read or
//! wrote a node answers EAGAIN), and the permission rules of C xenstored:
//!
//! * the first permission entry names the owner and the default for every domain not listed;
//! * the owner and dom0 (privileged) may do everything;
//! * a new node inherits its parent's permissions, except that a node an unprivileged domain
//!   creates is owned by that domain;
//! * a caller that may not read (or write) a node's nearest existing ancestor learns EACCES,
//!   not whether the node exists.
//!
//! Pure and synchronous: the server ([`crate::server`]) wraps it in a lock and routes the
//! [`Event`]s it returns to watches.

use crate::wire::{XsErrno, ABS_PATH_MAX, REL_PATH_MAX};
use crate::DomId;
use std::collections::{BTreeSet, HashMap};

/// Permission bit: read.
pub const PERM_READ: u8 = 1;
/// Permission bit: write.
pub const PERM_WRITE: u8 = 2;
/// Permission bit (computed, never stored): owner.
pub const PERM_OWNER: u8 = 4;

/// One permission entry: a domain and what it may do (`n`, `r`, `w`, `b`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perm {
    /// The domain this entry is about.
    pub dom: DomId,
    /// [`PERM_READ`] | [`PERM_WRITE`].
    pub bits: u8,
}

impl Perm {
    /// Parses the wire form: a letter (`n` none, `r` read, `w` write, `b` both) and a decimal domid.
    pub fn parse(s: &[u8]) -> Option<Perm> {
        let (&c, rest) = s.split_first()?;
        let bits = match c {
            b'n' => 0,
            b'r' => PERM_READ,
            b'w' => PERM_WRITE,
            b'b' => PERM_READ | PERM_WRITE,
            _ => return None,
        };
        if rest.is_empty() || !rest.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let dom: u16 = std::str::from_utf8(rest).ok()?.parse().ok()?;
        Some(Perm {
            dom: DomId(dom),
            bits,
        })
    }

    /// The wire form, e.g. `r0`.
    pub fn to_wire(&self) -> String {
        let c = match self.bits & (PERM_READ | PERM_WRITE) {
            0 => 'n',
            PERM_READ => 'r',
            PERM_WRITE => 'w',
            _ => 'b',
        };
        format!("{c}{}", self.dom.0)
    }
}

/// What `perms` grant `caller`: dom0 and the owner get everything, a listed domain its entry,
/// anyone else the first entry's bits.
pub fn perm_for(caller: DomId, perms: &[Perm]) -> u8 {
    let Some(owner) = perms.first() else { return 0 };
    if caller.is_privileged() || owner.dom == caller {
        return PERM_READ | PERM_WRITE | PERM_OWNER;
    }
    perms[1..]
        .iter()
        .find(|p| p.dom == caller)
        .map_or(owner.bits, |p| p.bits)
}

/// A node of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Raw value bytes (may be empty, need not be UTF-8).
    pub value: Vec<u8>,
    /// Permissions; never empty.
    pub perms: Vec<Perm>,
    /// Child names.
    pub children: BTreeSet<String>,
    /// Generation of the last change (for transaction conflict detection).
    pub gen: u64,
}

/// A change that watches may need to hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Absolute path (or special name such as `@releaseDomain`) that changed.
    pub path: String,
    /// Only watches on exactly this path fire (descendants of a removed node); otherwise every
    /// watch on the path or one of its ancestors fires.
    pub exact: bool,
    /// The node's permissions (a watcher must be able to read it to hear the event).
    pub perms: Vec<Perm>,
}

/// Limits that protect the server from one domain's excess (C xenstored's quotas).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Nodes an unprivileged domain may own.
    pub max_nodes_per_domain: usize,
    /// Watches one connection may hold.
    pub max_watches_per_conn: usize,
    /// Transactions one connection may have open.
    pub max_transactions_per_conn: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_nodes_per_domain: 1000,
            max_watches_per_conn: 128,
            max_transactions_per_conn: 10,
        }
    }
}

/// Identifies a connection (for transaction ownership).
pub type ConnId = u64;

#[derive(Debug)]
struct Tx {
    conn: ConnId,
    overlay: HashMap<String, Option<Node>>,
    accessed: HashMap<String, Option<u64>>,
    events: Vec<Event>,
}

/// Special watch paths and their permission nodes.
pub const SPECIAL_PATHS: [&str; 2] = ["@introduceDomain", "@releaseDomain"];

/// The whole store.
#[derive(Debug)]
pub struct Store {
    nodes: HashMap<String, Node>,
    gen: u64,
    specials: HashMap<String, Vec<Perm>>,
    txs: HashMap<u32, Tx>,
    next_tx: u32,
    introduced: BTreeSet<DomId>,
    /// Limits in force.
    pub limits: Limits,
}

/// The parent of an absolute path (`/` for top-level nodes).
pub fn parent_of(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) => "/",
        Some(i) => &path[..i],
        None => "/",
    }
}

fn base_name(path: &str) -> &str {
    &path[path.rfind('/').map_or(0, |i| i + 1)..]
}

/// Whether `path` is `ancestor` or below it.
pub fn is_child(path: &str, ancestor: &str) -> bool {
    if ancestor == "/" {
        return path.starts_with('/');
    }
    path == ancestor
        || (path.len() > ancestor.len()
            && path.starts_with(ancestor)
            && path.as_bytes()[ancestor.len()] == b'/')
}

/// `/local/domain/<N>`.
pub fn domain_path(dom: DomId) -> String {
    format!("/local/domain/{}", dom.0)
}

/// Turns a request's path into an absolute path (relative paths are under the caller's domain
/// path), validating characters (`[A-Za-z0-9-/_@]`), separators and length as C xenstored does.
/// Special `@…` names are accepted only when `allow_special`.
pub fn canonicalize(caller: DomId, raw: &[u8], allow_special: bool) -> Result<String, XsErrno> {
    let s = std::str::from_utf8(raw).map_err(|_| XsErrno::EINVAL)?;
    if s.is_empty() {
        return Err(XsErrno::EINVAL);
    }
    let valid = |p: &str| {
        p.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-/_@".contains(&c))
            && !p.contains("//")
            && (p == "/" || !p.ends_with('/'))
    };
    if s.starts_with('@') {
        if !allow_special || !valid(s) || s.contains('/') {
            return Err(XsErrno::EINVAL);
        }
        return Ok(s.to_string());
    }
    let abs = if s.starts_with('/') {
        if s.len() > ABS_PATH_MAX {
            return Err(XsErrno::E2BIG);
        }
        s.to_string()
    } else {
        if s.len() > REL_PATH_MAX {
            return Err(XsErrno::E2BIG);
        }
        format!("{}/{s}", domain_path(caller))
    };
    if !valid(&abs) {
        return Err(XsErrno::EINVAL);
    }
    Ok(abs)
}

/// A read/write view of the store: the live tree, or a transaction's overlay on it.
struct View<'a> {
    nodes: &'a mut HashMap<String, Node>,
    gen: &'a mut u64,
    tx: Option<&'a mut Tx>,
    events: Vec<Event>,
}

impl View<'_> {
    fn get(&mut self, p: &str) -> Option<&Node> {
        if let Some(tx) = self.tx.as_deref_mut() {
            if !tx.overlay.contains_key(p) && !tx.accessed.contains_key(p) {
                tx.accessed
                    .insert(p.to_string(), self.nodes.get(p).map(|n| n.gen));
            }
        }
        if let Some(tx) = self.tx.as_deref() {
            if let Some(o) = tx.overlay.get(p) {
                return o.as_ref();
            }
        }
        self.nodes.get(p)
    }

    fn put(&mut self, p: &str, mut node: Node) {
        self.get(p);
        match self.tx.as_deref_mut() {
            Some(tx) => {
                tx.overlay.insert(p.to_string(), Some(node));
            }
            None => {
                *self.gen += 1;
                node.gen = *self.gen;
                self.nodes.insert(p.to_string(), node);
            }
        }
    }

    fn del(&mut self, p: &str) {
        self.get(p);
        match self.tx.as_deref_mut() {
            Some(tx) => {
                tx.overlay.insert(p.to_string(), None);
            }
            None => {
                self.nodes.remove(p);
            }
        }
    }

    fn event(&mut self, path: &str, exact: bool, perms: &[Perm]) {
        self.events.push(Event {
            path: path.to_string(),
            exact,
            perms: perms.to_vec(),
        });
    }

    /// The error for a node that does not exist: EACCES when the caller lacks `want` on the
    /// nearest existing ancestor (so existence is not revealed), otherwise ENOENT.
    fn errno_from_parents(&mut self, caller: DomId, path: &str, want: u8) -> XsErrno {
        let mut p = path;
        while p != "/" {
            p = parent_of(p);
            if let Some(n) = self.get(p) {
                return if perm_for(caller, &n.perms) & want == want {
                    XsErrno::ENOENT
                } else {
                    XsErrno::EACCES
                };
            }
        }
        XsErrno::ENOENT
    }

    fn node_checked(&mut self, caller: DomId, path: &str, want: u8) -> Result<Node, XsErrno> {
        match self.get(path) {
            Some(n) if perm_for(caller, &n.perms) & want == want => Ok(n.clone()),
            Some(_) => Err(XsErrno::EACCES),
            None => Err(self.errno_from_parents(caller, path, want)),
        }
    }

    fn create(
        &mut self,
        caller: DomId,
        path: &str,
        value: &[u8],
        limits: &Limits,
    ) -> Result<(), XsErrno> {
        // Nearest existing ancestor and the components to create below it.
        let mut missing = vec![path.to_string()];
        let mut anc = parent_of(path).to_string();
        while self.get(&anc).is_none() {
            missing.push(anc.clone());
            anc = parent_of(&anc).to_string();
        }
        let parent = self.get(&anc).cloned().ok_or(XsErrno::ENOENT)?;
        if perm_for(caller, &parent.perms) & PERM_WRITE == 0 {
            return Err(XsErrno::EACCES);
        }
        if !caller.is_privileged() {
            let owned = self
                .nodes
                .values()
                .filter(|n| n.perms[0].dom == caller)
                .count();
            let pending = self.tx.as_deref().map_or(0, |t| {
                t.overlay
                    .values()
                    .flatten()
                    .filter(|n| n.perms[0].dom == caller)
                    .count()
            });
            if owned + pending + missing.len() > limits.max_nodes_per_domain {
                return Err(XsErrno::ENOSPC);
            }
        }
        let mut parent_path = anc;
        let mut parent = parent;
        for p in missing.iter().rev() {
            let mut perms = parent.perms.clone();
            if !caller.is_privileged() {
                perms[0].dom = caller;
            }
            parent.children.insert(base_name(p).to_string());
            self.put(&parent_path, parent);
            let node = Node {
                value: if p == path {
                    value.to_vec()
                } else {
                    Vec::new()
                },
                perms,
                children: BTreeSet::new(),
                gen: 0,
            };
            parent_path = p.clone();
            parent = node;
        }
        let perms = parent.perms.clone();
        self.put(&parent_path, parent);
        self.event(path, false, &perms);
        Ok(())
    }

    fn write(
        &mut self,
        caller: DomId,
        path: &str,
        value: &[u8],
        l: &Limits,
    ) -> Result<(), XsErrno> {
        match self.get(path).cloned() {
            Some(mut n) => {
                if perm_for(caller, &n.perms) & PERM_WRITE == 0 {
                    return Err(XsErrno::EACCES);
                }
                n.value = value.to_vec();
                let perms = n.perms.clone();
                self.put(path, n);
                self.event(path, false, &perms);
                Ok(())
            }
            None => {
                let e = self.errno_from_parents(caller, path, PERM_WRITE);
                if e == XsErrno::EACCES {
                    return Err(e);
                }
                self.create(caller, path, value, l)
            }
        }
    }

    fn mkdir(&mut self, caller: DomId, path: &str, l: &Limits) -> Result<(), XsErrno> {
        match self.get(path) {
            Some(n) if perm_for(caller, &n.perms) & PERM_WRITE != 0 => Ok(()),
            Some(_) => Err(XsErrno::EACCES),
            None => {
                let e = self.errno_from_parents(caller, path, PERM_WRITE);
                if e == XsErrno::EACCES {
                    return Err(e);
                }
                self.create(caller, path, b"", l)
            }
        }
    }

    fn rm(&mut self, caller: DomId, path: &str) -> Result<(), XsErrno> {
        if path == "/" {
            return Err(XsErrno::EINVAL);
        }
        let Some(node) = self.get(path).cloned() else {
            // Removing what is not there is fine if its parent exists.
            let e = self.errno_from_parents(caller, path, PERM_WRITE);
            if e == XsErrno::EACCES {
                return Err(e);
            }
            return if self.get(parent_of(path)).is_some() {
                Ok(())
            } else {
                Err(XsErrno::ENOENT)
            };
        };
        if perm_for(caller, &node.perms) & PERM_WRITE == 0 {
            return Err(XsErrno::EACCES);
        }
        self.event(path, false, &node.perms);
        let mut stack: Vec<(String, Node)> = vec![(path.to_string(), node)];
        while let Some((p, n)) = stack.pop() {
            for c in &n.children {
                let cp = format!("{p}/{c}");
                if let Some(cn) = self.get(&cp).cloned() {
                    self.event(&cp, true, &cn.perms);
                    stack.push((cp, cn));
                }
            }
            self.del(&p);
        }
        let pp = parent_of(path).to_string();
        if let Some(mut parent) = self.get(&pp).cloned() {
            parent.children.remove(base_name(path));
            self.put(&pp, parent);
        }
        Ok(())
    }

    fn set_perms(&mut self, caller: DomId, path: &str, perms: Vec<Perm>) -> Result<(), XsErrno> {
        let mut n = self.node_checked(caller, path, PERM_WRITE | PERM_OWNER)?;
        if !caller.is_privileged() && perms[0].dom != n.perms[0].dom {
            return Err(XsErrno::EPERM);
        }
        n.perms = perms;
        let p = n.perms.clone();
        self.put(path, n);
        self.event(path, false, &p);
        Ok(())
    }
}

/// Answer of a store operation that succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `OK`.
    Ack,
    /// Raw bytes (READ).
    Bytes(Vec<u8>),
    /// NUL-terminated strings (DIRECTORY, GET_PERMS…).
    Strings(Vec<String>),
}

impl Store {
    /// A store as a freshly started xenstored plus what `xen-init-dom0` writes:
    /// `/local/domain/0/{domid,name}`, all owned by dom0 and readable by nobody else.
    pub fn new(dom0_name: &str, limits: Limits) -> Store {
        let mut s = Store {
            nodes: HashMap::new(),
            gen: 0,
            specials: SPECIAL_PATHS
                .iter()
                .map(|p| (p.to_string(), vec![n0()]))
                .collect(),
            txs: HashMap::new(),
            next_tx: 1,
            introduced: BTreeSet::new(),
            limits,
        };
        s.nodes.insert(
            "/".into(),
            Node {
                value: vec![],
                perms: vec![n0()],
                children: BTreeSet::new(),
                gen: 0,
            },
        );
        let d0 = DomId(0);
        for (p, v) in [
            ("/tool/xenstored", ""),
            ("/local/domain/0/domid", "0"),
            ("/local/domain/0/name", dom0_name),
        ] {
            s.op(d0, 0, |v_, l| v_.write(d0, p, v.as_bytes(), l))
                .expect("initial tree");
        }
        s
    }

    fn view_for(&mut self, caller: ConnId, tx: u32) -> Result<View<'_>, XsErrno> {
        let tx = if tx == 0 {
            None
        } else {
            match self.txs.get_mut(&tx) {
                Some(t) if t.conn == caller => Some(t),
                _ => return Err(XsErrno::ENOENT),
            }
        };
        Ok(View {
            nodes: &mut self.nodes,
            gen: &mut self.gen,
            tx,
            events: Vec::new(),
        })
    }

    /// Runs one node operation for `conn` acting as `dom`, inside transaction `tx` (0: none).
    /// Returns the events to deliver now (none inside a transaction: those wait for the commit).
    fn op<T>(
        &mut self,
        dom: DomId,
        tx: u32,
        f: impl FnOnce(&mut View<'_>, &Limits) -> Result<T, XsErrno>,
    ) -> Result<(T, Vec<Event>), XsErrno> {
        self.op_conn(0, dom, tx, f)
    }

    fn op_conn<T>(
        &mut self,
        conn: ConnId,
        _dom: DomId,
        tx: u32,
        f: impl FnOnce(&mut View<'_>, &Limits) -> Result<T, XsErrno>,
    ) -> Result<(T, Vec<Event>), XsErrno> {
        let limits = self.limits.clone();
        let mut v = self.view_for(conn, tx)?;
        let r = f(&mut v, &limits)?;
        let events = std::mem::take(&mut v.events);
        match v.tx {
            Some(t) => {
                t.events.extend(events);
                Ok((r, Vec::new()))
            }
            None => Ok((r, events)),
        }
    }

    /// READ.
    pub fn read(
        &mut self,
        conn: ConnId,
        dom: DomId,
        tx: u32,
        path: &str,
    ) -> Result<Vec<u8>, XsErrno> {
        self.op_conn(conn, dom, tx, |v, _| {
            v.node_checked(dom, path, PERM_READ).map(|n| n.value)
        })
        .map(|r| r.0)
    }

    /// WRITE (creates missing ancestors).
    pub fn write(
        &mut self,
        conn: ConnId,
        dom: DomId,
        tx: u32,
        path: &str,
        value: &[u8],
    ) -> Result<Vec<Event>, XsErrno> {
        self.op_conn(conn, dom, tx, |v, l| v.write(dom, path, value, l))
            .map(|r| r.1)
    }

    /// MKDIR (an existing node is fine).
    pub fn mkdir(
        &mut self,
        conn: ConnId,
        dom: DomId,
        tx: u32,
        path: &str,
    ) -> Result<Vec<Event>, XsErrno> {
        self.op_conn(conn, dom, tx, |v, l| v.mkdir(dom, path, l))
            .map(|r| r.1)
    }

    /// RM (recursive; a missing node whose parent exists is fine).
    pub fn rm(
        &mut self,
        conn: ConnId,
        dom: DomId,
        tx: u32,
        path: &str,
    ) -> Result<Vec<Event>, XsErrno> {
        self.op_conn(conn, dom, tx, |v, _| v.rm(dom, path))
            .map(|r| r.1)
    }

    /// DIRECTORY: child names, sorted.
    pub fn directory(
        &mut self,
        conn: ConnId,
        dom: DomId,
        tx: u32,
        path: &str,
    ) -> Result<Vec<String>, XsErrno> {
        self.op_conn(conn, dom, tx, |v, _| {
            v.node_checked(dom, path, PERM_READ)
                .map(|n| n.children.into_iter().collect())
        })
        .map(|r| r.0)
    }

    /// DIRECTORY of a node together with its generation (for DIRECTORY_PART).
    pub fn directory_gen(
        &mut self,
        conn: ConnId,
        dom: DomId,
        tx: u32,
        path: &str,
    ) -> Result<(u64, Vec<String>), XsErrno> {
        self.op_conn(conn, dom, tx, |v, _| {
            v.node_checked(dom, path, PERM_READ)
                .map(|n| (n.gen, n.children.into_iter().collect()))
        })
        .map(|r| r.0)
    }

    /// GET_PERMS (special paths included).
    pub fn get_perms(
        &mut self,
        conn: ConnId,
        dom: DomId,
        tx: u32,
        path: &str,
    ) -> Result<Vec<Perm>, XsErrno> {
        if let Some(p) = self.specials.get(path) {
            return if perm_for(dom, p) & PERM_READ != 0 {
                Ok(p.clone())
            } else {
                Err(XsErrno::EACCES)
            };
        }
        self.op_conn(conn, dom, tx, |v, _| {
            v.node_checked(dom, path, PERM_READ).map(|n| n.perms)
        })
        .map(|r| r.0)
    }

    /// SET_PERMS: owner or dom0 only; an unprivileged owner may not give the node away.
    pub fn set_perms(
        &mut self,
        conn: ConnId,
        dom: DomId,
        tx: u32,
        path: &str,
        perms: Vec<Perm>,
    ) -> Result<Vec<Event>, XsErrno> {
        if perms.is_empty() {
            return Err(XsErrno::EINVAL);
        }
        if let Some(p) = self.specials.get_mut(path) {
            if perm_for(dom, p) & (PERM_WRITE | PERM_OWNER) != PERM_WRITE | PERM_OWNER {
                return Err(XsErrno::EACCES);
            }
            if !dom.is_privileged() && perms[0].dom != p[0].dom {
                return Err(XsErrno::EPERM);
            }
            *p = perms;
            return Ok(Vec::new());
        }
        self.op_conn(conn, dom, tx, |v, _| v.set_perms(dom, path, perms))
            .map(|r| r.1)
    }

    /// TRANSACTION_START: a new transaction id for `conn`.
    pub fn tx_start(&mut self, conn: ConnId) -> Result<u32, XsErrno> {
        let open = self.txs.values().filter(|t| t.conn == conn).count();
        if open >= self.limits.max_transactions_per_conn {
            return Err(XsErrno::ENOSPC);
        }
        let mut id = self.next_tx;
        while id == 0 || self.txs.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_tx = id.wrapping_add(1);
        self.txs.insert(
            id,
            Tx {
                conn,
                overlay: HashMap::new(),
                accessed: HashMap::new(),
                events: Vec::new(),
            },
        );
        Ok(id)
    }

    /// TRANSACTION_END: commit (EAGAIN when anything it read or wrote changed meanwhile) or
    /// abort. Returns the events of a successful commit.
    pub fn tx_end(&mut self, conn: ConnId, tx: u32, commit: bool) -> Result<Vec<Event>, XsErrno> {
        match self.txs.get(&tx) {
            Some(t) if t.conn == conn => {}
            _ => return Err(XsErrno::ENOENT),
        }
        let t = self.txs.remove(&tx).expect("checked");
        if !commit {
            return Ok(Vec::new());
        }
        for (p, g) in &t.accessed {
            if self.nodes.get(p).map(|n| n.gen) != *g {
                return Err(XsErrno::EAGAIN);
            }
        }
        if !self.nodes.contains_key("/") {
            return Err(XsErrno::EAGAIN);
        }
        for (p, o) in t.overlay {
            match o {
                Some(mut n) => {
                    self.gen += 1;
                    n.gen = self.gen;
                    self.nodes.insert(p, n);
                }
                None => {
                    self.nodes.remove(&p);
                }
            }
        }
        Ok(t.events)
    }

    /// Drops every transaction of a closed connection.
    pub fn drop_conn(&mut self, conn: ConnId) {
        self.txs.retain(|_, t| t.conn != conn);
    }

    /// Whether `dom` is dom0 or was introduced and not released.
    pub fn is_introduced(&self, dom: DomId) -> bool {
        dom.is_privileged() || self.introduced.contains(&dom)
    }

    /// Introduces a domain as the toolstack would: `/local/domain/<N>` (owned by dom0,
    /// readable by N) with `domid`, `name` and a `data/` directory N owns; fires
    /// `@introduceDomain`. Re-introducing is a no-op.
    pub fn introduce(&mut self, dom: DomId, name: &str) -> Result<Vec<Event>, XsErrno> {
        if dom.is_privileged() || !self.introduced.insert(dom) {
            return Ok(Vec::new());
        }
        let d0 = DomId(0);
        let base = domain_path(dom);
        let ro = vec![
            n0(),
            Perm {
                dom,
                bits: PERM_READ,
            },
        ];
        let rw = vec![Perm { dom, bits: 0 }];
        let (_, mut ev) = self.op(d0, 0, |v, l| {
            v.rm(d0, &base)?;
            v.write(d0, &base, b"", l)?;
            v.set_perms(d0, &base, ro.clone())?;
            v.write(
                d0,
                &format!("{base}/domid"),
                dom.0.to_string().as_bytes(),
                l,
            )?;
            v.write(d0, &format!("{base}/name"), name.as_bytes(), l)?;
            v.mkdir(d0, &format!("{base}/data"), l)?;
            v.set_perms(d0, &format!("{base}/data"), rw.clone())
        })?;
        ev.push(Event {
            path: "@introduceDomain".into(),
            exact: true,
            perms: self.specials["@introduceDomain"].clone(),
        });
        Ok(ev)
    }

    /// Releases a domain: removes `/local/domain/<N>` (as the toolstack does when a domain
    /// dies) and fires `@releaseDomain`. ENOENT when it was not introduced.
    pub fn release(&mut self, dom: DomId) -> Result<Vec<Event>, XsErrno> {
        if !self.introduced.remove(&dom) {
            return Err(XsErrno::ENOENT);
        }
        let d0 = DomId(0);
        let (_, mut ev) = self.op(d0, 0, |v, _| v.rm(d0, &domain_path(dom)))?;
        ev.push(Event {
            path: "@releaseDomain".into(),
            exact: true,
            perms: self.specials["@releaseDomain"].clone(),
        });
        Ok(ev)
    }

    /// Number of nodes (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the store is empty (it never is: `/` exists).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

fn n0() -> Perm {
    Perm {
        dom: DomId(0),
        bits: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D0: DomId = DomId(0);
    const D5: DomId = DomId(5);
    const D7: DomId = DomId(7);

    fn store() -> Store {
        let mut s = Store::new("Domain-0", Limits::default());
        s.introduce(D5, "drv").unwrap();
        s.introduce(D7, "evil").unwrap();
        s
    }

    #[test]
    fn dom0_tree_is_populated() {
        let mut s = store();
        assert_eq!(s.read(1, D0, 0, "/local/domain/0/domid").unwrap(), b"0");
        assert_eq!(s.read(1, D5, 0, "/local/domain/5/domid").unwrap(), b"5");
    }

    #[test]
    fn relative_paths_resolve_under_the_callers_domain() {
        assert_eq!(
            canonicalize(D5, b"data/x", false).unwrap(),
            "/local/domain/5/data/x"
        );
        assert_eq!(canonicalize(D5, b"/a//b", false), Err(XsErrno::EINVAL));
        assert_eq!(canonicalize(D5, b"/a/", false), Err(XsErrno::EINVAL));
        assert_eq!(canonicalize(D5, b"/a b", false), Err(XsErrno::EINVAL));
        assert_eq!(
            canonicalize(D5, b"@releaseDomain", false),
            Err(XsErrno::EINVAL)
        );
        assert!(canonicalize(D5, b"@releaseDomain", true).is_ok());
    }

    #[test]
    fn domain_owns_what_it_creates_and_others_cannot_read() {
        let mut s = store();
        s.write(1, D5, 0, "/local/domain/5/data/x", b"v").unwrap();
        assert_eq!(
            s.get_perms(1, D5, 0, "/local/domain/5/data/x").unwrap()[0].dom,
            D5
        );
        assert_eq!(
            s.read(2, D7, 0, "/local/domain/5/data/x"),
            Err(XsErrno::EACCES)
        );
        assert_eq!(
            s.read(2, D7, 0, "/local/domain/5/data/nope"),
            Err(XsErrno::EACCES)
        );
        assert_eq!(
            s.write(2, D7, 0, "/local/domain/5/data/x", b"w"),
            Err(XsErrno::EACCES)
        );
        assert_eq!(s.read(3, D0, 0, "/local/domain/5/data/x").unwrap(), b"v");
        assert_eq!(
            s.write(1, D5, 0, "/local/domain/7/data/y", b"w"),
            Err(XsErrno::EACCES)
        );
        assert_eq!(s.write(1, D5, 0, "/elsewhere", b"w"), Err(XsErrno::EACCES));
        assert_eq!(
            s.write(1, D5, 0, "/local/domain/5/name", b"w"),
            Err(XsErrno::EACCES)
        );
    }

    #[test]
    fn set_perms_rules() {
        let mut s = store();
        s.write(1, D5, 0, "/local/domain/5/data/x", b"v").unwrap();
        let p = vec![
            Perm { dom: D5, bits: 0 },
            Perm {
                dom: D7,
                bits: PERM_READ,
            },
        ];
        s.set_perms(1, D5, 0, "/local/domain/5/data/x", p).unwrap();
        assert_eq!(s.read(2, D7, 0, "/local/domain/5/data/x").unwrap(), b"v");
        let give = vec![Perm { dom: D7, bits: 0 }];
        assert_eq!(
            s.set_perms(1, D5, 0, "/local/domain/5/data/x", give),
            Err(XsErrno::EPERM)
        );
        let steal = vec![Perm { dom: D7, bits: 0 }];
        assert_eq!(
            s.set_perms(2, D7, 0, "/local/domain/5/data/x", steal),
            Err(XsErrno::EACCES)
        );
    }

    #[test]
    fn rm_missing_node_with_parent_is_ok_and_root_is_einval() {
        let mut s = store();
        assert!(s.rm(1, D0, 0, "/local/nope").is_ok());
        assert_eq!(s.rm(1, D0, 0, "/nope/deeper"), Err(XsErrno::ENOENT));
        assert_eq!(s.rm(1, D0, 0, "/"), Err(XsErrno::EINVAL));
    }

    #[test]
    fn rm_is_recursive_and_reports_descendants() {
        let mut s = store();
        s.write(1, D0, 0, "/a/b/c", b"1").unwrap();
        let ev = s.rm(1, D0, 0, "/a").unwrap();
        assert!(ev.iter().any(|e| e.path == "/a" && !e.exact));
        assert!(ev.iter().any(|e| e.path == "/a/b/c" && e.exact));
        assert_eq!(s.read(1, D0, 0, "/a/b"), Err(XsErrno::ENOENT));
        assert!(!s
            .directory(1, D0, 0, "/")
            .unwrap()
            .contains(&"a".to_string()));
    }

    #[test]
    fn transaction_is_isolated_and_conflict_answers_eagain() {
        let mut s = store();
        s.write(1, D0, 0, "/k", b"0").unwrap();
        let t = s.tx_start(1).unwrap();
        assert_eq!(s.read(1, D0, t, "/k").unwrap(), b"0");
        s.write(1, D0, t, "/k", b"1").unwrap();
        assert_eq!(
            s.read(2, D0, 0, "/k").unwrap(),
            b"0",
            "uncommitted write invisible"
        );
        assert_eq!(
            s.read(2, D0, t, "/k"),
            Err(XsErrno::ENOENT),
            "tx of another connection"
        );
        s.write(2, D0, 0, "/k", b"2").unwrap();
        assert_eq!(s.tx_end(1, t, true), Err(XsErrno::EAGAIN));
        assert_eq!(s.read(1, D0, 0, "/k").unwrap(), b"2");
        let t = s.tx_start(1).unwrap();
        s.write(1, D0, t, "/k", b"3").unwrap();
        s.write(1, D0, t, "/new/deep", b"x").unwrap();
        let ev = s.tx_end(1, t, true).unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!(s.read(2, D0, 0, "/k").unwrap(), b"3");
        assert_eq!(s.read(2, D0, 0, "/new/deep").unwrap(), b"x");
    }

    #[test]
    fn transactions_on_disjoint_nodes_both_commit() {
        let mut s = store();
        let a = s.tx_start(1).unwrap();
        let b = s.tx_start(2).unwrap();
        s.write(1, D5, a, "/local/domain/5/data/a", b"1").unwrap();
        s.write(2, D7, b, "/local/domain/7/data/b", b"1").unwrap();
        s.tx_end(1, a, true).unwrap();
        s.tx_end(2, b, true).unwrap();
    }

    #[test]
    fn aborted_transaction_leaves_no_trace() {
        let mut s = store();
        let t = s.tx_start(1).unwrap();
        s.write(1, D0, t, "/gone", b"1").unwrap();
        s.tx_end(1, t, false).unwrap();
        assert_eq!(s.read(1, D0, 0, "/gone"), Err(XsErrno::ENOENT));
    }

    #[test]
    fn node_quota_answers_enospc() {
        let mut s = Store::new(
            "d0",
            Limits {
                max_nodes_per_domain: 5,
                ..Limits::default()
            },
        );
        s.introduce(D5, "x").unwrap();
        let mut res = Ok(Vec::new());
        for i in 0..10 {
            res = s.write(1, D5, 0, &format!("/local/domain/5/data/k{i}"), b"v");
            if res.is_err() {
                break;
            }
        }
        assert_eq!(res, Err(XsErrno::ENOSPC));
    }

    #[test]
    fn release_removes_domain_tree() {
        let mut s = store();
        let ev = s.release(D5).unwrap();
        assert!(ev.iter().any(|e| e.path == "@releaseDomain"));
        assert_eq!(
            s.read(1, D0, 0, "/local/domain/5/domid"),
            Err(XsErrno::ENOENT)
        );
        assert_eq!(s.release(D5), Err(XsErrno::ENOENT));
    }

    #[test]
    fn perm_strings_parse() {
        assert_eq!(
            Perm::parse(b"r0"),
            Some(Perm {
                dom: D0,
                bits: PERM_READ
            })
        );
        assert_eq!(Perm::parse(b"b12").unwrap().to_wire(), "b12");
        assert_eq!(Perm::parse(b"x1"), None);
        assert_eq!(Perm::parse(b"r"), None);
        assert_eq!(Perm::parse(b"r-1"), None);
        assert_eq!(Perm::parse(b"r70000"), None);
    }
}
