//! The guest's general-purpose registers as the exit stub saves them.
//!
//! **Runs in:** VMX root.

/// GPRs in SDM register-number order (RAX=0 … R15=15), so an exit qualification's register
/// field indexes them directly. The RSP slot is not the guest's RSP (that lives in the VMCS):
/// the stub leaves it unused. On the fast external-interrupt path only the nine volatile
/// registers' slots are filled, and nothing reads them; handlers get all fifteen.
#[repr(C)]
#[derive(Debug, Default)]
pub struct GuestRegs {
    /// The 16 GPRs.
    pub gpr: [u64; 16],
    /// Keeps HOST_RSP − size 16-byte aligned for the stub's CALL.
    _pad: [u64; 2],
}

const _: () = assert!(core::mem::size_of::<GuestRegs>() == 144);

/// The guest's x87/SSE state as the stub's FXSAVE64 stored it (SDM 1, "FXSAVE"): XMM*n* at
/// byte 160 + 16·*n*. Handlers that must hand XMM registers to someone (forwarded hypercalls)
/// read and write them here; the stub's FXRSTOR64 gives them to the guest.
#[repr(C, align(16))]
pub struct FxArea(pub [u8; 512]);

impl FxArea {
    /// Byte offset of XMM0.
    pub const XMM0: usize = 160;
}

const _: () = assert!(core::mem::size_of::<FxArea>() == 512);

/// Register numbers used by handlers.
pub mod reg {
    /// RAX.
    pub const RAX: usize = 0;
    /// RCX.
    pub const RCX: usize = 1;
    /// RDX.
    pub const RDX: usize = 2;
    /// RBX.
    pub const RBX: usize = 3;
    /// RSP (not saved here).
    pub const RSP: usize = 4;
}

impl GuestRegs {
    /// Register `n` (0..16); out-of-range numbers read 0.
    #[inline(always)]
    pub fn get(&self, n: usize) -> u64 {
        self.gpr.get(n).copied().unwrap_or(0)
    }

    /// Sets register `n` (0..16); out-of-range numbers are ignored.
    #[inline(always)]
    pub fn set(&mut self, n: usize, v: u64) {
        if let Some(r) = self.gpr.get_mut(n) {
            *r = v;
        }
    }

    /// Operand register `n` of an exiting MOV CR/MOV DR (the qualification's GPR field). RSP is
    /// not saved here: the guest's RSP is GUEST_RSP, which `guest_rsp` reads (only for RSP).
    #[inline(always)]
    pub fn operand(&self, n: usize, guest_rsp: impl FnOnce() -> u64) -> u64 {
        if n == reg::RSP {
            guest_rsp()
        } else {
            self.get(n)
        }
    }

    /// Stores `v` into operand register `n`. For RSP it returns `Some(v)`: the caller writes
    /// it to GUEST_RSP (the stub restores no RSP from here).
    #[inline(always)]
    #[must_use]
    pub fn set_operand(&mut self, n: usize, v: u64) -> Option<u64> {
        if n == reg::RSP {
            Some(v)
        } else {
            self.set(n, v);
            None
        }
    }

    /// EDX:EAX as one value (RDMSR/WRMSR/XSETBV operands).
    pub fn edx_eax(&self) -> u64 {
        (self.get(reg::RDX) << 32) | (self.get(reg::RAX) & 0xFFFF_FFFF)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsp_operand_is_the_guest_rsp_not_the_unused_slot() {
        let mut r = GuestRegs::default();
        r.gpr[reg::RSP] = 0xDEAD;
        r.gpr[reg::RBX] = 7;
        assert_eq!(
            r.operand(reg::RSP, || 0xFFFF_8000_1234_5670),
            0xFFFF_8000_1234_5670
        );
        assert_eq!(r.operand(reg::RBX, || unreachable!("RSP not asked")), 7);
        assert_eq!(r.set_operand(reg::RSP, 0x42), Some(0x42));
        assert_eq!(r.gpr[reg::RSP], 0xDEAD, "the slot stays unused");
        assert_eq!(r.set_operand(reg::RBX, 9), None);
        assert_eq!(r.gpr[reg::RBX], 9);
    }
}
