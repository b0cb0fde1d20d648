//! VM-entry event injection and the exits that bring deferred vectors back (interrupt window,
//! CR8 load), plus the controls that switch interrupt delivery on and off.
//!
//! **Runs in:** VMX root.

use crate::cpu::RootState;
use crate::vmx::Vmcs;
use crate::vmx::fields::EntryIntrInfo;
use x86::vmx::vmcs::control::{self, PinbasedControls, PrimaryControls};

/// Injects hardware exception `vector` (with error code 0 when `error_code`).
pub fn exception(vmcs: &Vmcs, vector: u8, error_code: bool) {
    if error_code {
        vmcs.set(control::VMENTRY_EXCEPTION_ERR_CODE, 0);
    }
    vmcs.set(
        control::VMENTRY_INTERRUPTION_INFO_FIELD,
        u64::from(EntryIntrInfo::exception(vector, error_code).raw()),
    );
}

fn write_proc(vmcs: &Vmcs, root: &mut RootState, proc: u32) {
    if proc != root.proc {
        root.proc = proc;
        vmcs.set(control::PRIMARY_PROCBASED_EXEC_CONTROLS, u64::from(proc));
    }
}

fn write_pin(vmcs: &Vmcs, root: &mut RootState, pin: u32) {
    if pin != root.pin {
        root.pin = pin;
        vmcs.set(control::PINBASED_EXEC_CONTROLS, u64::from(pin));
    }
}

/// Interrupt-window and CR8-load exiting as the pending set needs them.
pub fn set_waits(vmcs: &Vmcs, root: &mut RootState, window: bool, cr8: bool) {
    let mut proc = root.proc
        & !(PrimaryControls::INTERRUPT_WINDOW_EXITING | PrimaryControls::CR8_LOAD_EXITING).bits();
    if window {
        proc |= PrimaryControls::INTERRUPT_WINDOW_EXITING.bits();
    }
    if cr8 {
        proc |= PrimaryControls::CR8_LOAD_EXITING.bits();
    }
    write_proc(vmcs, root, proc);
}

/// Pin-based controls for the current mode.
pub fn mode_pin(root: &RootState) -> u32 {
    let mut pin = root.controls.pin;
    if root.mode.exits_on_interrupts() {
        pin |= PinbasedControls::EXTERNAL_INTERRUPT_EXITING.bits();
    }
    pin
}

/// exit-sti hands the pending IRR vector to the guest: external-interrupt exiting off until the
/// next exit, which the preemption timer (or, without one, the monitor trap flag) forces soon.
pub fn suspend_exiting(vmcs: &Vmcs, root: &mut RootState) {
    let mut pin = mode_pin(root) & !PinbasedControls::EXTERNAL_INTERRUPT_EXITING.bits();
    if root.preemption_ticks != 0 {
        pin |= PinbasedControls::VMX_PREEMPTION_TIMER.bits();
        vmcs.set(
            x86::vmx::vmcs::guest::VMX_PREEMPTION_TIMER_VALUE,
            u64::from(root.preemption_ticks),
        );
    } else {
        write_proc(
            vmcs,
            root,
            root.proc | PrimaryControls::MONITOR_TRAP_FLAG.bits(),
        );
    }
    write_pin(vmcs, root, pin);
    root.exiting_suspended = true;
}

/// Undoes [`suspend_exiting`] at the next exit of any reason.
pub fn resume_exiting(vmcs: &Vmcs, root: &mut RootState) {
    root.exiting_suspended = false;
    write_proc(
        vmcs,
        root,
        root.proc & !PrimaryControls::MONITOR_TRAP_FLAG.bits(),
    );
    let pin = mode_pin(root);
    write_pin(vmcs, root, pin);
}
