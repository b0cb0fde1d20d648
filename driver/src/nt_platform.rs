//! The NT implementation of [`Platform`]: contiguous pages, virtual-to-physical, every processor
//! of every group, DbgPrintEx, KeBugCheckEx, the System process's CR3, the local APIC, IRQL.
//!
//! **Runs in:** PASSIVE for everything but [`Platform::fatal`], [`Platform::raise_irql`] and
//! [`Platform::lower_irql`], which VMX root calls with IF=0; and [`Platform::for_each_cpu`]'s
//! closure, which runs at DISPATCH_LEVEL on the CPU it names.

use core::fmt;
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::ntapi::{self, KeLowerIrql, KfRaiseIrql, MmMapIoSpaceEx};
use ackvisor_vmm::arch::msr::{ApicBase, IA32_APIC_BASE};
use ackvisor_vmm::arch::regs;
use ackvisor_vmm::intr::vector_policy::{PolicyTable, tick_defaults};
use ackvisor_vmm::{
    ApicAccess, CpuIndex, Error, FatalKind, FatalState, PhysAddr, Platform, PlatformError,
};
use wdk::fmt::FlushableFormatBuffer;
use wdk_sys::ntddk::{
    DbgPrintEx, IoGetCurrentProcess, KeBugCheckEx, KeGetCurrentProcessorNumberEx,
    KeGetProcessorNumberFromIndex, KeQueryActiveProcessorCountEx,
    KeRevertToUserGroupAffinityThread, KeSetSystemGroupAffinityThread, KeStackAttachProcess,
    KeUnstackDetachProcess, MmAllocateContiguousMemorySpecifyCache, MmFreeContiguousMemory,
    MmGetPhysicalAddress, MmUnmapIoSpace,
};
use wdk_sys::{
    _DPFLTR_TYPE::DPFLTR_IHVDRIVER_ID, _MEMORY_CACHING_TYPE::MmCached, ALL_PROCESSOR_GROUPS,
    DISPATCH_LEVEL, DPFLTR_ERROR_LEVEL, DPFLTR_INFO_LEVEL, GROUP_AFFINITY, KAPC_STATE,
    LARGE_INTEGER, NT_SUCCESS, PAGE_NOCACHE, PAGE_READWRITE, PAGE_SIZE, PASSIVE_LEVEL,
    PROCESSOR_NUMBER,
};

/// NT's clock vectors, which `KeAccumulateTicks` (DPC watchdog, run-time accounting) sees
/// through `KeClockInterruptNotify`: `HalpTimerClockInterrupt` (CLOCK_LEVEL) on the CPU that owns
/// the timer, `HalpTimerClockIpiRoutine` on the CPUs the owner forwards ticks to, and
/// `HalpTimerProfileInterrupt` (PROFILE_LEVEL), which samples the interrupted RIP. Fixed by the
/// x64 HAL (WinDbg `!idt` shows them at these vectors on Windows 10 and 11). No documented
/// interface names them, and an IDT entry points into `KiIsrThunk` for every device vector
/// alike, so they cannot be told apart from the IDT without symbols: `delivery_policy` adds
/// what the running system does show, the vector the HAL programmed into this CPU's LAPIC timer.
pub const NT_CLOCK_VECTOR: u8 = 0xD1;
/// See [`NT_CLOCK_VECTOR`].
pub const NT_CLOCK_IPI_VECTOR: u8 = 0xD2;
/// See [`NT_CLOCK_VECTOR`].
pub const NT_PROFILE_VECTOR: u8 = 0xFD;

/// Bugcheck code of a root-mode failure ("ACKV"), in the style of wdk-panic's "RPNC".
/// Parameters: 1 = `FatalKind` code | CPU << 32, 2 = exit reason | VM-instruction error << 32,
/// 3 = exit qualification, 4 = guest RIP.
pub const ACKVISOR_BUGCHECK: u32 = u32::from_be_bytes(*b"ACKV");

/// How loud a line is in the Debug Print Filter: `Error` shows with the default filter,
/// `Info` only after `ed nt!Kd_IHVDRIVER_Mask 0xffffffff` (or the registry key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Refusals and failures.
    Error,
    /// Everything else.
    Info,
}

/// Prints one line to the kernel debugger, prefixed `ackvisor: `. IRQL ≤ DIRQL, never in root.
pub fn print(level: Level, args: fmt::Arguments<'_>) {
    let level = match level {
        Level::Error => DPFLTR_ERROR_LEVEL,
        Level::Info => DPFLTR_INFO_LEVEL,
    };
    // DbgPrintEx takes at most 512 bytes per call; the buffer flushes in chunks of that size.
    let mut out = FlushableFormatBuffer::<_, 512>::new(|chunk| {
        // SAFETY: "%s" is a NUL-terminated literal and `chunk` a NUL-terminated C string that
        // lives across the call; passing the text as an argument keeps DbgPrintEx from
        // interpreting a `%` in it.
        unsafe {
            DbgPrintEx(
                DPFLTR_IHVDRIVER_ID as u32,
                level,
                c"%s".as_ptr(),
                chunk.as_c_str().as_ptr(),
            )
        };
    });
    // A formatting error only truncates a debug line; there is nobody to report it to.
    let _ = fmt::write(&mut out, format_args!("ackvisor: {args}\n"));
}

/// `print!`-style shorthand for [`print`].
macro_rules! dbg_line {
    ($level:ident, $($arg:tt)*) => {
        $crate::nt_platform::print($crate::nt_platform::Level::$level, format_args!($($arg)*))
    };
}
pub(crate) use dbg_line;

/// Why the platform could not be prepared at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrepareError {
    /// MmMapIoSpaceEx refused to map the xAPIC page at this physical address.
    ApicUnmapped(PhysAddr),
}

impl fmt::Display for PrepareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ApicUnmapped(pa) => {
                write!(f, "cannot map the local APIC registers at {:#x}", pa.0)
            }
        }
    }
}

/// The NT platform. Its fields are set once in `DriverEntry` ([`NtPlatform::prepare`]) before
/// the core sees it, and read in root mode afterwards, hence atomics.
pub struct NtPlatform {
    host_cr3: AtomicU64,
    x2apic: AtomicBool,
    xapic_va: AtomicUsize,
    /// `for_each_cpu` raised this thread from PASSIVE to DISPATCH_LEVEL (serialized by the
    /// lifecycle lock, so one flag serves).
    raised: AtomicBool,
}

/// The one instance the core gets as `&'static dyn Platform`.
pub static PLATFORM: NtPlatform = NtPlatform {
    host_cr3: AtomicU64::new(0),
    x2apic: AtomicBool::new(false),
    xapic_va: AtomicUsize::new(0),
    raised: AtomicBool::new(false),
};

impl NtPlatform {
    /// Records what root mode needs from the running system: the System process's CR3 and how
    /// to reach the local APIC (mapping the xAPIC page if the OS uses xAPIC mode).
    pub fn prepare(&self) -> Result<(), PrepareError> {
        self.host_cr3.store(system_cr3(), Ordering::Relaxed);
        // SAFETY: IA32_APIC_BASE exists on every x86-64 processor; reading it has no effect.
        let apic = ApicBase::from_raw(unsafe { regs::rdmsr(IA32_APIC_BASE) });
        if apic.x2apic() {
            // The OS switches every CPU to x2APIC mode together; root uses the MSRs.
            self.x2apic.store(true, Ordering::Relaxed);
            return Ok(());
        }
        let pa = PhysAddr(apic.base_page() << 12);
        let Ok(quad) = i64::try_from(pa.0) else {
            return Err(PrepareError::ApicUnmapped(pa));
        };
        // Every CPU's xAPIC answers at the same physical page, each with its own registers, so
        // one mapping serves all CPUs. Uncached (it is MMIO) and not executable.
        // SAFETY: the page is the local APIC's MMIO, which NT itself maps; a second, read-only
        // use (root reads IRR) of an uncached mapping of it does not conflict.
        let va = unsafe {
            MmMapIoSpaceEx(
                LARGE_INTEGER { QuadPart: quad },
                u64::from(PAGE_SIZE),
                PAGE_READWRITE | PAGE_NOCACHE,
            )
        };
        if va.is_null() {
            return Err(PrepareError::ApicUnmapped(pa));
        }
        self.xapic_va.store(va as usize, Ordering::Release);
        Ok(())
    }

    /// Undoes [`NtPlatform::prepare`] once no CPU is virtualized (nothing reads the APIC).
    pub fn release(&self) {
        let va = self.xapic_va.swap(0, Ordering::AcqRel);
        if va != 0 {
            // SAFETY: `va` is the PAGE_SIZE mapping from `prepare`, and no CPU runs root code
            // that could read it any more (every CPU was devirtualized first).
            unsafe { MmUnmapIoSpace(va as *mut _, u64::from(PAGE_SIZE)) };
        }
    }
}

/// The System process's directory base, read while running in it. `DriverEntry` normally runs
/// in System already (the I/O manager loads drivers from a system worker thread); attaching
/// covers any other caller. CR3 in kernel mode is the kernel directory base even with KVA
/// shadowing, which only loads the user one on the way back to user mode (DESIGN §4).
fn system_cr3() -> u64 {
    let system = ntapi::initial_system_process();
    // SAFETY: IoGetCurrentProcess has no preconditions at PASSIVE.
    if unsafe { IoGetCurrentProcess() } == system {
        return regs::cr3();
    }
    // SAFETY: KAPC_STATE is plain data; all-zero is valid and KeStackAttachProcess fills it.
    let mut apc: KAPC_STATE = unsafe { core::mem::zeroed() };
    // SAFETY: the System process never exits; `apc` outlives the attachment, which is undone
    // on this thread right below.
    unsafe { KeStackAttachProcess(system.cast(), &mut apc) };
    let cr3 = regs::cr3();
    // SAFETY: pairs with the attach above, same `apc`, same thread, same IRQL.
    unsafe { KeUnstackDetachProcess(&mut apc) };
    cr3
}

/// The stable code of a [`FatalKind`] in bugcheck parameter 1.
const fn fatal_code(kind: FatalKind) -> u64 {
    match kind {
        FatalKind::TripleFault => 1,
        FatalKind::EntryFailure => 2,
        FatalKind::UnexpectedExit => 3,
        FatalKind::InitSignal => 4,
        FatalKind::ResumeFailed => 5,
    }
}

impl Platform for NtPlatform {
    fn alloc_pages(&self, count: usize) -> Result<NonNull<u8>, PlatformError> {
        let oom = PlatformError::OutOfMemory { pages: count };
        let bytes = count.checked_mul(PAGE_SIZE as usize).ok_or(oom)?;
        // Anywhere in physical memory, no boundary, write-back: VMXON/VMCS regions, bitmaps and
        // stacks are ordinary memory to the CPU. The result is page-aligned by construction.
        // SAFETY: callable at IRQL ≤ DISPATCH_LEVEL, which holds for every caller (PASSIVE, or
        // inside for_each_cpu at DISPATCH_LEVEL).
        let va = unsafe {
            MmAllocateContiguousMemorySpecifyCache(
                bytes as u64,
                LARGE_INTEGER { QuadPart: 0 },
                LARGE_INTEGER { QuadPart: -1 },
                LARGE_INTEGER { QuadPart: 0 },
                MmCached,
            )
        };
        let pages = NonNull::new(va.cast::<u8>()).ok_or(oom)?;
        // SAFETY: `pages` points to `bytes` writable bytes that nobody else references yet.
        unsafe { ptr::write_bytes(pages.as_ptr(), 0, bytes) };
        Ok(pages)
    }

    unsafe fn free_pages(&self, ptr: NonNull<u8>, _count: usize) {
        // SAFETY: the caller hands back a pointer from `alloc_pages` that nothing uses any more;
        // MmFreeContiguousMemory knows the allocation's size itself.
        unsafe { MmFreeContiguousMemory(ptr.as_ptr().cast()) };
    }

    fn virt_to_phys(&self, va: NonNull<u8>) -> PhysAddr {
        // SAFETY: `va` lies in nonpaged contiguous memory from `alloc_pages` (trait contract),
        // which stays resident, so the translation exists.
        let pa = unsafe { MmGetPhysicalAddress(va.as_ptr().cast()) };
        // SAFETY: every variant of the LARGE_INTEGER union is the same 64 bits.
        PhysAddr(unsafe { pa.QuadPart } as u64)
    }

    fn cpu_count(&self) -> u32 {
        // SAFETY: no preconditions; counts the active processors of every group.
        unsafe { KeQueryActiveProcessorCountEx(ALL_PROCESSOR_GROUPS as u16) }
    }

    fn current_cpu(&self) -> CpuIndex {
        // SAFETY: a null PROCESSOR_NUMBER pointer asks for the system-wide index only.
        CpuIndex(unsafe { KeGetCurrentProcessorNumberEx(ptr::null_mut()) })
    }

    fn for_each_cpu(
        &self,
        f: &(dyn Fn(CpuIndex) -> Result<(), Error> + Sync),
    ) -> Result<(), (CpuIndex, Error)> {
        // DESIGN §5: every processor in every group, not just the first 64. One at a time on
        // this thread, moved with group affinity (must be called at PASSIVE).
        for index in 0..self.cpu_count() {
            let cpu = CpuIndex(index);
            let unreachable = (cpu, Error::Platform(PlatformError::CpuUnreachable(cpu)));
            // SAFETY: PROCESSOR_NUMBER is plain data; all-zero is valid.
            let mut number: PROCESSOR_NUMBER = unsafe { core::mem::zeroed() };
            // SAFETY: `number` is a valid out-parameter; `index` < the active count.
            let status = unsafe { KeGetProcessorNumberFromIndex(index, &mut number) };
            if !NT_SUCCESS(status) {
                return Err(unreachable);
            }
            let mask = 1u64
                .checked_shl(u32::from(number.Number))
                .ok_or(unreachable)?;
            let mut affinity = GROUP_AFFINITY {
                Mask: mask,
                Group: number.Group,
                Reserved: [0; 3],
            };
            // SAFETY: GROUP_AFFINITY is plain data; all-zero is valid.
            let mut previous: GROUP_AFFINITY = unsafe { core::mem::zeroed() };
            // SAFETY: at PASSIVE (caller contract); `affinity` names one active processor, and
            // `previous` receives what KeRevertToUserGroupAffinityThread restores below.
            unsafe { KeSetSystemGroupAffinityThread(&mut affinity, &mut previous) };
            // No thread switch while the core works on this CPU (HyperPlatform and SimpleVisor
            // run the same code in a DPC, at DISPATCH_LEVEL).
            // SAFETY: raising from PASSIVE to DISPATCH_LEVEL is always allowed.
            let old = unsafe { KfRaiseIrql(DISPATCH_LEVEL as u8) };
            self.raised.store(true, Ordering::Relaxed);
            let result = f(cpu);
            self.raised.store(false, Ordering::Relaxed);
            // SAFETY: restores the IRQL saved above, on the same CPU.
            unsafe { KeLowerIrql(old) };
            // SAFETY: back at PASSIVE; `previous` came from the matching set call.
            unsafe { KeRevertToUserGroupAffinityThread(&mut previous) };
            result.map_err(|e| (cpu, e))?;
        }
        Ok(())
    }

    fn log(&self, args: fmt::Arguments<'_>) {
        print(Level::Info, args);
    }

    fn fatal(&self, state: &FatalState) -> ! {
        let p1 = fatal_code(state.kind) | (u64::from(state.cpu.0) << 32);
        let p2 = u64::from(state.exit_reason) | (u64::from(state.instr_error) << 32);
        // SAFETY: KeBugCheckEx has no preconditions and never returns; it is the documented way
        // to stop the system, callable at any IRQL (here: VMX root, IF=0).
        unsafe {
            KeBugCheckEx(
                ACKVISOR_BUGCHECK,
                p1,
                p2,
                state.qualification,
                state.guest_rip,
            )
        }
    }

    fn host_cr3(&self) -> u64 {
        self.host_cr3.load(Ordering::Relaxed)
    }

    fn apic(&self) -> ApicAccess {
        if self.x2apic.load(Ordering::Relaxed) {
            ApicAccess::X2Apic
        } else {
            ApicAccess::XApic {
                base_va: self.xapic_va.load(Ordering::Acquire),
            }
        }
    }

    fn relax(&self) {
        // The core retries a hypercall because acknowledged vectors still wait on this CPU.
        // One of class ≤ DISPATCH (a DPC or APC request) can only leave once IRQL drops below
        // DISPATCH: drop to PASSIVE for a moment. Affinity keeps the thread on this CPU.
        if self.raised.load(Ordering::Relaxed) {
            // SAFETY: for_each_cpu raised this thread from PASSIVE to DISPATCH_LEVEL, so going
            // back to PASSIVE and up again restores exactly the state it set.
            unsafe { KeLowerIrql(PASSIVE_LEVEL as u8) };
            // SAFETY: raising from PASSIVE to DISPATCH_LEVEL is always allowed.
            unsafe { KfRaiseIrql(DISPATCH_LEVEL as u8) };
        } else {
            core::hint::spin_loop();
        }
    }

    fn delivery_policy(&self) -> PolicyTable {
        // Issue 8: the ticks must reach NT at their true IRQL, or replay makes every one look
        // like DISPATCH and the DPC watchdog bugchecks (0x133). Called on each CPU in turn.
        // Without the xAPIC mapping (`prepare` not run) there is nothing to read: the fixed
        // vectors alone.
        let lvt = match self.apic() {
            ApicAccess::XApic { base_va: 0 } => None,
            apic => Some(ackvisor_vmm::arch::apic::lvt_timer(apic)),
        };
        tick_defaults(
            &[NT_CLOCK_VECTOR, NT_CLOCK_IPI_VECTOR, NT_PROFILE_VECTOR],
            lvt,
        )
    }

    fn irql_is_cr8(&self) -> bool {
        // Windows 11 keeps IRQL bookkeeping beside CR8 (KiIrqlFlags): go through the kernel.
        false
    }

    fn raise_irql(&self, to: u8) -> u8 {
        // DESIGN §4: change IRQL through NT so Win11's IRQL bookkeeping stays consistent.
        // KfRaiseIrql bugchecks on a "raise" to a lower level, so only raise.
        let current = regs::cr8();
        if current >= to {
            return current;
        }
        // SAFETY: `to` is above the current IRQL (checked); KfRaiseIrql only writes CR8 and
        // NT's per-CPU IRQL bookkeeping, which is valid in root (GS = this CPU's KPCR).
        unsafe { KfRaiseIrql(to) }
    }

    fn lower_irql(&self, to: u8) {
        if regs::cr8() <= to {
            return;
        }
        // SAFETY: `to` is the IRQL `raise_irql` returned on this CPU, below the current one;
        // with IF=0 no interrupt is delivered by the lowering itself.
        unsafe { KeLowerIrql(to) };
    }
}
