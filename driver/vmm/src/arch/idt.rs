//! IDT gate descriptors (SDM 3A, "IDT Descriptors" / "64-Bit Mode IDT").
//!
//! **Runs in:** anywhere (pure decoding; reading the table is the caller's business).
#![forbid(unsafe_code)]

use bitfield::bitfield;

bitfield! {
    /// Low quadword of a 64-bit IDT gate.
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub struct GateLow(u64); impl Debug;
    /// Offset bits 15:0.
    pub u16, offset_low, _: 15, 0;
    /// Segment selector of the handler.
    pub u16, selector, _: 31, 16;
    /// Interrupt-stack-table index (0 = none).
    pub u8, ist, _: 34, 32;
    /// Gate type (0xE = 64-bit interrupt gate, 0xF = trap gate).
    pub u8, gate_type, _: 43, 40;
    /// Descriptor privilege level.
    pub u8, dpl, _: 46, 45;
    /// Present.
    pub present, _: 47;
    /// Offset bits 31:16.
    pub u16, offset_mid, _: 63, 48;
}

impl GateLow {
    /// The raw quadword.
    pub const fn raw(self) -> u64 {
        self.0
    }
}

/// Gate type field values in IA-32e mode.
pub mod gate_type {
    /// 64-bit interrupt gate: clears IF on entry.
    pub const INTERRUPT: u8 = 0xE;
    /// 64-bit trap gate: leaves IF as it was.
    pub const TRAP: u8 = 0xF;
}

/// One 16-byte IDT entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct IdtGate {
    /// Bits 63:0.
    pub low: GateLow,
    /// Bits 95:64 = offset 63:32; 127:96 reserved.
    pub high: u64,
}

const _: () = assert!(core::mem::size_of::<IdtGate>() == 16);

impl IdtGate {
    /// From the two raw quadwords.
    pub const fn from_raw(low: u64, high: u64) -> Self {
        Self {
            low: GateLow(low),
            high,
        }
    }

    /// Handler address.
    pub fn offset(&self) -> u64 {
        u64::from(self.low.offset_low())
            | (u64::from(self.low.offset_mid()) << 16)
            | ((self.high & 0xFFFF_FFFF) << 32)
    }

    /// Builds a gate (for test kernels and tests).
    pub fn new(
        handler: u64,
        selector: u16,
        ist: u8,
        gate_type: u8,
        dpl: u8,
        present: bool,
    ) -> Self {
        let low = (handler & 0xFFFF)
            | (u64::from(selector) << 16)
            | (u64::from(ist & 7) << 32)
            | (u64::from(gate_type & 0xF) << 40)
            | (u64::from(dpl & 3) << 45)
            | (u64::from(present) << 47)
            | (((handler >> 16) & 0xFFFF) << 48);
        Self::from_raw(low, handler >> 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_round_trips_every_field() {
        let g = IdtGate::new(0xFFFF_F801_2345_6789, 0x10, 3, gate_type::TRAP, 3, true);
        assert_eq!(g.offset(), 0xFFFF_F801_2345_6789);
        assert_eq!(g.low.selector(), 0x10);
        assert_eq!(g.low.ist(), 3);
        assert_eq!(g.low.gate_type(), gate_type::TRAP);
        assert_eq!(g.low.dpl(), 3);
        assert!(g.low.present());
    }
}
