//! Refusals on demand: the routine named in the disk header fails on its k-th call, as NT's
//! routines fail when memory or names run out, so every refusal path of DriverEntry runs. Each
//! injectable routine also counts its calls, so a clean run tells the runner how many k to try.
//!
//! **Runs in:** wherever the routines run (one CPU).

use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// The routines that can be made to fail, in the order the RESULT line names their calls.
pub const ROUTINES: [&str; 6] = [
    "MmAllocateContiguousMemorySpecifyCache",
    "MmMapIoSpaceEx",
    "WdmlibIoCreateDeviceSecure",
    "IoCreateSymbolicLink",
    "PsCreateSystemThread",
    "ExCreateCallback",
];

static CALLS: [AtomicU32; ROUTINES.len()] = [const { AtomicU32::new(0) }; ROUTINES.len()];
/// Index in [`ROUTINES`] + 1 of the routine to fail (0: none).
static TARGET: AtomicUsize = AtomicUsize::new(0);
/// Which call fails (1-based).
static AT: AtomicU32 = AtomicU32::new(0);
/// Failures injected.
pub static INJECTED: AtomicU32 = AtomicU32::new(0);

/// Reads `Routine:k` (NUL-padded); anything else injects nothing.
pub fn arm(text: &[u8]) {
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    let Ok(text) = core::str::from_utf8(&text[..end]) else {
        return;
    };
    let Some((name, k)) = text.split_once(':') else {
        return;
    };
    let (Some(i), Ok(k)) = (ROUTINES.iter().position(|r| *r == name), k.parse::<u32>()) else {
        crate::kprintln!("ntos: ignoring fault {text}");
        return;
    };
    AT.store(k, Ordering::Release);
    TARGET.store(i + 1, Ordering::Release);
}

/// Counts a call of `routine`; true when this call is the one to fail.
pub fn fails(routine: &str) -> bool {
    let Some(i) = ROUTINES.iter().position(|r| *r == routine) else {
        return false;
    };
    let n = CALLS[i].fetch_add(1, Ordering::AcqRel) + 1;
    let hit = TARGET.load(Ordering::Acquire) == i + 1 && AT.load(Ordering::Acquire) == n;
    if hit {
        INJECTED.fetch_add(1, Ordering::AcqRel);
        crate::kprintln!("ntos: failing {routine} call {n}");
    }
    hit
}

/// Writes `calls_<Routine>=N` for each injectable routine.
pub fn report_calls(line: &mut crate::report::Line) {
    for (name, calls) in ROUTINES.iter().zip(&CALLS) {
        line.kv(format_args!("calls_{name}"), calls.load(Ordering::Acquire));
    }
}
