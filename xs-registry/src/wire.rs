//! The xenstore wire protocol (`xen/include/public/io/xs_wire.h`): a 16-byte header
//! `{type, req_id, tx_id, len}` in native byte order, followed by `len` (≤ 4096) payload bytes,
//! usually NUL-terminated strings. Shared by the test server and the client additions.

use crate::Error;

/// Size of the message header in bytes.
pub const HEADER_LEN: usize = 16;
/// Largest payload either side may send (`XENSTORE_PAYLOAD_MAX`).
pub const PAYLOAD_MAX: usize = 4096;
/// Longest absolute path (`XENSTORE_ABS_PATH_MAX`).
pub const ABS_PATH_MAX: usize = 3072;
/// Longest relative path (`XENSTORE_REL_PATH_MAX`).
pub const REL_PATH_MAX: usize = 2048;

macro_rules! msg_types {
    ($($(#[$m:meta])* $name:ident = $val:expr,)*) => {
        /// A message type (`enum xsd_sockmsg_type`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum MsgType {
            $($(#[$m])* $name = $val,)*
        }
        impl MsgType {
            /// The type with this number, if xs_wire.h defines one.
            pub fn from_u32(v: u32) -> Option<Self> {
                match v {
                    $($val => Some(Self::$name),)*
                    _ => None,
                }
            }
        }
    };
}

msg_types! {
    /// XS_CONTROL (formerly XS_DEBUG).
    Control = 0,
    /// XS_DIRECTORY: list a node's children.
    Directory = 1,
    /// XS_READ: a node's value.
    Read = 2,
    /// XS_GET_PERMS: a node's permissions.
    GetPerms = 3,
    /// XS_WATCH: register a watch (path, token).
    Watch = 4,
    /// XS_UNWATCH: remove a watch.
    Unwatch = 5,
    /// XS_TRANSACTION_START.
    TransactionStart = 6,
    /// XS_TRANSACTION_END ("T" commits, "F" aborts).
    TransactionEnd = 7,
    /// XS_INTRODUCE: the toolstack introduces a domain.
    Introduce = 8,
    /// XS_RELEASE: the toolstack releases a domain.
    Release = 9,
    /// XS_GET_DOMAIN_PATH: `/local/domain/<N>`.
    GetDomainPath = 10,
    /// XS_WRITE: path NUL value.
    Write = 11,
    /// XS_MKDIR.
    Mkdir = 12,
    /// XS_RM.
    Rm = 13,
    /// XS_SET_PERMS.
    SetPerms = 14,
    /// XS_WATCH_EVENT: path NUL token NUL, unsolicited.
    WatchEvent = 15,
    /// XS_ERROR: an error name such as `ENOENT`.
    Error = 16,
    /// XS_IS_DOMAIN_INTRODUCED.
    IsDomainIntroduced = 17,
    /// XS_RESUME.
    Resume = 18,
    /// XS_SET_TARGET.
    SetTarget = 19,
    /// XS_RESET_WATCHES.
    ResetWatches = 21,
    /// XS_DIRECTORY_PART: a directory listing in pieces.
    DirectoryPart = 22,
}

/// A message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Raw message type (may be one xs_wire.h does not define).
    pub ty: u32,
    /// Request id, echoed in the reply.
    pub req_id: u32,
    /// Transaction id (0: none).
    pub tx_id: u32,
    /// Payload length.
    pub len: u32,
}

impl Header {
    /// Decodes a header (native byte order, as xs_wire.h's struct).
    pub fn decode(b: &[u8; HEADER_LEN]) -> Self {
        let u = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            ty: u(0),
            req_id: u(4),
            tx_id: u(8),
            len: u(12),
        }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.ty.to_ne_bytes());
        b[4..8].copy_from_slice(&self.req_id.to_ne_bytes());
        b[8..12].copy_from_slice(&self.tx_id.to_ne_bytes());
        b[12..16].copy_from_slice(&self.len.to_ne_bytes());
        b
    }

    /// Checks what can be checked before reading the payload: the type is known and the
    /// length is within [`PAYLOAD_MAX`].
    pub fn validate(&self) -> Result<MsgType, Error> {
        if self.len as usize > PAYLOAD_MAX {
            return Err(Error::Wire(format!(
                "payload length {} exceeds the maximum {PAYLOAD_MAX}",
                self.len
            )));
        }
        MsgType::from_u32(self.ty)
            .ok_or_else(|| Error::Wire(format!("unknown message type {}", self.ty)))
    }
}

/// Encodes a whole message (header + payload). Panics only if `payload` exceeds `u32`.
pub fn encode_msg(ty: MsgType, req_id: u32, tx_id: u32, payload: &[u8]) -> Vec<u8> {
    let h = Header {
        ty: ty as u32,
        req_id,
        tx_id,
        len: payload.len() as u32,
    };
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(&h.encode());
    v.extend_from_slice(payload);
    v
}

/// Splits a payload made of NUL-terminated strings. Every string must be terminated
/// (a payload that does not end with NUL is an error); an empty payload gives no strings.
pub fn split_strings(payload: &[u8]) -> Result<Vec<&[u8]>, Error> {
    if payload.is_empty() {
        return Ok(Vec::new());
    }
    if payload.last() != Some(&0) {
        return Err(Error::Wire("payload string is not NUL-terminated".into()));
    }
    Ok(payload[..payload.len() - 1].split(|&c| c == 0).collect())
}

/// Splits a payload into its first NUL-terminated string and the raw rest (WRITE's
/// `path NUL value`, where the value is not terminated).
pub fn split_first(payload: &[u8]) -> Result<(&[u8], &[u8]), Error> {
    let nul = payload
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| Error::Wire("payload string is not NUL-terminated".into()))?;
    Ok((&payload[..nul], &payload[nul + 1..]))
}

/// A request as the server parses it: the header's fields and the payload's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Message type.
    pub ty: MsgType,
    /// Request id.
    pub req_id: u32,
    /// Transaction id.
    pub tx_id: u32,
    /// Arguments: NUL-separated strings (for WRITE: path, then the raw value).
    pub args: Vec<Vec<u8>>,
}

/// Parses one complete message (header + payload) into a [`Request`]. Rejects unknown types,
/// lengths that disagree with the header or exceed [`PAYLOAD_MAX`], and strings that are
/// not NUL-terminated. This is the entry point the wire fuzz target drives.
pub fn parse_request(msg: &[u8]) -> Result<Request, Error> {
    if msg.len() < HEADER_LEN {
        return Err(Error::Wire(format!(
            "message of {} bytes is shorter than a header",
            msg.len()
        )));
    }
    let mut hb = [0u8; HEADER_LEN];
    hb.copy_from_slice(&msg[..HEADER_LEN]);
    let h = Header::decode(&hb);
    let ty = h.validate()?;
    let payload = &msg[HEADER_LEN..];
    if payload.len() != h.len as usize {
        return Err(Error::Wire(format!(
            "header says {} payload bytes but {} follow",
            h.len,
            payload.len()
        )));
    }
    parse_payload(ty, &h, payload)
}

/// Parses the payload of a message whose header was validated.
pub fn parse_payload(ty: MsgType, h: &Header, payload: &[u8]) -> Result<Request, Error> {
    let args: Vec<Vec<u8>> = match ty {
        MsgType::Write => {
            let (p, v) = split_first(payload)?;
            vec![p.to_vec(), v.to_vec()]
        }
        MsgType::TransactionStart | MsgType::ResetWatches if payload.is_empty() => Vec::new(),
        _ => split_strings(payload)?
            .into_iter()
            .map(<[u8]>::to_vec)
            .collect(),
    };
    Ok(Request {
        ty,
        req_id: h.req_id,
        tx_id: h.tx_id,
        args,
    })
}

/// The error names a reply of type XS_ERROR may carry (`xsd_errors[]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum XsErrno {
    EINVAL,
    EACCES,
    EEXIST,
    EISDIR,
    ENOENT,
    ENOMEM,
    ENOSPC,
    EIO,
    ENOTEMPTY,
    ENOSYS,
    EROFS,
    EBUSY,
    EAGAIN,
    EISCONN,
    E2BIG,
    EPERM,
}

impl XsErrno {
    /// The name as sent on the wire (without the NUL).
    pub fn name(self) -> &'static str {
        use XsErrno::*;
        match self {
            EINVAL => "EINVAL",
            EACCES => "EACCES",
            EEXIST => "EEXIST",
            EISDIR => "EISDIR",
            ENOENT => "ENOENT",
            ENOMEM => "ENOMEM",
            ENOSPC => "ENOSPC",
            EIO => "EIO",
            ENOTEMPTY => "ENOTEMPTY",
            ENOSYS => "ENOSYS",
            EROFS => "EROFS",
            EBUSY => "EBUSY",
            EAGAIN => "EAGAIN",
            EISCONN => "EISCONN",
            E2BIG => "E2BIG",
            EPERM => "EPERM",
        }
    }

    /// Parses an error name; unknown names map to EINVAL, as libxenstore does.
    pub fn parse(s: &[u8]) -> Self {
        use XsErrno::*;
        let s = s.strip_suffix(&[0]).unwrap_or(s);
        [
            EINVAL, EACCES, EEXIST, EISDIR, ENOENT, ENOMEM, ENOSPC, EIO, ENOTEMPTY, ENOSYS, EROFS,
            EBUSY, EAGAIN, EISCONN, E2BIG, EPERM,
        ]
        .into_iter()
        .find(|e| e.name().as_bytes() == s)
        .unwrap_or(EINVAL)
    }
}

impl std::fmt::Display for XsErrno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_native_order() {
        let h = Header {
            ty: 11,
            req_id: 7,
            tx_id: 3,
            len: 9,
        };
        assert_eq!(Header::decode(&h.encode()), h);
        assert_eq!(&h.encode()[0..4], &11u32.to_ne_bytes());
    }

    #[test]
    fn write_payload_keeps_raw_value() {
        let msg = encode_msg(MsgType::Write, 1, 0, b"/a\0va\0lue");
        let r = parse_request(&msg).unwrap();
        assert_eq!(r.args, vec![b"/a".to_vec(), b"va\0lue".to_vec()]);
    }

    #[test]
    fn rejects_oversized_unknown_and_unterminated() {
        let mut m = encode_msg(MsgType::Read, 1, 0, b"/a\0");
        m[12..16].copy_from_slice(&5000u32.to_ne_bytes());
        assert!(parse_request(&m).is_err());
        let m = encode_msg(MsgType::Read, 1, 0, b"/a");
        assert!(parse_request(&m).is_err());
        let mut m = encode_msg(MsgType::Read, 1, 0, b"/a\0");
        m[0..4].copy_from_slice(&20u32.to_ne_bytes());
        assert!(parse_request(&m).is_err());
        let mut m = encode_msg(MsgType::Read, 1, 0, b"/a\0");
        m.push(0);
        assert!(parse_request(&m).is_err());
    }

    #[test]
    fn error_names_round_trip_and_unknown_is_einval() {
        assert_eq!(XsErrno::parse(b"EAGAIN\0"), XsErrno::EAGAIN);
        assert_eq!(XsErrno::parse(b"EWHAT"), XsErrno::EINVAL);
    }
}
