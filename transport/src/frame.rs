//! The frame codec (DESIGN.md §3): a little-endian `u32` length followed by that many bytes of
//! bincode 1.3 encoding a [`Frame`] `{ id: u64, body }`.
//!
//! bincode options: fixed-width little-endian integers (the same wire format as
//! `bincode::serialize`), an explicit size limit equal to the frame maximum, and trailing bytes
//! rejected. Everything that reads or writes frames goes through this module.

use crate::error::{Error, Result};
use bincode::Options;
use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Default maximum frame payload: 16 MiB.
pub const MAX_FRAME_DEFAULT: u32 = 16 * 1024 * 1024;

/// Length of the frame header (the little-endian `u32` payload length).
pub const HEADER_LEN: usize = 4;

/// One frame: a request id and a body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame<B> {
    /// Request id; replies carry the id of the request they answer. Id 0 is the hello.
    pub id: u64,
    /// The payload.
    pub body: B,
}

fn options(max: u32) -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .reject_trailing_bytes()
        .with_limit(u64::from(max))
}

/// Encode a frame (header and payload) into a new buffer. Fails if the payload exceeds `max`.
pub fn encode<B: Serialize>(id: u64, body: &B, max: u32) -> Result<Vec<u8>> {
    let frame = FrameRef { id, body };
    let len = bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .serialized_size(&frame)
        .map_err(|e| Error::Encode(e.to_string()))?;
    if len > u64::from(max) {
        return Err(Error::FrameTooLarge { len, max });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + len as usize);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    options(max)
        .serialize_into(&mut out, &frame)
        .map_err(|e| Error::Encode(e.to_string()))?;
    Ok(out)
}

/// Decode a frame payload (without the header). Malformed bincode, a payload over `max` and
/// trailing bytes are all errors.
pub fn decode<B: DeserializeOwned>(payload: &[u8], max: u32) -> Result<Frame<B>> {
    if payload.len() as u64 > u64::from(max) {
        return Err(Error::FrameTooLarge {
            len: payload.len() as u64,
            max,
        });
    }
    options(max)
        .deserialize(payload)
        .map_err(|e| Error::Decode(e.to_string()))
}

/// Split one complete frame off the front of `buf`: `Ok(Some((payload, rest)))` when a whole
/// frame is there, `Ok(None)` when more bytes are needed, an error when the header announces
/// more than `max`.
pub fn split_frame(buf: &[u8], max: u32) -> Result<Option<(&[u8], &[u8])>> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len > max {
        return Err(Error::FrameTooLarge {
            len: u64::from(len),
            max,
        });
    }
    let end = HEADER_LEN + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((&buf[HEADER_LEN..end], &buf[end..])))
}

#[derive(Serialize)]
struct FrameRef<'a, B> {
    id: u64,
    body: &'a B,
}

/// Reads frames from a byte stream. Buffered and cancellation safe: a `read` future dropped
/// half-way (e.g. in `tokio::select!`) loses no bytes.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    max: u32,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wrap a stream; frames longer than `max` are refused.
    pub fn new(inner: R, max: u32) -> Self {
        FrameReader {
            inner,
            max,
            buf: BytesMut::with_capacity(8192),
        }
    }

    /// Read the next frame's payload. `Ok(None)` on a clean end of stream at a frame boundary;
    /// an error for an oversized announcement or a stream that ends mid-frame.
    pub async fn read_payload(&mut self) -> Result<Option<Bytes>> {
        loop {
            let want = if self.buf.len() >= HEADER_LEN {
                let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                if len > self.max {
                    return Err(Error::FrameTooLarge {
                        len: u64::from(len),
                        max: self.max,
                    });
                }
                let end = HEADER_LEN + len as usize;
                if self.buf.len() >= end {
                    let mut frame = self.buf.split_to(end);
                    return Ok(Some(frame.split_off(HEADER_LEN).freeze()));
                }
                end
            } else {
                HEADER_LEN
            };
            self.buf
                .reserve(want.saturating_sub(self.buf.len()).max(8192));
            let n = self
                .inner
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| Error::io("reading a frame", e))?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(Error::Truncated {
                    got: self.buf.len(),
                    want,
                });
            }
        }
    }

    /// Read and decode the next frame. `Ok(None)` on a clean end of stream.
    pub async fn read<B: DeserializeOwned>(&mut self) -> Result<Option<Frame<B>>> {
        match self.read_payload().await? {
            None => Ok(None),
            Some(p) => decode(&p, self.max).map(Some),
        }
    }

    /// The wrapped stream.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Writes frames to a byte stream.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    max: u32,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Wrap a stream; frames longer than `max` are refused before anything is written.
    pub fn new(inner: W, max: u32) -> Self {
        FrameWriter { inner, max }
    }

    /// Encode and write one frame, then flush.
    pub async fn write<B: Serialize>(&mut self, id: u64, body: &B) -> Result<()> {
        let bytes = encode(id, body, self.max)?;
        self.write_encoded(&bytes).await?;
        self.flush().await
    }

    /// Write an already encoded frame (from [`encode`]) without flushing.
    pub async fn write_encoded(&mut self, bytes: &[u8]) -> Result<()> {
        self.inner
            .write_all(bytes)
            .await
            .map_err(|e| Error::io("writing a frame", e))
    }

    /// Flush the stream.
    pub async fn flush(&mut self) -> Result<()> {
        self.inner
            .flush()
            .await
            .map_err(|e| Error::io("flushing frames", e))
    }

    /// Shut the write side down (the peer sees end of stream).
    pub async fn shutdown(&mut self) -> Result<()> {
        self.inner
            .shutdown()
            .await
            .map_err(|e| Error::io("closing the stream", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Body {
        Ping(u32),
        Data(Vec<u8>),
        Text(String),
    }

    #[test]
    fn round_trip_preserves_id_and_body() {
        let bytes = encode(7, &Body::Text("hello".into()), MAX_FRAME_DEFAULT).unwrap();
        let (payload, rest) = split_frame(&bytes, MAX_FRAME_DEFAULT).unwrap().unwrap();
        assert!(rest.is_empty());
        let f: Frame<Body> = decode(payload, MAX_FRAME_DEFAULT).unwrap();
        assert_eq!(f.id, 7);
        assert_eq!(f.body, Body::Text("hello".into()));
    }

    #[test]
    fn header_is_little_endian_payload_length() {
        let bytes = encode(1, &Body::Ping(5), MAX_FRAME_DEFAULT).unwrap();
        // id u64 + enum tag u32 + u32
        assert_eq!(&bytes[..4], &16u32.to_le_bytes());
        assert_eq!(bytes.len(), 20);
        assert_eq!(&bytes[4..12], &1u64.to_le_bytes());
    }

    #[test]
    fn oversized_body_is_refused_on_encode() {
        let err = encode(1, &Body::Data(vec![0; 200]), 100).unwrap_err();
        assert!(matches!(err, Error::FrameTooLarge { .. }), "{err}");
    }

    #[test]
    fn oversized_header_is_refused_before_reading_body() {
        let mut bytes = 1000u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 8]);
        assert!(matches!(
            split_frame(&bytes, 100),
            Err(Error::FrameTooLarge { len: 1000, .. })
        ));
    }

    #[test]
    fn trailing_garbage_inside_a_frame_is_rejected() {
        let mut bytes = encode(3, &Body::Ping(1), MAX_FRAME_DEFAULT).unwrap();
        bytes.push(0xAA);
        let len = (bytes.len() - HEADER_LEN) as u32;
        bytes[..4].copy_from_slice(&len.to_le_bytes());
        let (payload, _) = split_frame(&bytes, MAX_FRAME_DEFAULT).unwrap().unwrap();
        let err = decode::<Body>(payload, MAX_FRAME_DEFAULT).unwrap_err();
        assert!(matches!(err, Error::Decode(_)), "{err}");
    }

    #[test]
    fn undecodable_payload_is_rejected() {
        // Enum tag 99 does not exist.
        let mut payload = 1u64.to_le_bytes().to_vec();
        payload.extend_from_slice(&99u32.to_le_bytes());
        assert!(matches!(
            decode::<Body>(&payload, MAX_FRAME_DEFAULT),
            Err(Error::Decode(_))
        ));
    }

    #[test]
    fn huge_vec_length_prefix_does_not_allocate_past_limit() {
        let mut payload = 1u64.to_le_bytes().to_vec();
        payload.extend_from_slice(&1u32.to_le_bytes()); // Body::Data
        payload.extend_from_slice(&u64::MAX.to_le_bytes()); // absurd length
        assert!(matches!(
            decode::<Body>(&payload, 1024),
            Err(Error::Decode(_))
        ));
    }

    #[tokio::test]
    async fn reader_reports_truncated_frame() {
        let bytes = encode(9, &Body::Text("truncate me".into()), MAX_FRAME_DEFAULT).unwrap();
        let cut = &bytes[..bytes.len() - 3];
        let mut r = FrameReader::new(cut, MAX_FRAME_DEFAULT);
        let err = r.read::<Body>().await.unwrap_err();
        assert!(matches!(err, Error::Truncated { .. }), "{err}");
        let mut r = FrameReader::new(&bytes[..2], MAX_FRAME_DEFAULT);
        assert!(matches!(
            r.read::<Body>().await,
            Err(Error::Truncated { got: 2, want: 4 })
        ));
    }

    #[tokio::test]
    async fn reader_reads_consecutive_frames_then_clean_eof() {
        let mut bytes = encode(1, &Body::Ping(1), MAX_FRAME_DEFAULT).unwrap();
        bytes.extend(encode(2, &Body::Data(vec![1, 2, 3]), MAX_FRAME_DEFAULT).unwrap());
        let mut r = FrameReader::new(&bytes[..], MAX_FRAME_DEFAULT);
        assert_eq!(r.read::<Body>().await.unwrap().unwrap().id, 1);
        let f = r.read::<Body>().await.unwrap().unwrap();
        assert_eq!(f.body, Body::Data(vec![1, 2, 3]));
        assert!(r.read::<Body>().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn writer_then_reader_round_trip() {
        let (a, b) = tokio::io::duplex(64);
        let mut w = FrameWriter::new(a, MAX_FRAME_DEFAULT);
        let t = tokio::spawn(async move {
            for i in 0..10u64 {
                w.write(i, &Body::Data(vec![i as u8; 100])).await.unwrap();
            }
        });
        let mut r = FrameReader::new(b, MAX_FRAME_DEFAULT);
        for i in 0..10u64 {
            let f = r.read::<Body>().await.unwrap().unwrap();
            assert_eq!(
                f,
                Frame {
                    id: i,
                    body: Body::Data(vec![i as u8; 100])
                }
            );
        }
        t.await.unwrap();
        assert!(r.read::<Body>().await.unwrap().is_none());
    }
}
