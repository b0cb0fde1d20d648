//! The LAPIC's spurious vector, acknowledged on exit like any other (SDM 3A "Spurious
//! Interrupt"): when the interrupt the APIC was about to hand out became masked by the task
//! priority before the acknowledge, the APIC hands out the spurious vector instead. It sets no
//! ISR bit, so its handler writes no EOI, and the CPU delivers it through the IDT gated by IF
//! alone: the task priority is what produced it, so it cannot hold it back. The core therefore
//! delivers it like hardware would: it waits for IF (and STI/MOV-SS blocking) as every vector
//! does, never for CR8.
//!
//! **Runs in:** anywhere (pure).
#![forbid(unsafe_code)]

use super::Mode;
use super::policy::{self, Delivery, GuestView, Vector, Wait};
use super::vector_policy::PolicyLookup;

/// [`policy::decide`] for an acknowledged vector `v` when the LAPIC's spurious vector is
/// `spurious` (`None`: unknown, treat every vector alike). Only a priority wait is reconsidered,
/// so the common path costs nothing.
#[inline(always)]
pub fn decide(
    mode: Mode,
    v: Vector,
    spurious: Option<Vector>,
    g: &GuestView,
    table: &impl PolicyLookup,
) -> Delivery {
    match policy::decide(mode, v, g, table) {
        Delivery::Defer(Wait::Priority) if spurious == Some(v) => {
            policy::decide(mode, v, &GuestView { cr8: 0, ..*g }, table)
        }
        d => d,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intr::vector_policy::PolicyTable;
    use crate::vmx::fields::{ActivityState, Interruptibility};

    const SPURIOUS: Vector = Vector(0xFF);

    fn guest(interrupts_enabled: bool, cr8: u8) -> GuestView {
        GuestView {
            interrupts_enabled,
            interruptibility: Interruptibility::from_raw(0),
            cpl: 0,
            cr8,
            rsp: 0x1000,
            activity: ActivityState::Active,
        }
    }

    #[test]
    fn the_spurious_vector_ignores_cr8_like_hardware() {
        let g = guest(true, 0xF);
        assert_eq!(
            decide(
                Mode::AckReplay,
                SPURIOUS,
                Some(SPURIOUS),
                &g,
                &PolicyTable::ALL_REPLAY
            ),
            Delivery::Replay
        );
        assert_eq!(
            decide(
                Mode::AckInject,
                SPURIOUS,
                Some(SPURIOUS),
                &g,
                &PolicyTable::ALL_REPLAY
            ),
            Delivery::Inject
        );
        // Without knowing the spurious vector, and for any other vector, CR8 still decides.
        assert_eq!(
            decide(
                Mode::AckReplay,
                SPURIOUS,
                None,
                &g,
                &PolicyTable::ALL_REPLAY
            ),
            Delivery::Defer(Wait::Priority)
        );
        assert_eq!(
            decide(
                Mode::AckReplay,
                Vector(0xFE),
                Some(SPURIOUS),
                &g,
                &PolicyTable::ALL_REPLAY
            ),
            Delivery::Defer(Wait::Priority)
        );
    }

    #[test]
    fn the_spurious_vector_still_waits_for_if() {
        assert_eq!(
            decide(
                Mode::AckReplay,
                SPURIOUS,
                Some(SPURIOUS),
                &guest(false, 0xF),
                &PolicyTable::ALL_REPLAY
            ),
            Delivery::Defer(Wait::Window)
        );
    }
}
