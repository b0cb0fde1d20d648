//! Sleep and hibernation with partial failures (DESIGN §5, issue 8 item 5): the state machine
//! the platform's power callback drives. The platform only marshals: it calls
//! [`before_sleep`] when the system leaves S0 and [`after_wake`] when it is back, and logs
//! what they report.
//!
//! - Before S3/S4 every CPU is tried: one CPU that cannot leave VMX operation (vectors still
//!   pending) does not keep the others in it. [`Tally`] counts the outcomes.
//! - A CPU cannot come back from S3/S4 in VMX operation: the processor is reset. So on wake a
//!   CPU whose slot still holds a block is dead: its block is freed and reported, and only then
//!   is every CPU virtualized again in the mode it had. The slots, and so `ackctl status`, are
//!   exact afterwards.
//!
//! **Runs in:** PASSIVE (the power callback); the per-CPU part at the platform's
//! `for_each_cpu` level.
#![cfg_attr(not(test), forbid(unsafe_code))]

use crate::hypervisor::{self, Config};
use crate::platform::{CpuIndex, Platform};
use crate::{Error, Mode};
use core::sync::atomic::{AtomicU32, Ordering};

/// What leaving VMX operation before sleep did on each CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// CPUs that left VMX operation.
    pub left: u32,
    /// CPUs that were not virtualized.
    pub not_virtualized: u32,
    /// CPUs that could not leave (they sleep in VMX operation and are reaped on wake).
    pub failed: u32,
    /// The first failure, for the log.
    pub first_failure: Option<(CpuIndex, Error)>,
}

impl Tally {
    /// Counts one CPU's outcome.
    pub fn record(&mut self, cpu: CpuIndex, outcome: Result<(), Error>) {
        match outcome {
            Ok(()) => self.left += 1,
            Err(Error::NotVirtualized) => self.not_virtualized += 1,
            Err(e) => {
                self.failed += 1;
                if self.first_failure.is_none() {
                    self.first_failure = Some((cpu, e));
                }
            }
        }
    }
}

/// Where the power path stands between its two callbacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SleepState {
    /// Running (or never virtualized): a wake has nothing to restore.
    Awake,
    /// Left VMX operation for sleep (on some CPUs at least): restore `mode` on wake.
    Asleep {
        /// The mode every CPU ran before sleep.
        mode: Mode,
    },
}

impl SleepState {
    /// Entering sleep. With nothing virtualized there is nothing to restore; otherwise, even
    /// after failures, the wake must reap and virtualize again.
    pub const fn entering(virtualized_before: u32, mode: Mode) -> SleepState {
        if virtualized_before == 0 {
            SleepState::Awake
        } else {
            SleepState::Asleep { mode }
        }
    }

    /// Waking: the mode to virtualize in again, if any; the state is then `Awake`.
    pub const fn waking(self) -> (SleepState, Option<Mode>) {
        match self {
            SleepState::Asleep { mode } => (SleepState::Awake, Some(mode)),
            SleepState::Awake => (SleepState::Awake, None),
        }
    }

    const fn encode(self) -> u32 {
        match self {
            SleepState::Awake => 0,
            SleepState::Asleep { mode } => 1 + mode as u32,
        }
    }

    fn decode(v: u32) -> SleepState {
        match v.checked_sub(1).map(Mode::try_from) {
            Some(Ok(mode)) => SleepState::Asleep { mode },
            _ => SleepState::Awake,
        }
    }
}

static STATE: AtomicU32 = AtomicU32::new(SleepState::Awake.encode());

/// The state now (for a debugger or `ackctl`).
pub fn state() -> SleepState {
    SleepState::decode(STATE.load(Ordering::Acquire))
}

/// What [`before_sleep`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SleepReport {
    /// The mode that will be restored on wake (`None`: nothing was virtualized).
    pub mode: Option<Mode>,
    /// Per-CPU outcomes.
    pub tally: Tally,
    /// The platform could not reach a CPU (its `for_each_cpu` stopped there).
    pub unreachable: Option<(CpuIndex, Error)>,
}

/// Runs `leave` on every CPU the platform reaches and counts the outcomes: a failure is
/// recorded, never returned to `for_each_cpu`, so it does not stop the CPUs after it.
pub fn leave_every_cpu(
    platform: &dyn Platform,
    leave: &(dyn Fn() -> Result<(), Error> + Sync),
) -> (Tally, Option<(CpuIndex, Error)>) {
    let tally = spin::Mutex::new(Tally::default());
    let unreachable = platform
        .for_each_cpu(&|cpu| {
            let outcome = leave();
            tally.lock().record(cpu, outcome);
            Ok(())
        })
        .err();
    let tally = *tally.lock();
    (tally, unreachable)
}

/// System leaving S0: devirtualizes every CPU, trying each one even after a failure.
pub fn before_sleep() -> SleepReport {
    let virtualized = hypervisor::virtualized_count();
    let mode = hypervisor::first_virtualized_mode().unwrap_or(Mode::Passthrough);
    let (tally, unreachable) = match hypervisor::platform() {
        Some(p) => leave_every_cpu(p, &hypervisor::devirtualize_current_cpu),
        None => (Tally::default(), None),
    };
    let next = SleepState::entering(virtualized, mode);
    STATE.store(next.encode(), Ordering::Release);
    SleepReport {
        mode: match next {
            SleepState::Asleep { mode } => Some(mode),
            SleepState::Awake => None,
        },
        tally,
        unreachable,
    }
}

/// The outcome of virtualizing every CPU again.
pub type Restored = (Mode, Result<(), (CpuIndex, Error)>);

/// What [`after_wake`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WakeReport {
    /// CPUs found still marked virtualized and reaped (block freed).
    pub reaped: u32,
    /// The mode virtualized again, and the outcome; `None` when nothing was to be restored.
    pub restored: Option<Restored>,
}

/// System back in S0: reaps every CPU still marked virtualized (`on_reaped` is told each one),
/// then virtualizes every CPU again in the mode it had.
pub fn after_wake(platform: &'static dyn Platform, on_reaped: impl FnMut(CpuIndex)) -> WakeReport {
    let (next, mode) = state().waking();
    STATE.store(next.encode(), Ordering::Release);
    let Some(mode) = mode else {
        return WakeReport {
            reaped: 0,
            restored: None,
        };
    };
    let reaped = hypervisor::reap_dead(platform, on_reaped);
    let result = hypervisor::virtualize_all(platform, Config { mode });
    WakeReport {
        reaped,
        restored: Some((mode, result)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cpu_is_counted_and_the_first_failure_kept() {
        let mut t = Tally::default();
        t.record(CpuIndex(0), Ok(()));
        t.record(CpuIndex(1), Err(Error::Busy));
        t.record(CpuIndex(2), Ok(()));
        t.record(CpuIndex(3), Err(Error::NotVirtualized));
        t.record(CpuIndex(4), Err(Error::TooManyCpus));
        assert_eq!((t.left, t.not_virtualized, t.failed), (2, 1, 2));
        assert_eq!(t.first_failure, Some((CpuIndex(1), Error::Busy)));
    }

    use core::sync::atomic::AtomicU32;

    #[test]
    fn a_cpu_that_cannot_leave_does_not_stop_the_others() {
        let platform = crate::platform::fake::FakeCpus::new(4);
        let tried = AtomicU32::new(0);
        let (tally, unreachable) = leave_every_cpu(&platform, &|| {
            tried.fetch_add(1, Ordering::Relaxed);
            match platform.current_cpu().0 {
                1 => Err(Error::Busy),
                3 => Err(Error::NotVirtualized),
                _ => Ok(()),
            }
        });
        assert_eq!(tried.load(Ordering::Relaxed), 4, "every CPU tried");
        assert_eq!((tally.left, tally.failed, tally.not_virtualized), (2, 1, 1));
        assert_eq!(tally.first_failure, Some((CpuIndex(1), Error::Busy)));
        assert_eq!(unreachable, None);
    }

    #[test]
    fn sleep_with_failures_still_restores_on_wake() {
        let s = SleepState::entering(4, Mode::AckReplay);
        assert_eq!(
            s,
            SleepState::Asleep {
                mode: Mode::AckReplay
            }
        );
        let (after, mode) = s.waking();
        assert_eq!((after, mode), (SleepState::Awake, Some(Mode::AckReplay)));
        // A second wake notification restores nothing.
        assert_eq!(after.waking(), (SleepState::Awake, None));
    }

    #[test]
    fn sleep_without_anything_virtualized_restores_nothing() {
        assert_eq!(SleepState::entering(0, Mode::AckReplay), SleepState::Awake);
    }

    #[test]
    fn state_round_trips_through_its_encoding() {
        for mode in [
            Mode::Passthrough,
            Mode::ExitSti,
            Mode::AckReplay,
            Mode::AckInject,
        ] {
            let s = SleepState::Asleep { mode };
            assert_eq!(SleepState::decode(s.encode()), s);
        }
        assert_eq!(SleepState::decode(0), SleepState::Awake);
        assert_eq!(SleepState::decode(999), SleepState::Awake);
    }
}
