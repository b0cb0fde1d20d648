//! The VMCALL ABI between the guest side of ackvisor and its root mode, and the decision of
//! what to do with a VMCALL that is not ours (DESIGN §5).
//!
//! ABI: RAX = [`Call`], RCX = [`KEY`], RDX = argument; on return RAX = [`Status`], RDX = value.
//! Only CPL 0 with the key is ours.
//!
//! **Runs in:** anywhere (guest side: [`vmcall`]; root side: [`classify`], pure).

/// The project key in RCX ("ACKVISOR" in ASCII, little-endian).
pub const KEY: u64 = u64::from_le_bytes(*b"ACKVISOR");

/// Hypercall numbers (RAX).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Call {
    /// Answers [`PING_REPLY`] in RDX: proves the CPU is virtualized.
    Ping = 1,
    /// RDX = [`crate::Mode`] as u32: apply on this CPU's VMCS.
    SetMode = 2,
    /// Leave VMX operation on this CPU; returns in the former guest.
    Devirtualize = 3,
}

impl TryFrom<u64> for Call {
    type Error = u64;
    fn try_from(v: u64) -> Result<Self, u64> {
        match v {
            1 => Ok(Call::Ping),
            2 => Ok(Call::SetMode),
            3 => Ok(Call::Devirtualize),
            other => Err(other),
        }
    }
}

/// RDX after a successful [`Call::Ping`].
pub const PING_REPLY: u64 = u64::from_le_bytes(*b"ACKPONG\0");

/// Hypercall result in RAX.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// Unknown call number.
    UnknownCall = 1,
    /// Bad argument (for example an unknown mode).
    BadArgument = 2,
    /// Not now: vectors are still pending on this CPU; retry.
    Busy = 3,
    /// This CPU cannot run the requested mode (`vmx::caps::mode_supported`).
    Unsupported = 4,
}

impl Status {
    /// Decodes RAX after a hypercall.
    pub fn from_raw(v: u64) -> Option<Status> {
        match v {
            0 => Some(Status::Ok),
            1 => Some(Status::UnknownCall),
            2 => Some(Status::BadArgument),
            3 => Some(Status::Busy),
            4 => Some(Status::Unsupported),
            _ => None,
        }
    }
}

/// What root mode does with a VMCALL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmcallAction {
    /// Ours: handle it.
    Ours,
    /// Not ours, an outer hypervisor is present: forward with the guest's registers.
    Forward,
    /// Not ours, nobody to forward to: inject #UD (what a CPU without VMX does).
    InjectUd,
}

/// DESIGN §5: a VMCALL is ours only from CPL 0 with the key; other CPL-0 VMCALLs go to the
/// outer hypervisor when there is one. Everything else gets the #UD a CPL-3 VMCALL gets from
/// Hyper-V itself: forwarding it would re-issue it from root at CPL 0, turning a user process's
/// VMCALL into a privileged hypercall on guest-physical memory.
pub const fn classify(cpl: u8, rcx: u64, outer_hypervisor: bool) -> VmcallAction {
    if cpl != 0 {
        VmcallAction::InjectUd
    } else if rcx == KEY {
        VmcallAction::Ours
    } else if outer_hypervisor {
        VmcallAction::Forward
    } else {
        VmcallAction::InjectUd
    }
}

/// Issues a raw VMCALL with these RAX/RCX/RDX and returns (RAX, RDX). Guest side.
/// Without a hypervisor (or with a wrong key) the CPU raises #UD: the caller must expect it.
#[inline(never)]
pub fn vmcall_raw(rax: u64, rcx: u64, rdx: u64) -> (u64, u64) {
    let (a, d): (u64, u64);
    // SAFETY: VMCALL changes no memory of ours; root mode returns with RAX/RDX set, and any other
    // register it touches is restored by the exit stub. A #UD goes to the OS's handler.
    unsafe {
        core::arch::asm!("vmcall", inout("rax") rax => a, inout("rcx") rcx => _, inout("rdx") rdx => d,
            options(nostack))
    };
    (a, d)
}

/// Issues one of our hypercalls.
pub fn vmcall(call: Call, arg: u64) -> (Option<Status>, u64) {
    let (a, d) = vmcall_raw(call as u64, KEY, arg);
    (Status::from_raw(a), d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmcall_is_ours_only_from_cpl0_with_key() {
        assert_eq!(classify(0, KEY, false), VmcallAction::Ours);
        assert_eq!(classify(0, KEY, true), VmcallAction::Ours);
        assert_eq!(classify(3, KEY, false), VmcallAction::InjectUd);
        assert_eq!(classify(0, KEY ^ 1, false), VmcallAction::InjectUd);
    }

    #[test]
    fn foreign_vmcalls_forward_only_from_cpl0_when_an_outer_hypervisor_exists() {
        assert_eq!(classify(0, 0x1234, true), VmcallAction::Forward);
        assert_eq!(classify(0, 0x1234, false), VmcallAction::InjectUd);
    }

    #[test]
    fn user_mode_vmcalls_are_never_forwarded() {
        // Re-issued from root they would run at CPL 0 in the outer hypervisor's eyes.
        assert_eq!(classify(3, KEY, true), VmcallAction::InjectUd);
        assert_eq!(classify(3, 0x1234, true), VmcallAction::InjectUd);
        assert_eq!(classify(3, 0, false), VmcallAction::InjectUd);
    }

    #[test]
    fn call_and_status_codes_round_trip() {
        for c in [Call::Ping, Call::SetMode, Call::Devirtualize] {
            assert_eq!(Call::try_from(c as u64), Ok(c));
        }
        assert_eq!(Call::try_from(0), Err(0));
        assert_eq!(Status::from_raw(3), Some(Status::Busy));
        assert_eq!(Status::from_raw(9), None);
    }
}
