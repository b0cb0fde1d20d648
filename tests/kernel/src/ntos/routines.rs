//! The miniature NT's routines with state: memory (`Mm*`), devices and links (`Io*`),
//! callbacks (`Ex*`), dispatcher objects and waits (`Ke*`), threads and handles (`Ps*`, `Ob*`,
//! `Zw*`), and the verifier's books of what the image holds ([`Books`]).
//!
//! Threads, waits and affinity run on the cooperative scheduler (`sched`): a wait that cannot be
//! satisfied blocks the calling thread and its CPU runs another; KeSetSystemGroupAffinityThread
//! moves the calling thread to the CPU it names (`groups` maps group and number to the CPU).
//! Simplifications, each named where it is made:
//! - no preemption and no load balancing (see `sched`'s module comment);
//! - an affinity must name exactly one CPU: a mask of several CPUs is counted as a misuse (NT
//!   would let the thread run on any of them), as is one naming a CPU that does not exist;
//! - the `Wait` argument of KeSetEvent/KeReleaseMutex is ignored (it only lets NT keep the
//!   dispatcher lock into the caller's next wait).
//!
//! **Runs in:** PASSIVE unless a routine says otherwise; any CPU.

use core::ffi::c_void;
use core::ptr::{self, NonNull, null_mut};
use core::sync::atomic::{AtomicI64, AtomicPtr, AtomicU32, AtomicUsize, Ordering};

use super::exports::{HIGH_LEVEL, irql_check};
use super::layout::{
    DRIVER_OBJECT, DeviceObject, GROUP_AFFINITY, KEVENT, KMUTEX, OBJECT_ATTRIBUTES, UNICODE_STRING,
};

/// PASSIVE_LEVEL.
const PASSIVE: u8 = 0;
/// APC_LEVEL.
const APC: u8 = 1;
/// DISPATCH_LEVEL.
const DISPATCH: u8 = 2;

const STATUS_SUCCESS: i32 = 0;
const STATUS_INVALID_HANDLE: i32 = 0xC000_0008_u32 as i32;
const STATUS_INVALID_PARAMETER: i32 = 0xC000_000D_u32 as i32;
const STATUS_OBJECT_NAME_NOT_FOUND: i32 = 0xC000_0034_u32 as i32;
const STATUS_OBJECT_NAME_COLLISION: i32 = 0xC000_0035_u32 as i32;
const STATUS_OBJECT_TYPE_MISMATCH: i32 = 0xC000_0024_u32 as i32;
/// What an injected refusal returns (see `fault`).
pub const STATUS_INSUFFICIENT_RESOURCES: i32 = 0xC000_009A_u32 as i32;

const PAGE: usize = 4096;

/// The verifier's books: what the image holds now. After unload each must be zero.
pub struct Books {
    /// Pages of contiguous memory allocated and not freed.
    pub contiguous_pages: AtomicUsize,
    /// I/O space mappings not unmapped.
    pub io_maps: AtomicI64,
    /// Devices not deleted.
    pub devices: AtomicI64,
    /// Symbolic links not deleted.
    pub links: AtomicI64,
    /// Callback registrations not unregistered.
    pub callbacks: AtomicI64,
    /// Threads not terminated.
    pub threads: AtomicI64,
    /// Object references (ExCreateCallback, ObReferenceObjectByHandle) not dropped.
    pub references: AtomicI64,
    /// Handles not closed.
    pub handles: AtomicI64,
    /// Process attachments not detached.
    pub attached: AtomicI64,
    /// Misuses: a free of memory never allocated, a dereference below zero, ...
    pub misuses: AtomicU32,
}

/// The books of this run.
pub static BOOKS: Books = Books {
    contiguous_pages: AtomicUsize::new(0),
    io_maps: AtomicI64::new(0),
    devices: AtomicI64::new(0),
    links: AtomicI64::new(0),
    callbacks: AtomicI64::new(0),
    threads: AtomicI64::new(0),
    references: AtomicI64::new(0),
    handles: AtomicI64::new(0),
    attached: AtomicI64::new(0),
    misuses: AtomicU32::new(0),
};

impl Books {
    /// Everything the image still holds, summed.
    pub fn leaks(&self) -> u64 {
        let signed = [
            &self.io_maps,
            &self.devices,
            &self.links,
            &self.callbacks,
            &self.threads,
            &self.references,
            &self.handles,
            &self.attached,
        ];
        self.contiguous_pages.load(Ordering::Acquire) as u64
            + signed
                .iter()
                .map(|c| c.load(Ordering::Acquire).unsigned_abs())
                .sum::<u64>()
    }
}

fn misuse(what: &str) {
    BOOKS.misuses.fetch_add(1, Ordering::AcqRel);
    crate::kprintln!("ntos: misuse: {what}");
}

// --- Memory ---

/// Contiguous allocations: base address and pages.
static ALLOCATIONS: [(AtomicUsize, AtomicUsize); 64] =
    [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; 64];

/// `MmAllocateContiguousMemorySpecifyCache(NumberOfBytes, Lowest, Highest, Boundary, Cache)`:
/// IRQL ≤ DISPATCH. Simplified: the test kernel's page pool, identity mapped (below 4 GiB, so
/// within any `Highest` ackvisor passes); the cache type is not applied.
pub extern "win64" fn mm_allocate_contiguous_memory_specify_cache(
    bytes: usize,
    _lowest: u64,
    _highest: u64,
    _boundary: u64,
    _cache: u32,
) -> *mut c_void {
    irql_check("MmAllocateContiguousMemorySpecifyCache", DISPATCH);
    if super::fault::fails("MmAllocateContiguousMemorySpecifyCache") {
        return null_mut();
    }
    let pages = bytes.div_ceil(PAGE);
    let Some(slot) = ALLOCATIONS
        .iter()
        .find(|(base, _)| base.load(Ordering::Acquire) == 0)
    else {
        return null_mut();
    };
    let Some(p) = crate::pool::alloc(pages) else {
        return null_mut();
    };
    slot.0.store(p.as_ptr() as usize, Ordering::Release);
    slot.1.store(pages, Ordering::Release);
    BOOKS.contiguous_pages.fetch_add(pages, Ordering::AcqRel);
    p.as_ptr().cast()
}

/// `MmFreeContiguousMemory(BaseAddress)`: IRQL ≤ DISPATCH (documented as PASSIVE on older
/// systems; DISPATCH since Windows Vista).
pub extern "win64" fn mm_free_contiguous_memory(base: *mut c_void) {
    irql_check("MmFreeContiguousMemory", DISPATCH);
    let Some(slot) = ALLOCATIONS
        .iter()
        .find(|(b, _)| !base.is_null() && b.load(Ordering::Acquire) == base as usize)
    else {
        misuse("MmFreeContiguousMemory of memory never allocated");
        return;
    };
    let pages = slot.1.load(Ordering::Acquire);
    if let Some(p) = NonNull::new(base.cast::<u8>()) {
        crate::pool::free(p, pages);
    }
    slot.0.store(0, Ordering::Release);
    BOOKS.contiguous_pages.fetch_sub(pages, Ordering::AcqRel);
}

/// `MmMapIoSpaceEx(PhysicalAddress, NumberOfBytes, Protect)`: IRQL ≤ DISPATCH. The test kernel
/// maps the low 4 GiB one to one (the LAPIC's top GiB uncached), so the address maps to itself.
pub extern "win64" fn mm_map_io_space_ex(pa: u64, bytes: usize, _protect: u32) -> *mut c_void {
    irql_check("MmMapIoSpaceEx", DISPATCH);
    if super::fault::fails("MmMapIoSpaceEx") {
        return null_mut();
    }
    if bytes == 0 || pa >= 1 << 32 {
        return null_mut();
    }
    BOOKS.io_maps.fetch_add(1, Ordering::AcqRel);
    pa as usize as *mut c_void
}

/// `MmUnmapIoSpace(BaseAddress, NumberOfBytes)`: IRQL ≤ DISPATCH.
pub extern "win64" fn mm_unmap_io_space(_va: *mut c_void, _bytes: usize) {
    irql_check("MmUnmapIoSpace", DISPATCH);
    if BOOKS.io_maps.fetch_sub(1, Ordering::AcqRel) <= 0 {
        misuse("MmUnmapIoSpace without a mapping");
    }
}

// --- Processes ---

/// `IoGetCurrentProcess()`: any IRQL. The only process is the System process.
pub extern "win64" fn io_get_current_process() -> *mut c_void {
    irql_check("IoGetCurrentProcess", HIGH_LEVEL);
    super::exports::system_process()
}

/// `KeStackAttachProcess(Process, ApcState)`: IRQL ≤ APC. One address space: counted only.
pub extern "win64" fn ke_stack_attach_process(_process: *mut c_void, _apc: *mut c_void) {
    irql_check("KeStackAttachProcess", APC);
    BOOKS.attached.fetch_add(1, Ordering::AcqRel);
}

/// `KeUnstackDetachProcess(ApcState)`: IRQL ≤ APC.
pub extern "win64" fn ke_unstack_detach_process(_apc: *mut c_void) {
    irql_check("KeUnstackDetachProcess", APC);
    if BOOKS.attached.fetch_sub(1, Ordering::AcqRel) <= 0 {
        misuse("KeUnstackDetachProcess without an attach");
    }
}

// --- Affinity ---

/// KeSetSystemGroupAffinityThread calls by the group they named (groups 0 and 1).
pub static AFFINITY_CALLS_BY_GROUP: [AtomicU32; 2] = [const { AtomicU32::new(0) }; 2];

/// The CPU `affinity` names, or a counted misuse naming why not.
fn affinity_target(routine: &str, affinity: *const GROUP_AFFINITY) -> Option<u32> {
    if affinity.is_null() {
        misuse(routine);
        return None;
    }
    // SAFETY: the caller passes a valid GROUP_AFFINITY (null checked above).
    let a = unsafe { affinity.read() };
    match super::groups::index_of(&a) {
        Ok(index) => Some(index),
        Err(e) => {
            BOOKS.misuses.fetch_add(1, Ordering::AcqRel);
            crate::kprintln!(
                "ntos: misuse: {routine} group {} mask {:#x}: {e:?}",
                a.Group,
                a.Mask
            );
            None
        }
    }
}

/// `KeSetSystemGroupAffinityThread(Affinity, PreviousAffinity)`: IRQL ≤ DISPATCH. Moves the
/// calling thread to the one CPU `Affinity` names (its stack continues there); writes the
/// thread's previous system affinity, Mask 0 when it ran with its user affinity. Simplified:
/// exactly one CPU (see the module comment); at DISPATCH the move happens at once (NT defers the
/// switch until the IRQL drops; ackvisor calls at PASSIVE).
pub extern "win64" fn ke_set_system_group_affinity_thread(
    affinity: *const GROUP_AFFINITY,
    previous: *mut GROUP_AFFINITY,
) {
    irql_check("KeSetSystemGroupAffinityThread", DISPATCH);
    let Some(target) = affinity_target("KeSetSystemGroupAffinityThread", affinity) else {
        return;
    };
    // SAFETY: valid (affinity_target read it).
    let group = usize::from(unsafe { affinity.read() }.Group);
    if let Some(n) = AFFINITY_CALLS_BY_GROUP.get(group) {
        n.fetch_add(1, Ordering::AcqRel);
    }
    let before = super::sched::set_affinity(Some(target));
    if !previous.is_null() {
        let value = before.map_or(
            GROUP_AFFINITY {
                Mask: 0,
                Group: 0,
                Reserved: [0; 3],
            },
            super::groups::affinity_of,
        );
        // SAFETY: the caller passes a GROUP_AFFINITY to fill (null checked).
        unsafe { previous.write(value) };
    }
}

/// `KeRevertToUserGroupAffinityThread(PreviousAffinity)`: IRQL ≤ DISPATCH. Mask 0 restores the
/// thread's user affinity (the CPU it was created on, where it moves back); anything else is
/// the system affinity to restore.
pub extern "win64" fn ke_revert_to_user_group_affinity_thread(previous: *const GROUP_AFFINITY) {
    irql_check("KeRevertToUserGroupAffinityThread", DISPATCH);
    // SAFETY: the caller passes what KeSetSystemGroupAffinityThread wrote (or null, checked).
    let mask = (!previous.is_null()).then(|| unsafe { previous.read() }.Mask);
    match mask {
        None | Some(0) => {
            super::sched::set_affinity(None);
        }
        Some(_) => {
            if let Some(target) = affinity_target("KeRevertToUserGroupAffinityThread", previous) {
                super::sched::set_affinity(Some(target));
            }
        }
    }
}

// --- Devices and links ---

static DEVICE: AtomicPtr<DeviceObject> = AtomicPtr::new(null_mut());

struct DeviceSlot(core::cell::UnsafeCell<DeviceObject>);
// SAFETY: handed to the image through WdmlibIoCreateDeviceSecure only while DEVICE is null.
unsafe impl Sync for DeviceSlot {}
static DEVICE_SLOT: DeviceSlot = DeviceSlot(core::cell::UnsafeCell::new(
    // SAFETY: DEVICE_OBJECT is integers, pointers and options of fn pointers: zero is valid.
    unsafe { core::mem::zeroed() },
));

/// `WdmlibIoCreateDeviceSecure(...)` (wdmsec.lib's routine): PASSIVE. Simplified: one device;
/// no extension (ackvisor asks for none: a size above 0 is refused); the SDDL and class GUID
/// are accepted unread.
#[allow(clippy::too_many_arguments)]
pub extern "win64" fn wdmlib_io_create_device_secure(
    driver: *mut DRIVER_OBJECT,
    extension_size: u32,
    _name: *const UNICODE_STRING,
    device_type: u32,
    characteristics: u32,
    exclusive: u8,
    _sddl: *const UNICODE_STRING,
    _class: *const c_void,
    out: *mut *mut DeviceObject,
) -> i32 {
    irql_check("WdmlibIoCreateDeviceSecure", PASSIVE);
    if super::fault::fails("WdmlibIoCreateDeviceSecure") {
        return STATUS_INSUFFICIENT_RESOURCES;
    }
    if out.is_null() || driver.is_null() || extension_size != 0 {
        return STATUS_INVALID_PARAMETER;
    }
    if !DEVICE.load(Ordering::Acquire).is_null() {
        return STATUS_OBJECT_NAME_COLLISION;
    }
    let d = DEVICE_SLOT.0.get();
    // SAFETY: DEVICE_OBJECT is integers, pointers and options of fn pointers: zero is valid.
    let zero: DeviceObject = unsafe { core::mem::zeroed() };
    // SAFETY: no device exists, so nobody else references the slot.
    unsafe { d.write(zero) };
    // SAFETY: as above; the slot is ours until DEVICE is published.
    let dev = unsafe { &mut (*d).0 };
    dev.Type = 3;
    dev.Size = size_of::<DeviceObject>() as u16;
    dev.ReferenceCount = 1;
    dev.DriverObject = driver;
    dev.DeviceType = device_type;
    dev.Characteristics = characteristics;
    dev.StackSize = 1;
    dev.Flags = if exclusive != 0 { 0x8 } else { 0 };
    // SAFETY: `driver` is the DRIVER_OBJECT this kernel passed to DriverEntry.
    unsafe { (*driver).DeviceObject = ptr::from_mut(dev).cast() };
    DEVICE.store(d, Ordering::Release);
    BOOKS.devices.fetch_add(1, Ordering::AcqRel);
    // SAFETY: `out` is the caller's out-param (checked non-null).
    unsafe { out.write(d) };
    STATUS_SUCCESS
}

/// `IoDeleteDevice(DeviceObject)`: PASSIVE.
pub extern "win64" fn io_delete_device(device: *mut DeviceObject) {
    irql_check("IoDeleteDevice", PASSIVE);
    if device.is_null() || DEVICE.load(Ordering::Acquire) != device {
        misuse("IoDeleteDevice of an unknown device");
        return;
    }
    // SAFETY: the device is ours; its DriverObject is the one DriverEntry got.
    let driver = unsafe { (*device).0.DriverObject };
    if !driver.is_null() {
        // SAFETY: as above.
        unsafe { (*driver).DeviceObject = null_mut() };
    }
    DEVICE.store(null_mut(), Ordering::Release);
    BOOKS.devices.fetch_sub(1, Ordering::AcqRel);
}

/// `IoCreateSymbolicLink(Link, Target)`: PASSIVE. Counted; the names are not resolved.
pub extern "win64" fn io_create_symbolic_link(
    link: *const UNICODE_STRING,
    target: *const UNICODE_STRING,
) -> i32 {
    irql_check("IoCreateSymbolicLink", PASSIVE);
    if super::fault::fails("IoCreateSymbolicLink") {
        return STATUS_INSUFFICIENT_RESOURCES;
    }
    if link.is_null() || target.is_null() {
        return STATUS_INVALID_PARAMETER;
    }
    BOOKS.links.fetch_add(1, Ordering::AcqRel);
    STATUS_SUCCESS
}

/// `IoDeleteSymbolicLink(Link)`: PASSIVE.
pub extern "win64" fn io_delete_symbolic_link(_link: *const UNICODE_STRING) -> i32 {
    irql_check("IoDeleteSymbolicLink", PASSIVE);
    if BOOKS.links.fetch_sub(1, Ordering::AcqRel) <= 0 {
        misuse("IoDeleteSymbolicLink of no link");
        return STATUS_OBJECT_NAME_NOT_FOUND;
    }
    STATUS_SUCCESS
}

// --- Callbacks ---

/// The `\Callback\PowerState` object (opaque to the image).
static POWER_STATE_OBJECT: [u64; 8] = [0; 8];
/// Its one registration: function and context.
static POWER_CALLBACK: AtomicUsize = AtomicUsize::new(0);
static POWER_CONTEXT: AtomicUsize = AtomicUsize::new(0);

/// `\Callback\PowerState` in UTF-16.
const POWER_STATE_NAME: &str = "\\Callback\\PowerState";

fn unicode_eq(s: *const UNICODE_STRING, ascii: &str) -> bool {
    if s.is_null() {
        return false;
    }
    // SAFETY: the caller passes a valid counted string.
    let s = unsafe { s.read() };
    if usize::from(s.Length) != ascii.len() * 2 || s.Buffer.is_null() {
        return false;
    }
    ascii.bytes().enumerate().all(|(i, b)| {
        // SAFETY: i < Length / 2 code units of the buffer.
        let c = unsafe { s.Buffer.wrapping_add(i).read() };
        c == u16::from(b)
    })
}

/// `ExCreateCallback(CallbackObject, ObjectAttributes, Create, AllowMultipleCallbacks)`:
/// PASSIVE. Only `\Callback\PowerState` exists; opening it takes a reference.
pub extern "win64" fn ex_create_callback(
    out: *mut *mut c_void,
    attributes: *const OBJECT_ATTRIBUTES,
    _create: u8,
    _allow_multiple: u8,
) -> i32 {
    irql_check("ExCreateCallback", PASSIVE);
    if super::fault::fails("ExCreateCallback") {
        return STATUS_INSUFFICIENT_RESOURCES;
    }
    if out.is_null() || attributes.is_null() {
        return STATUS_INVALID_PARAMETER;
    }
    // SAFETY: the caller passes valid OBJECT_ATTRIBUTES.
    let name = unsafe { (*attributes).ObjectName };
    if !unicode_eq(name, POWER_STATE_NAME) {
        return STATUS_OBJECT_NAME_NOT_FOUND;
    }
    BOOKS.references.fetch_add(1, Ordering::AcqRel);
    // SAFETY: out-param, checked non-null.
    unsafe { out.write(ptr::addr_of!(POWER_STATE_OBJECT).cast_mut().cast()) };
    STATUS_SUCCESS
}

/// `ExRegisterCallback(CallbackObject, Function, Context)`: PASSIVE. One registration.
pub extern "win64" fn ex_register_callback(
    object: *mut c_void,
    function: usize,
    context: usize,
) -> *mut c_void {
    irql_check("ExRegisterCallback", PASSIVE);
    if object != ptr::addr_of!(POWER_STATE_OBJECT).cast_mut().cast() || function == 0 {
        return null_mut();
    }
    if POWER_CALLBACK
        .compare_exchange(0, function, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return null_mut();
    }
    POWER_CONTEXT.store(context, Ordering::Release);
    BOOKS.callbacks.fetch_add(1, Ordering::AcqRel);
    ptr::addr_of!(POWER_CALLBACK).cast_mut().cast()
}

/// `ExUnregisterCallback(CallbackRegistration)`: PASSIVE.
pub extern "win64" fn ex_unregister_callback(registration: *mut c_void) {
    irql_check("ExUnregisterCallback", PASSIVE);
    if registration != ptr::addr_of!(POWER_CALLBACK).cast_mut().cast()
        || POWER_CALLBACK.swap(0, Ordering::AcqRel) == 0
    {
        misuse("ExUnregisterCallback of no registration");
        return;
    }
    BOOKS.callbacks.fetch_sub(1, Ordering::AcqRel);
}

// --- Dispatcher objects ---

use super::waits::{EVENT_NOTIFICATION, EVENT_SYNCHRONIZATION, MUTANT, Timeout};

/// `KeInitializeEvent(Event, Type, State)`: any IRQL.
pub extern "win64" fn ke_initialize_event(event: *mut KEVENT, kind: u32, state: u8) {
    irql_check("KeInitializeEvent", HIGH_LEVEL);
    if event.is_null() {
        return;
    }
    let kind = match kind {
        0 => EVENT_NOTIFICATION,
        1 => EVENT_SYNCHRONIZATION,
        _ => {
            misuse("KeInitializeEvent of an unknown event type");
            return;
        }
    };
    // SAFETY: KEVENT is integers and list links: zero is valid.
    let zero: KEVENT = unsafe { core::mem::zeroed() };
    // SAFETY: the caller passes a KEVENT to initialize.
    unsafe { event.write(zero) };
    // SAFETY: as above; Type is the header's first byte.
    unsafe { event.cast::<u8>().write(kind) };
    // SAFETY: as above.
    unsafe { (*event).Header.SignalState = i32::from(state) };
}

/// `KeSetEvent(Event, Increment, Wait)`: IRQL ≤ DISPATCH. Returns the previous state; a
/// notification event releases every waiter and stays set, a synchronization event releases
/// one waiter and is reset by it.
pub extern "win64" fn ke_set_event(event: *mut KEVENT, _increment: i32, _wait: u8) -> i32 {
    irql_check("KeSetEvent", DISPATCH);
    if event.is_null() {
        return 0;
    }
    super::waits::set_event(event.cast())
}

/// `KeInitializeMutex(Mutex, Level)`: PASSIVE. Signaled (free), no owner.
pub extern "win64" fn ke_initialize_mutex(mutex: *mut KMUTEX, _level: u32) {
    irql_check("KeInitializeMutex", PASSIVE);
    if mutex.is_null() {
        return;
    }
    // SAFETY: KMUTEX is integers, pointers and list links: zero is valid.
    let zero: KMUTEX = unsafe { core::mem::zeroed() };
    // SAFETY: the caller passes a KMUTEX to initialize.
    unsafe { mutex.write(zero) };
    // SAFETY: as above.
    unsafe { mutex.cast::<u8>().write(MUTANT) };
    // SAFETY: as above.
    unsafe { (*mutex).Header.SignalState = 1 };
}

/// `KeReleaseMutex(Mutex, Wait)`: IRQL ≤ DISPATCH. Releasing a mutex not held, or held by
/// another thread, is NT's bugcheck (MUTEX_LEVEL_NUMBER_VIOLATION/THREAD_NOT_MUTEX_OWNER);
/// here a misuse. The last release of the owner hands the mutex to one waiter.
pub extern "win64" fn ke_release_mutex(mutex: *mut KMUTEX, _wait: u8) -> i32 {
    irql_check("KeReleaseMutex", DISPATCH);
    if mutex.is_null() {
        return 0;
    }
    match super::waits::release_mutex(mutex.cast()) {
        Ok(previous) => previous,
        Err(super::waits::ReleaseError::NotHeld) => {
            misuse("KeReleaseMutex of a mutex not held");
            1
        }
        Err(super::waits::ReleaseError::NotOwner) => {
            misuse("KeReleaseMutex by a thread that does not own it");
            0
        }
    }
}

/// `KeWaitForSingleObject(Object, WaitReason, WaitMode, Alertable, Timeout)`: IRQL ≤ DISPATCH,
/// and PASSIVE..APC unless the timeout is zero. Blocks the calling thread until the event,
/// mutex or thread object is signaled (taking the mutex), or the timeout (relative when
/// negative, 100 ns units, measured on the TSC) passes: STATUS_TIMEOUT. Simplified: not
/// alertable (no APCs exist).
pub extern "win64" fn ke_wait_for_single_object(
    object: *mut c_void,
    _reason: u32,
    _mode: i8,
    _alertable: u8,
    timeout: *const i64,
) -> i32 {
    // SAFETY: the caller passes a LARGE_INTEGER or null.
    let value = (!timeout.is_null()).then(|| unsafe { timeout.read() });
    irql_check(
        "KeWaitForSingleObject",
        if value == Some(0) { DISPATCH } else { APC },
    );
    super::waits::wait(object, Timeout::from_nt(value))
}

/// `ZwWaitForSingleObject(Handle, Alertable, Timeout)`: PASSIVE. As KeWaitForSingleObject on
/// the handle's object (only thread handles exist).
pub extern "win64" fn zw_wait_for_single_object(
    handle: usize,
    _alertable: u8,
    timeout: *const i64,
) -> i32 {
    irql_check("ZwWaitForSingleObject", PASSIVE);
    // SAFETY: the caller passes a LARGE_INTEGER or null.
    let value = (!timeout.is_null()).then(|| unsafe { timeout.read() });
    match super::threads::object_of(handle) {
        Some(object) => super::waits::wait(object, Timeout::from_nt(value)),
        None => STATUS_INVALID_HANDLE,
    }
}

/// `ObReferenceObjectByHandle(Handle, Access, ObjectType, AccessMode, Object, Info)`:
/// IRQL ≤ DISPATCH. Only thread handles exist.
pub extern "win64" fn ob_reference_object_by_handle(
    handle: usize,
    _access: u32,
    object_type: *mut c_void,
    _mode: i8,
    out: *mut *mut c_void,
    _info: *mut c_void,
) -> i32 {
    irql_check("ObReferenceObjectByHandle", DISPATCH);
    if out.is_null() {
        return STATUS_INVALID_PARAMETER;
    }
    if !object_type.is_null() && object_type != super::exports::thread_type() {
        return STATUS_OBJECT_TYPE_MISMATCH;
    }
    let Some(slot) = super::threads::slot_of_handle(handle) else {
        return STATUS_INVALID_HANDLE;
    };
    let object = super::sched::object(slot);
    super::sched::reference(slot);
    BOOKS.references.fetch_add(1, Ordering::AcqRel);
    // SAFETY: out-param, checked non-null.
    unsafe { out.write(object) };
    STATUS_SUCCESS
}

/// `ObfDereferenceObject(Object)`: IRQL ≤ DISPATCH.
pub extern "win64" fn obf_dereference_object(object: *mut c_void) -> isize {
    irql_check("ObfDereferenceObject", DISPATCH);
    if object.is_null() || BOOKS.references.fetch_sub(1, Ordering::AcqRel) <= 0 {
        misuse("ObfDereferenceObject without a reference");
    }
    if let Some(slot) = super::sched::slot_of_object(object)
        && !super::sched::dereference(slot)
    {
        misuse("ObfDereferenceObject of a thread without a reference");
    }
    0
}

/// `ZwClose(Handle)`: PASSIVE.
pub extern "win64" fn zw_close(handle: usize) -> i32 {
    irql_check("ZwClose", PASSIVE);
    let Some(slot) = super::threads::slot_of_handle(handle) else {
        return STATUS_INVALID_HANDLE;
    };
    if BOOKS.handles.fetch_sub(1, Ordering::AcqRel) <= 0 || !super::sched::dereference(slot) {
        misuse("ZwClose of a closed handle");
    }
    STATUS_SUCCESS
}

/// Calls the registered power callback as NT does around a sleep (`PO_CB_SYSTEM_STATE_LOCK`,
/// Argument2 0 before, 1 after). Returns false when nothing is registered.
pub fn notify_power_state(argument2: usize) -> bool {
    const PO_CB_SYSTEM_STATE_LOCK: usize = 3;
    let f = POWER_CALLBACK.load(Ordering::Acquire);
    if f == 0 {
        return false;
    }
    // SAFETY: the image registered a CALLBACK_FUNCTION (win64) at this address.
    let callback: extern "win64" fn(usize, usize, usize) =
        unsafe { core::mem::transmute::<usize, extern "win64" fn(usize, usize, usize)>(f) };
    callback(
        POWER_CONTEXT.load(Ordering::Acquire),
        PO_CB_SYSTEM_STATE_LOCK,
        argument2,
    );
    true
}
