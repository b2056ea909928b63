//! The handshake (fixed newstyle): the greeting, then options until `NBD_OPT_GO` or
//! `NBD_OPT_EXPORT_NAME` picks an export (or the client aborts). Options answered: EXPORT_NAME,
//! ABORT, LIST, STARTTLS (refused), INFO/GO (export, name, description and block size infos),
//! STRUCTURED_REPLY, EXTENDED_HEADERS, LIST/SET_META_CONTEXT (`base:allocation`); anything else
//! gets `NBD_REP_ERR_UNSUP`. Every option payload is bounds-checked ([`Cursor`]) and bounded
//! in size ([`proto::MAX_OPTION_LEN`]).

use super::{discard, transmission_flags, ConnError, Session};
use crate::export::Exports;
use crate::proto::{self, ReplyStyle};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

async fn read_u32<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<u32> {
    r.read_u32().await
}

async fn send_opt_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut h = Vec::with_capacity(20 + data.len());
    h.extend_from_slice(&proto::OPT_REPLY_MAGIC.to_be_bytes());
    h.extend_from_slice(&opt.to_be_bytes());
    h.extend_from_slice(&kind.to_be_bytes());
    h.extend_from_slice(&(data.len() as u32).to_be_bytes());
    h.extend_from_slice(data);
    w.write_all(&h).await
}

async fn send_opt_error<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    kind: u32,
    msg: &str,
) -> std::io::Result<()> {
    tracing::debug!(opt, kind = kind & !(1 << 31), msg, "NBD option refused");
    send_opt_reply(w, opt, kind, msg.as_bytes()).await?;
    w.flush().await
}

/// A cursor over an option's payload; every read is bounds-checked.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(proto::be16)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(proto::be32)
    }
    fn string(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        if n > proto::MAX_STRING {
            return None;
        }
        std::str::from_utf8(self.take(n)?).ok()
    }
}

/// Parses `NBD_OPT_INFO`/`NBD_OPT_GO` data: export name and requested info types.
fn parse_info_request(data: &[u8]) -> Option<(&str, Vec<u16>)> {
    let mut c = Cursor(data);
    let name = c.string()?;
    let n = c.u16()?;
    let mut infos = Vec::with_capacity(n as usize);
    for _ in 0..n {
        infos.push(c.u16()?);
    }
    c.0.is_empty().then_some((name, infos))
}

/// Parses `NBD_OPT_{LIST,SET}_META_CONTEXT` data: export name and queries.
fn parse_meta_request(data: &[u8]) -> Option<(&str, Vec<&str>)> {
    let mut c = Cursor(data);
    let name = c.string()?;
    let n = c.u32()?;
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(c.string()?);
    }
    c.0.is_empty().then_some((name, queries))
}

/// Runs the handshake on (`r`, `w`): `Some(session)` once an export is chosen, `None` when the
/// client aborted.
pub(super) async fn handshake<R, W>(
    r: &mut R,
    w: &mut W,
    exports: &Exports,
) -> Result<Option<Session>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greet = Vec::with_capacity(18);
    greet.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    greet.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greet.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&greet).await?;
    w.flush().await?;

    let cflags = read_u32(r).await?;
    if cflags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(ConnError::Protocol(format!(
            "unknown client flags {cflags:#x}"
        )));
    }
    let no_zeroes = cflags & proto::FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut extended = false;
    let mut base_allocation = false;

    loop {
        let magic = r.read_u64().await?;
        if magic != proto::IHAVEOPT {
            return Err(ConnError::Protocol(format!(
                "bad option magic {magic:#018x}"
            )));
        }
        let opt = read_u32(r).await?;
        let len = read_u32(r).await?;

        if opt == proto::OPT_EXPORT_NAME {
            if len as usize > proto::MAX_STRING {
                return Err(ConnError::Protocol("export name too long".into()));
            }
            let mut name = vec![0u8; len as usize];
            r.read_exact(&mut name).await?;
            let name = String::from_utf8_lossy(&name).into_owned();
            if extended {
                return Err(ConnError::Protocol(
                    "NBD_OPT_EXPORT_NAME after extended headers".into(),
                ));
            }
            let Some(export) = exports.get(&name) else {
                // This option cannot fail politely: the spec says to close.
                return Err(ConnError::Protocol(format!("no export named {name:?}")));
            };
            let mut reply = Vec::with_capacity(134);
            reply.extend_from_slice(&export.size().to_be_bytes());
            reply.extend_from_slice(&transmission_flags(&export, structured).to_be_bytes());
            if !no_zeroes {
                reply.extend_from_slice(&[0u8; 124]);
            }
            w.write_all(&reply).await?;
            w.flush().await?;
            return Ok(Some(Session {
                export,
                style: if structured {
                    ReplyStyle::Structured
                } else {
                    ReplyStyle::Simple
                },
                base_allocation,
            }));
        }

        if len > proto::MAX_OPTION_LEN {
            discard(r, u64::from(len)).await?;
            send_opt_error(w, opt, proto::REP_ERR_TOO_BIG, "option payload too big").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;

        match opt {
            proto::OPT_ABORT => {
                // Best effort: the client may already have gone.
                let _ = send_opt_reply(w, opt, proto::REP_ACK, &[]).await;
                let _ = w.flush().await;
                return Ok(None);
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    send_opt_error(w, opt, proto::REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                        .await?;
                    continue;
                }
                for name in exports.names() {
                    let mut d = Vec::with_capacity(4 + name.len());
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name.as_bytes());
                    send_opt_reply(w, opt, proto::REP_SERVER, &d).await?;
                }
                send_opt_reply(w, opt, proto::REP_ACK, &[]).await?;
                w.flush().await?;
            }
            proto::OPT_STARTTLS => {
                send_opt_error(w, opt, proto::REP_ERR_POLICY, "TLS is not offered").await?;
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let Some((name, infos)) = parse_info_request(&data) else {
                    send_opt_error(w, opt, proto::REP_ERR_INVALID, "malformed info request")
                        .await?;
                    continue;
                };
                let Some(export) = exports.get(name) else {
                    let msg = format!("no export named {name:?}");
                    send_opt_error(w, opt, proto::REP_ERR_UNKNOWN, &msg).await?;
                    continue;
                };
                let mut d = Vec::with_capacity(12);
                d.extend_from_slice(&proto::INFO_EXPORT.to_be_bytes());
                d.extend_from_slice(&export.size().to_be_bytes());
                d.extend_from_slice(&transmission_flags(&export, structured).to_be_bytes());
                send_opt_reply(w, opt, proto::REP_INFO, &d).await?;
                for info in infos {
                    let mut d = info.to_be_bytes().to_vec();
                    match info {
                        proto::INFO_NAME => d.extend_from_slice(export.name().as_bytes()),
                        proto::INFO_DESCRIPTION => match export.description() {
                            Some(s) => d.extend_from_slice(s.as_bytes()),
                            None => continue,
                        },
                        proto::INFO_BLOCK_SIZE => {
                            d.extend_from_slice(&1u32.to_be_bytes());
                            d.extend_from_slice(&4096u32.to_be_bytes());
                            d.extend_from_slice(&(proto::MAX_PAYLOAD as u32).to_be_bytes());
                        }
                        _ => continue,
                    }
                    send_opt_reply(w, opt, proto::REP_INFO, &d).await?;
                }
                send_opt_reply(w, opt, proto::REP_ACK, &[]).await?;
                w.flush().await?;
                if opt == proto::OPT_GO {
                    let style = if extended {
                        ReplyStyle::Extended
                    } else if structured {
                        ReplyStyle::Structured
                    } else {
                        ReplyStyle::Simple
                    };
                    return Ok(Some(Session {
                        export,
                        style,
                        base_allocation,
                    }));
                }
            }
            proto::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send_opt_error(w, opt, proto::REP_ERR_INVALID, "option takes no data").await?;
                } else if extended {
                    send_opt_error(
                        w,
                        opt,
                        proto::REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    )
                    .await?;
                } else if structured {
                    send_opt_error(w, opt, proto::REP_ERR_INVALID, "already negotiated").await?;
                } else {
                    structured = true;
                    send_opt_reply(w, opt, proto::REP_ACK, &[]).await?;
                    w.flush().await?;
                }
            }
            proto::OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    send_opt_error(w, opt, proto::REP_ERR_INVALID, "option takes no data").await?;
                } else if extended {
                    send_opt_error(w, opt, proto::REP_ERR_INVALID, "already negotiated").await?;
                } else {
                    extended = true;
                    structured = true;
                    send_opt_reply(w, opt, proto::REP_ACK, &[]).await?;
                    w.flush().await?;
                }
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                let set = opt == proto::OPT_SET_META_CONTEXT;
                if !structured {
                    send_opt_error(
                        w,
                        opt,
                        proto::REP_ERR_INVALID,
                        "negotiate structured replies first",
                    )
                    .await?;
                    continue;
                }
                let Some((name, queries)) = parse_meta_request(&data) else {
                    send_opt_error(w, opt, proto::REP_ERR_INVALID, "malformed meta request")
                        .await?;
                    continue;
                };
                if exports.get(name).is_none() {
                    let msg = format!("no export named {name:?}");
                    send_opt_error(w, opt, proto::REP_ERR_UNKNOWN, &msg).await?;
                    continue;
                }
                let wanted = if set {
                    queries.contains(&proto::BASE_ALLOCATION)
                } else {
                    queries.is_empty()
                        || queries
                            .iter()
                            .any(|q| *q == "base:" || *q == proto::BASE_ALLOCATION)
                };
                if set {
                    base_allocation = wanted;
                }
                if wanted {
                    let id = if set { proto::BASE_ALLOCATION_ID } else { 0 };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
                    send_opt_reply(w, opt, proto::REP_META_CONTEXT, &d).await?;
                }
                send_opt_reply(w, opt, proto::REP_ACK, &[]).await?;
                w.flush().await?;
            }
            _ => {
                let msg = format!("option {opt} is not supported");
                send_opt_error(w, opt, proto::REP_ERR_UNSUP, &msg).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_must_use_exactly_its_bytes() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Some(("abc", vec![proto::INFO_BLOCK_SIZE]))
        );
        d.push(0);
        assert_eq!(parse_info_request(&d), None);
        assert_eq!(parse_info_request(&[0, 0, 0, 9, b'a']), None);
    }
}
