//! Delivery decisions for an acknowledged vector, as plain functions (DESIGN §3, §4).
//!
//! **Runs in:** anywhere (pure).
#![forbid(unsafe_code)]

use super::Mode;
use super::vector_policy::PolicyLookup;
use crate::arch::idt::{IdtGate, gate_type};
use crate::vmx::fields::{ActivityState, Interruptibility};

/// NT's DISPATCH_LEVEL: vectors of this class or lower exist to switch threads (DPC 0x2F,
/// APC 0x1F) and are never replayed in root mode (DESIGN §4).
pub const DISPATCH_LEVEL: u8 = 2;
/// NT's DPC software-interrupt vector.
pub const NT_DPC_VECTOR: u8 = 0x2F;
/// First vector that is not an architectural exception.
pub const FIRST_EXTERNAL_VECTOR: u8 = 0x20;

/// An interrupt vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Vector(pub u8);

impl Vector {
    /// Priority class (what CR8 and the LAPIC's TPR compare against).
    pub const fn class(self) -> u8 {
        self.0 >> 4
    }
}

/// The guest state the decision needs, read from the VMCS at the exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestView {
    /// RFLAGS.IF.
    pub interrupts_enabled: bool,
    /// Blocking by STI / MOV SS / NMI.
    pub interruptibility: Interruptibility,
    /// Current privilege level (SS.DPL).
    pub cpl: u8,
    /// CR8 (task-priority class).
    pub cr8: u8,
    /// RSP.
    pub rsp: u64,
    /// Activity state.
    pub activity: ActivityState,
}

impl GuestView {
    /// The guest could accept an external interrupt at this instruction boundary (IF=1, no
    /// STI/MOV-SS blocking). NMI blocking does not block external interrupts.
    pub fn interruptible(&self) -> bool {
        self.interrupts_enabled
            && !self.interruptibility.blocking_by_sti()
            && !self.interruptibility.blocking_by_mov_ss()
    }
}

/// Why a vector waits in the pending set, and so which exit will bring it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// IF=0 or STI/MOV-SS blocking: interrupt-window exiting.
    Window,
    /// CR8 at or above the vector's class: CR8-load exiting.
    Priority,
}

/// What to do with an acknowledged vector now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Call this CPU's IDT gate in root mode with a hand-built frame.
    Replay,
    /// Inject into the guest at the next VM entry.
    Inject,
    /// Keep it pending until the guest can take it.
    Defer(Wait),
}

/// DESIGN §3 step 2 and §4: whether and how vector `v` reaches the guest now.
///
/// A vector is delivered only where a real interrupt could be: IF=1, no STI/MOV-SS blocking,
/// and a class above the guest's CR8. Then: replay in `ack-replay`, except vectors of class ≤
/// DISPATCH (their handlers switch threads), while the guest blocks NMIs (the handler's IRETQ
/// would unblock them), and where the vector's [`VectorPolicy`](super::vector_policy::VectorPolicy)
/// says inject now (the clock below DISPATCH, issue 8); all of those are injected like every
/// vector in the other modes. `policy` is read only for a vector that would be replayed.
#[inline(always)]
pub fn decide(mode: Mode, v: Vector, guest: &GuestView, policy: &impl PolicyLookup) -> Delivery {
    if !guest.interruptible() {
        return Delivery::Defer(Wait::Window);
    }
    if v.class() <= guest.cr8 {
        return Delivery::Defer(Wait::Priority);
    }
    let replayable = v.class() > DISPATCH_LEVEL && !guest.interruptibility.blocking_by_nmi();
    if mode == Mode::AckReplay && replayable && !policy.injects_now(v, guest.cr8) {
        Delivery::Replay
    } else {
        Delivery::Inject
    }
}

/// The exits that bring pending vectors back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArmedExits {
    /// Interrupt-window exiting.
    pub window: bool,
    /// CR8-load exiting.
    pub cr8_load: bool,
}

/// After a delivery pass: `more` vectors still pending, whether one was `injected` at this
/// entry, and why the first remaining one had to `wait`. Only one event can be injected per VM
/// entry, so after an injection the rest wait for the next window (the guest's handler
/// re-enables interrupts); with nothing pending both exits are off.
pub const fn exits_to_arm(more: bool, injected: bool, wait: Option<Wait>) -> ArmedExits {
    let window_wait = matches!(wait, Some(Wait::Window));
    let priority_wait = matches!(wait, Some(Wait::Priority));
    ArmedExits {
        window: more && (injected || window_wait),
        cr8_load: more && priority_wait,
    }
}

/// Why a gate may not be called from root mode (FreeBSD bhyve's checks, DESIGN §3.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateRejection {
    /// An exception vector (< 0x20).
    ExceptionVector,
    /// The entry lies past the IDT limit.
    BeyondLimit,
    /// Present bit clear.
    NotPresent,
    /// Not a 64-bit interrupt gate (a trap gate would run the handler with IF=1).
    NotInterruptGate,
    /// DPL ≠ 0.
    UserGate,
    /// Selector is not the kernel code segment.
    WrongSelector,
    /// IST ≠ 0: the CPU would switch stacks, our frame would not be where NT looks.
    UsesIst,
}

/// The gate bits root may call for one kernel code selector, computed once per CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateExpectation {
    kernel_cs: u16,
    bits: u64,
}

impl GateExpectation {
    /// For gates that must use `kernel_cs`.
    pub fn new(kernel_cs: u16) -> Self {
        Self {
            kernel_cs,
            bits: replayable_gate_bits(kernel_cs),
        }
    }
}

/// Whether vector `v`'s IDT entry can be called from root: returns the handler address.
/// `idt_limit` is the IDTR limit; `kernel_cs` the selector the handler must use.
#[inline(always)]
pub fn validate_gate(
    v: Vector,
    gate: Option<IdtGate>,
    idt_limit: u16,
    kernel_cs: u16,
) -> Result<u64, GateRejection> {
    validate_gate_expecting(v, gate, idt_limit, &GateExpectation::new(kernel_cs))
}

/// [`validate_gate`] with the expected bits computed beforehand (the exit path's form).
#[inline(always)]
pub fn validate_gate_expecting(
    v: Vector,
    gate: Option<IdtGate>,
    idt_limit: u16,
    expect: &GateExpectation,
) -> Result<u64, GateRejection> {
    let kernel_cs = expect.kernel_cs;
    // The exit path's case first, in one mask-and-compare over the low quadword (issue 11):
    // selector, IST, type, DPL and present exactly as the checks below demand them.
    if let Some(g) = gate
        && v.0 >= FIRST_EXTERNAL_VECTOR
        && gate_end(v) <= u32::from(idt_limit)
        && g.low.raw() & gate_checked_bits() == expect.bits
    {
        return Ok(g.offset());
    }
    if v.0 < FIRST_EXTERNAL_VECTOR {
        return Err(GateRejection::ExceptionVector);
    }
    if gate_end(v) > u32::from(idt_limit) {
        return Err(GateRejection::BeyondLimit);
    }
    let Some(g) = gate else {
        return Err(GateRejection::BeyondLimit);
    };
    if !g.low.present() {
        return Err(GateRejection::NotPresent);
    }
    if g.low.gate_type() != gate_type::INTERRUPT {
        return Err(GateRejection::NotInterruptGate);
    }
    if g.low.dpl() != 0 {
        return Err(GateRejection::UserGate);
    }
    if g.low.selector() != kernel_cs {
        return Err(GateRejection::WrongSelector);
    }
    if g.low.ist() != 0 {
        return Err(GateRejection::UsesIst);
    }
    Ok(g.offset())
}

/// The low-quadword bits [`validate_gate`] checks: selector, IST, type, DPL, present.
#[inline(always)]
fn gate_checked_bits() -> u64 {
    IdtGate::new(0, u16::MAX, u8::MAX, u8::MAX, u8::MAX, true)
        .low
        .raw()
}

/// Those bits in a gate root may call: `kernel_cs`, no IST, a 64-bit interrupt gate, DPL 0,
/// present.
#[inline(always)]
fn replayable_gate_bits(kernel_cs: u16) -> u64 {
    IdtGate::new(0, kernel_cs, 0, gate_type::INTERRUPT, 0, true)
        .low
        .raw()
}

/// Offset of the last byte of `v`'s gate in the IDT.
pub const fn gate_end(v: Vector) -> u32 {
    (v.0 as u32) * 16 + 15
}

/// Where the hand-built frame goes (DESIGN §3.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameStack {
    /// Guest at CPL 0: on the guest's own stack, aligned down to 16 like the CPU does, so NT's
    /// "already on the ISR stack?" check sees what a real interrupt would have shown it and
    /// nested frames stack below the live ones.
    Guest(u64),
    /// Guest at CPL 3: on the VMM stack (NT switches to its idle ISR stack).
    Vmm,
}

/// DESIGN §3.4: the stack the replay frame is built on.
pub const fn frame_stack(cpl: u8, guest_rsp: u64) -> FrameStack {
    if cpl == 0 {
        FrameStack::Guest(guest_rsp & !0xF)
    } else {
        FrameStack::Vmm
    }
}

/// The activity state to enter with after an external interrupt was delivered to a guest that
/// was in `before`. HLT ends when an interrupt is delivered (SDM 3C "Activity State"): a halted
/// guest that got one would have woken. Shutdown and wait-for-SIPI block external interrupts,
/// so a delivery never changes them (and the policy never delivers there).
pub const fn activity_after_delivery(before: ActivityState) -> ActivityState {
    match before {
        ActivityState::Hlt => ActivityState::Active,
        other => other,
    }
}

/// What exit-sti does with an exit whose vector is still in the IRR (DESIGN §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StiWindow {
    /// Open an interrupt window in root: the CPU vectors through the host IDT.
    Open,
    /// Let the guest take the vector itself: enter with external-interrupt exiting off and turn
    /// it back on at the next exit (forced by the preemption timer or MTF).
    GuestTakes,
}

/// DESIGN §2's exit-sti policy. `highest_irr` is the highest vector requested in the LAPIC.
/// Class ≤ DISPATCH vectors must not run in root; a guest that could not take the vector must
/// not have it delivered behind its back; a vector whose policy says inject now (the clock
/// below DISPATCH) must reach the guest at its true IRQL; with no IRR bit visible the window is
/// harmless.
pub fn sti_window(
    highest_irr: Option<Vector>,
    guest: &GuestView,
    policy: &impl PolicyLookup,
) -> StiWindow {
    match highest_irr {
        None => StiWindow::Open,
        Some(v) if v.class() <= DISPATCH_LEVEL => StiWindow::GuestTakes,
        Some(v) if !guest.interruptible() || v.class() <= guest.cr8 => StiWindow::GuestTakes,
        Some(_) if guest.interruptibility.blocking_by_nmi() => StiWindow::GuestTakes,
        Some(v) if policy.injects_now(v, guest.cr8) => StiWindow::GuestTakes,
        Some(_) => StiWindow::Open,
    }
}

/// Issue 8: after a replay that interrupted user mode (CPL 3), clear CPU buffers with VERW
/// before VM entry when the CPU enumerates MD_CLEAR. NT's own return to user mode would have
/// done it; the guest resumes at CPL 3 without passing through that code. Only that path: a
/// CPL-0 guest resumes in the kernel, where NT does not clear them either.
pub const fn clears_buffers_after_replay(cpl: u8, md_clear: bool) -> bool {
    cpl == 3 && md_clear
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::intr::vector_policy::{PolicyTable, VectorPolicy};

    const KCS: u16 = 0x10;

    /// The one-compare fast check accepts exactly what the field-by-field checks accept:
    /// 200,000 seeded gates, most of them one field away from a replayable one.
    #[test]
    fn validate_gate_fast_check_agrees_with_each_field_check() {
        let mut seed = 0x1234_5678_9ABC_DEF0u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut accepted = 0;
        for _ in 0..200_000 {
            let r = next();
            let good = IdtGate::new(r, KCS, 0, gate_type::INTERRUPT, 0, true);
            let low = match r % 4 {
                0 => good.low.raw(),
                1 => good.low.raw() ^ (1 << (next() % 64)),
                _ => next(),
            };
            let gate = IdtGate::from_raw(low, next());
            let v = Vector((next() % 256) as u8);
            let limit = (next() % 0x1100) as u16;
            let slow = (|| {
                if v.0 < FIRST_EXTERNAL_VECTOR {
                    return Err(GateRejection::ExceptionVector);
                }
                if gate_end(v) > u32::from(limit) {
                    return Err(GateRejection::BeyondLimit);
                }
                let g = gate.low;
                if !g.present() || g.gate_type() != gate_type::INTERRUPT || g.dpl() != 0 {
                    return Err(GateRejection::NotPresent);
                }
                if g.selector() != KCS || g.ist() != 0 {
                    return Err(GateRejection::WrongSelector);
                }
                Ok(gate.offset())
            })();
            let fast = validate_gate(v, Some(gate), limit, KCS);
            assert_eq!(
                fast.is_ok(),
                slow.is_ok(),
                "{gate:?} v={v:?} limit={limit:#x}"
            );
            if let (Ok(a), Ok(b)) = (fast, slow) {
                assert_eq!(a, b);
                accepted += 1;
            }
        }
        assert!(
            accepted > 1000,
            "the seeds must reach the accepting case: {accepted}"
        );
    }

    fn decide_r(mode: Mode, v: Vector, g: &GuestView) -> Delivery {
        decide(mode, v, g, &PolicyTable::ALL_REPLAY)
    }

    fn sti_r(v: Option<Vector>, g: &GuestView) -> StiWindow {
        sti_window(v, g, &PolicyTable::ALL_REPLAY)
    }

    fn guest() -> GuestView {
        GuestView {
            interrupts_enabled: true,
            interruptibility: Interruptibility::from_raw(0),
            cpl: 0,
            cr8: 0,
            rsp: 0xFFFF_8000_0010_0008,
            activity: ActivityState::Active,
        }
    }

    fn blocking(raw: u32) -> GuestView {
        GuestView {
            interruptibility: Interruptibility::from_raw(raw),
            ..guest()
        }
    }

    #[test]
    fn decide_replays_device_vectors_in_ack_replay() {
        assert_eq!(
            decide_r(Mode::AckReplay, Vector(0x41), &guest()),
            Delivery::Replay
        );
        assert_eq!(
            decide_r(Mode::AckReplay, Vector(0xD1), &guest()),
            Delivery::Replay
        );
    }

    #[test]
    fn decide_defers_when_guest_if_clear() {
        let g = GuestView {
            interrupts_enabled: false,
            ..guest()
        };
        for mode in Mode::ALL {
            assert_eq!(
                decide_r(mode, Vector(0x41), &g),
                Delivery::Defer(Wait::Window)
            );
        }
    }

    #[test]
    fn decide_defers_under_sti_and_mov_ss_blocking() {
        assert_eq!(
            decide_r(Mode::AckReplay, Vector(0x41), &blocking(1)),
            Delivery::Defer(Wait::Window)
        );
        assert_eq!(
            decide_r(Mode::AckInject, Vector(0x41), &blocking(2)),
            Delivery::Defer(Wait::Window)
        );
    }

    #[test]
    fn decide_injects_instead_of_replaying_under_nmi_blocking() {
        // The handler's IRETQ would unblock NMIs; injection is what hardware would do.
        assert_eq!(
            decide_r(Mode::AckReplay, Vector(0x41), &blocking(8)),
            Delivery::Inject
        );
    }

    #[test]
    fn decide_defers_when_cr8_at_or_above_class() {
        let g = GuestView { cr8: 4, ..guest() };
        assert_eq!(
            decide_r(Mode::AckReplay, Vector(0x41), &g),
            Delivery::Defer(Wait::Priority)
        );
        assert_eq!(
            decide_r(Mode::AckReplay, Vector(0x4F), &g),
            Delivery::Defer(Wait::Priority)
        );
        assert_eq!(
            decide_r(Mode::AckReplay, Vector(0x51), &g),
            Delivery::Replay
        );
        assert_eq!(
            decide_r(Mode::AckInject, Vector(0x31), &g),
            Delivery::Defer(Wait::Priority)
        );
    }

    #[test]
    fn decide_window_wins_over_priority() {
        let g = GuestView {
            interrupts_enabled: false,
            cr8: 0xF,
            ..guest()
        };
        assert_eq!(
            decide_r(Mode::AckReplay, Vector(0x41), &g),
            Delivery::Defer(Wait::Window)
        );
    }

    #[test]
    fn decide_injects_dispatch_class_vectors_never_replays_them() {
        assert_eq!(
            decide_r(Mode::AckReplay, Vector(NT_DPC_VECTOR), &guest()),
            Delivery::Inject
        );
        assert_eq!(
            decide_r(Mode::AckReplay, Vector(0x1F), &guest()),
            Delivery::Inject
        );
        assert_eq!(
            decide_r(Mode::AckReplay, Vector(0x30), &guest()),
            Delivery::Replay
        );
    }

    #[test]
    fn decide_injects_everything_in_other_modes() {
        for mode in [Mode::AckInject, Mode::ExitSti, Mode::Passthrough] {
            assert_eq!(decide_r(mode, Vector(0x41), &guest()), Delivery::Inject);
        }
    }

    #[test]
    fn decide_for_a_halted_guest_delivers_and_wakes_it() {
        let g = GuestView {
            activity: ActivityState::Hlt,
            ..guest()
        };
        assert_eq!(
            decide_r(Mode::AckReplay, Vector(0x41), &g),
            Delivery::Replay
        );
        assert_eq!(activity_after_delivery(g.activity), ActivityState::Active);
    }

    #[test]
    fn activity_after_delivery_wakes_only_a_halted_guest() {
        assert_eq!(
            activity_after_delivery(ActivityState::Hlt),
            ActivityState::Active
        );
        assert_eq!(
            activity_after_delivery(ActivityState::Active),
            ActivityState::Active
        );
        for blocked in [ActivityState::Shutdown, ActivityState::WaitForSipi] {
            assert_eq!(activity_after_delivery(blocked), blocked);
        }
    }

    #[test]
    fn two_pending_classes_deliver_the_higher_and_wait_on_cr8_for_the_lower() {
        // Guest at CR8 = 5 with 0xD1 and 0x41 acknowledged: 0xD1 goes now, 0x41 must wait for
        // CR8 to drop below 4, so CR8-load exiting (not the window) brings it back.
        let g = GuestView { cr8: 5, ..guest() };
        let mut p = crate::intr::pending::PendingSet::new();
        p.insert(Vector(0x41)).unwrap();
        p.insert(Vector(0xD1)).unwrap();
        let first = p.pop().expect("two pending");
        assert_eq!(
            (first, decide_r(Mode::AckReplay, first, &g)),
            (Vector(0xD1), Delivery::Replay)
        );
        let second = p.highest().expect("one left");
        let wait = match decide_r(Mode::AckReplay, second, &g) {
            Delivery::Defer(w) => w,
            other => panic!("0x41 under CR8 5 must wait, got {other:?}"),
        };
        assert_eq!(
            exits_to_arm(true, false, Some(wait)),
            ArmedExits {
                window: false,
                cr8_load: true
            }
        );
        // Once CR8 drops to 3 the CR8-load exit finds it deliverable.
        let lowered = GuestView { cr8: 3, ..guest() };
        assert_eq!(
            decide_r(Mode::AckReplay, second, &lowered),
            Delivery::Replay
        );
    }

    #[test]
    fn after_an_injection_the_rest_waits_for_the_window() {
        assert_eq!(
            exits_to_arm(true, true, None),
            ArmedExits {
                window: true,
                cr8_load: false
            }
        );
        assert_eq!(
            exits_to_arm(true, false, Some(Wait::Window)),
            ArmedExits {
                window: true,
                cr8_load: false
            }
        );
        assert_eq!(
            exits_to_arm(false, true, None),
            ArmedExits {
                window: false,
                cr8_load: false
            }
        );
        assert_eq!(
            exits_to_arm(false, false, Some(Wait::Priority)),
            ArmedExits {
                window: false,
                cr8_load: false
            }
        );
    }

    fn gate() -> IdtGate {
        IdtGate::new(0xFFFF_F800_1234_5678, KCS, 0, gate_type::INTERRUPT, 0, true)
    }

    #[test]
    fn validate_gate_accepts_a_kernel_interrupt_gate() {
        assert_eq!(
            validate_gate(Vector(0x41), Some(gate()), 0xFFF, KCS),
            Ok(0xFFFF_F800_1234_5678)
        );
    }

    #[test]
    fn validate_gate_rejects_ist_dpl3_not_present_trap_and_wrong_selector() {
        let with =
            |ist, ty, dpl, present, sel| Some(IdtGate::new(0x1000, sel, ist, ty, dpl, present));
        let v = Vector(0x41);
        assert_eq!(
            validate_gate(v, with(1, gate_type::INTERRUPT, 0, true, KCS), 0xFFF, KCS),
            Err(GateRejection::UsesIst)
        );
        assert_eq!(
            validate_gate(v, with(0, gate_type::INTERRUPT, 3, true, KCS), 0xFFF, KCS),
            Err(GateRejection::UserGate)
        );
        assert_eq!(
            validate_gate(v, with(0, gate_type::INTERRUPT, 0, false, KCS), 0xFFF, KCS),
            Err(GateRejection::NotPresent)
        );
        assert_eq!(
            validate_gate(v, with(0, gate_type::TRAP, 0, true, KCS), 0xFFF, KCS),
            Err(GateRejection::NotInterruptGate)
        );
        assert_eq!(
            validate_gate(v, with(0, 0xC, 0, true, KCS), 0xFFF, KCS),
            Err(GateRejection::NotInterruptGate)
        );
        assert_eq!(
            validate_gate(v, with(0, gate_type::INTERRUPT, 0, true, 0x08), 0xFFF, KCS),
            Err(GateRejection::WrongSelector)
        );
    }

    #[test]
    fn validate_gate_rejects_exception_vectors_and_entries_past_the_limit() {
        assert_eq!(
            validate_gate(Vector(0x0E), Some(gate()), 0xFFF, KCS),
            Err(GateRejection::ExceptionVector)
        );
        assert_eq!(
            validate_gate(Vector(0x41), Some(gate()), 0x41 * 16 + 14, KCS),
            Err(GateRejection::BeyondLimit)
        );
        assert_eq!(
            validate_gate(Vector(0x41), Some(gate()), 0x41 * 16 + 15, KCS),
            Ok(gate().offset())
        );
        assert_eq!(
            validate_gate(Vector(0x41), None, 0xFFF, KCS),
            Err(GateRejection::BeyondLimit)
        );
    }

    #[test]
    fn frame_goes_on_guest_stack_aligned_at_cpl0_and_vmm_stack_at_cpl3() {
        assert_eq!(frame_stack(0, 0x1000_0008), FrameStack::Guest(0x1000_0000));
        assert_eq!(frame_stack(0, 0x1000_0000), FrameStack::Guest(0x1000_0000));
        assert_eq!(frame_stack(3, 0x7FF0_0008), FrameStack::Vmm);
    }

    #[test]
    fn exit_sti_gives_dispatch_class_and_blocked_vectors_to_the_guest() {
        assert_eq!(sti_r(Some(Vector(0x41)), &guest()), StiWindow::Open);
        assert_eq!(sti_r(Some(Vector(0x2F)), &guest()), StiWindow::GuestTakes);
        let cli = GuestView {
            interrupts_enabled: false,
            ..guest()
        };
        assert_eq!(sti_r(Some(Vector(0x41)), &cli), StiWindow::GuestTakes);
        let raised = GuestView { cr8: 5, ..guest() };
        assert_eq!(sti_r(Some(Vector(0x51)), &raised), StiWindow::GuestTakes);
        assert_eq!(sti_r(Some(Vector(0x61)), &raised), StiWindow::Open);
        assert_eq!(
            sti_r(Some(Vector(0x61)), &blocking(1)),
            StiWindow::GuestTakes
        );
        assert_eq!(sti_r(None, &guest()), StiWindow::Open);
    }

    #[test]
    fn decide_follows_the_vector_policy_only_where_it_would_replay() {
        let table = PolicyTable::ALL_REPLAY
            .with(&[0xD1], VectorPolicy::Auto)
            .with(&[0x61], VectorPolicy::Inject);
        let at = |cr8| GuestView { cr8, ..guest() };
        // auto: injected below DISPATCH (NT takes the tick at its true IRQL), replayed at or
        // above it (NT would see >= DISPATCH either way).
        for (cr8, want) in [
            (0, Delivery::Inject),
            (1, Delivery::Inject),
            (2, Delivery::Replay),
            (5, Delivery::Replay),
        ] {
            assert_eq!(
                decide(Mode::AckReplay, Vector(0xD1), &at(cr8), &table),
                want
            );
        }
        assert_eq!(
            decide(Mode::AckReplay, Vector(0xD1), &at(0xD), &table),
            Delivery::Defer(Wait::Priority)
        );
        assert_eq!(
            decide(Mode::AckReplay, Vector(0x61), &at(3), &table),
            Delivery::Inject
        );
        assert_eq!(
            decide(Mode::AckReplay, Vector(0x41), &at(0), &table),
            Delivery::Replay
        );
        // The policy never lets a vector through that must wait.
        let cli = GuestView {
            interrupts_enabled: false,
            ..guest()
        };
        assert_eq!(
            decide(Mode::AckReplay, Vector(0xD1), &cli, &table),
            Delivery::Defer(Wait::Window)
        );
    }

    #[test]
    fn exit_sti_hands_an_auto_vector_to_the_guest_below_dispatch() {
        let table = PolicyTable::ALL_REPLAY.with(&[0xD1], VectorPolicy::Auto);
        assert_eq!(
            sti_window(Some(Vector(0xD1)), &guest(), &table),
            StiWindow::GuestTakes
        );
        let raised = GuestView { cr8: 3, ..guest() };
        assert_eq!(
            sti_window(Some(Vector(0xD1)), &raised, &table),
            StiWindow::Open
        );
        assert_eq!(
            sti_window(Some(Vector(0x61)), &guest(), &table),
            StiWindow::Open
        );
    }

    #[test]
    fn verw_only_after_a_cpl3_replay_with_md_clear() {
        assert!(clears_buffers_after_replay(3, true));
        assert!(!clears_buffers_after_replay(3, false));
        assert!(!clears_buffers_after_replay(0, true));
    }
}
