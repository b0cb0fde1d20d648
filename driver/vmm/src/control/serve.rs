//! The server side of the serial link: take bytes received so far, answer the frame at their
//! front through [`dispatch`], and say how many bytes to drop and send. The test
//! machine's COM1 server and `ackctl`'s tests both run this, with fixed buffers and no heap.
//!
//! ```text
//! loop {
//!     rx.extend(bytes read);
//!     let s = serve(&target, &rx, &mut tx, MAX);
//!     send(&tx[..s.reply_len]);
//!     rx.drop_front(s.consumed);
//!     if s.event == ServeEvent::Idle { wait for bytes (on a long silence: frame::truncated) }
//! }
//! ```
//!
//! **Runs in:** PASSIVE (whatever thread reads the link).
#![forbid(unsafe_code)]

use super::error::saturate;
use super::frame::{self, Decoded, FrameError, Kind};
use super::wire::{ErrorReply, Field};
use super::{ControlTarget, dispatch};

/// What one call to [`serve`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeEvent {
    /// Not enough bytes for a frame yet.
    Idle,
    /// A request was dispatched and answered with `status` (0 = success).
    Answered {
        /// The request's code.
        code: u32,
        /// The protocol status of the answer.
        status: u32,
    },
    /// A broken or unexpected frame was answered with a NAK.
    Nak(FrameError),
    /// Bytes that were no frame at all were dropped (not NAKed: line noise between frames
    /// should not make a waiting client resend).
    Discarded(FrameError),
    /// The reply buffer cannot hold even an error response; nothing was sent.
    ReplyBufferTooSmall(FrameError),
}

/// The outcome of one [`serve`] step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    /// Bytes to drop from the front of the receive buffer.
    pub consumed: usize,
    /// Bytes at the front of the reply buffer to send (0 = nothing).
    pub reply_len: usize,
    /// What happened.
    pub event: ServeEvent,
}

/// Smallest reply buffer that can answer anything (an error response).
pub const MIN_REPLY_BUFFER: usize = frame::OVERHEAD + frame::RESPONSE_PREFIX + ErrorReply::SIZE;

/// Decodes the frame at the front of `received` (requests up to `max_request_payload` bytes) and
/// writes the answer into `reply`: a response for a request, a NAK for a broken frame.
pub fn serve(
    target: &dyn ControlTarget,
    received: &[u8],
    reply: &mut [u8],
    max_request_payload: usize,
) -> Served {
    serve_with(&Dispatcher(target), received, reply, max_request_payload)
}

/// What answers a well-formed request inside the framing [`serve_with`] does: the core's
/// [`dispatch`] ([`serve`]), or, in the test machine's driver mode, the real ackvisor.sys
/// behind the IRPs NT would send it.
pub trait Responder {
    /// Answers request `code` with `input`, for a client that accepts `capacity` bytes: writes
    /// the response body into the front of `body` (as long as the server's reply buffer allows)
    /// and returns the protocol status and the body's length; None when not even an error
    /// reply fits in `body`.
    fn respond(
        &self,
        code: u32,
        capacity: u32,
        input: &[u8],
        body: &mut [u8],
    ) -> Option<(u32, usize)>;
}

/// [`serve`] with any [`Responder`] behind the framing: NAKs, discards and reply sealing are the
/// same whoever answers.
pub fn serve_with(
    responder: &dyn Responder,
    received: &[u8],
    reply: &mut [u8],
    max_request_payload: usize,
) -> Served {
    match frame::decode(received, max_request_payload) {
        Decoded::Incomplete => Served {
            consumed: 0,
            reply_len: 0,
            event: ServeEvent::Idle,
        },
        Decoded::Rejected {
            error: error @ FrameError::Garbage { .. },
            skip,
            ..
        } => Served {
            consumed: skip,
            reply_len: 0,
            event: ServeEvent::Discarded(error),
        },
        Decoded::Rejected { error, seq, skip } => nak(seq.unwrap_or(0), error, skip, reply),
        Decoded::Frame { frame, used } => {
            if frame.kind != Kind::Request {
                let error = FrameError::UnexpectedKind {
                    kind: frame.kind as u16,
                };
                return nak(frame.seq, error, used, reply);
            }
            match frame::request_parts(frame.payload) {
                Ok((code, capacity, input)) => {
                    answer(responder, frame.seq, code, capacity, input, used, reply)
                }
                Err(error) => nak(frame.seq, error, used, reply),
            }
        }
    }
}

/// The core's dispatcher as a [`Responder`].
struct Dispatcher<'a>(&'a dyn ControlTarget);

impl Responder for Dispatcher<'_> {
    fn respond(
        &self,
        code: u32,
        capacity: u32,
        input: &[u8],
        body: &mut [u8],
    ) -> Option<(u32, usize)> {
        // The client's capacity plays the role of NT's output buffer length; the server's own
        // buffer bounds it (and OutputTooSmall's `got` then tells the client the server's
        // limit).
        let usable = body.len().min(capacity as usize);
        let output = body.get_mut(..usable).unwrap_or(&mut []);
        match dispatch(self.0, code, input, output) {
            Ok(n) => Some((0, n)),
            Err(e) => e.write_reply(body).map(|n| (e.as_status(), n)),
        }
    }
}

fn nak(seq: u16, error: FrameError, consumed: usize, reply: &mut [u8]) -> Served {
    match frame::encode_nak(seq, error, reply) {
        Ok(reply_len) => Served {
            consumed,
            reply_len,
            event: ServeEvent::Nak(error),
        },
        Err(e) => Served {
            consumed,
            reply_len: 0,
            event: ServeEvent::ReplyBufferTooSmall(e),
        },
    }
}

fn answer(
    responder: &dyn Responder,
    seq: u16,
    code: u32,
    capacity: u32,
    input: &[u8],
    consumed: usize,
    reply: &mut [u8],
) -> Served {
    let reply_buffer_len = reply.len();
    let payload = frame::payload_mut(reply);
    let Some((status_slot, body)) = payload.split_at_mut_checked(frame::RESPONSE_PREFIX) else {
        return too_small(consumed, reply_buffer_len);
    };
    let Some((status, body_len)) = responder.respond(code, capacity, input, body) else {
        return too_small(consumed, reply_buffer_len);
    };
    if status.encode(status_slot).is_none() {
        return too_small(consumed, reply_buffer_len);
    }
    match frame::seal(
        Kind::Response,
        seq,
        reply,
        frame::RESPONSE_PREFIX + body_len,
    ) {
        Ok(reply_len) => Served {
            consumed,
            reply_len,
            event: ServeEvent::Answered { code, status },
        },
        Err(e) => Served {
            consumed,
            reply_len: 0,
            event: ServeEvent::ReplyBufferTooSmall(e),
        },
    }
}

fn too_small(consumed: usize, got: usize) -> Served {
    Served {
        consumed,
        reply_len: 0,
        event: ServeEvent::ReplyBufferTooSmall(FrameError::BufferTooSmall {
            needed: saturate(MIN_REPLY_BUFFER),
            got: saturate(got),
        }),
    }
}
