//! ackvisor.sys as a Linux-built kernel image, and the rules any ackvisor.sys must pass.
//!
//! - [`build`]: the project's own build of `ackvisor.sys` on Linux (for the test machine and
//!   the image check). The Windows build stays `cargo make`.
//! - [`check`]: reads a built image (any: this build's, `cargo make`'s, win-check's) and
//!   asserts what a Windows x64 kernel driver must be; prints its imports and largest frames.

pub mod build;
pub mod check;
