//! NBD wire format: magics, option/command/reply numbers, and the fixed-size headers of the
//! fixed-newstyle handshake and the transmission phase (compact and extended).
//!
//! All numbers come from the NBD protocol specification (`doc/proto.md` of the
//! NetworkBlockDevice/nbd project). Everything on the wire is big-endian.

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second magic of the greeting and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`.
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// `NBD_OPT_EXTENDED_HEADERS`.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER` (one export in reply to `NBD_OPT_LIST`).
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`: option unknown to this server.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// `NBD_REP_ERR_POLICY`.
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// `NBD_REP_ERR_INVALID`: syntactically or semantically invalid option.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// `NBD_REP_ERR_UNKNOWN`: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// `NBD_REP_ERR_SHUTDOWN`: the server is going down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
/// `NBD_REP_ERR_TOO_BIG`: option payload too big.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;
/// `NBD_REP_ERR_EXT_HEADER_REQD`.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR | 10;

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: flags field is valid.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: export is read-only.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` supported.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` supported.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` supported.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` supported.
pub const TF_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections to one export see one consistent disk.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

/// Compact request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Extended request magic.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Extended reply chunk magic.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access (durable before the reply).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: do not fragment a structured read reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: one extent only in a block status reply.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (extended headers): the length field is a payload length.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Structured reply flag: last chunk of this reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload (success of a command without data).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: block status with 32-bit extents.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: block status with 64-bit extents (extended headers only).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Chunk type: error with a message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// NBD error numbers (the protocol's own values, not the host's errno).
pub mod errno {
    /// Operation not permitted (writing a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument (out of range, bad flags, unknown command).
    pub const EINVAL: u32 = 22;
    /// No space left (also: write past the end).
    pub const ENOSPC: u32 = 28;
    /// Value too large (request longer than the maximum payload).
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server is shutting down (export removed).
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` state bit: the extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` state bit: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context served.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Context id given to `base:allocation` when selected.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Largest payload (read or write) accepted in one request; the protocol's default maximum.
pub const MAX_PAYLOAD: u64 = 32 << 20;
/// Largest option payload read during the handshake; longer ones are refused with TOO_BIG.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest string (export name, context name) accepted, per the spec.
pub const MAX_STRING: usize = 4096;

/// One request of the transmission phase, from either header style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub kind: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length (effect length, or payload length for writes).
    pub length: u64,
}

/// Size of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;

/// Why a request header was rejected (the connection cannot be resynchronised).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadMagic(pub u32);

/// Parses a request header: `buf` holds `REQUEST_LEN` bytes (compact) or `EXTENDED_REQUEST_LEN`
/// (extended). The magic must match the negotiated style.
pub fn parse_request(buf: &[u8], extended: bool) -> Result<Request, BadMagic> {
    let magic = be32(&buf[0..4]);
    let want = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != want {
        return Err(BadMagic(magic));
    }
    let length = if extended {
        be64(&buf[24..32])
    } else {
        u64::from(be32(&buf[24..28]))
    };
    Ok(Request {
        flags: be16(&buf[4..6]),
        kind: be16(&buf[6..8]),
        cookie: be64(&buf[8..16]),
        offset: be64(&buf[16..24]),
        length,
    })
}

/// Encodes a request header (used by tests and the fuzz target to play the client).
pub fn encode_request(req: &Request, extended: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(EXTENDED_REQUEST_LEN);
    if extended {
        v.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
    } else {
        v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    }
    v.extend_from_slice(&req.flags.to_be_bytes());
    v.extend_from_slice(&req.kind.to_be_bytes());
    v.extend_from_slice(&req.cookie.to_be_bytes());
    v.extend_from_slice(&req.offset.to_be_bytes());
    if extended {
        v.extend_from_slice(&req.length.to_be_bytes());
    } else {
        v.extend_from_slice(&(req.length as u32).to_be_bytes());
    }
    v
}

/// The reply style negotiated for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStyle {
    /// Simple replies only (16-byte header).
    Simple,
    /// Structured reply chunks (20-byte header).
    Structured,
    /// Extended headers (32-byte header on every reply, 64-bit lengths).
    Extended,
}

impl ReplyStyle {
    /// Header length of a chunk (structured or extended), 16 for simple replies.
    pub fn chunk_header_len(self) -> usize {
        match self {
            ReplyStyle::Simple => 16,
            ReplyStyle::Structured => 20,
            ReplyStyle::Extended => 32,
        }
    }
}

/// Writes a simple reply header into `out` (16 bytes).
pub fn put_simple_reply(out: &mut [u8], error: u32, cookie: u64) {
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// Writes a structured (20 bytes) or extended (32 bytes) chunk header into `out`.
/// `offset` is the request's offset (extended headers carry it in every chunk).
pub fn put_chunk_header(
    out: &mut [u8],
    style: ReplyStyle,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    payload_len: u64,
) {
    match style {
        ReplyStyle::Extended => {
            out[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            out[4..6].copy_from_slice(&flags.to_be_bytes());
            out[6..8].copy_from_slice(&kind.to_be_bytes());
            out[8..16].copy_from_slice(&cookie.to_be_bytes());
            out[16..24].copy_from_slice(&offset.to_be_bytes());
            out[24..32].copy_from_slice(&payload_len.to_be_bytes());
        }
        _ => {
            out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            out[4..6].copy_from_slice(&flags.to_be_bytes());
            out[6..8].copy_from_slice(&kind.to_be_bytes());
            out[8..16].copy_from_slice(&cookie.to_be_bytes());
            out[16..20].copy_from_slice(&(payload_len as u32).to_be_bytes());
        }
    }
}

/// Big-endian u16 from the first 2 bytes.
pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// Big-endian u32 from the first 4 bytes.
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Big-endian u64 from the first 8 bytes.
pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_and_extended_requests_round_trip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0xdead_beef_0000_0001,
            offset: 1 << 40,
            length: 4096,
        };
        let c = encode_request(&r, false);
        assert_eq!(c.len(), REQUEST_LEN);
        assert_eq!(parse_request(&c, false), Ok(r));
        let e = encode_request(&r, true);
        assert_eq!(e.len(), EXTENDED_REQUEST_LEN);
        assert_eq!(parse_request(&e, true), Ok(r));
    }

    #[test]
    fn request_with_the_other_styles_magic_is_rejected() {
        let r = Request {
            flags: 0,
            kind: CMD_READ,
            cookie: 1,
            offset: 0,
            length: 512,
        };
        let c = encode_request(&r, false);
        assert_eq!(parse_request(&c, true), Err(BadMagic(REQUEST_MAGIC)));
    }

    #[test]
    fn extended_chunk_header_carries_offset_and_64_bit_length() {
        let mut h = [0u8; 32];
        put_chunk_header(
            &mut h,
            ReplyStyle::Extended,
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            7,
            4096,
            1 << 33,
        );
        assert_eq!(be32(&h), EXTENDED_REPLY_MAGIC);
        assert_eq!(be64(&h[16..]), 4096);
        assert_eq!(be64(&h[24..]), 1 << 33);
    }
}
