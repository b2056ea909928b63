//! The libxenvchan ring (DESIGN.md §4), byte-compatible with `tools/libs/vchan` of Xen.
//!
//! Ring page (native endian): 0 `left.cons`, 4 `left.prod`, 8 `right.cons`, 12 `right.prod`,
//! 16 `left_order`, 18 `right_order`, 20 `cli_live`, 21 `srv_live`, 22 `cli_notify`,
//! 23 `srv_notify`, 24.. `grants[]` (LEFT's pages then RIGHT's). LEFT is written by the client.
//! Order 10 lives at offset 1024 of the ring page, order 11 at 2048, orders 12–20 in
//! 2^(order−12) separately granted pages.
//!
//! Unlike libxenvchan, this side keeps private copies of its own indices and orders, so a peer
//! rewriting them cannot steer our copies outside the ring; anything impossible (an index
//! difference beyond the ring size, orders changing, a live byte going backwards) is reported
//! as [`Error::HostilePeer`] and the connection is dropped.

use super::mem::{Mapping, PAGE_SIZE};
use super::{Backend, DomId, EventChannel, GrantRef, UnmapNotify};
use crate::error::{Error, Result};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

/// Offset of `left.cons`.
pub const LEFT_CONS: usize = 0;
/// Offset of `left.prod`.
pub const LEFT_PROD: usize = 4;
/// Offset of `right.cons`.
pub const RIGHT_CONS: usize = 8;
/// Offset of `right.prod`.
pub const RIGHT_PROD: usize = 12;
/// Offset of `left_order` (u16).
pub const LEFT_ORDER: usize = 16;
/// Offset of `right_order` (u16).
pub const RIGHT_ORDER: usize = 18;
/// Offset of `cli_live`.
pub const CLI_LIVE: usize = 20;
/// Offset of `srv_live`.
pub const SRV_LIVE: usize = 21;
/// Offset of `cli_notify`.
pub const CLI_NOTIFY: usize = 22;
/// Offset of `srv_notify`.
pub const SRV_NOTIFY: usize = 23;
/// Offset of `grants[]`.
pub const GRANTS: usize = 24;
/// Notify bit: data was written.
pub const NOTIFY_WRITE: u8 = 0x1;
/// Notify bit: data was read (space freed).
pub const NOTIFY_READ: u8 = 0x2;
/// Smallest ring order (1 KiB, in the ring page).
pub const MIN_ORDER: u8 = 10;
/// Largest ring order (1 MiB).
pub const MAX_ORDER: u8 = 20;
const PAGE_SHIFT: u8 = 12;

/// Live-byte values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    /// 0: the side has gone.
    Gone,
    /// 1: connected.
    Connected,
    /// 2: the client has not connected yet (only in `cli_live`).
    Waiting,
}

impl Live {
    fn from_byte(b: u8) -> Option<Live> {
        match b {
            0 => Some(Live::Gone),
            1 => Some(Live::Connected),
            2 => Some(Live::Waiting),
            _ => None,
        }
    }
}

/// Orders libxenvchan's server picks for minimum sizes (bytes) of LEFT (client→server) and
/// RIGHT (server→client): in-page rings (10/11) when they fit, else the smallest power of two.
pub fn choose_orders(left_min: usize, right_min: usize) -> Result<(u8, u8)> {
    let max = 1usize << MAX_ORDER;
    if left_min > max || right_min > max {
        return Err(Error::Vchan(format!(
            "ring sizes {left_min}/{right_min} exceed the maximum of {max} bytes"
        )));
    }
    let min_order = |n: usize| {
        let mut o = PAGE_SHIFT;
        while n > (1usize << o) {
            o += 1;
        }
        o
    };
    let (small, large) = (1usize << 10, 1usize << 11);
    let mut l = min_order(left_min);
    let mut r = min_order(right_min);
    if left_min <= small && right_min <= large {
        (l, r) = (10, 11);
    } else if left_min <= large && right_min <= small {
        (l, r) = (11, 10);
    } else if left_min <= large {
        l = 11;
    } else if right_min <= large {
        r = 11;
    }
    Ok((l, r))
}

fn pages(order: u8) -> usize {
    if order >= PAGE_SHIFT {
        1 << (order - PAGE_SHIFT)
    } else {
        0
    }
}

/// Check a pair of orders as a client must before mapping anything.
pub fn validate_orders(left: u16, right: u16) -> Result<(u8, u8)> {
    for (name, o) in [("left", left), ("right", right)] {
        if !(u16::from(MIN_ORDER)..=u16::from(MAX_ORDER)).contains(&o) {
            return Err(Error::HostilePeer(format!(
                "{name} ring order {o} outside {MIN_ORDER}..={MAX_ORDER}"
            )));
        }
    }
    if left == right && left < u16::from(PAGE_SHIFT) {
        return Err(Error::HostilePeer(format!(
            "both rings have order {left}: they would overlap in the ring page"
        )));
    }
    let (l, r) = (left as u8, right as u8);
    let grants_end = GRANTS + 4 * (pages(l) + pages(r));
    let first_in_page = [l, r]
        .iter()
        .filter(|&&o| o < PAGE_SHIFT)
        .map(|&o| 1usize << o)
        .min()
        .unwrap_or(PAGE_SIZE);
    if grants_end > first_in_page {
        return Err(Error::HostilePeer(format!(
            "orders {l}/{r}: the grant list would overlap the in-page ring"
        )));
    }
    Ok((l, r))
}

/// One side's view of a vchan ring.
#[derive(Debug)]
pub struct Ring {
    // Field order matters: data mappings are released before the ring page (whose unmap
    // notification tells the peer we are gone).
    left: Option<Mapping>,
    right: Option<Mapping>,
    page: Mapping,
    is_server: bool,
    left_order: u8,
    right_order: u8,
    rd_cons: u32,
    wr_prod: u32,
    peer_live: Live,
    closed: bool,
}

impl Ring {
    /// Server side (libxenvchan's `server_init`): share the ring page (unmap notification on
    /// `srv_live` through `event`) and the data pages, and fill in the header. Returns the
    /// ring and the ring page's grant reference to publish.
    pub fn server_init(
        backend: &dyn Backend,
        client: DomId,
        event: Arc<dyn EventChannel>,
        left_order: u8,
        right_order: u8,
    ) -> Result<(Ring, GrantRef)> {
        validate_orders(left_order.into(), right_order.into())
            .map_err(|e| Error::Vchan(format!("bad orders for a server: {e}")))?;
        let notify = UnmapNotify {
            offset: SRV_LIVE,
            event,
        };
        let (refs, page) = backend.share(client, 1, Some(notify))?;
        page.zero();
        page.u16_at(LEFT_ORDER)
            .store(left_order.into(), Ordering::Relaxed);
        page.u16_at(RIGHT_ORDER)
            .store(right_order.into(), Ordering::Relaxed);
        page.u8_at(CLI_LIVE).store(2, Ordering::Relaxed);
        page.u8_at(SRV_LIVE).store(1, Ordering::Relaxed);
        page.u8_at(CLI_NOTIFY)
            .store(NOTIFY_WRITE, Ordering::Relaxed);
        let mut slot = 0;
        let mut share_side = |order: u8| -> Result<Option<Mapping>> {
            if order < PAGE_SHIFT {
                return Ok(None);
            }
            let (grefs, m) = backend.share(client, pages(order), None)?;
            for g in grefs {
                page.u32_at(GRANTS + 4 * slot).store(g.0, Ordering::Relaxed);
                slot += 1;
            }
            Ok(Some(m))
        };
        let left = share_side(left_order)?;
        let right = share_side(right_order)?;
        fence(Ordering::SeqCst);
        Ok((
            Ring {
                left,
                right,
                page,
                is_server: true,
                left_order,
                right_order,
                rd_cons: 0,
                wr_prod: 0,
                peer_live: Live::Waiting,
                closed: false,
            },
            refs[0],
        ))
    }

    /// Client side (libxenvchan's `client_init`): map the ring page (unmap notification on
    /// `cli_live`), check the orders, map the data pages, mark the client live and request
    /// write notifications. The caller then notifies the server.
    pub fn client_init(
        backend: &dyn Backend,
        server: DomId,
        ring_ref: GrantRef,
        event: Arc<dyn EventChannel>,
    ) -> Result<Ring> {
        let notify = UnmapNotify {
            offset: CLI_LIVE,
            event,
        };
        let mut page = backend.map(server, &[ring_ref], true, Some(notify))?;
        let checked = validate_orders(
            page.u16_at(LEFT_ORDER).load(Ordering::SeqCst),
            page.u16_at(RIGHT_ORDER).load(Ordering::SeqCst),
        );
        let (l, r) = match checked {
            Ok(x) => x,
            Err(e) => {
                page.disarm_notify();
                return Err(e);
            }
        };
        let mut grants = Vec::new();
        for i in 0..pages(l) + pages(r) {
            grants.push(GrantRef(page.u32_at(GRANTS + 4 * i).load(Ordering::SeqCst)));
        }
        let map_side = |order: u8, refs: &[GrantRef], writable: bool| -> Result<Option<Mapping>> {
            if order < PAGE_SHIFT {
                return Ok(None);
            }
            backend.map(server, refs, writable, None).map(Some)
        };
        let mapped = map_side(l, &grants[..pages(l)], true)
            .and_then(|left| Ok((left, map_side(r, &grants[pages(l)..], false)?)));
        let (left, right) = match mapped {
            Ok(x) => x,
            Err(e) => {
                page.disarm_notify();
                return Err(e);
            }
        };
        let srv = page.u8_at(SRV_LIVE).load(Ordering::SeqCst);
        let ring = Ring {
            left,
            right,
            page,
            is_server: false,
            left_order: l,
            right_order: r,
            rd_cons: 0,
            wr_prod: 0,
            peer_live: Live::Connected,
            closed: false,
        };
        if srv != 1 {
            return Err(Error::HostilePeer(format!(
                "server live byte is {srv} at connect, expected 1"
            )));
        }
        // Start from the indices the server left (normally zero) rather than trusting them
        // later: they are checked on every use.
        let mut ring = ring;
        ring.rd_cons = ring.page.u32_at(RIGHT_CONS).load(Ordering::SeqCst);
        ring.wr_prod = ring.page.u32_at(LEFT_PROD).load(Ordering::SeqCst);
        ring.page.u8_at(CLI_LIVE).store(1, Ordering::SeqCst);
        ring.page
            .u8_at(SRV_NOTIFY)
            .store(NOTIFY_WRITE, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        Ok(ring)
    }

    /// Whether this is the server side.
    pub fn is_server(&self) -> bool {
        self.is_server
    }

    /// (left, right) orders.
    pub fn orders(&self) -> (u8, u8) {
        (self.left_order, self.right_order)
    }

    fn read_order(&self) -> u8 {
        if self.is_server {
            self.left_order
        } else {
            self.right_order
        }
    }

    fn write_order(&self) -> u8 {
        if self.is_server {
            self.right_order
        } else {
            self.left_order
        }
    }

    /// (mapping, offset of the ring in it) for LEFT (`true`) or RIGHT.
    fn buffer(&self, left: bool) -> (&Mapping, usize) {
        let (order, sep) = if left {
            (self.left_order, &self.left)
        } else {
            (self.right_order, &self.right)
        };
        match order {
            10 => (&self.page, 1024),
            11 => (&self.page, 2048),
            _ => (sep.as_ref().expect("multi-page ring mapped"), 0),
        }
    }

    fn own_notify(&self) -> usize {
        if self.is_server {
            SRV_NOTIFY
        } else {
            CLI_NOTIFY
        }
    }

    fn peer_notify(&self) -> usize {
        if self.is_server {
            CLI_NOTIFY
        } else {
            SRV_NOTIFY
        }
    }

    fn request_notify(&self, bit: u8) {
        self.page
            .u8_at(self.peer_notify())
            .fetch_or(bit, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// Clear our notify bit; true when the peer asked to be told (so the caller must notify).
    fn send_notify(&self, bit: u8) -> bool {
        fence(Ordering::SeqCst);
        let prev = self
            .page
            .u8_at(self.own_notify())
            .fetch_and(!bit, Ordering::SeqCst);
        prev & bit != 0
    }

    fn check_header(&self) -> Result<()> {
        let l = self.page.u16_at(LEFT_ORDER).load(Ordering::Relaxed);
        let r = self.page.u16_at(RIGHT_ORDER).load(Ordering::Relaxed);
        if l != u16::from(self.left_order) || r != u16::from(self.right_order) {
            return Err(Error::HostilePeer(format!(
                "ring orders changed from {}/{} to {l}/{r}",
                self.left_order, self.right_order
            )));
        }
        Ok(())
    }

    /// The peer's live byte, checked: it may only move forward (waiting → connected → gone).
    pub fn peer_live(&mut self) -> Result<Live> {
        let off = if self.is_server { CLI_LIVE } else { SRV_LIVE };
        let b = self.page.u8_at(off).load(Ordering::SeqCst);
        let live = Live::from_byte(b)
            .ok_or_else(|| Error::HostilePeer(format!("peer live byte holds {b}")))?;
        let ok = matches!(
            (self.peer_live, live),
            (Live::Waiting, _)
                | (Live::Connected, Live::Connected | Live::Gone)
                | (Live::Gone, Live::Gone)
        ) && (self.is_server || live != Live::Waiting);
        if !ok {
            return Err(Error::HostilePeer(format!(
                "peer live byte went from {:?} to {:?}",
                self.peer_live, live
            )));
        }
        self.peer_live = live;
        Ok(live)
    }

    fn data_ready(&self) -> Result<u32> {
        let (cons_off, prod_off) = if self.is_server {
            (LEFT_CONS, LEFT_PROD)
        } else {
            (RIGHT_CONS, RIGHT_PROD)
        };
        let prod = self.page.u32_at(prod_off).load(Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let shared_cons = self.page.u32_at(cons_off).load(Ordering::Relaxed);
        if shared_cons != self.rd_cons {
            return Err(Error::HostilePeer(format!(
                "peer rewrote our consumer index ({} -> {shared_cons})",
                self.rd_cons
            )));
        }
        let ready = prod.wrapping_sub(self.rd_cons);
        let size = 1u32 << self.read_order();
        if ready > size {
            return Err(Error::HostilePeer(format!(
                "peer producer index {prod} claims {ready} bytes in a {size}-byte ring"
            )));
        }
        Ok(ready)
    }

    fn buffer_space(&self) -> Result<u32> {
        let (cons_off, prod_off) = if self.is_server {
            (RIGHT_CONS, RIGHT_PROD)
        } else {
            (LEFT_CONS, LEFT_PROD)
        };
        let cons = self.page.u32_at(cons_off).load(Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let shared_prod = self.page.u32_at(prod_off).load(Ordering::Relaxed);
        if shared_prod != self.wr_prod {
            return Err(Error::HostilePeer(format!(
                "peer rewrote our producer index ({} -> {shared_prod})",
                self.wr_prod
            )));
        }
        let used = self.wr_prod.wrapping_sub(cons);
        let size = 1u32 << self.write_order();
        if used > size {
            return Err(Error::HostilePeer(format!(
                "peer consumer index {cons} claims {used} bytes in flight in a {size}-byte ring"
            )));
        }
        Ok(size - used)
    }

    /// Read up to `dst.len()` bytes. Returns (bytes read, whether the peer must be notified).
    /// Zero bytes means the ring is empty and a write notification has been requested.
    pub fn recv(&mut self, dst: &mut [u8]) -> Result<(usize, bool)> {
        self.check_header()?;
        let mut ready = self.data_ready()?;
        if (ready as usize) < dst.len() {
            self.request_notify(NOTIFY_WRITE);
            ready = self.data_ready()?;
        }
        let n = (ready as usize).min(dst.len());
        if n == 0 {
            return Ok((0, false));
        }
        let size = 1usize << self.read_order();
        let idx = self.rd_cons as usize & (size - 1);
        let contig = (size - idx).min(n);
        let (m, base) = self.buffer(self.is_server);
        fence(Ordering::Acquire);
        m.read_into(base + idx, &mut dst[..contig]);
        if contig < n {
            m.read_into(base, &mut dst[contig..n]);
        }
        fence(Ordering::SeqCst);
        self.rd_cons = self.rd_cons.wrapping_add(n as u32);
        let cons_off = if self.is_server {
            LEFT_CONS
        } else {
            RIGHT_CONS
        };
        self.page
            .u32_at(cons_off)
            .store(self.rd_cons, Ordering::SeqCst);
        Ok((n, self.send_notify(NOTIFY_READ)))
    }

    /// Write up to `src.len()` bytes. Returns (bytes written, whether the peer must be
    /// notified). Zero bytes means the ring is full and a read notification has been requested.
    pub fn send(&mut self, src: &[u8]) -> Result<(usize, bool)> {
        self.check_header()?;
        let mut space = self.buffer_space()?;
        if (space as usize) < src.len() {
            self.request_notify(NOTIFY_READ);
            space = self.buffer_space()?;
        }
        let n = (space as usize).min(src.len());
        if n == 0 {
            return Ok((0, false));
        }
        let size = 1usize << self.write_order();
        let idx = self.wr_prod as usize & (size - 1);
        let contig = (size - idx).min(n);
        let (m, base) = self.buffer(!self.is_server);
        fence(Ordering::SeqCst);
        m.write_from(base + idx, &src[..contig]);
        if contig < n {
            m.write_from(base, &src[contig..n]);
        }
        fence(Ordering::Release);
        self.wr_prod = self.wr_prod.wrapping_add(n as u32);
        let prod_off = if self.is_server {
            RIGHT_PROD
        } else {
            LEFT_PROD
        };
        self.page
            .u32_at(prod_off)
            .store(self.wr_prod, Ordering::SeqCst);
        Ok((n, self.send_notify(NOTIFY_WRITE)))
    }

    /// Mark this side gone (live byte 0). The caller notifies the peer.
    pub fn close(&mut self) {
        if !self.closed {
            self.closed = true;
            let off = if self.is_server { SRV_LIVE } else { CLI_LIVE };
            self.page.u8_at(off).store(0, Ordering::SeqCst);
            fence(Ordering::SeqCst);
        }
    }

    /// Whether [`Ring::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The ring page (tests and diagnostics).
    pub fn page(&self) -> &Mapping {
        &self.page
    }
}

#[cfg(test)]
mod tests {
    use super::super::mem::MemXen;
    use super::*;

    #[test]
    fn orders_follow_libxenvchan_choices() {
        assert_eq!(choose_orders(1024, 2048).unwrap(), (10, 11));
        assert_eq!(choose_orders(2048, 1024).unwrap(), (11, 10));
        assert_eq!(choose_orders(1 << 14, 1 << 16).unwrap(), (14, 16));
        assert_eq!(choose_orders(100, 1 << 16).unwrap(), (11, 16));
        assert_eq!(choose_orders(1 << 20, 1 << 20).unwrap(), (20, 20));
        assert!(choose_orders(1 << 21, 10).is_err());
    }

    #[test]
    fn bad_orders_are_refused() {
        assert!(validate_orders(9, 11).is_err());
        assert!(validate_orders(10, 21).is_err());
        assert!(validate_orders(10, 10).is_err());
        assert!(validate_orders(11, 11).is_err());
        assert!(
            validate_orders(10, 20).is_err(),
            "grants overlap the order-10 ring"
        );
        assert!(validate_orders(11, 20).is_ok());
        assert!(validate_orders(12, 12).is_ok());
        assert!(validate_orders(20, 20).is_ok());
    }

    fn pair(l: u8, r: u8) -> (MemXen, Ring, Ring) {
        let xen = MemXen::new();
        let sev = xen.bind_unbound(DomId(1)).unwrap();
        let (srv, gref) = Ring::server_init(&xen, DomId(1), sev.clone(), l, r).unwrap();
        let cev = xen.bind_interdomain(DomId(0), sev.local_port()).unwrap();
        let cli = Ring::client_init(&xen, DomId(0), gref, cev).unwrap();
        (xen, srv, cli)
    }

    #[test]
    fn header_layout_matches_libxenvchan() {
        let (_x, mut srv, cli) = pair(10, 11);
        assert_eq!(srv.page().u16_at(16).load(Ordering::SeqCst), 10);
        assert_eq!(srv.page().u16_at(18).load(Ordering::SeqCst), 11);
        assert_eq!(
            srv.page().u8_at(20).load(Ordering::SeqCst),
            1,
            "cli_live after connect"
        );
        assert_eq!(srv.page().u8_at(21).load(Ordering::SeqCst), 1, "srv_live");
        assert_eq!(srv.peer_live().unwrap(), Live::Connected);
        // Client writes LEFT (order 10, page offset 1024) and bumps left.prod.
        let mut cli = cli;
        assert_eq!(cli.send(b"abc").unwrap().0, 3);
        assert_eq!(srv.page().u32_at(4).load(Ordering::SeqCst), 3);
        let mut b = [0u8; 3];
        srv.page().read_into(1024, &mut b);
        assert_eq!(&b, b"abc");
        let mut got = [0u8; 8];
        assert_eq!(srv.recv(&mut got).unwrap().0, 3);
        assert_eq!(srv.page().u32_at(0).load(Ordering::SeqCst), 3, "left.cons");
        // Server writes RIGHT (order 11, offset 2048).
        srv.send(b"xy").unwrap();
        srv.page().read_into(2048, &mut b[..2]);
        assert_eq!(&b[..2], b"xy");
        assert_eq!(
            srv.page().u32_at(12).load(Ordering::SeqCst),
            2,
            "right.prod"
        );
    }

    #[test]
    fn data_wraps_around_multi_page_rings() {
        let (xen, mut srv, mut cli) = pair(12, 13);
        let mut total_in = Vec::new();
        let mut total_out = Vec::new();
        let mut seed = 1u32;
        for round in 0..50 {
            let len = 1000 + round * 37;
            let chunk: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (seed >> 16) as u8
                })
                .collect();
            let mut off = 0;
            while off < chunk.len() {
                let (n, _) = cli.send(&chunk[off..]).unwrap();
                off += n;
                let mut buf = vec![0u8; 3000];
                let (m, _) = srv.recv(&mut buf).unwrap();
                total_out.extend_from_slice(&buf[..m]);
            }
            total_in.extend_from_slice(&chunk);
        }
        loop {
            let mut buf = vec![0u8; 5000];
            let (m, _) = srv.recv(&mut buf).unwrap();
            if m == 0 {
                break;
            }
            total_out.extend_from_slice(&buf[..m]);
        }
        assert_eq!(total_in, total_out);
        drop((srv, cli));
        assert_eq!(xen.live_grants(), 0, "every grant released");
        assert_eq!(xen.live_ports(), 0, "every port released");
    }

    #[test]
    fn full_ring_requests_read_notification_and_peer_read_triggers_it() {
        let (_x, mut srv, mut cli) = pair(10, 11);
        let big = vec![7u8; 5000];
        let (n, _) = cli.send(&big).unwrap();
        assert_eq!(n, 1024);
        assert_eq!(cli.send(&big).unwrap().0, 0, "ring full");
        // The client asked to be told of reads: the server's recv says "notify".
        let mut buf = vec![0u8; 100];
        let (m, kick) = srv.recv(&mut buf).unwrap();
        assert_eq!(m, 100);
        assert!(kick, "server must notify the waiting writer");
        let (_, kick2) = srv.recv(&mut buf).unwrap();
        assert!(!kick2, "notify bit cleared after the first notification");
    }

    #[test]
    fn hostile_producer_index_is_reported() {
        let (_x, mut srv, _cli) = pair(10, 11);
        srv.page().u32_at(LEFT_PROD).store(5000, Ordering::SeqCst);
        let err = srv.recv(&mut [0u8; 16]).unwrap_err();
        assert!(matches!(err, Error::HostilePeer(_)), "{err}");
    }

    #[test]
    fn hostile_consumer_index_is_reported() {
        let (_x, mut srv, _cli) = pair(10, 11);
        srv.page()
            .u32_at(RIGHT_CONS)
            .store(3_000_000, Ordering::SeqCst);
        assert!(matches!(srv.send(b"x"), Err(Error::HostilePeer(_))));
    }

    #[test]
    fn orders_rewritten_after_connect_are_reported() {
        let (_x, mut srv, _cli) = pair(10, 11);
        srv.page().u16_at(LEFT_ORDER).store(20, Ordering::SeqCst);
        assert!(matches!(
            srv.recv(&mut [0u8; 4]),
            Err(Error::HostilePeer(_))
        ));
    }

    #[test]
    fn live_byte_flipping_back_is_reported() {
        let (_x, mut srv, _cli) = pair(10, 11);
        assert_eq!(srv.peer_live().unwrap(), Live::Connected);
        srv.page().u8_at(CLI_LIVE).store(2, Ordering::SeqCst);
        assert!(matches!(srv.peer_live(), Err(Error::HostilePeer(_))));
        srv.page().u8_at(CLI_LIVE).store(77, Ordering::SeqCst);
        assert!(matches!(srv.peer_live(), Err(Error::HostilePeer(_))));
    }

    #[test]
    fn client_refuses_bad_orders_and_missing_grants() {
        let xen = MemXen::new();
        let sev = xen.bind_unbound(DomId(1)).unwrap();
        for (l, r) in [(9u16, 11u16), (10, 10), (21, 12), (10, 20)] {
            let (srv, gref) = Ring::server_init(&xen, DomId(1), sev.clone(), 10, 11).unwrap();
            srv.page().u16_at(LEFT_ORDER).store(l, Ordering::SeqCst);
            srv.page().u16_at(RIGHT_ORDER).store(r, Ordering::SeqCst);
            let cev = xen.bind_interdomain(DomId(0), sev.local_port()).unwrap();
            let err = Ring::client_init(&xen, DomId(0), gref, cev).unwrap_err();
            assert!(matches!(err, Error::HostilePeer(_)), "{l}/{r}: {err}");
        }
        let (srv, gref) = Ring::server_init(&xen, DomId(1), sev.clone(), 12, 12).unwrap();
        srv.page().u32_at(GRANTS).store(999_999, Ordering::SeqCst);
        let cev = xen.bind_interdomain(DomId(0), sev.local_port()).unwrap();
        let err = Ring::client_init(&xen, DomId(0), gref, cev).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
