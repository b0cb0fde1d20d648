//! The boundary between the portable core and the OS that hosts it.
//!
//! **Runs in:** PASSIVE (allocation, logging, CPU iteration); VMX root only for
//! [`Platform::fatal`].

use core::fmt;
use core::ptr::NonNull;

/// A physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PhysAddr(pub u64);

/// A logical processor's index as the platform numbers them: 0..[`Platform::cpu_count`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CpuIndex(pub u32);

/// What a platform call can fail with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlatformError {
    /// No contiguous memory of the requested size.
    OutOfMemory {
        /// Pages asked for.
        pages: usize,
    },
    /// The platform could not run code on this processor.
    CpuUnreachable(CpuIndex),
}

impl fmt::Display for PlatformError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfMemory { pages } => {
                write!(f, "out of contiguous memory ({pages} pages requested)")
            }
            Self::CpuUnreachable(cpu) => write!(f, "cannot run on CPU {}", cpu.0),
        }
    }
}

/// How root mode reads the local APIC (only the exit-sti policy needs it: DESIGN §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicAccess {
    /// xAPIC registers mapped at this virtual address (valid in root: same kernel mapping).
    XApic {
        /// Virtual address of the 4 KiB register page.
        base_va: usize,
    },
    /// x2APIC: registers are MSRs 0x800+.
    X2Apic,
}

/// Why root mode gave up on a CPU: enough to find the cause in a crash dump or a log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FatalState {
    /// The CPU that stopped.
    pub cpu: CpuIndex,
    /// Full exit reason (bit 31 = VM-entry failure), or [`FatalState::NO_EXIT`].
    pub exit_reason: u32,
    /// Exit qualification.
    pub qualification: u64,
    /// Guest RIP at the exit.
    pub guest_rip: u64,
    /// VM-instruction error when a VMX instruction failed, else 0.
    pub instr_error: u32,
    /// What happened, as one of the `FatalState::*` kinds.
    pub kind: FatalKind,
}

impl FatalState {
    /// `exit_reason` when the failure was not an exit (VMRESUME failed).
    pub const NO_EXIT: u32 = u32::MAX;
}

/// The classes of unrecoverable root-mode events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FatalKind {
    /// The guest triple-faulted.
    TripleFault,
    /// VM entry failed on guest state, MSR loading or machine check (exit reason bit 31).
    EntryFailure,
    /// An exit reason with no handler.
    UnexpectedExit,
    /// INIT or SIPI reached a virtualized CPU (the blue pill does not emulate a reset).
    InitSignal,
    /// VMRESUME itself failed (VMfailValid / VMfailInvalid).
    ResumeFailed,
}

/// The services the core needs from its host OS. One static instance per platform.
///
/// Everything except [`Platform::fatal`] is called outside VMX root mode.
pub trait Platform: Sync {
    /// `count` zeroed, physically contiguous, 4 KiB-aligned pages, mapped writable.
    fn alloc_pages(&self, count: usize) -> Result<NonNull<u8>, PlatformError>;
    /// Hands pages back.
    ///
    /// # Safety
    /// `ptr` and `count` come from one [`Platform::alloc_pages`] call and nothing uses the pages.
    unsafe fn free_pages(&self, ptr: NonNull<u8>, count: usize);
    /// Physical address of a byte in memory from [`Platform::alloc_pages`].
    fn virt_to_phys(&self, va: NonNull<u8>) -> PhysAddr;
    /// Number of logical processors, every group included.
    fn cpu_count(&self) -> u32;
    /// Index of the processor the caller runs on (the caller keeps itself there).
    fn current_cpu(&self) -> CpuIndex;
    /// Runs `f` on every processor, one at a time or concurrently, and waits for all.
    /// Returns the first failure with the CPU it happened on.
    fn for_each_cpu(
        &self,
        f: &(dyn Fn(CpuIndex) -> Result<(), crate::Error> + Sync),
    ) -> Result<(), (CpuIndex, crate::Error)>;
    /// Log sink: PASSIVE-level text output (NT: DbgPrintEx; test machine: port 0xE9).
    fn log(&self, args: fmt::Arguments<'_>);
    /// Root mode cannot go on: record and stop (NT: KeBugCheckEx; test machine: print, power off).
    fn fatal(&self, state: &FatalState) -> !;
    /// CR3 for root mode. NT: the System process's directory base, never a KVA-shadow user CR3.
    fn host_cr3(&self) -> u64;
    /// How root reads this CPU's local APIC.
    fn apic(&self) -> ApicAccess;
    /// IA32_DEBUGCTL as the guest starts with. The default reads the MSR; a platform whose CPU
    /// lacks it (Bochs #GPs on it, DESIGN §7) returns `None`, and root then never reads,
    /// writes or intercepts it.
    fn debugctl(&self) -> Option<u64> {
        // SAFETY: IA32_DEBUGCTL exists on every VMX-capable Intel CPU.
        Some(unsafe { crate::arch::regs::rdmsr(crate::arch::msr::IA32_DEBUGCTL) })
    }
    /// Called between retries while root answers "busy" (acknowledged vectors still pending on
    /// this CPU). A platform that runs [`Platform::for_each_cpu`]'s closure at a raised IRQL
    /// must let it drop here, or a vector waiting for CR8 to fall below its class never leaves.
    fn relax(&self) {
        core::hint::spin_loop();
    }
    /// Whether IRQL is nothing but CR8 on this platform. Then root raises and restores it with
    /// MOV CR8 inline (the exit path's cost) and never calls [`Platform::raise_irql`] or
    /// [`Platform::lower_irql`]. A platform that overrides those two must return false (NT:
    /// Windows 11 keeps IRQL bookkeeping beside CR8, DESIGN §4).
    fn irql_is_cr8(&self) -> bool {
        true
    }
    /// Raises IRQL to at least `to` around a replay and returns the previous IRQL (DESIGN §4).
    /// Called in VMX root with IF=0: must not fault, allocate, lock or log. The default writes
    /// CR8 directly, which is what IRQL is on x64 without NT's extra bookkeeping.
    fn raise_irql(&self, to: u8) -> u8 {
        crate::arch::regs::raise_cr8(to)
    }
    /// Restores the IRQL [`Platform::raise_irql`] returned. Same rules.
    fn lower_irql(&self, to: u8) {
        crate::arch::regs::lower_cr8(to)
    }
    /// The per-vector delivery policy every CPU starts with (issue 8): the platform names the
    /// vectors that must reach the OS at their true IRQL (NT: clock and profile, `auto`).
    /// Called at PASSIVE on each CPU as it is virtualized. The default replays every vector.
    fn delivery_policy(&self) -> crate::intr::vector_policy::PolicyTable {
        crate::intr::vector_policy::PolicyTable::ALL_REPLAY
    }
}

/// A host-test platform with `cpus` CPUs: `for_each_cpu` runs the closure on them in order and
/// stops at the first error, as NT's loop does, and `free_pages` records what it was handed.
/// Nothing else is ever called by the code under test.
#[cfg(test)]
pub(crate) mod fake {
    extern crate std;

    use super::{ApicAccess, CpuIndex, NonNull, Platform, PlatformError};
    use crate::{Error, FatalState, PhysAddr};
    use core::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;
    use std::vec::Vec;

    /// A growable list for tests in the `no_std` crate.
    pub(crate) type Log = Vec<u32>;

    /// See the module.
    pub(crate) struct FakeCpus {
        cpus: u32,
        current: AtomicU32,
        /// `(address, page count)` of every `free_pages` call, in order.
        pub(crate) freed: Mutex<Vec<(usize, usize)>>,
    }

    impl FakeCpus {
        pub(crate) fn new(cpus: u32) -> FakeCpus {
            FakeCpus {
                cpus,
                current: AtomicU32::new(0),
                freed: Mutex::new(Vec::new()),
            }
        }
    }

    impl Platform for FakeCpus {
        fn alloc_pages(&self, _: usize) -> Result<NonNull<u8>, PlatformError> {
            unreachable!()
        }
        unsafe fn free_pages(&self, ptr: NonNull<u8>, count: usize) {
            self.freed
                .lock()
                .unwrap()
                .push((ptr.as_ptr() as usize, count));
        }
        fn virt_to_phys(&self, _: NonNull<u8>) -> PhysAddr {
            unreachable!()
        }
        fn cpu_count(&self) -> u32 {
            self.cpus
        }
        fn current_cpu(&self) -> CpuIndex {
            CpuIndex(self.current.load(Ordering::Relaxed))
        }
        fn for_each_cpu(
            &self,
            f: &(dyn Fn(CpuIndex) -> Result<(), Error> + Sync),
        ) -> Result<(), (CpuIndex, Error)> {
            for i in 0..self.cpus {
                self.current.store(i, Ordering::Relaxed);
                f(CpuIndex(i)).map_err(|e| (CpuIndex(i), e))?;
            }
            Ok(())
        }
        fn log(&self, _: core::fmt::Arguments<'_>) {}
        fn fatal(&self, _: &FatalState) -> ! {
            unreachable!()
        }
        fn host_cr3(&self) -> u64 {
            unreachable!()
        }
        fn apic(&self) -> ApicAccess {
            unreachable!()
        }
    }
}
