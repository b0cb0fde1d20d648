//! The test machine's serial link: Bochs serves COM1 as a TCP socket (`com1: mode=socket-server`)
//! and the test kernel answers frames (`control::frame`, `control::serve`) on it.
//!
//! Each request gets a fresh sequence number. A NAK for it, or a broken frame where its response
//! should be, makes the client send the same request again (up to [`Options::attempts`]); so does
//! a silent link after [`Options::reply_timeout`]. Every request is safe to repeat (set-mode to
//! the same mode, reset, reads). Responses with another sequence number are late answers to an
//! earlier attempt and are dropped.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use ackvisor_vmm::control::ControlError;
use ackvisor_vmm::control::frame::{self, Decoded, FrameError, Kind};
use ackvisor_vmm::control::wire::{ErrorReply, Field};

use super::Transport;
use crate::ClientError;

/// Timeouts and retries of the link.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Waiting for the TCP connection.
    pub connect_timeout: Duration,
    /// Waiting for each reply before sending the request again.
    pub reply_timeout: Duration,
    /// Sends of one request before giving up.
    pub attempts: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            reply_timeout: Duration::from_secs(3),
            attempts: 3,
        }
    }
}

/// A connection to the test machine's control server.
pub struct TcpTransport {
    stream: TcpStream,
    addr: SocketAddr,
    options: Options,
    seq: u16,
    rx: Vec<u8>,
}

/// What came back for one attempt.
enum Answer {
    /// The response: status and body.
    Response(u32, Vec<u8>),
    /// The server (or the link) rejected the frame: send again.
    Resend(FrameError),
}

impl TcpTransport {
    /// Connects to `machine` (`HOST:PORT`), trying each address it resolves to.
    pub fn connect(machine: &str, options: Options) -> Result<Self, ClientError> {
        let addrs: Vec<SocketAddr> = machine
            .to_socket_addrs()
            .map_err(|_| ClientError::BadMachine)?
            .collect();
        let mut last = ClientError::BadMachine;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, options.connect_timeout) {
                Ok(stream) => {
                    // Requests are small and answered one at a time: send each at once.
                    stream
                        .set_nodelay(true)
                        .map_err(|e| unreachable(addr, &e))?;
                    return Ok(Self {
                        stream,
                        addr,
                        options,
                        seq: 0,
                        rx: Vec::new(),
                    });
                }
                Err(e) => last = unreachable(addr, &e),
            }
        }
        Err(last)
    }

    fn send(&mut self, frame_bytes: &[u8]) -> Result<(), ClientError> {
        self.stream
            .write_all(frame_bytes)
            .map_err(|e| unreachable(self.addr, &e))
    }

    /// Reads until the answer for `seq` arrives, the link breaks a frame, or time runs out
    /// (`Ok(None)`).
    fn await_answer(
        &mut self,
        seq: u16,
        max_payload: usize,
    ) -> Result<Option<Answer>, ClientError> {
        let deadline = Instant::now() + self.options.reply_timeout;
        loop {
            match frame::decode(&self.rx, max_payload) {
                Decoded::Frame { frame, used } => {
                    let answer = match frame.kind {
                        Kind::Response if frame.seq == seq => {
                            let (status, body) =
                                frame::response_parts(frame.payload).map_err(|_| {
                                    ClientError::BadReply("response frame without a status")
                                })?;
                            Some(Answer::Response(status, body.to_vec()))
                        }
                        // A NAK with seq 0 answers a frame whose header was unreadable: ours.
                        Kind::Nak if frame.seq == seq || frame.seq == 0 => Some(Answer::Resend(
                            frame::nak_error(frame.payload).unwrap_or(FrameError::HeaderChecksum),
                        )),
                        // Late answers to an earlier attempt, or a request echoed back.
                        Kind::Response | Kind::Nak | Kind::Request => None,
                    };
                    self.rx.drain(..used);
                    if answer.is_some() {
                        return Ok(answer);
                    }
                }
                Decoded::Rejected {
                    error: FrameError::Garbage { .. },
                    skip,
                    ..
                } => {
                    self.rx.drain(..skip);
                }
                Decoded::Rejected { error, skip, .. } => {
                    // A broken frame where our response should be: ask again.
                    self.rx.drain(..skip);
                    return Ok(Some(Answer::Resend(error)));
                }
                Decoded::Incomplete => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        self.rx.clear(); // a partial frame will never complete now
                        return Ok(None);
                    }
                    if !self.read_some(left)? {
                        self.rx.clear();
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Reads what arrives within `wait`; `false` on timeout.
    fn read_some(&mut self, wait: Duration) -> Result<bool, ClientError> {
        self.stream
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .map_err(|e| ClientError::Io(e.kind()))?;
        let mut buf = [0u8; 64 * 1024];
        match self.stream.read(&mut buf) {
            Ok(0) => Err(ClientError::Unreachable {
                addr: Some(self.addr),
                kind: io::ErrorKind::ConnectionAborted,
            }),
            Ok(n) => {
                self.rx.extend_from_slice(buf.get(..n).unwrap_or(&[]));
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
            Err(e) => Err(unreachable(self.addr, &e)),
        }
    }
}

fn unreachable(addr: SocketAddr, e: &io::Error) -> ClientError {
    ClientError::Unreachable {
        addr: Some(addr),
        kind: e.kind(),
    }
}

impl Transport for TcpTransport {
    fn call(&mut self, code: u32, input: &[u8], capacity: usize) -> Result<Vec<u8>, ClientError> {
        self.seq = self.seq.wrapping_add(1).max(1); // 0 is reserved for "unknown" in NAKs
        let seq = self.seq;
        let capacity_u32 = u32::try_from(capacity).unwrap_or(u32::MAX);
        let mut out = vec![0u8; frame::OVERHEAD + frame::REQUEST_PREFIX + input.len()];
        let n = frame::encode_request(seq, code, capacity_u32, input, &mut out)
            .map_err(ClientError::Link)?;
        out.truncate(n);
        let max_payload = frame::RESPONSE_PREFIX + capacity.max(ErrorReply::SIZE);
        let mut last = None;
        for _ in 0..self.options.attempts.max(1) {
            self.send(&out)?;
            match self.await_answer(seq, max_payload)? {
                Some(Answer::Response(0, body)) => return Ok(body),
                Some(Answer::Response(_, body)) => {
                    return Err(match ControlError::read_reply(&body) {
                        Some(e) => ClientError::Refused(e),
                        None => ClientError::BadReply("error response without a valid error reply"),
                    });
                }
                Some(Answer::Resend(e)) => last = Some(ClientError::Link(e)),
                None => {
                    last = Some(ClientError::Timeout {
                        attempts: self.options.attempts.max(1),
                        each_ms: u64::try_from(self.options.reply_timeout.as_millis())
                            .unwrap_or(u64::MAX),
                    })
                }
            }
        }
        Err(last.unwrap_or(ClientError::BadReply("no attempt made")))
    }
}
