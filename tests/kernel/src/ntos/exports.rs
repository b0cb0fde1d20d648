//! The miniature NT's export table: every ntoskrnl routine ackvisor.sys imports, by name, as an
//! `extern "win64"` function the loader binds into the image's import address table.
//!
//! Each routine first checks its documented IRQL rule ([`irql_check`]), as Driver Verifier does:
//! a violation is counted and the first offender named ([`IRQL_VIOLATIONS`], [`first_violation`]).
//! IRQL is CR8, as on x64 NT.
//!
//! The routines with state live in `routines`, `threads` and `sched`. A routine the miniature NT
//! does not provide is not in the table, so the loader refuses an image that imports it; a wait
//! no thread can ever satisfy ends the run ([`unimplemented_deadlock`]), never a silent success.
//!
//! **Runs in:** whatever IRQL the image calls at (each routine names its rule).

use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use super::{routines, threads};
use crate::arch;

/// HIGH_LEVEL: the rule of routines callable at any IRQL.
pub const HIGH_LEVEL: u8 = 15;

/// Calls that broke their routine's IRQL rule.
pub static IRQL_VIOLATIONS: AtomicU32 = AtomicU32::new(0);
static FIRST_VIOLATION: AtomicPtr<u8> = AtomicPtr::new(core::ptr::null_mut());
static FIRST_VIOLATION_LEN: AtomicU32 = AtomicU32::new(0);

/// The routine that broke its IRQL rule first (`-` when none did).
pub fn first_violation() -> &'static str {
    let p = FIRST_VIOLATION.load(Ordering::Acquire);
    if p.is_null() {
        return "-";
    }
    let n = FIRST_VIOLATION_LEN.load(Ordering::Relaxed) as usize;
    // SAFETY: `p`/`n` were stored from a `&'static str` in `irql_check`.
    let bytes = unsafe { core::slice::from_raw_parts(p, n) };
    core::str::from_utf8(bytes).unwrap_or("?")
}

/// Driver Verifier's IRQL check: `routine` may be called at IRQL ≤ `max` only.
pub fn irql_check(routine: &'static str, max: u8) {
    if arch::cr8() > max {
        violation(routine);
    }
}

/// Counts a broken IRQL rule of `routine` (and names it if it is the first). Out of line: the
/// image calls KfRaiseIrql and KeLowerIrql on its exit path (measured by `nt-bench`), and
/// inlined, this printing path made KfRaiseIrql save XMM6–15 (callee-saved in win64, which it
/// is, and not in the System V code it calls) on every call, violation or not.
#[cold]
#[inline(never)]
fn violation(routine: &'static str) {
    if IRQL_VIOLATIONS.fetch_add(1, Ordering::AcqRel) == 0 {
        FIRST_VIOLATION_LEN.store(routine.len() as u32, Ordering::Relaxed);
        FIRST_VIOLATION.store(routine.as_ptr().cast_mut(), Ordering::Release);
    }
    crate::kprintln!("ntos: IRQL violation: {routine} at IRQL {}", arch::cr8());
}

/// Ends the run: a wait without a timeout outside any thread, which nothing could end.
pub fn unimplemented_deadlock(routine: &str) -> ! {
    crate::report::fatal_result(format_args!("deadlock={routine}"))
}

// --- C runtime (ntoskrnl exports them; any IRQL, the memory must be resident) ---

/// `memcpy`.
extern "win64" fn nt_memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the image's contract for memcpy: `n` bytes valid at both, no overlap.
    unsafe { crate::mem::memcpy(dst, src, n) }
}

/// `memset`.
extern "win64" fn nt_memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the image's contract for memset: `n` bytes valid at `dst`.
    unsafe { crate::mem::memset(dst, c, n) }
}

/// `memcmp`.
extern "win64" fn nt_memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the image's contract for memcmp: `n` bytes valid at both.
    unsafe { crate::mem::memcmp(a, b, n) }
}

// --- Debugging ---

/// `DbgPrintEx(ComponentId, Level, Format, ...)`: IRQL ≤ DIRQL. Prints to the console with an
/// `ntos: dbg:` prefix. Simplified: the format may use `%s` (one NUL-terminated string from
/// the first variadic argument) and `%%`; any other conversion is printed as written.
extern "win64" fn nt_dbg_print_ex(
    _component: u32,
    _level: u32,
    format: *const u8,
    a0: usize,
) -> u32 {
    irql_check("DbgPrintEx", HIGH_LEVEL);
    let Some(fmt) = c_str(format) else {
        return 0;
    };
    let mut out = Text::new();
    let mut bytes = fmt.iter().copied();
    let mut arg_used = false;
    while let Some(b) = bytes.next() {
        if b != b'%' {
            push_byte(&mut out, b);
            continue;
        }
        match bytes.next() {
            Some(b's') if !arg_used => {
                arg_used = true;
                for &c in c_str(a0 as *const u8).unwrap_or(b"(null)") {
                    push_byte(&mut out, c);
                }
            }
            Some(b'%') => push_byte(&mut out, b'%'),
            Some(other) => {
                push_byte(&mut out, b'%');
                push_byte(&mut out, other);
            }
            None => push_byte(&mut out, b'%'),
        }
    }
    crate::kprint!("ntos: dbg: {}", out.as_str());
    if super::sched::in_system_thread() {
        SYSTEM_THREAD_LINES.fetch_add(1, Ordering::AcqRel);
    }
    if out.as_str().contains(REFUSAL) {
        REFUSAL_LINES.fetch_add(1, Ordering::AcqRel);
    }
    0
}

/// What ackvisor's DbgPrintEx line says when DriverEntry refuses (README: "Why ackvisor refused
/// to load").
const REFUSAL: &str = "refusing to load";
/// DbgPrintEx lines printed by a system thread (ackvisor's log-drain worker).
pub static SYSTEM_THREAD_LINES: AtomicU32 = AtomicU32::new(0);
/// DbgPrintEx lines that said [`REFUSAL`].
pub static REFUSAL_LINES: AtomicU32 = AtomicU32::new(0);

/// One DbgPrintEx line (NT takes at most 512 bytes per call; longer text is cut).
struct Text {
    buf: [u8; 512],
    len: usize,
}

impl Text {
    fn new() -> Text {
        Text {
            buf: [0; 512],
            len: 0,
        }
    }
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?")
    }
}

fn push_byte(out: &mut Text, b: u8) {
    if let Some(slot) = out.buf.get_mut(out.len) {
        *slot = if b.is_ascii() { b } else { b'?' };
        out.len += 1;
    }
}

/// A NUL-terminated string of at most 4 KiB, or None for a null pointer.
fn c_str<'a>(p: *const u8) -> Option<&'a [u8]> {
    const LIMIT: usize = 4096;
    if p.is_null() {
        return None;
    }
    let mut n = 0;
    // SAFETY: the image passes NUL-terminated strings; the scan stops at LIMIT.
    while n < LIMIT && unsafe { p.wrapping_add(n).read() } != 0 {
        n += 1;
    }
    // SAFETY: the `n` bytes before the NUL were just read.
    Some(unsafe { core::slice::from_raw_parts(p, n) })
}

/// `KeBugCheckEx(Code, P1..P4)`: any IRQL, never returns. Ends the run with a fatal line.
extern "win64" fn nt_ke_bug_check_ex(code: u32, p1: u64, p2: u64, p3: u64, p4: u64) -> ! {
    crate::report::fatal_result(format_args!(
        "bugcheck={code:#x} p1={p1:#x} p2={p2:#x} p3={p3:#x} p4={p4:#x}"
    ))
}

// --- IRQL ---

/// `KfRaiseIrql(NewIrql)`: returns the old IRQL. Raising to a lower IRQL is a bugcheck in NT
/// (IRQL_NOT_GREATER_OR_EQUAL); here it counts as a violation and changes nothing.
/// Simplified (also KeLowerIrql): IRQL is CR8 alone; Windows 11 also keeps per-CPU IRQL
/// bookkeeping beside it when `KiIrqlFlags` asks for it, so its routines are longer than these
/// (`nt-bench` counts these bodies apart as `irql`).
extern "win64" fn nt_kf_raise_irql(new: u8) -> u8 {
    let old = arch::cr8();
    if new < old {
        violation("KfRaiseIrql");
        return old;
    }
    // SAFETY: raising the task priority only masks more interrupt classes.
    unsafe { arch::set_cr8(new) };
    old
}

/// `KeLowerIrql(NewIrql)`: lowering to a higher IRQL is a bugcheck in NT
/// (IRQL_NOT_LESS_OR_EQUAL); here it counts as a violation and changes nothing.
extern "win64" fn nt_ke_lower_irql(new: u8) {
    if new > arch::cr8() {
        violation("KeLowerIrql");
        return;
    }
    // SAFETY: lowering to an IRQL an earlier raise returned (the image's contract).
    unsafe { arch::set_cr8(new) };
}

// --- Processors (as processor groups: `groups`) ---

/// `KeQueryActiveProcessorCountEx(GroupNumber)`: any IRQL. `ALL_PROCESSOR_GROUPS` (0xFFFF) →
/// every online CPU; a group → its CPUs; a group that does not exist → 0.
extern "win64" fn nt_ke_query_active_processor_count_ex(group: u16) -> u32 {
    const ALL_PROCESSOR_GROUPS: u16 = 0xFFFF;
    irql_check("KeQueryActiveProcessorCountEx", HIGH_LEVEL);
    match group {
        ALL_PROCESSOR_GROUPS => super::groups::online(),
        g => super::groups::active_in(g),
    }
}

/// `KeGetCurrentProcessorNumberEx(ProcNumber)`: any IRQL; the CPU the calling thread runs on
/// now, as its system-wide index (and group/number).
pub(super) extern "win64" fn nt_ke_get_current_processor_number_ex(
    number: *mut super::layout::PROCESSOR_NUMBER,
) -> u32 {
    irql_check("KeGetCurrentProcessorNumberEx", HIGH_LEVEL);
    let index = crate::percpu::this_cpu().index.load(Ordering::Relaxed);
    if !number.is_null()
        && let Some(n) = super::groups::number_of(index)
    {
        // SAFETY: the caller passes a PROCESSOR_NUMBER to fill (or null, checked above).
        unsafe { number.write(n) };
    }
    index
}

/// `KeGetProcessorNumberFromIndex(ProcIndex, ProcNumber)`: any IRQL; STATUS_INVALID_PARAMETER
/// for an index past the online CPUs.
extern "win64" fn nt_ke_get_processor_number_from_index(
    index: u32,
    number: *mut super::layout::PROCESSOR_NUMBER,
) -> i32 {
    const STATUS_INVALID_PARAMETER: i32 = 0xC000_000Du32 as i32;
    irql_check("KeGetProcessorNumberFromIndex", HIGH_LEVEL);
    let Some(n) = super::groups::number_of(index) else {
        return STATUS_INVALID_PARAMETER;
    };
    if number.is_null() {
        return STATUS_INVALID_PARAMETER;
    }
    // SAFETY: the caller passes a PROCESSOR_NUMBER to fill (null rejected above).
    unsafe { number.write(n) };
    0
}

/// `MmGetPhysicalAddress(BaseAddress)`: any IRQL. This kernel maps memory one to one.
extern "win64" fn nt_mm_get_physical_address(va: usize) -> u64 {
    irql_check("MmGetPhysicalAddress", HIGH_LEVEL);
    va as u64
}

// --- Data exports: the loader binds the variable's address into the image's slot ---

/// The System process object `PsInitialSystemProcess` points at (opaque to the image: it only
/// passes it back to KeStackAttachProcess).
static SYSTEM_PROCESS: [u64; 64] = [0; 64];
/// The System process object.
pub fn system_process() -> *mut core::ffi::c_void {
    core::ptr::addr_of!(SYSTEM_PROCESS).cast_mut().cast()
}

/// The thread object type (`*PsThreadType`).
pub fn thread_type() -> *mut core::ffi::c_void {
    core::ptr::addr_of!(THREAD_TYPE).cast_mut().cast()
}

/// `PsInitialSystemProcess`: a PEPROCESS variable.
static PS_INITIAL_SYSTEM_PROCESS: AtomicPtr<[u64; 64]> =
    AtomicPtr::new(core::ptr::addr_of!(SYSTEM_PROCESS).cast_mut());
/// The thread object type `*PsThreadType` points at (opaque, compared by identity).
static THREAD_TYPE: [u64; 32] = [0; 32];
static THREAD_TYPE_SLOT: AtomicPtr<[u64; 32]> =
    AtomicPtr::new(core::ptr::addr_of!(THREAD_TYPE).cast_mut());
/// `PsThreadType`: a `POBJECT_TYPE *` variable.
static PS_THREAD_TYPE: AtomicPtr<AtomicPtr<[u64; 32]>> =
    AtomicPtr::new(core::ptr::addr_of!(THREAD_TYPE_SLOT).cast_mut());

/// One export: its name and what the import slot receives.
struct Export {
    name: &'static [u8],
    address: fn() -> usize,
}

macro_rules! exports {
    ($($name:literal => $addr:expr),* $(,)?) => {
        [$(Export { name: $name, address: || $addr as usize }),*]
    };
}

/// ntoskrnl.exe's exports in this kernel.
static NTOSKRNL: [Export; 41] = exports! {
    b"DbgPrintEx" => nt_dbg_print_ex as *const (),
    b"ExCreateCallback" => routines::ex_create_callback as *const (),
    b"ExRegisterCallback" => routines::ex_register_callback as *const (),
    b"ExUnregisterCallback" => routines::ex_unregister_callback as *const (),
    b"IoCreateSymbolicLink" => routines::io_create_symbolic_link as *const (),
    b"IoDeleteDevice" => routines::io_delete_device as *const (),
    b"IoDeleteSymbolicLink" => routines::io_delete_symbolic_link as *const (),
    b"IoGetCurrentProcess" => routines::io_get_current_process as *const (),
    b"IofCompleteRequest" => super::io::iof_complete_request as *const (),
    b"KeBugCheckEx" => nt_ke_bug_check_ex as *const (),
    b"KeGetCurrentProcessorNumberEx" => nt_ke_get_current_processor_number_ex as *const (),
    b"KeGetProcessorNumberFromIndex" => nt_ke_get_processor_number_from_index as *const (),
    b"KeInitializeEvent" => routines::ke_initialize_event as *const (),
    b"KeInitializeMutex" => routines::ke_initialize_mutex as *const (),
    b"KeLowerIrql" => nt_ke_lower_irql as *const (),
    b"KeQueryActiveProcessorCountEx" => nt_ke_query_active_processor_count_ex as *const (),
    b"KeReleaseMutex" => routines::ke_release_mutex as *const (),
    b"KeRevertToUserGroupAffinityThread" => routines::ke_revert_to_user_group_affinity_thread as *const (),
    b"KeSetEvent" => routines::ke_set_event as *const (),
    b"KeSetSystemGroupAffinityThread" => routines::ke_set_system_group_affinity_thread as *const (),
    b"KeStackAttachProcess" => routines::ke_stack_attach_process as *const (),
    b"KeUnstackDetachProcess" => routines::ke_unstack_detach_process as *const (),
    b"KeWaitForSingleObject" => routines::ke_wait_for_single_object as *const (),
    b"KfRaiseIrql" => nt_kf_raise_irql as *const (),
    b"MmAllocateContiguousMemorySpecifyCache" => routines::mm_allocate_contiguous_memory_specify_cache as *const (),
    b"MmFreeContiguousMemory" => routines::mm_free_contiguous_memory as *const (),
    b"MmGetPhysicalAddress" => nt_mm_get_physical_address as *const (),
    b"MmMapIoSpaceEx" => routines::mm_map_io_space_ex as *const (),
    b"MmUnmapIoSpace" => routines::mm_unmap_io_space as *const (),
    b"ObReferenceObjectByHandle" => routines::ob_reference_object_by_handle as *const (),
    b"ObfDereferenceObject" => routines::obf_dereference_object as *const (),
    b"PsCreateSystemThread" => threads::ps_create_system_thread as *const (),
    b"PsInitialSystemProcess" => core::ptr::addr_of!(PS_INITIAL_SYSTEM_PROCESS),
    b"PsTerminateSystemThread" => threads::ps_terminate_system_thread as *const (),
    b"PsThreadType" => core::ptr::addr_of!(PS_THREAD_TYPE),
    b"WdmlibIoCreateDeviceSecure" => routines::wdmlib_io_create_device_secure as *const (),
    b"ZwClose" => routines::zw_close as *const (),
    b"ZwWaitForSingleObject" => routines::zw_wait_for_single_object as *const (),
    b"memcmp" => nt_memcmp as *const (),
    b"memcpy" => nt_memcpy as *const (),
    b"memset" => nt_memset as *const (),
};

/// The address an import of `name` from `dll` binds to, if this kernel exports it. DLL names
/// compare without case, as NT's loader does. `WdmlibIoCreateDeviceSecure` is wdmsec.lib's (a
/// static library on Windows); the Linux build imports it from ntoskrnl.exe, so it is here.
pub fn find(dll: &[u8], name: &[u8]) -> Option<usize> {
    if !dll.eq_ignore_ascii_case(b"ntoskrnl.exe") {
        return None;
    }
    NTOSKRNL
        .iter()
        .find(|e| e.name == name)
        .map(|e| (e.address)())
}

/// The name of the export at `address`, if it is one.
pub fn name_of(address: usize) -> Option<&'static [u8]> {
    NTOSKRNL
        .iter()
        .find(|e| (e.address)() == address)
        .map(|e| e.name)
}

/// How many routines and variables the table exports.
pub fn count() -> usize {
    NTOSKRNL.len()
}
