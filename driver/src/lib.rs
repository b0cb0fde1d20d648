//! ackvisor.sys: the NT platform of the ackvisor hypervisor (DESIGN §6, §8).
//!
//! A legacy (non-PnP) WDM driver. `DriverEntry` virtualizes every processor through the
//! portable core `ackvisor_vmm` (refusing to load, with a message, when VT-x is absent, locked
//! off, owned by Hyper-V, or FRED is on), creates `\Device\Ackvisor` for `ackctl`, starts the
//! worker that prints the core's root-mode log records, and registers for power transitions.
//! Unload undoes all of it in reverse.
//!
//! This crate marshals and never decides: what to do with a CPU, a request or a log record is
//! the core's call. Its one piece of logic, what an I/O request completes with, lives in
//! [`request`] and is unit-tested on any host.
//!
//! Building: on Windows with the WDK through `cargo make` (see the README). On every other
//! target only [`request`] is compiled, so `cargo build/test --workspace` on Linux never needs
//! wdk-sys; `win-check driver ackvisor` type-checks the NT side there.
#![cfg_attr(all(windows, not(test)), no_std)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod request;

// The driver image. These modules call NT through wdk-sys, which only builds for Windows, and
// test builds leave them out because a test binary cannot link ntoskrnl. `cfg(windows)` appears
// nowhere else in the crate (DESIGN §8); one attribute per module, not a macro around them, so
// rustfmt still finds the files.
#[cfg(all(windows, not(test)))]
mod device;
#[cfg(all(windows, not(test)))]
mod entry;
#[cfg(all(windows, not(test)))]
mod irp;
#[cfg(all(windows, not(test)))]
mod lifecycle;
#[cfg(all(windows, not(test)))]
mod log_drain;
#[cfg(all(windows, not(test)))]
mod nt_platform;
#[cfg(all(windows, not(test)))]
mod ntapi;
#[cfg(all(windows, not(test)))]
mod power;

// DESIGN §6: a panic in the driver breaks into the debugger (debug builds), then bugchecks
// with file and line ("RPNC"); linking the crate installs that handler.
#[cfg(all(windows, not(test)))]
use wdk_panic as _;
