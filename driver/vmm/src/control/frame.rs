//! Framing of control requests over a byte stream (the test machine's COM1, reached as a TCP
//! socket): shared by the test kernel's server and `ackctl`, so both ends agree by construction.
//!
//! A frame is, little-endian:
//!
//! ```text
//! offset 0   magic    "AckV"
//!        4   kind     u16   1 = request, 2 = response, 3 = NAK
//!        6   seq      u16   chosen by the client, echoed by the response or NAK
//!        8   len      u32   payload bytes (≤ the receiver's maximum)
//!       12   hcrc     u32   CRC-32 of bytes 0..12
//!       16   payload  len bytes
//!   16+len   pcrc     u32   CRC-32 of the payload
//! ```
//!
//! Payloads: a request is `code u32, output capacity u32, input bytes`; a response is
//! `status u32` then the reply (status 0) or an [`ErrorReply`](super::wire::ErrorReply); a NAK is
//! a [`FrameError`] as three `u32`s. The header has its own CRC so a corrupted length is caught
//! before the receiver waits for bytes that will never come. A broken frame is rejected and the
//! receiver resynchronises by scanning for the next magic; bytes before a magic are garbage.
//!
//! **Runs in:** anywhere (pure).
#![forbid(unsafe_code)]

use core::fmt;

use super::error::saturate;

/// Start of every frame.
pub const MAGIC: [u8; 4] = *b"AckV";
/// Bytes before the payload.
pub const HEADER_SIZE: usize = 16;
/// Bytes after the payload.
pub const TRAILER_SIZE: usize = 4;
/// Framing bytes around a payload.
pub const OVERHEAD: usize = HEADER_SIZE + TRAILER_SIZE;
/// No receiver accepts more payload than this, whatever its buffer.
pub const MAX_PAYLOAD: usize = 1 << 24;
/// A request payload's prefix: code and output capacity.
pub const REQUEST_PREFIX: usize = 8;
/// A response payload's prefix: status.
pub const RESPONSE_PREFIX: usize = 4;
/// A NAK's payload: a [`FrameError`] as code and two arguments.
pub const NAK_PAYLOAD: usize = 12;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Client to server: a control request.
    Request = 1,
    /// Server to client: the answer to the request with the same `seq`.
    Response = 2,
    /// Either way: the last frame received was broken (payload: the [`FrameError`]).
    Nak = 3,
}

impl TryFrom<u16> for Kind {
    type Error = u16;
    fn try_from(v: u16) -> Result<Self, u16> {
        match v {
            1 => Ok(Self::Request),
            2 => Ok(Self::Response),
            3 => Ok(Self::Nak),
            other => Err(other),
        }
    }
}

/// One decoded frame, borrowing its payload from the receive buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// What it carries.
    pub kind: Kind,
    /// The request's sequence number.
    pub seq: u16,
    /// Payload bytes (checksum verified).
    pub payload: &'a [u8],
}

/// Why bytes on the link were not a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Bytes that do not start a frame were skipped.
    Garbage {
        /// How many.
        bytes: u32,
    },
    /// The header's CRC does not match: the header (and so its length) cannot be trusted.
    HeaderChecksum,
    /// The header names no known kind.
    UnknownKind {
        /// The value found.
        kind: u16,
    },
    /// The payload is longer than the receiver accepts.
    Oversized {
        /// Payload length announced (or asked to encode).
        len: u32,
        /// The receiver's maximum.
        max: u32,
    },
    /// The payload's CRC does not match.
    PayloadChecksum {
        /// CRC carried by the frame.
        expected: u32,
        /// CRC of the bytes received.
        got: u32,
    },
    /// The link went quiet in the middle of a frame.
    Truncated {
        /// Bytes received.
        have: u32,
        /// Bytes the frame (or at least its header) needs.
        need: u32,
    },
    /// The payload is too short for its kind's prefix.
    ShortPayload {
        /// Payload bytes.
        len: u32,
        /// Bytes the prefix needs.
        needed: u32,
    },
    /// A valid frame of a kind this end does not accept (a server receiving a response).
    UnexpectedKind {
        /// The kind found.
        kind: u16,
    },
    /// The output buffer cannot hold the frame to encode.
    BufferTooSmall {
        /// Bytes needed.
        needed: u32,
        /// Bytes available.
        got: u32,
    },
}

impl FrameError {
    /// Stable code for a NAK payload.
    pub const fn code(&self) -> u32 {
        match self {
            Self::Garbage { .. } => 1,
            Self::HeaderChecksum => 2,
            Self::UnknownKind { .. } => 3,
            Self::Oversized { .. } => 4,
            Self::PayloadChecksum { .. } => 5,
            Self::Truncated { .. } => 6,
            Self::ShortPayload { .. } => 7,
            Self::UnexpectedKind { .. } => 8,
            Self::BufferTooSmall { .. } => 9,
        }
    }

    const fn args(&self) -> (u32, u32) {
        match *self {
            Self::Garbage { bytes } => (bytes, 0),
            Self::HeaderChecksum => (0, 0),
            Self::UnknownKind { kind } | Self::UnexpectedKind { kind } => (kind as u32, 0),
            Self::Oversized { len, max } => (len, max),
            Self::PayloadChecksum { expected, got } => (expected, got),
            Self::Truncated { have, need } => (have, need),
            Self::ShortPayload { len, needed } => (len, needed),
            Self::BufferTooSmall { needed, got } => (needed, got),
        }
    }

    const fn from_parts(code: u32, a: u32, b: u32) -> Option<Self> {
        // Kinds are u16 on the wire; a larger value is a corrupt NAK.
        let kind = if a > u16::MAX as u32 {
            None
        } else {
            Some(a as u16)
        };
        Some(match (code, kind) {
            (1, _) => Self::Garbage { bytes: a },
            (2, _) => Self::HeaderChecksum,
            (3, Some(kind)) => Self::UnknownKind { kind },
            (4, _) => Self::Oversized { len: a, max: b },
            (5, _) => Self::PayloadChecksum {
                expected: a,
                got: b,
            },
            (6, _) => Self::Truncated { have: a, need: b },
            (7, _) => Self::ShortPayload { len: a, needed: b },
            (8, Some(kind)) => Self::UnexpectedKind { kind },
            (9, _) => Self::BufferTooSmall { needed: a, got: b },
            _ => return None,
        })
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Garbage { bytes } => write!(f, "{bytes} bytes of garbage between frames"),
            Self::HeaderChecksum => f.write_str("frame header checksum mismatch"),
            Self::UnknownKind { kind } => write!(f, "unknown frame kind {kind}"),
            Self::Oversized { len, max } => {
                write!(f, "frame payload of {len} bytes exceeds the limit of {max}")
            }
            Self::PayloadChecksum { expected, got } => write!(
                f,
                "frame payload checksum mismatch (frame says {expected:#010x}, bytes give {got:#010x})"
            ),
            Self::Truncated { have, need } => {
                write!(f, "truncated frame: {have} of {need} bytes arrived")
            }
            Self::ShortPayload { len, needed } => {
                write!(
                    f,
                    "frame payload of {len} bytes is shorter than its {needed}-byte prefix"
                )
            }
            Self::UnexpectedKind { kind } => write!(f, "unexpected frame kind {kind}"),
            Self::BufferTooSmall { needed, got } => {
                write!(
                    f,
                    "frame of {needed} bytes does not fit a {got}-byte buffer"
                )
            }
        }
    }
}

// ---- CRC-32 (IEEE 802.3, reflected, as zlib) -----------------------------------------------------

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut n: u32 = 0;
    while n < 256 {
        let mut c = n;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        #[expect(
            clippy::indexing_slicing,
            reason = "n < 256, evaluated at compile time"
        )]
        {
            table[n as usize] = c;
        }
        n += 1;
    }
    table
};

/// CRC-32 of `bytes` (the zlib/Ethernet polynomial; `crc32(b"123456789") == 0xCBF4_3926`).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = u32::MAX;
    for &b in bytes {
        #[expect(clippy::indexing_slicing, reason = "u8 index into a 256-entry table")]
        let t = CRC_TABLE[usize::from((crc as u8) ^ b)];
        crc = t ^ (crc >> 8);
    }
    !crc
}

// ---- decoding ---------------------------------------------------------------------------------

/// What the front of a receive buffer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole, valid frame; drop `used` bytes once it is handled.
    Frame {
        /// The frame.
        frame: Frame<'a>,
        /// Bytes it occupies at the front of the buffer.
        used: usize,
    },
    /// Not enough bytes yet to decide (nothing to drop).
    Incomplete,
    /// The front is not a valid frame: drop `skip` (≥ 1) bytes and decode again.
    Rejected {
        /// Why.
        error: FrameError,
        /// Sequence number, when the header was intact.
        seq: Option<u16>,
        /// Bytes to drop to resynchronise.
        skip: usize,
    },
}

fn u16_at(buf: &[u8], at: usize) -> u16 {
    buf.get(at..at + 2)
        .and_then(|s| <[u8; 2]>::try_from(s).ok())
        .map_or(0, u16::from_le_bytes)
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    buf.get(at..at + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_le_bytes)
}

/// Where a frame could start after position 0: the next full magic, or a tail of the buffer that
/// is a prefix of the magic (the rest may still arrive); `buf.len()` if neither.
fn next_candidate(buf: &[u8]) -> usize {
    (1..buf.len())
        .find(|&i| {
            buf.get(i..).is_some_and(|tail| {
                let n = tail.len().min(MAGIC.len());
                tail.get(..n) == MAGIC.get(..n)
            })
        })
        .unwrap_or(buf.len())
}

/// Decodes the frame at the front of `buf`, accepting payloads up to `max_payload` bytes (capped
/// at [`MAX_PAYLOAD`]).
pub fn decode(buf: &[u8], max_payload: usize) -> Decoded<'_> {
    let max_payload = max_payload.min(MAX_PAYLOAD);
    let have = buf.len().min(MAGIC.len());
    if buf.get(..have) != MAGIC.get(..have) {
        let skip = next_candidate(buf);
        return Decoded::Rejected {
            error: FrameError::Garbage {
                bytes: saturate(skip),
            },
            seq: None,
            skip,
        };
    }
    let Some(header) = buf.get(..HEADER_SIZE) else {
        return Decoded::Incomplete;
    };
    // From here the magic matched. A bad header CRC may mean a false magic inside other bytes:
    // drop one byte and scan again rather than trusting anything the header says.
    if crc32(header.get(..12).unwrap_or(&[])) != u32_at(header, 12) {
        return Decoded::Rejected {
            error: FrameError::HeaderChecksum,
            seq: None,
            skip: 1,
        };
    }
    let seq = u16_at(header, 6);
    let len = u32_at(header, 8);
    let kind = match Kind::try_from(u16_at(header, 4)) {
        Ok(kind) => kind,
        Err(kind) => {
            return Decoded::Rejected {
                error: FrameError::UnknownKind { kind },
                seq: Some(seq),
                skip: HEADER_SIZE,
            };
        }
    };
    let payload_len = len as usize;
    if payload_len > max_payload {
        // The header is genuine (its CRC matched): skip it; the payload bytes that follow are
        // scanned as garbage until the next magic.
        return Decoded::Rejected {
            error: FrameError::Oversized {
                len,
                max: saturate(max_payload),
            },
            seq: Some(seq),
            skip: HEADER_SIZE,
        };
    }
    let end = HEADER_SIZE + payload_len;
    let (Some(payload), Some(trailer)) = (buf.get(HEADER_SIZE..end), buf.get(end..end + 4)) else {
        return Decoded::Incomplete;
    };
    let expected = u32_at(trailer, 0);
    let got = crc32(payload);
    if expected != got {
        // Skip one byte only: a partial frame whose announced length swallowed the start of the
        // next frame fails here, and that next frame must still be found by the rescan.
        return Decoded::Rejected {
            error: FrameError::PayloadChecksum { expected, got },
            seq: Some(seq),
            skip: 1,
        };
    }
    Decoded::Frame {
        frame: Frame { kind, seq, payload },
        used: end + TRAILER_SIZE,
    }
}

/// For a receiver whose link went quiet: the error for the incomplete frame at the front of
/// `buf`, or `None` if `buf` is empty or decodes to something else. Drop the whole buffer after.
pub fn truncated(buf: &[u8], max_payload: usize) -> Option<FrameError> {
    if buf.is_empty() || decode(buf, max_payload) != Decoded::Incomplete {
        return None;
    }
    let need = if buf.len() < HEADER_SIZE {
        HEADER_SIZE
    } else {
        OVERHEAD.saturating_add(u32_at(buf, 8) as usize)
    };
    Some(FrameError::Truncated {
        have: saturate(buf.len()),
        need: saturate(need),
    })
}

// ---- encoding ---------------------------------------------------------------------------------

/// The part of `out` where a frame's payload goes (empty if `out` cannot hold the framing), so a
/// server can build its reply in place and then [`seal`] it.
pub fn payload_mut(out: &mut [u8]) -> &mut [u8] {
    let end = out.len().saturating_sub(TRAILER_SIZE);
    out.get_mut(HEADER_SIZE..end).unwrap_or(&mut [])
}

/// Writes header and trailer around the `payload_len` bytes already at `out[HEADER_SIZE..]`;
/// returns the frame's length.
pub fn seal(kind: Kind, seq: u16, out: &mut [u8], payload_len: usize) -> Result<usize, FrameError> {
    if payload_len > MAX_PAYLOAD {
        return Err(FrameError::Oversized {
            len: saturate(payload_len),
            max: saturate(MAX_PAYLOAD),
        });
    }
    let total = OVERHEAD + payload_len;
    let got = saturate(out.len());
    let small = FrameError::BufferTooSmall {
        needed: saturate(total),
        got,
    };
    let frame = out.get_mut(..total).ok_or(small)?;
    let (header, rest) = frame.split_at_mut(HEADER_SIZE);
    let (payload, trailer) = rest.split_at_mut(payload_len);
    header.get_mut(..4).ok_or(small)?.copy_from_slice(&MAGIC);
    header
        .get_mut(4..6)
        .ok_or(small)?
        .copy_from_slice(&(kind as u16).to_le_bytes());
    header
        .get_mut(6..8)
        .ok_or(small)?
        .copy_from_slice(&seq.to_le_bytes());
    header
        .get_mut(8..12)
        .ok_or(small)?
        .copy_from_slice(&saturate(payload_len).to_le_bytes());
    let hcrc = crc32(header.get(..12).ok_or(small)?);
    header
        .get_mut(12..16)
        .ok_or(small)?
        .copy_from_slice(&hcrc.to_le_bytes());
    trailer.copy_from_slice(&crc32(payload).to_le_bytes());
    Ok(total)
}

/// Encodes a frame whose payload is the concatenation of `parts`.
pub fn encode(kind: Kind, seq: u16, parts: &[&[u8]], out: &mut [u8]) -> Result<usize, FrameError> {
    let len = parts.iter().fold(0usize, |n, p| n.saturating_add(p.len()));
    let needed = OVERHEAD.saturating_add(len);
    if out.len() < needed {
        return Err(FrameError::BufferTooSmall {
            needed: saturate(needed),
            got: saturate(out.len()),
        });
    }
    let mut at = 0;
    let payload = payload_mut(out);
    for p in parts {
        let dst = payload
            .get_mut(at..at + p.len())
            .ok_or(FrameError::BufferTooSmall {
                needed: saturate(needed),
                got: saturate(at),
            })?;
        dst.copy_from_slice(p);
        at += p.len();
    }
    seal(kind, seq, out, len)
}

/// Encodes a request frame: `code`, the output capacity the caller offers, and the input.
pub fn encode_request(
    seq: u16,
    code: u32,
    output_capacity: u32,
    input: &[u8],
    out: &mut [u8],
) -> Result<usize, FrameError> {
    let prefix = [code.to_le_bytes(), output_capacity.to_le_bytes()];
    let [a, b] = &prefix;
    encode(Kind::Request, seq, &[a, b, input], out)
}

/// Encodes a NAK frame for `error`.
pub fn encode_nak(seq: u16, error: FrameError, out: &mut [u8]) -> Result<usize, FrameError> {
    let (a, b) = error.args();
    let parts = [error.code().to_le_bytes(), a.to_le_bytes(), b.to_le_bytes()];
    let [p0, p1, p2] = &parts;
    encode(Kind::Nak, seq, &[p0, p1, p2], out)
}

/// A request payload's parts: `(code, output capacity, input)`.
pub fn request_parts(payload: &[u8]) -> Result<(u32, u32, &[u8]), FrameError> {
    let input = payload
        .get(REQUEST_PREFIX..)
        .ok_or(FrameError::ShortPayload {
            len: saturate(payload.len()),
            needed: saturate(REQUEST_PREFIX),
        })?;
    Ok((u32_at(payload, 0), u32_at(payload, 4), input))
}

/// A response payload's parts: `(status, reply or ErrorReply bytes)`.
pub fn response_parts(payload: &[u8]) -> Result<(u32, &[u8]), FrameError> {
    let body = payload
        .get(RESPONSE_PREFIX..)
        .ok_or(FrameError::ShortPayload {
            len: saturate(payload.len()),
            needed: saturate(RESPONSE_PREFIX),
        })?;
    Ok((u32_at(payload, 0), body))
}

/// The error a NAK payload carries; `None` if the payload is not a valid NAK.
pub fn nak_error(payload: &[u8]) -> Option<FrameError> {
    if payload.len() != NAK_PAYLOAD {
        return None;
    }
    FrameError::from_parts(u32_at(payload, 0), u32_at(payload, 4), u32_at(payload, 8))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    fn request(seq: u16, input: &[u8]) -> Vec<u8> {
        let mut out = std::vec![0u8; OVERHEAD + REQUEST_PREFIX + input.len()];
        let n = encode_request(seq, 0x0022_6000, 64, input, &mut out).unwrap();
        assert_eq!(n, out.len());
        out
    }

    type Owned = (Kind, u16, Vec<u8>);

    /// Feeds `stream` to `decode` the way a receiver does; returns frames (kind, seq, payload)
    /// and errors, and the bytes left over.
    fn drain(mut stream: &[u8], max: usize) -> (Vec<Owned>, Vec<FrameError>, usize) {
        let (mut frames, mut errors) = (Vec::new(), Vec::new());
        loop {
            match decode(stream, max) {
                Decoded::Frame { frame, used } => {
                    frames.push((frame.kind, frame.seq, frame.payload.to_vec()));
                    stream = &stream[used..];
                }
                Decoded::Rejected { error, skip, .. } => {
                    assert!(skip >= 1 && skip <= stream.len());
                    errors.push(error);
                    stream = &stream[skip..];
                }
                Decoded::Incomplete => return (frames, errors, stream.len()),
            }
        }
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn a_frame_round_trips_and_reports_its_length() {
        let f = request(7, &[1, 2, 3]);
        let Decoded::Frame { frame, used } = decode(&f, 1024) else {
            panic!("not a frame")
        };
        assert_eq!(used, f.len());
        assert_eq!((frame.kind, frame.seq), (Kind::Request, 7));
        let (code, cap, input) = request_parts(frame.payload).unwrap();
        assert_eq!((code, cap, input), (0x0022_6000, 64, &[1u8, 2, 3][..]));
    }

    #[test]
    fn every_truncation_is_incomplete_never_a_frame() {
        let f = request(1, &[9; 10]);
        for cut in 0..f.len() {
            assert_eq!(decode(&f[..cut], 1024), Decoded::Incomplete, "cut at {cut}");
        }
        assert_eq!(truncated(&f[..0], 1024), None);
        assert_eq!(
            truncated(&f[..5], 1024),
            Some(FrameError::Truncated { have: 5, need: 16 })
        );
        assert_eq!(
            truncated(&f[..20], 1024),
            Some(FrameError::Truncated {
                have: 20,
                need: f.len() as u32
            })
        );
        assert_eq!(truncated(&f, 1024), None);
    }

    #[test]
    fn every_single_bit_flip_is_rejected_or_incomplete() {
        let f = request(3, &[0xAA; 12]);
        for i in 0..f.len() * 8 {
            let mut g = f.clone();
            g[i / 8] ^= 1 << (i % 8);
            let (frames, errors, _) = drain(&g, 1024);
            assert!(frames.is_empty(), "bit {i} flipped still decoded");
            // A flip in the length field cannot leave the receiver waiting: the header CRC
            // fails first.
            assert!(!errors.is_empty(), "bit {i}: no error");
        }
    }

    #[test]
    fn corrupt_payload_names_both_checksums() {
        let mut f = request(3, &[5; 4]);
        f[HEADER_SIZE + 2] ^= 0xFF;
        match decode(&f, 1024) {
            Decoded::Rejected {
                error: FrameError::PayloadChecksum { expected, got },
                seq: Some(3),
                skip: 1,
            } => assert_ne!(expected, got),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_between_frames_is_skipped_and_both_frames_survive() {
        let mut stream = b"noise".to_vec();
        stream.extend(request(1, &[1]));
        stream.extend(b"Ac\x00more noise AckV!");
        stream.extend(request(2, &[2, 2]));
        let (frames, errors, left) = drain(&stream, 1024);
        assert_eq!(left, 0);
        assert_eq!(frames.len(), 2);
        assert_eq!((frames[0].1, frames[1].1), (1, 2));
        assert_eq!(errors[0], FrameError::Garbage { bytes: 5 });
        assert!(
            errors
                .iter()
                .all(|e| matches!(e, FrameError::Garbage { .. } | FrameError::HeaderChecksum))
        );
    }

    #[test]
    fn a_magic_prefix_at_the_end_waits_for_more() {
        let mut stream = b"xyz".to_vec();
        stream.extend(b"Ack");
        assert_eq!(
            decode(&stream, 64),
            Decoded::Rejected {
                error: FrameError::Garbage { bytes: 3 },
                seq: None,
                skip: 3
            }
        );
        assert_eq!(decode(b"Ack", 64), Decoded::Incomplete);
    }

    #[test]
    fn oversized_frames_are_rejected_before_their_payload_arrives() {
        let f = request(9, &[0; 100]);
        match decode(&f[..HEADER_SIZE], 50) {
            Decoded::Rejected {
                error: FrameError::Oversized { len: 108, max: 50 },
                seq: Some(9),
                skip: HEADER_SIZE,
            } => {}
            other => panic!("{other:?}"),
        }
        // The receiver then finds the next frame after the skipped payload.
        let mut stream = f.clone();
        stream.extend(request(10, &[1]));
        let (frames, errors, left) = drain(&stream, 50);
        assert_eq!((frames.len(), frames[0].1, left), (1, 10, 0));
        assert!(matches!(errors[0], FrameError::Oversized { .. }));
    }

    #[test]
    fn a_partial_frame_followed_by_a_whole_one_loses_only_the_partial() {
        let first = request(1, &[7; 40]);
        let mut stream = first[..30].to_vec();
        let second = request(2, &[8; 40]);
        stream.extend(&second);
        stream.extend(&second); // the client's retry supplies the bytes the partial waited for
        let (frames, errors, _) = drain(&stream, 1024);
        assert!(frames.iter().all(|f| f.1 == 2), "{frames:?}");
        assert!(!frames.is_empty());
        assert!(matches!(errors[0], FrameError::PayloadChecksum { .. }));
    }

    #[test]
    fn unknown_kind_with_a_valid_header_is_rejected() {
        let mut f = request(4, &[]);
        f[4] = 9;
        let crc = crc32(&f[..12]);
        f[12..16].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode(&f, 64),
            Decoded::Rejected {
                error: FrameError::UnknownKind { kind: 9 },
                seq: Some(4),
                ..
            }
        ));
    }

    #[test]
    fn naks_carry_every_frame_error_back() {
        let all = [
            FrameError::Garbage { bytes: 3 },
            FrameError::HeaderChecksum,
            FrameError::UnknownKind { kind: 9 },
            FrameError::Oversized { len: 10, max: 5 },
            FrameError::PayloadChecksum {
                expected: 0xDEAD_BEEF,
                got: u32::MAX,
            },
            FrameError::Truncated { have: 3, need: 20 },
            FrameError::ShortPayload { len: 2, needed: 8 },
            FrameError::UnexpectedKind { kind: 2 },
            FrameError::BufferTooSmall { needed: 9, got: 4 },
        ];
        for e in all {
            let mut out = [0u8; OVERHEAD + NAK_PAYLOAD];
            let n = encode_nak(5, e, &mut out).unwrap();
            let Decoded::Frame { frame, .. } = decode(&out[..n], 64) else {
                panic!()
            };
            assert_eq!((frame.kind, frame.seq), (Kind::Nak, 5));
            assert_eq!(nak_error(frame.payload), Some(e));
            assert!(!std::format!("{e}").is_empty());
        }
        assert_eq!(nak_error(&[0; 11]), None);
        assert_eq!(nak_error(&[0; 12]), None);
        // A kind past u16 is a corrupt NAK, not a truncated kind.
        let bad_kind = [3u32, 0x1_0002, 0].map(u32::to_le_bytes).concat();
        assert_eq!(nak_error(&bad_kind), None);
    }

    #[test]
    fn encoding_into_a_short_buffer_fails_without_panicking() {
        let mut out = [0u8; OVERHEAD + 3];
        assert_eq!(
            encode(Kind::Response, 0, &[&[1, 2, 3, 4]], &mut out),
            Err(FrameError::BufferTooSmall {
                needed: 24,
                got: 23
            })
        );
        assert!(seal(Kind::Response, 0, &mut out[..10], 0).is_err());
        assert!(payload_mut(&mut out[..5]).is_empty());
        assert!(matches!(
            seal(Kind::Response, 0, &mut out, MAX_PAYLOAD + 1),
            Err(FrameError::Oversized { .. })
        ));
    }

    #[test]
    fn short_payloads_are_named() {
        assert_eq!(
            request_parts(&[1, 2, 3]),
            Err(FrameError::ShortPayload { len: 3, needed: 8 })
        );
        assert_eq!(
            response_parts(&[1]),
            Err(FrameError::ShortPayload { len: 1, needed: 4 })
        );
        assert_eq!(response_parts(&[0, 0, 0, 0, 9]), Ok((0, &[9u8][..])));
    }
}
