//! Build script of ackvisor.sys.
//!
//! On a Windows host it runs windows-drivers-rs's WDK configuration (linker flags for a WDM
//! driver, WDK library paths, the `driver_model__driver_type` cfg) and links `wdmsec.lib`, which
//! holds `WdmlibIoCreateDeviceSecure` and which wdk-sys does not link. On any other host it does
//! nothing: the crate then builds without the WDK (only the host-testable routing logic), and
//! wdk-build, a Windows-only build dependency, is not even compiled.
//!
//! Cargo resolves `[target.'cfg(windows)'.build-dependencies]` against the *host*, the same
//! platform this script's own `cfg(windows)` describes, so the two always agree.

#[cfg(windows)]
fn main() -> Result<(), wdk_build::ConfigError> {
    wdk_build::configure_wdk_binary_build()?;
    // IoCreateDeviceSecure is a macro for WdmlibIoCreateDeviceSecure, a static library routine
    // (wdmsec.h / wdmsec.lib, in the WDK's km library directory that wdk-build just added to the
    // search path).
    println!("cargo::rustc-link-lib=static=wdmsec");
    Ok(())
}

#[cfg(not(windows))]
fn main() {}
