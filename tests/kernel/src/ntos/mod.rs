//! A miniature NT for the real ackvisor.sys (issue 9): the runner puts the image the project
//! builds on Linux onto the disk (`disk`), the loader maps it as NT's would (`loader`), binding
//! its imports to this kernel's exports (`exports`), whose objects use NT's x64 layouts
//! (`layout`).
//!
//! The routines with state are in `routines` (memory, devices, callbacks, dispatcher objects,
//! handles, the verifier's books), `threads` (system threads and their handles) on `sched` (a
//! cooperative scheduler per CPU that also moves threads between CPUs, switching with
//! `context`), `waits` (events, mutexes, thread objects, timeouts; checked by `sched_check`),
//! `groups` (the CPUs as processor groups) and `io` (IRPs and their completion); `cpus` holds
//! `nt-driver`'s per-CPU measurements; `fault` makes a routine fail on demand, `quirks` completes what
//! Bochs lacks.
//!
//! Scenario `nt-load` loads the image and reports what the load did; a broken image gets a
//! `fatal=1` line naming the fault. Scenario `nt-driver` (`driver`) takes the image through
//! DriverEntry, requests, a sleep, malformed requests (`malformed`) and DriverUnload. Scenario
//! `nt-serve` (`serve`) lets `ackctl` drive the image: the COM1 server wraps each request as
//! the IRPs NT would send. Scenario `nt-bench` (`bench`) measures the image's exit path with
//! the test kernel's benchmark.
//!
//! **Runs in:** PASSIVE, on the BSP's initial thread (which moves to other CPUs and back).

pub mod bench;
pub mod context;
pub mod cpus;
pub mod disk;
pub mod driver;
pub mod exports;
pub mod fault;
pub mod groups;
pub mod io;
pub mod layout;
pub mod loader;
pub mod malformed;
pub mod quirks;
pub mod routines;
pub mod sched;
pub mod sched_check;
pub mod serve;
pub mod threads;
pub mod waits;

use core::cell::UnsafeCell;

use crate::params::Params;
use crate::report::Line;

/// The largest image file the kernel reads (the debug ackvisor.sys is about 300 KiB).
const FILE_BYTES: usize = 1 << 20;
/// The largest `SizeOfImage` the kernel maps.
const IMAGE_BYTES: usize = 1 << 20;

#[repr(C, align(4096))]
struct Buffer<const N: usize>(UnsafeCell<[u8; N]>);

// SAFETY: only the BSP touches the buffers, in `load_scenario`, once per boot.
unsafe impl<const N: usize> Sync for Buffer<N> {}

/// The kernel has no heap. `object` links the `alloc` crate but its PE reader allocates
/// nothing; should anything allocate, the request fails and the run ends in the panic line.
struct NoHeap;

// SAFETY: never hands out memory (null is GlobalAlloc's "failed").
unsafe impl core::alloc::GlobalAlloc for NoHeap {
    unsafe fn alloc(&self, _layout: core::alloc::Layout) -> *mut u8 {
        core::ptr::null_mut()
    }
    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: core::alloc::Layout) {}
}

#[global_allocator]
static NO_HEAP: NoHeap = NoHeap;

static FILE: Buffer<FILE_BYTES> = Buffer(UnsafeCell::new([0; FILE_BYTES]));
static IMAGE: Buffer<IMAGE_BYTES> = Buffer(UnsafeCell::new([0; IMAGE_BYTES]));

/// Reads the image from the disk and loads it; on failure prints `RESULT <name> fatal=1
/// loaded=0 <what>` and returns None.
pub fn load_image(name: &str) -> Option<(usize, loader::Loaded)> {
    // SAFETY: the only reference to FILE for the life of this run (see `Buffer`'s Sync).
    let file = unsafe { &mut *FILE.0.get() };
    // SAFETY: the only reference to IMAGE for the life of this run (the image's code, once
    // called, reaches its own bytes through the addresses the loader wrote, not this borrow).
    let image = unsafe { &mut *IMAGE.0.get() };
    let mut fault_text = [0u8; disk::FAULT_BYTES];
    let len = match disk::read_image(file, &mut fault_text) {
        Ok(n) => n,
        Err(e) => {
            let mut line = Line::new(name);
            line.kv("fatal", 1).kv("loaded", 0);
            e.report(&mut line);
            line.print();
            return None;
        }
    };
    fault::arm(&fault_text);
    match loader::load(&file[..len], image) {
        Ok(l) => {
            quirks::IMAGE_START.store(l.base, core::sync::atomic::Ordering::Release);
            quirks::IMAGE_END.store(
                l.base + l.size as usize,
                core::sync::atomic::Ordering::Release,
            );
            Some((len, l))
        }
        Err(e) => {
            let mut line = Line::new(name);
            line.kv("fatal", 1).kv("loaded", 0);
            e.report(&mut line);
            line.print();
            None
        }
    }
}

/// Scenario `nt-load`: read the image from the disk, load it, report.
pub fn load_scenario(_p: &Params) {
    const NAME: &str = "nt-load";
    if let Some((len, l)) = load_image(NAME) {
        Line::new(NAME)
            .kv("loaded", 1)
            .kv("file_bytes", len)
            .kv("size", l.size)
            .kv("base", format_args!("{:#x}", l.base))
            .kv("entry_rva", format_args!("{:#x}", l.entry - l.base))
            .kv("sections", l.sections)
            .kv("relocations", l.relocations)
            .kv("relocations_inside", l.relocations_inside)
            .kv("imports", l.imports)
            .kv("bound", l.bound)
            .kv(
                "bound_names_hash",
                format_args!("{:#x}", l.bound_names_hash),
            )
            .kv("exports", exports::count())
            .kv(
                "irql_violations",
                exports::IRQL_VIOLATIONS.load(core::sync::atomic::Ordering::Acquire),
            )
            .kv("first_violation", exports::first_violation())
            .print();
    }
}
