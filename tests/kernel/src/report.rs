//! Machine-readable output: one `RESULT <scenario> key=value ...` line per finding, built in a
//! buffer and printed at once so lines of different CPUs never interleave.
//!
//! **Runs in:** PASSIVE, and from the exception path / `Platform::fatal` (root included).

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};

static SCENARIO: AtomicUsize = AtomicUsize::new(0);
static SCENARIO_LEN: AtomicUsize = AtomicUsize::new(0);

/// Remembers the scenario name for lines printed from fault paths.
pub fn set_scenario(name: &'static str) {
    SCENARIO.store(name.as_ptr() as usize, Ordering::Relaxed);
    SCENARIO_LEN.store(name.len(), Ordering::Relaxed);
}

/// The scenario name set by [`set_scenario`].
pub fn scenario() -> &'static str {
    let (p, n) = (
        SCENARIO.load(Ordering::Relaxed),
        SCENARIO_LEN.load(Ordering::Relaxed),
    );
    if p == 0 {
        return "boot";
    }
    // SAFETY: `p`/`n` came from a `&'static str` in `set_scenario`.
    let bytes = unsafe { core::slice::from_raw_parts(p as *const u8, n) };
    core::str::from_utf8(bytes).unwrap_or("?")
}

/// A RESULT line under construction.
pub struct Line {
    buf: [u8; 2048],
    len: usize,
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl Line {
    /// `RESULT <scenario>`.
    pub fn new(scenario: &str) -> Line {
        let mut l = Line {
            buf: [0; 2048],
            len: 0,
        };
        let _ = write!(l, "RESULT {scenario}");
        l
    }
    /// Appends ` key=value`.
    pub fn kv(&mut self, key: impl fmt::Display, value: impl fmt::Display) -> &mut Line {
        let _ = write!(self, " {key}={value}");
        self
    }
    /// Prints the line.
    pub fn print(&self) {
        let s = core::str::from_utf8(&self.buf[..self.len]).unwrap_or("RESULT ? utf8");
        crate::kprintln!("{s}");
    }
}

/// Prints `RESULT <scenario> fatal=1 <what>` and powers off: the runner fails the run.
pub fn fatal_result(what: fmt::Arguments<'_>) -> ! {
    crate::kprintln!("RESULT {} fatal=1 {}", scenario(), what);
    crate::console::shutdown()
}
