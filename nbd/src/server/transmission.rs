//! The transmission phase: requests in, replies out, many in flight.
//!
//! One task reads requests. A read whose data is cached (page cache, cached VHD bitmaps:
//! [`BlockBackend::try_read_at`], `preadv2(RWF_NOWAIT)`) is answered right there, and such
//! replies are batched while more requests are already buffered. Every other request passes
//! the export's pause gate and does its I/O on the blocking pool with positional I/O. Either
//! way a finished reply (one contiguous buffer: header + payload, read straight into place; or
//! a pipe holding it, see [`crate::splice`]) goes to the connection's writer task, which writes
//! whatever has queued up with one vectored write, from the replies' own buffers. Replies therefore leave in completion order, not
//! request order. Requests in flight per connection are bounded (count and bytes) and a permit
//! is released only once its reply is written, so a client that never reads its replies stalls
//! only itself.

use super::{discard, ConnError, NbdSink, ServerOptions, Session};
use crate::backend::{BlockBackend, Extent, ExtentState};
use crate::export::{Export, GatePass};
use crate::proto::{self, errno, ReplyStyle, Request};
use crate::splice::{FilledPipe, Piece, PipePool};
use crate::Error;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

/// Most requests in flight on one connection (as qemu's NBD server: more requests than this
/// only queue up in the socket). A large bound hurt: nbdcopy keeps 64 requests of 256 KiB in
/// flight on each of 4 connections, and hundreds of blocking-pool threads copying at once on a
/// small machine are slower than a few.
const MAX_IN_FLIGHT: usize = 16;
/// Inline replies handed to the writer once they add up to this many bytes, even if more
/// requests are buffered (so a burst of big cached reads starts leaving early).
const BATCH_BYTES: usize = 512 << 10;
/// Most payload bytes in flight on one connection, in units of [`BYTE_UNIT`].
const MAX_IN_FLIGHT_UNITS: usize = 4096;
/// Unit of the byte budget (64 KiB; so 256 MiB per connection).
const BYTE_UNIT: u64 = 64 << 10;
/// Most extents returned in one block status reply.
const MAX_EXTENTS: usize = 1 << 16;

/// A finished reply with the permits it holds until written.
struct Reply {
    body: Body,
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
}

/// What a reply's bytes are in.
enum Body {
    /// The whole reply in memory.
    Bytes(Vec<u8>),
    /// The whole reply in a pipe, to be spliced into the socket.
    Pipe(FilledPipe),
}

impl Body {
    fn len(&self) -> usize {
        match self {
            Body::Bytes(b) => b.len(),
            Body::Pipe(p) => p.remaining(),
        }
    }
}

/// State shared by the request tasks of one connection.
struct Conn {
    export: Arc<Export>,
    style: ReplyStyle,
    base_allocation: bool,
    tx: mpsc::UnboundedSender<Reply>,
    /// Turns true when the connection is dead: waiting requests give up.
    abort: watch::Receiver<bool>,
    /// Pipes for zero-copy read replies; `None` when the stream is not a socket.
    pipes: Option<Arc<PipePool>>,
    /// Largest read answered on the reader task when its data is cached.
    inline_read_max: u64,
    /// Smallest read sent zero-copy (`u64::MAX`: never).
    zero_copy_min: u64,
}

/// Serves requests of session `s` until the client leaves or the connection fails; replies
/// still being worked on are written before it returns.
pub(super) async fn transmission<R, W>(
    mut r: BufReader<R>,
    w: W,
    s: Session,
    opts: &ServerOptions,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: NbdSink,
{
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let (abort_tx, abort_rx) = watch::channel(false);
    let abort_tx = Arc::new(abort_tx);
    let pipes = w.socket().is_some().then(PipePool::new);
    let writer = tokio::spawn(writer_task(w, rx, abort_tx.clone()));
    let conn = Arc::new(Conn {
        export: s.export.clone(),
        style: s.style,
        base_allocation: s.base_allocation,
        tx,
        abort: abort_rx,
        pipes,
        inline_read_max: opts.inline_read_max,
        zero_copy_min: match opts.zero_copy_min {
            0 => u64::MAX,
            v => v,
        },
    });
    let count = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let bytes = Arc::new(Semaphore::new(MAX_IN_FLIGHT_UNITS));
    let extended = s.style == ReplyStyle::Extended;
    let hdr_len = if extended {
        proto::EXTENDED_REQUEST_LEN
    } else {
        proto::REQUEST_LEN
    };
    let mut closed = s.export.closed_signal();
    let mut abort_watch = abort_tx.subscribe();

    // Replies answered inline (cached reads) wait here while more requests are already
    // buffered, so a burst of requests is answered with one wake-up of the writer.
    let mut batch: Vec<Reply> = Vec::new();
    let result: Result<(), ConnError> = loop {
        let mut hdr = [0u8; proto::EXTENDED_REQUEST_LEN];
        let read = tokio::select! {
            res = r.read_exact(&mut hdr[..hdr_len]) => res,
            _ = closed.wait_for(|c| *c) => break Ok(()),
            _ = abort_watch.wait_for(|a| *a) => break Err(ConnError::Protocol("reply writer failed".into())),
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break Ok(());
            }
            Err(e) => break Err(e.into()),
        }
        let req = match proto::parse_request(&hdr[..hdr_len], extended) {
            Ok(req) => req,
            Err(proto::BadMagic(m)) => {
                break Err(ConnError::Protocol(format!("bad request magic {m:#010x}")));
            }
        };
        if req.kind == proto::CMD_DISC {
            tracing::debug!(export = conn.export.name(), "client disconnects");
            break Ok(());
        }
        let has_payload = req.kind == proto::CMD_WRITE
            || (extended && req.flags & proto::CMD_FLAG_PAYLOAD_LEN != 0);
        let payload_len = if has_payload { req.length } else { 0 };
        if payload_len > proto::MAX_PAYLOAD {
            if extended {
                break Err(ConnError::Protocol(format!(
                    "payload of {payload_len} bytes exceeds the maximum"
                )));
            }
            // A compact write cannot exceed 4 GiB: swallow it and refuse it.
            if let Err(e) = discard(&mut r, payload_len).await {
                break Err(e.into());
            }
            conn.flush_batch(&mut batch);
            let permit = count.clone().acquire_owned().await.expect("never closed");
            conn.send_error(&req, errno::EOVERFLOW, "request too large", (permit, None));
            continue;
        }
        let effect = match req.kind {
            proto::CMD_READ => req.length.min(proto::MAX_PAYLOAD),
            _ => payload_len,
        };
        let units = (effect / BYTE_UNIT + 1) as u32;
        let permits = match (
            count.clone().try_acquire_owned(),
            bytes.clone().try_acquire_many_owned(units),
        ) {
            (Ok(p), Ok(b)) => (p, Some(b)),
            (p, b) => {
                // Full: the batched replies hold permits, so they must leave before waiting.
                conn.flush_batch(&mut batch);
                let p = match p {
                    Ok(p) => p,
                    Err(_) => count.clone().acquire_owned().await.expect("never closed"),
                };
                let b = match b {
                    Ok(b) => b,
                    Err(_) => bytes
                        .clone()
                        .acquire_many_owned(units)
                        .await
                        .expect("never closed"),
                };
                (p, Some(b))
            }
        };
        let mut payload = Vec::new();
        if payload_len > 0 {
            conn.flush_batch(&mut batch);
            payload = vec![0u8; payload_len as usize];
            if let Err(e) = r.read_exact(&mut payload).await {
                break Err(e.into());
            }
        }
        conn.dispatch(req, has_payload, payload, permits, &mut batch);
        if r.buffer().len() < hdr_len
            || batch.iter().map(|rep| rep.body.len()).sum::<usize>() >= BATCH_BYTES
        {
            // No next request is waiting in the buffer: send what was answered inline.
            conn.flush_batch(&mut batch);
        }
    };
    conn.flush_batch(&mut batch);
    if result.is_err() {
        abort_tx.send_replace(true);
    }
    drop(conn);
    // Requests still running finish and their replies are written before the socket closes.
    let _ = writer.await;
    result
}

/// Replies written with one `writev` at most (well below `IOV_MAX`).
const WRITE_BATCH: usize = 64;

/// Writes replies as they come: whatever has queued up (up to [`WRITE_BATCH`]) leaves in one
/// vectored write straight from the replies' own buffers, so a connection has no write buffer
/// of its own (its memory is the replies in flight, bounded by the permits they hold).
async fn writer_task<W: NbdSink>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    abort: Arc<watch::Sender<bool>>,
) {
    let mut batch: Vec<Reply> = Vec::new();
    let res: std::io::Result<()> = async {
        while let Some(rep) = rx.recv().await {
            batch.push(rep);
            while batch.len() < WRITE_BATCH {
                match rx.try_recv() {
                    Ok(rep) => batch.push(rep),
                    Err(_) => break,
                }
            }
            write_replies(&mut w, &mut batch).await?;
        }
        w.shutdown().await
    }
    .await;
    if let Err(e) = res {
        tracing::debug!(error = %e, "NBD reply writer stopped");
        abort.send_replace(true);
    }
}

/// Writes `batch` in order and empties it (each reply's permits are released once it is
/// written): runs of in-memory replies with vectored writes, pipes straight into the socket.
/// Pipe replies exist only on connections whose stream is a socket ([`Conn::pipes`]).
async fn write_replies<W: NbdSink>(w: &mut W, batch: &mut Vec<Reply>) -> std::io::Result<()> {
    let mut start = 0;
    while start < batch.len() {
        let end = batch[start..]
            .iter()
            .position(|r| matches!(r.body, Body::Pipe(_)))
            .map_or(batch.len(), |k| start + k);
        if end > start {
            let bufs: Vec<&[u8]> = batch[start..end]
                .iter()
                .map(|r| match &r.body {
                    Body::Bytes(b) => b.as_slice(),
                    Body::Pipe(_) => &[],
                })
                .collect();
            write_all_vectored(w, &bufs).await?;
        }
        if let Some(Reply {
            body: Body::Pipe(pipe),
            ..
        }) = batch.get_mut(end)
        {
            splice_all(w, pipe).await?;
        }
        start = end + 1;
    }
    batch.clear();
    Ok(())
}

/// Writes every byte of `bufs`, in order, with as few vectored writes as the stream takes.
async fn write_all_vectored<W: NbdSink>(w: &mut W, bufs: &[&[u8]]) -> std::io::Result<()> {
    let (mut i, mut off) = (0usize, 0usize);
    loop {
        while i < bufs.len() && off == bufs[i].len() {
            i += 1;
            off = 0;
        }
        if i == bufs.len() {
            return Ok(());
        }
        let mut iov = Vec::with_capacity(bufs.len() - i);
        iov.push(std::io::IoSlice::new(&bufs[i][off..]));
        iov.extend(bufs[i + 1..].iter().map(|b| std::io::IoSlice::new(b)));
        let mut n = w.write_vectored(&iov).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let rest = bufs[i].len() - off;
            if n < rest {
                off += n;
                n = 0;
            } else {
                n -= rest;
                i += 1;
                off = 0;
            }
        }
    }
}

/// Moves a pipe reply into the socket under `w` (non-blocking splices, waiting for room).
async fn splice_all<W: NbdSink>(w: &mut W, pipe: &mut FilledPipe) -> std::io::Result<()> {
    let sock = w.socket().ok_or_else(|| {
        std::io::Error::other("internal error: a pipe reply on a stream that is not a socket")
    })?;
    while pipe.remaining() > 0 {
        match sock.try_splice(pipe) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::future::poll_fn(|cx| sock.poll_writable(cx)).await?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

type Permits = (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>);

impl Conn {
    /// Hands the inline-answered replies to the writer.
    fn flush_batch(&self, batch: &mut Vec<Reply>) {
        for rep in batch.drain(..) {
            // If the writer is gone the connection is dead; the reply is moot.
            let _ = self.tx.send(rep);
        }
    }

    fn send(&self, buf: Vec<u8>, permits: Permits) {
        self.send_body(Body::Bytes(buf), permits);
    }

    fn send_body(&self, body: Body, permits: Permits) {
        // If the writer is gone the connection is dead; the reply is moot.
        let _ = self.tx.send(Reply {
            body,
            _permits: permits,
        });
    }

    fn send_ok(&self, req: &Request, permits: Permits) {
        let mut buf = vec![0u8; self.style.chunk_header_len()];
        match self.style {
            ReplyStyle::Simple | ReplyStyle::Structured => {
                proto::put_simple_reply(&mut buf[..16], 0, req.cookie);
                buf.truncate(16);
            }
            ReplyStyle::Extended => proto::put_chunk_header(
                &mut buf,
                self.style,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_NONE,
                req.cookie,
                req.offset,
                0,
            ),
        }
        self.send(buf, permits);
    }

    fn send_error(&self, req: &Request, err: u32, msg: &str, permits: Permits) {
        tracing::debug!(
            export = self.export.name(),
            cmd = req.kind,
            offset = req.offset,
            length = req.length,
            err,
            msg,
            "NBD request failed"
        );
        match self.style {
            ReplyStyle::Simple => {
                let mut buf = vec![0u8; 16];
                proto::put_simple_reply(&mut buf, err, req.cookie);
                self.send(buf, permits);
            }
            _ => {
                let msg = &msg.as_bytes()[..msg.len().min(1024)];
                let hl = self.style.chunk_header_len();
                let plen = 6 + msg.len();
                let mut buf = vec![0u8; hl + plen];
                proto::put_chunk_header(
                    &mut buf,
                    self.style,
                    proto::REPLY_FLAG_DONE,
                    proto::REPLY_TYPE_ERROR,
                    req.cookie,
                    req.offset,
                    plen as u64,
                );
                buf[hl..hl + 4].copy_from_slice(&err.to_be_bytes());
                buf[hl + 4..hl + 6].copy_from_slice(&(msg.len() as u16).to_be_bytes());
                buf[hl + 6..].copy_from_slice(msg);
                self.send(buf, permits);
            }
        }
    }

    /// Passes the gate, unless the connection dies or the export closes first.
    async fn enter(&self) -> Result<GatePass, Error> {
        let mut abort = self.abort.clone();
        tokio::select! {
            pass = self.export.enter() => pass,
            _ = abort.wait_for(|a| *a) => Err(Error::Closed(self.export.name().to_string())),
        }
    }

    /// Checks `[offset, offset+len)` against the export size.
    fn in_range(&self, req: &Request) -> bool {
        req.offset
            .checked_add(req.length)
            .is_some_and(|end| end <= self.export.size())
    }

    /// Refusals that need no I/O: (NBD errno, message).
    fn precheck(&self, req: &Request, has_payload: bool) -> Result<(), (u32, &'static str)> {
        if has_payload && req.kind != proto::CMD_WRITE {
            return Err((errno::EINVAL, "unexpected payload"));
        }
        let writes = matches!(
            req.kind,
            proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES
        );
        if writes && self.export.read_only() {
            return Err((errno::EPERM, "export is read-only"));
        }
        match req.kind {
            proto::CMD_READ => {
                if req.length > proto::MAX_PAYLOAD {
                    return Err((errno::EOVERFLOW, "read too large"));
                }
                if !self.in_range(req) {
                    return Err((errno::EINVAL, "beyond the end of the export"));
                }
            }
            proto::CMD_WRITE | proto::CMD_WRITE_ZEROES => {
                if !self.in_range(req) {
                    return Err((errno::ENOSPC, "beyond the end of the export"));
                }
            }
            proto::CMD_TRIM => {
                if !self.in_range(req) {
                    return Err((errno::EINVAL, "beyond the end of the export"));
                }
            }
            proto::CMD_FLUSH => {}
            proto::CMD_BLOCK_STATUS => {
                if !self.base_allocation || self.style == ReplyStyle::Simple {
                    return Err((errno::EINVAL, "no metadata context negotiated"));
                }
                if req.length == 0 || req.offset >= self.export.size() {
                    return Err((errno::EINVAL, "beyond the end of the export"));
                }
            }
            _ => return Err((errno::EINVAL, "unknown command")),
        }
        Ok(())
    }

    /// Starts one request: refusals are answered at once; otherwise the I/O runs on the
    /// blocking pool — straight away when the gate is open (no extra task hop), after waiting
    /// at the gate otherwise.
    fn dispatch(
        self: &Arc<Self>,
        req: Request,
        has_payload: bool,
        payload: Vec<u8>,
        permits: Permits,
        batch: &mut Vec<Reply>,
    ) {
        if let Err((e, msg)) = self.precheck(&req, has_payload) {
            return self.send_error(&req, e, msg, permits);
        }
        if req.kind == proto::CMD_READ && req.length == 0 {
            return self.send_ok_read_empty(&req, permits);
        }
        let conn = self.clone();
        match self.export.try_enter() {
            Some(pass) if req.kind == proto::CMD_READ && req.length <= self.inline_read_max => {
                // A read served from memory costs less than the hop to the blocking pool.
                let mut buf = self.read_reply_buffer(&req);
                let prefix = buf.len() - req.length as usize;
                match pass.backend.try_read_at(&mut buf[prefix..], req.offset) {
                    Ok(true) => {
                        drop(pass);
                        self.finish_read_reply(&mut buf, &req);
                        batch.push(Reply {
                            body: Body::Bytes(buf),
                            _permits: permits,
                        });
                    }
                    Ok(false) => {
                        tokio::task::spawn_blocking(move || {
                            conn.execute(pass, req, payload, permits)
                        });
                    }
                    Err(e) => self.send_error(&req, e.nbd_errno(), &e.to_string(), permits),
                }
            }
            Some(pass) => {
                tokio::task::spawn_blocking(move || conn.execute(pass, req, payload, permits));
            }
            None => {
                tokio::spawn(async move {
                    match conn.enter().await {
                        Ok(pass) => {
                            tokio::task::spawn_blocking(move || {
                                conn.execute(pass, req, payload, permits)
                            });
                        }
                        Err(e) => conn.send_error(&req, e.nbd_errno(), &e.to_string(), permits),
                    }
                });
            }
        }
    }

    /// Does one request's I/O (on a blocking thread, past the gate) and queues its reply.
    fn execute(&self, pass: GatePass, req: Request, payload: Vec<u8>, permits: Permits) {
        let b = &*pass.backend;
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        let r = match req.kind {
            proto::CMD_READ => return self.execute_read(b, req, permits),
            proto::CMD_BLOCK_STATUS => return self.execute_block_status(b, req, permits),
            proto::CMD_WRITE => b.write_at(&payload, req.offset),
            proto::CMD_WRITE_ZEROES => b.write_zeroes(req.offset, req.length),
            proto::CMD_TRIM => b.trim(req.offset, req.length),
            _ => b.flush(),
        };
        let r = match r {
            Ok(()) if fua && req.kind != proto::CMD_FLUSH => b.flush(),
            other => other,
        };
        drop(pass);
        match r {
            Ok(()) => self.send_ok(&req, permits),
            Err(e) => self.send_error(&req, e.nbd_errno(), &e.to_string(), permits),
        }
    }

    /// A zeroed buffer for the reply to read `req`: header space, then the payload.
    fn read_reply_buffer(&self, req: &Request) -> Vec<u8> {
        let prefix = match self.style {
            ReplyStyle::Simple => 16,
            s => s.chunk_header_len() + 8,
        };
        vec![0u8; prefix + req.length as usize]
    }

    fn execute_read(&self, b: &dyn BlockBackend, req: Request, permits: Permits) {
        if req.length >= self.zero_copy_min {
            if let Some(pipe) = self
                .pipes
                .as_ref()
                .and_then(|p| self.zero_copy_read(p, b, &req))
            {
                return self.send_body(Body::Pipe(pipe), permits);
            }
        }
        let mut buf = self.read_reply_buffer(&req);
        let prefix = buf.len() - req.length as usize;
        if let Err(e) = b.read_at(&mut buf[prefix..], req.offset) {
            return self.send_error(&req, e.nbd_errno(), &e.to_string(), permits);
        }
        self.finish_read_reply(&mut buf, &req);
        self.send(buf, permits);
    }

    /// The reply to read `req` assembled in a pipe: header, then the data spliced from the
    /// backend's files. `None` when the backend has no files or anything fails — the caller
    /// then reads by copying, which also reports any error the proper way.
    fn zero_copy_read(
        &self,
        pool: &Arc<PipePool>,
        b: &dyn BlockBackend,
        req: &Request,
    ) -> Option<FilledPipe> {
        let plan = b.read_plan(req.offset, req.length).ok()??;
        let mut hdr = self.read_reply_buffer(&Request { length: 0, ..*req });
        self.finish_read_reply(&mut hdr, req);
        let mut pieces = Vec::with_capacity(plan.len() + 1);
        pieces.push(Piece::Bytes(&hdr));
        pieces.extend(plan);
        match pool.fill(&pieces) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(export = self.export.name(), offset = req.offset,
                    length = req.length, error = %e, "zero-copy read declined; copying");
                None
            }
        }
    }

    /// Fills in the header of a read reply whose payload is in place.
    fn finish_read_reply(&self, buf: &mut [u8], req: &Request) {
        let len = req.length as usize;
        let hl = self.style.chunk_header_len();
        match self.style {
            ReplyStyle::Simple => proto::put_simple_reply(&mut buf[..16], 0, req.cookie),
            s => {
                proto::put_chunk_header(
                    &mut buf[..hl],
                    s,
                    proto::REPLY_FLAG_DONE,
                    proto::REPLY_TYPE_OFFSET_DATA,
                    req.cookie,
                    req.offset,
                    (8 + len) as u64,
                );
                buf[hl..hl + 8].copy_from_slice(&req.offset.to_be_bytes());
            }
        }
    }

    fn send_ok_read_empty(&self, req: &Request, permits: Permits) {
        match self.style {
            ReplyStyle::Simple => self.send_ok(req, permits),
            s => {
                let mut buf = vec![0u8; s.chunk_header_len()];
                proto::put_chunk_header(
                    &mut buf,
                    s,
                    proto::REPLY_FLAG_DONE,
                    proto::REPLY_TYPE_NONE,
                    req.cookie,
                    req.offset,
                    0,
                );
                self.send(buf, permits);
            }
        }
    }

    fn execute_block_status(&self, b: &dyn BlockBackend, req: Request, permits: Permits) {
        let len = req.length.min(b.size().saturating_sub(req.offset));
        let extents = match b.block_status(req.offset, len) {
            Ok(x) => x,
            Err(e) => return self.send_error(&req, e.nbd_errno(), &e.to_string(), permits),
        };
        let one = req.flags & proto::CMD_FLAG_REQ_ONE != 0;
        let descs = encode_extents(&extents, req.offset, len, one, self.style);
        if descs.is_empty() {
            return self.send_error(&req, errno::EIO, "backend returned no extents", permits);
        }
        let hl = self.style.chunk_header_len();
        let extended = self.style == ReplyStyle::Extended;
        let mut buf = vec![0u8; hl];
        buf.extend_from_slice(&proto::BASE_ALLOCATION_ID.to_be_bytes());
        if extended {
            buf.extend_from_slice(&(descs.len() as u32).to_be_bytes());
        }
        for (length, flags) in &descs {
            if extended {
                buf.extend_from_slice(&length.to_be_bytes());
                buf.extend_from_slice(&u64::from(*flags).to_be_bytes());
            } else {
                buf.extend_from_slice(&(*length as u32).to_be_bytes());
                buf.extend_from_slice(&flags.to_be_bytes());
            }
        }
        let plen = (buf.len() - hl) as u64;
        let kind = if extended {
            proto::REPLY_TYPE_BLOCK_STATUS_EXT
        } else {
            proto::REPLY_TYPE_BLOCK_STATUS
        };
        proto::put_chunk_header(
            &mut buf[..hl],
            self.style,
            proto::REPLY_FLAG_DONE,
            kind,
            req.cookie,
            req.offset,
            plen,
        );
        self.send(buf, permits);
    }
}

/// Turns backend extents into `(length, base:allocation flags)` descriptors covering a prefix
/// of `[offset, offset+len)`: clipped, contiguous, merged, bounded in count and (compact
/// style) in 32-bit length.
fn encode_extents(
    extents: &[Extent],
    offset: u64,
    len: u64,
    one: bool,
    style: ReplyStyle,
) -> Vec<(u64, u32)> {
    let end = offset + len;
    let max_len = if style == ReplyStyle::Extended {
        u64::MAX
    } else {
        // Largest u32 multiple of 512, so clipped extents stay sector-aligned.
        u64::from(u32::MAX) & !511
    };
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut pos = offset;
    for e in extents {
        // Extents must be contiguous from `offset`; stop at the first gap or overlap.
        if e.offset > pos || e.offset + e.length <= pos || pos >= end {
            break;
        }
        let stop = (e.offset + e.length).min(end);
        let flags = match e.state {
            ExtentState::Data => 0,
            ExtentState::Zero => proto::STATE_ZERO,
            ExtentState::Hole => proto::STATE_HOLE | proto::STATE_ZERO,
        };
        let mut n = stop - pos;
        match out.last_mut() {
            Some((l, f)) if *f == flags && *l + n <= max_len => *l += n,
            _ => {
                while n > 0 {
                    let k = n.min(max_len);
                    out.push((k, flags));
                    n -= k;
                }
            }
        }
        pos = stop;
        if out.len() >= MAX_EXTENTS {
            break;
        }
    }
    if one {
        out.truncate(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, length: u64, state: ExtentState) -> Extent {
        Extent {
            offset,
            length,
            state,
        }
    }

    #[test]
    fn extents_are_clipped_to_the_request_and_merged() {
        let x = [
            ext(0, 100, ExtentState::Data),
            ext(100, 100, ExtentState::Data),
            ext(200, 100, ExtentState::Hole),
            ext(300, 100, ExtentState::Zero),
        ];
        let d = encode_extents(&x, 50, 300, false, ReplyStyle::Structured);
        assert_eq!(
            d,
            vec![
                (150, 0),
                (100, proto::STATE_HOLE | proto::STATE_ZERO),
                (50, proto::STATE_ZERO)
            ]
        );
        let d = encode_extents(&x, 50, 300, true, ReplyStyle::Structured);
        assert_eq!(d, vec![(150, 0)]);
    }

    #[test]
    fn extents_stop_at_a_gap() {
        let x = [
            ext(0, 100, ExtentState::Data),
            ext(150, 100, ExtentState::Hole),
        ];
        assert_eq!(
            encode_extents(&x, 0, 250, false, ReplyStyle::Extended),
            vec![(100, 0)]
        );
    }
}
