//! COM1, a 16550A at I/O 0x3F8, polled (no interrupt is needed: the BSP reads it between
//! workload rounds). Under Bochs (`com1: mode=socket-server`) its bytes are a TCP stream to the
//! host, where `ackctl --machine` (through the runner's relay) talks to [`crate::control`].
//!
//! Bochs's socket mode takes the next byte from the socket only once the guest has read the
//! previous one, so nothing is lost to a FIFO overrun however late the guest polls; it just
//! waits. Transmission runs at the line's pace: one byte per character time (emulated µs).
//!
//! **Runs in:** PASSIVE on the BSP.

use crate::arch::{inb, outb};

const BASE: u16 = 0x3F8;
const RBR_THR: u16 = BASE;
const IER: u16 = BASE + 1;
const FCR: u16 = BASE + 2;
const LCR: u16 = BASE + 3;
const MCR: u16 = BASE + 4;
const LSR: u16 = BASE + 5;
/// LSR bit 0: a received byte is waiting.
const LSR_DATA_READY: u8 = 1 << 0;
/// LSR bit 5: the transmit holding register (with the FIFO on: the whole TX FIFO) is empty.
const LSR_THR_EMPTY: u8 = 1 << 5;
/// Bytes the TX FIFO takes once LSR says it is empty.
pub const TX_FIFO: usize = 16;

/// 115200 8N1 with both FIFOs on, no interrupts. Bochs starts polling its socket when DLAB
/// goes from 1 back to 0, so the divisor is always written.
pub fn init() {
    for (port, value) in [
        (IER, 0x00),  // no interrupts: polled
        (LCR, 0x80),  // DLAB=1
        (RBR_THR, 1), // divisor 1 = 115200 baud
        (IER, 0x00),  // divisor high byte
        (LCR, 0x03),  // 8N1, DLAB=0
        (FCR, 0x07),  // FIFOs on and cleared
        (MCR, 0x03),  // DTR, RTS
    ] {
        // SAFETY: COM1's registers; this is the 16550's initialization sequence.
        unsafe { outb(port, value) };
    }
}

fn lsr() -> u8 {
    // SAFETY: reading LSR only reports status (it clears error bits we do not use).
    unsafe { inb(LSR) }
}

/// The next received byte, if one is waiting.
pub fn read() -> Option<u8> {
    if lsr() & LSR_DATA_READY == 0 {
        return None;
    }
    // SAFETY: a byte is waiting; reading RBR takes it.
    Some(unsafe { inb(RBR_THR) })
}

/// Writes up to [`TX_FIFO`] bytes of `bytes` if the transmitter is empty; returns how many.
pub fn write(bytes: &[u8]) -> usize {
    if lsr() & LSR_THR_EMPTY == 0 {
        return 0;
    }
    let n = bytes.len().min(TX_FIFO);
    for &b in &bytes[..n] {
        // SAFETY: THR with the FIFO empty: up to 16 bytes fit.
        unsafe { outb(RBR_THR, b) };
    }
    n
}
