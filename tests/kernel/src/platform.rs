//! The test machine's implementation of `ackvisor_vmm::Platform`.
//!
//! **Runs in:** PASSIVE, except `fatal` (VMX root).

use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::Ordering;

use ackvisor_vmm::{ApicAccess, CpuIndex, Error, FatalState, PhysAddr, Platform, PlatformError};

use crate::percpu::{self, this_cpu};
use crate::{apic, arch, pool, smp};

/// The one platform instance.
pub struct TestPlatform;

/// What the core is given.
pub static PLATFORM: TestPlatform = TestPlatform;

impl Platform for TestPlatform {
    fn alloc_pages(&self, count: usize) -> Result<NonNull<u8>, PlatformError> {
        pool::alloc(count).ok_or(PlatformError::OutOfMemory { pages: count })
    }

    unsafe fn free_pages(&self, ptr: NonNull<u8>, count: usize) {
        pool::free(ptr, count);
    }

    fn virt_to_phys(&self, va: NonNull<u8>) -> PhysAddr {
        PhysAddr(va.as_ptr() as u64) // identity map (boot.rs)
    }

    fn cpu_count(&self) -> u32 {
        percpu::online_count()
    }

    fn current_cpu(&self) -> CpuIndex {
        CpuIndex(this_cpu().index.load(Ordering::Relaxed))
    }

    fn for_each_cpu(
        &self,
        f: &(dyn Fn(CpuIndex) -> Result<(), Error> + Sync),
    ) -> Result<(), (CpuIndex, Error)> {
        smp::run_on_each_cpu(f)
    }

    fn log(&self, args: fmt::Arguments<'_>) {
        crate::kprintln!("vmm: {}", args);
    }

    fn fatal(&self, s: &FatalState) -> ! {
        crate::kprintln!(
            "FATAL cpu={} kind={:?} exit_reason={:#x} qualification={:#x} guest_rip={:#x} instr_error={}",
            s.cpu.0,
            s.kind,
            s.exit_reason,
            s.qualification,
            s.guest_rip,
            s.instr_error
        );
        crate::report::fatal_result(format_args!(
            "kind={:?} exit_reason={:#x} guest_rip={:#x} instr_error={}",
            s.kind, s.exit_reason, s.guest_rip, s.instr_error
        ))
    }

    fn host_cr3(&self) -> u64 {
        arch::cr3()
    }

    fn apic(&self) -> ApicAccess {
        ApicAccess::XApic {
            base_va: apic::XAPIC_BASE,
        }
    }

    fn debugctl(&self) -> Option<u64> {
        // Bochs #GPs on RDMSR IA32_DEBUGCTL (DESIGN §7): the CPU has no such MSR here, so the
        // core must never read, write or intercept it (its debug-register swap skips it).
        None
    }

    fn delivery_policy(&self) -> ackvisor_vmm::intr::vector_policy::PolicyTable {
        // This kernel's clock plays NT's: it must reach the guest at its true IRQL.
        use ackvisor_vmm::intr::vector_policy::{PolicyTable, VectorPolicy};
        PolicyTable::ALL_REPLAY.with(&[crate::interrupts::CLOCK_VECTOR], VectorPolicy::Auto)
    }
}
