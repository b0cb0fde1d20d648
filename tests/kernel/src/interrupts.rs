//! The IDT and an NT-like interrupt entry (DESIGN §7), so that a core mistake that would crash
//! Windows fails a test here.
//!
//! Device/IPI vectors: the stub pushes a tag (vector | variant << 8) and `device_common` switches
//! to this CPU's ISR stack unless RSP is already inside it (NT's dispatcher does the same), then
//! [`device_dispatch`]: record where the handler runs (guest, replayed by the core, exit-sti
//! window, or nested in a root-run handler), check that the interrupted code could take this
//! vector (marks in `percpu`), raise CR8 to the vector's class, STI so higher classes nest, run
//! the vector's action, CLI, check the canaries of the live frame, EOI, lower CR8, IRETQ.
//!
//! Exceptions: [`exception_dispatch`] recovers only what the running code registered (an
//! expected fault RIP, or a ring-3 excursion of `user`) and otherwise prints and fails the run.
//!
//! **Runs in:** interrupt context, in the guest or in VMX root (called by the core's replay, or
//! in its exit-sti window).

use core::sync::atomic::Ordering;

use crate::apic;
use crate::arch::{self, RFLAGS_IF};
use crate::percpu::{self, Gate, GateShape, MAX_CPUS, this_cpu};

/// NT's DISPATCH_LEVEL: the class at or below which a vector must never run in root (DESIGN §4).
pub const DISPATCH_CLASS: u8 = 2;
/// DPC-like software interrupt (NT's DISPATCH vector).
pub const DPC_VECTOR: u8 = 0x2F;
/// A device-class vector whose gate points to a different handler on each CPU.
pub const PER_CPU_VECTOR: u8 = 0x41;
/// Device-class vectors raised by self-IPIs.
pub const IPI_VECTORS: [u8; 5] = [DPC_VECTOR, PER_CPU_VECTOR, 0x61, 0x81, 0xB1];
/// The clock (NT's CLOCK_LEVEL vector): a one-shot LAPIC timer its handler re-arms.
pub const CLOCK_VECTOR: u8 = 0xD1;
/// Wake-up IPI for `for_each_cpu` (NT's IPI level).
pub const WAKE_VECTOR: u8 = 0xE1;
/// A gate with IST=2: the core must reject it and inject the vector.
pub const IST_GATE_VECTOR: u8 = 0x91;
/// A gate with DPL 3: the core must reject it and inject the vector.
pub const DPL3_GATE_VECTOR: u8 = 0x92;
/// Legacy 8259 vectors after the remap (both PICs stay masked).
const PIC_BASE: u8 = 0x30;
/// Cross-CPU IPIs: CPU `i` sends `CROSS_BASE + i` (a fixed IPI to another CPU's APIC ID), so
/// the receiver's count per vector is its count per sender and "raised == handled" stays exact
/// per vector and CPU. Class 5: masked by the workload's CR8 stretches, replayed in root.
pub const CROSS_BASE: u8 = 0x51;
/// The cross-CPU vector CPU `sender` sends.
pub const fn cross_vector(sender: u32) -> u8 {
    CROSS_BASE + sender as u8
}
/// The sender of a cross-CPU vector, `None` for any other vector.
pub fn cross_sender(vector: u8) -> Option<u32> {
    (CROSS_BASE..CROSS_BASE + MAX_CPUS as u8)
        .contains(&vector)
        .then(|| u32::from(vector - CROSS_BASE))
}
/// Every vector this kernel raises.
pub const SOURCE_VECTORS: [u8; 9 + MAX_CPUS] = [
    DPC_VECTOR,
    PER_CPU_VECTOR,
    0x61,
    0x81,
    0xB1,
    CLOCK_VECTOR,
    WAKE_VECTOR,
    IST_GATE_VECTOR,
    DPL3_GATE_VECTOR,
    cross_vector(0),
    cross_vector(1),
    cross_vector(2),
    cross_vector(3),
];
const _: () = assert!(
    MAX_CPUS == 4,
    "SOURCE_VECTORS lists one cross-CPU vector per CPU"
);

/// Exceptions that push an error code (bit n = vector n): 8, 10-14, 17, 21, 29, 30.
const ERROR_CODE_MASK: u32 = 0x6022_7D00;
/// Bytes between consecutive entry stubs (`.balign` in the asm below).
pub const STUB_BYTES: u64 = 16;
/// TSC ticks each handler spends in its body, so that interrupts overlap (param `handler_body`).
pub static HANDLER_BODY_TICKS: core::sync::atomic::AtomicU32 =
    core::sync::atomic::AtomicU32::new(300);
/// Value mixed into the frame canaries.
const CANARY: u64 = 0xC0FF_EE00_DEAD_BEEF;

core::arch::global_asm!(
    r#"
.section .text.entry, "ax", @progbits
.balign 16
.global exception_stubs
exception_stubs:
.set vec, 0
.rept 32
    .balign 16
    .if ((({err_mask}) >> vec) & 1) == 0
    push 0                        // no error code: keep one frame layout
    .endif
    push vec
    jmp exception_common
    .set vec, vec + 1
.endr

exception_common:                 // [rsp] = vector, error, rip, cs, rflags, rsp, ss
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15                      // 22 qwords on a 16-aligned CPU frame: aligned for the call
    mov rdi, rsp                  // &mut ExceptionFrame
    cld
    call {exception_dispatch}     // may rewrite the frame (recovery)
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16                   // vector, error code
    iretq

.balign 16
.global device_stubs
device_stubs:                     // one stub per vector 0x20..0xFF, STUB_BYTES apart
.set vec, 0x20
.rept 224
    .balign 16
    push vec
    jmp device_common
    .set vec, vec + 1
.endr

.balign 16
.global per_cpu_stubs
per_cpu_stubs:                    // PER_CPU_VECTOR with the CPU index as variant, one per CPU
.set cpu, 0
.rept {max_cpus}
    .balign 16
    push {per_cpu_vector} + (cpu << 8)
    jmp device_common
    .set cpu, cpu + 1
.endr

.balign 16
.global ist_gate_stub
ist_gate_stub:                    // already on its IST stack: do not switch (see device_common)
    push {ist_vector}
    push rbp
    mov rbp, rsp
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    and rsp, -16
    jmp 3f

device_common:                    // [rsp] = tag, rip, cs, rflags, rsp, ss
    push rbp
    mov rbp, rsp                  // rbp -> saved rbp; tag at rbp+8, CPU frame at rbp+16
    push rax                      // caller-saved registers; Rust keeps the rest
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    /* NT's rule: switch to this CPU's ISR stack unless RSP is already inside it. Inside means
       an interrupted handler's frames live above us: nest below them. Outside means the ISR
       stack is idle: start at its top. */
    mov rax, gs:[{isr_bottom}]
    cmp rsp, rax
    jbe 1f
    mov rax, gs:[{isr_top}]
    cmp rsp, rax
    ja 1f
    and rsp, -16                  // inside: stay, aligned for the call
    jmp 3f
1:  mov rsp, gs:[{isr_top}]       // outside: switch (the top is 16-aligned)
3:  lea rdi, [rbp + 8]            // &mut DeviceFrame
    cld
    call {device_dispatch}
    lea rsp, [rbp - 72]           // back to the saved registers, whichever stack we used
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    pop rbp
    add rsp, 8                    // tag
    iretq
.text
"#,
    err_mask = const ERROR_CODE_MASK,
    max_cpus = const MAX_CPUS,
    per_cpu_vector = const PER_CPU_VECTOR,
    ist_vector = const IST_GATE_VECTOR,
    isr_top = const percpu::OFFSET_ISR_TOP,
    isr_bottom = const percpu::OFFSET_ISR_BOTTOM,
    exception_dispatch = sym exception_dispatch,
    device_dispatch = sym device_dispatch,
);

unsafe extern "C" {
    static exception_stubs: u8;
    static device_stubs: u8;
    static per_cpu_stubs: u8;
    static ist_gate_stub: u8;
}

/// `[first, end)` of the device and per-CPU gate stubs: every gate target of vectors ≥ 0x20 is
/// `first + k * STUB_BYTES` inside it (the benchmark's trace reader uses it to skip handlers).
pub fn device_gate_range() -> (u64, u64) {
    (
        &raw const device_stubs as u64,
        &raw const ist_gate_stub as u64,
    )
}

/// Fills CPU `cpu`'s IDT: exceptions (NMI, #DF, #MC on IST1), every device vector through NT-
/// shaped gates, PER_CPU_VECTOR through this CPU's own stub, and the two gates the core must
/// reject.
pub fn install_gates(cpu: u32, idt: &mut [Gate; 256]) {
    let exc = &raw const exception_stubs as u64;
    let dev = &raw const device_stubs as u64;
    let per_cpu = &raw const per_cpu_stubs as u64;
    let ist = &raw const ist_gate_stub as u64;
    for (v, gate) in idt.iter_mut().enumerate() {
        let v64 = v as u64;
        *gate = if v < 32 {
            let ist = if matches!(v, 2 | 8 | 18) { 1 } else { 0 };
            Gate::interrupt(exc + v64 * STUB_BYTES, GateShape { ist, dpl: 0 })
        } else {
            Gate::interrupt(dev + (v64 - 0x20) * STUB_BYTES, GateShape::NT)
        };
    }
    idt[usize::from(PER_CPU_VECTOR)] =
        Gate::interrupt(per_cpu + u64::from(cpu) * STUB_BYTES, GateShape::NT);
    idt[usize::from(IST_GATE_VECTOR)] = Gate::interrupt(ist, GateShape { ist: 2, dpl: 0 });
    idt[usize::from(DPL3_GATE_VECTOR)] = Gate::interrupt(
        dev + u64::from(DPL3_GATE_VECTOR - 0x20) * STUB_BYTES,
        GateShape { ist: 0, dpl: 3 },
    );
}

/// Remaps the 8259 PICs away from the exception vectors (the BIOS leaves IRQ0 on #DF's vector)
/// and masks them: the LAPIC is the only interrupt source.
pub fn mask_pic() {
    const INIT: u8 = 0x11;
    for (port, value) in [
        (0x20, INIT),
        (0xA0, INIT),
        (0x21, PIC_BASE),
        (0xA1, PIC_BASE + 8),
        (0x21, 4),
        (0xA1, 2),
        (0x21, 1),
        (0xA1, 1),
        (0x21, 0xFF),
        (0xA1, 0xFF),
    ] {
        // SAFETY: the 8259 command/data ports; initialization sequence ICW1-4 then OCW1 (mask all).
        unsafe { arch::outb(port, value) };
    }
}

/// The CPU frame after the stub's tag.
#[repr(C)]
pub struct DeviceFrame {
    /// Vector | variant << 8.
    pub tag: u64,
    /// Interrupted RIP (a root return site when the core called us).
    pub rip: u64,
    /// Interrupted CS.
    pub cs: u64,
    /// Interrupted RFLAGS.
    pub rflags: u64,
    /// Interrupted RSP.
    pub rsp: u64,
    /// Interrupted SS.
    pub ss: u64,
}

/// Registers saved by `exception_common`, then the vector, error code and CPU frame.
#[repr(C)]
pub struct ExceptionFrame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    pub(crate) rdx: u64,
    pub(crate) rcx: u64,
    rbx: u64,
    /// RAX of the faulting code.
    pub rax: u64,
    /// Vector.
    pub vector: u64,
    /// Error code (0 when the exception has none).
    pub error: u64,
    /// Faulting RIP.
    pub rip: u64,
    /// CS.
    pub cs: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// RSP.
    pub rsp: u64,
    /// SS.
    pub ss: u64,
}
const _: () = assert!(size_of::<ExceptionFrame>() == 22 * 8);

/// Masks interrupts for a scope and marks it (`Cpu::ctx_if_off`), restoring both at drop.
pub struct IrqOff {
    was_enabled: bool,
    was_marked: bool,
}

impl IrqOff {
    /// `cli`, then mark: the mark is never set while IF=1.
    pub fn enter() -> IrqOff {
        let was_enabled = arch::rflags() & RFLAGS_IF != 0;
        arch::cli();
        let cpu = this_cpu();
        let was_marked = cpu.ctx_if_off.load(Ordering::Relaxed);
        cpu.ctx_if_off.store(true, Ordering::Relaxed);
        IrqOff {
            was_enabled,
            was_marked,
        }
    }
}

impl Drop for IrqOff {
    fn drop(&mut self) {
        this_cpu()
            .ctx_if_off
            .store(self.was_marked, Ordering::Relaxed);
        if self.was_enabled {
            // SAFETY: IF was set when the scope began; the scope's code is done.
            unsafe { arch::sti() };
        }
    }
}

/// Raises CR8 for a scope and marks it (`Cpu::ctx_cr8`): raise then mark, unmark then lower.
pub struct RaisedCr8 {
    previous: u8,
    previous_mark: u8,
}

impl RaisedCr8 {
    /// Raises CR8 to `class` (never lowers it).
    pub fn to(class: u8) -> RaisedCr8 {
        let previous = arch::cr8();
        let cpu = this_cpu();
        let previous_mark = cpu.ctx_cr8.load(Ordering::Relaxed);
        // SAFETY: raising CR8 only masks interrupts.
        unsafe { arch::set_cr8(class.max(previous)) };
        cpu.ctx_cr8
            .store(class.max(previous_mark), Ordering::Relaxed);
        RaisedCr8 {
            previous,
            previous_mark,
        }
    }
}

impl Drop for RaisedCr8 {
    fn drop(&mut self) {
        this_cpu()
            .ctx_cr8
            .store(self.previous_mark, Ordering::Relaxed);
        // SAFETY: back to the scope's entry priority; the scope's code is ready for anything its
        // caller was ready for.
        unsafe { arch::set_cr8(self.previous) };
    }
}

/// Requests `vector` on this CPU (self-IPI, or one-shot timer for the clock) unless one is
/// still outstanding: the LAPIC would merge the two, and "raised == handled" would stop being
/// an exact check. Returns whether it was raised.
pub fn raise(vector: u8) -> bool {
    let _off = IrqOff::enter();
    let cpu = this_cpu();
    if cpu.counts.outstanding(vector) != 0 {
        return false;
    }
    cpu.counts.raised.bump(vector);
    if vector == CLOCK_VECTOR {
        apic::timer_one_shot(CLOCK_VECTOR, cpu.clock_period.load(Ordering::Relaxed));
    } else {
        apic::self_ipi(vector);
    }
    true
}

/// Sends this CPU's cross-CPU vector to CPU `target` unless the previous one is still
/// outstanding there (the LAPIC would merge them). Only this CPU writes its `sent_to` counts;
/// the target's run count is read across CPUs, and a stale (lower) value only skips a send.
pub fn send_cross(target: u32) -> bool {
    let _off = IrqOff::enter();
    let cpu = this_cpu();
    let me = cpu.index.load(Ordering::Relaxed);
    let Some(dest) = percpu::CPUS.get(target as usize) else {
        return false;
    };
    if target == me || !dest.online.load(Ordering::Acquire) {
        return false;
    }
    let vector = cross_vector(me);
    let sent = cpu.counts.sent_to[target as usize].load(Ordering::Relaxed);
    if sent.wrapping_sub(dest.counts.runs.get(vector)) != 0 {
        return false;
    }
    cpu.counts.sent_to[target as usize].store(sent.wrapping_add(1), Ordering::Relaxed);
    apic::ipi(dest.apic_id.load(Ordering::Relaxed), vector);
    true
}

/// Starts this CPU's clock: `period` TSC ticks, re-armed by each tick until [`clock_stop`].
pub fn clock_start(period: u32) {
    let cpu = this_cpu();
    cpu.clock_period.store(period, Ordering::Relaxed);
    cpu.clock_on.store(true, Ordering::Relaxed);
    raise(CLOCK_VECTOR);
}

/// Stops re-arming (an armed tick still fires and is counted).
pub fn clock_stop() {
    this_cpu().clock_on.store(false, Ordering::Relaxed);
}

/// Whether handlers raise follow-up vectors (the nesting chains of [`action`]).
pub static CHAINS: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// What a vector's handler does at its own CR8 with IF=1. The chains are acyclic, so they end:
/// clock → DPC (every 4th tick); 0x61 → DPC (lower class: runs after us, an extra exit);
/// DPC → 0x41 (every other run: arrives while the guest is inside its own DPC handler);
/// 0x41 → 0x81 → 0xB1 (higher classes: nest at once).
fn action(vector: u8, cpu: &percpu::Cpu) {
    let chains = CHAINS.load(Ordering::Relaxed);
    match vector {
        CLOCK_VECTOR => {
            if cpu.clock_on.load(Ordering::Relaxed) {
                raise(CLOCK_VECTOR);
            }
            if chains && cpu.counts.runs.get(CLOCK_VECTOR).is_multiple_of(4) {
                raise(DPC_VECTOR);
            }
        }
        0x61 if chains => {
            raise(DPC_VECTOR);
        }
        DPC_VECTOR if chains && !cpu.counts.runs.get(DPC_VECTOR).is_multiple_of(2) => {
            raise(PER_CPU_VECTOR);
        }
        PER_CPU_VECTOR if chains => {
            raise(0x81);
        }
        0x81 if chains => {
            raise(0xB1);
        }
        _ => {}
    }
    arch::spin(u64::from(HANDLER_BODY_TICKS.load(Ordering::Relaxed)));
}

/// Where a handler run was entered from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Guest (or native before virtualization): delivered by the CPU or injected.
    Guest,
    /// The core's replay trampoline called the gate.
    Replayed,
    /// The core's exit-sti window.
    StiWindow,
    /// Delivered by the CPU in root, inside a root-run handler.
    NestedRoot,
}

/// Rust half of the device entry. IF=0 at entry and exit.
extern "sysv64" fn device_dispatch(frame: &mut DeviceFrame) {
    let cpu = this_cpu();
    let vector = frame.tag as u8;
    let variant = (frame.tag >> 8) as u8;
    let c = &cpu.counts;
    if vector == crate::misdirected::DPC_CLASS_VECTOR {
        crate::misdirected::on_dpc_class_vector(cpu);
        return;
    }
    let entry_cr8 = arch::cr8();
    let class = vector >> 4;
    let [replay_site, window_site] = ackvisor_vmm::root_interrupt_return_sites();
    let origin = if replay_site != 0 && frame.rip == replay_site as u64 {
        Origin::Replayed
    } else if window_site != 0 && frame.rip == window_site as u64 {
        Origin::StiWindow
    } else if cpu.root_depth.load(Ordering::Relaxed) > 0 {
        Origin::NestedRoot
    } else {
        Origin::Guest
    };

    // Could the interrupted code take this vector? Its marks say what it had masked.
    let (ctx_if_off, ctx_cr8) = (
        cpu.ctx_if_off.load(Ordering::Relaxed),
        cpu.ctx_cr8.load(Ordering::Relaxed),
    );
    // The spurious vector is gated by IF alone: the task priority is what produces it.
    let spurious = vector == apic::SPURIOUS_VECTOR;
    if ctx_if_off || (class <= ctx_cr8 && !spurious) {
        c.ctx_violations.bump();
        cpu.last_violation(vector, frame.rip);
    }
    cpu.ctx_if_off.store(true, Ordering::Relaxed);

    if vector == CLOCK_VECTOR && !crate::bench::measuring() {
        // NT's tick accounting sees the IRQL the tick interrupted and the interrupted CS.
        let index = cpu.index.load(Ordering::Relaxed) as usize;
        crate::watchdog::tick(index, entry_cr8, frame.cs & 3 == 3);
    }
    let depth = cpu.depth.load(Ordering::Relaxed);
    c.runs.bump(vector);
    match origin {
        Origin::Guest => c.guest.bump(vector),
        Origin::Replayed => c.replayed.bump(vector),
        Origin::StiWindow => c.sti_window.bump(vector),
        Origin::NestedRoot => c.nested_root.bump(vector),
    }
    let in_root = origin != Origin::Guest;
    if depth > 0 {
        c.nested.bump(vector);
        if origin == Origin::Replayed {
            c.replayed_nested.bump(vector);
        }
    }
    if origin == Origin::Replayed && entry_cr8 < DISPATCH_CLASS {
        c.replay_low_cr8.bump(vector);
    }
    if vector == DPC_VECTOR && in_root {
        c.dpc_in_root.bump();
        cpu.last_violation(vector, frame.rip);
    }
    if vector == PER_CPU_VECTOR && u32::from(variant) != cpu.index.load(Ordering::Relaxed) {
        c.wrong_idt.bump();
    }
    if !crate::bench::measuring() {
        crate::books::record(cpu, vector, origin, depth);
    }
    if spurious {
        // Counted like every delivery (where it ran, which exit brought it), but it set no ISR
        // bit: no EOI, no priority change, no body (SDM 3A "Spurious Interrupt").
        c.spurious.bump();
        cpu.ctx_if_off.store(ctx_if_off, Ordering::Relaxed);
        return;
    }
    if !SOURCE_VECTORS.contains(&vector) {
        c.unexpected.bump();
    }

    // Canaries: in this function's frame (on the ISR stack) and a copy of the interrupted frame.
    // A nested frame put in the wrong place (for example at the ISR stack's top while we run on
    // it) overwrites them.
    let seed = CANARY ^ arch::rdtsc() ^ u64::from(vector);
    let mut live = [0u64; 4];
    for (i, slot) in live.iter_mut().enumerate() {
        // SAFETY: a local slot; volatile so it stays in memory on the stack.
        unsafe { core::ptr::write_volatile(slot, seed.rotate_left(i as u32 * 8)) };
    }
    let frame_copy = (frame.rip, frame.cs, frame.rsp, frame.ss);

    // Branch-free, so a handler run in root costs what one run by the guest costs (the
    // benchmark's `guest_overhead` subtracts passthrough's handler from every mode's).
    let root_step = u32::from(in_root);
    cpu.root_depth.store(
        cpu.root_depth.load(Ordering::Relaxed) + root_step,
        Ordering::Relaxed,
    );
    cpu.depth.store(depth + 1, Ordering::Relaxed);
    // SAFETY: raising CR8 to the vector's class, as NT raises IRQL, masks equal/lower classes.
    unsafe { arch::set_cr8(class) };
    cpu.ctx_cr8.store(class, Ordering::Relaxed);
    cpu.ctx_if_off.store(false, Ordering::Relaxed);
    // SAFETY: state is consistent (counted, marks set); higher classes may nest now.
    unsafe { arch::sti() };

    crate::debug_regs::on_handler(vector, in_root);
    action(vector, cpu);

    arch::cli();
    cpu.ctx_if_off.store(true, Ordering::Relaxed);
    let mut intact = (frame.rip, frame.cs, frame.rsp, frame.ss) == frame_copy;
    for (i, slot) in live.iter().enumerate() {
        // SAFETY: reads back the local written above.
        intact &= unsafe { core::ptr::read_volatile(slot) } == seed.rotate_left(i as u32 * 8);
    }
    if !intact {
        c.canary_broken.bump();
        cpu.last_violation(vector, frame.rip);
    }
    cpu.root_depth.store(
        cpu.root_depth.load(Ordering::Relaxed) - root_step,
        Ordering::Relaxed,
    );
    cpu.depth.store(depth, Ordering::Relaxed);
    apic::eoi();
    cpu.ctx_cr8.store(ctx_cr8, Ordering::Relaxed);
    cpu.ctx_if_off.store(ctx_if_off, Ordering::Relaxed);
    // SAFETY: back to the entry priority with IF=0; IRETQ restores the interrupted IF.
    unsafe { arch::set_cr8(entry_cr8) };
}

impl percpu::Cpu {
    fn last_violation(&self, vector: u8, rip: u64) {
        self.counts.last_violation.store(
            (u64::from(vector) << 56) | (rip & 0x00FF_FFFF_FFFF_FFFF),
            Ordering::Relaxed,
        );
    }
}

/// Rust half of the exception entry: recover what was registered, else fail the run.
extern "sysv64" fn exception_dispatch(frame: &mut ExceptionFrame) {
    let cpu = this_cpu();
    let vector = frame.vector;
    if vector == crate::debug_regs::DB_VECTOR && crate::debug_regs::on_debug_exception(frame) {
        return;
    }
    let kernel_rsp = cpu.user.kernel_rsp.load(Ordering::Relaxed);
    if frame.cs & 3 == 3 && kernel_rsp != 0 {
        // End of a ring-3 excursion: note what happened and return into `user::enter`'s tail
        // in ring 0 on the kernel stack it saved.
        cpu.user.vector.store(vector, Ordering::Relaxed);
        cpu.user.rip.store(frame.rip, Ordering::Relaxed);
        cpu.user.rax.store(frame.rax, Ordering::Relaxed);
        frame.rip = crate::user::return_address();
        frame.cs = u64::from(percpu::KERNEL_CS);
        frame.ss = u64::from(percpu::KERNEL_SS);
        frame.rsp = kernel_rsp;
        frame.rflags &= !RFLAGS_IF;
        return;
    }
    if crate::ntos::quirks::emulate_debugctl(frame) {
        return;
    }
    let fault_rip = cpu.recovery.fault_rip.load(Ordering::Relaxed);
    if fault_rip != 0 && frame.rip == fault_rip {
        cpu.recovery
            .vector_plus_one
            .store(vector + 1, Ordering::Relaxed);
        cpu.recovery.fault_rip.store(0, Ordering::Relaxed);
        frame.rip = cpu.recovery.resume_rip.load(Ordering::Relaxed);
        return;
    }
    // The first unexpected exception reports; a CPU that faults after it (often a consequence,
    // or the other CPU of a shared corruption) stops quietly so the first report stays legible.
    static FAILING: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);
    let me = cpu.index.load(Ordering::Relaxed) + 1;
    match FAILING.compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {}
        // This CPU faulted again while reporting: power off with what was printed.
        Err(first) if first == me => crate::console::shutdown(),
        Err(_) => loop {
            arch::cli();
            arch::hlt();
        },
    }
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe {
        core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags))
    };
    crate::kprintln!(
        "EXCEPTION vector={} error={:#x} rip={:#x} cs={:#x} rflags={:#x} rsp={:#x} cr2={:#x} rax={:#x} cpu={} cr8={}",
        vector,
        frame.error,
        frame.rip,
        frame.cs,
        frame.rflags,
        frame.rsp,
        cr2,
        frame.rax,
        cpu.index.load(Ordering::Relaxed),
        arch::cr8()
    );
    crate::report::fatal_result(format_args!(
        "exception vector={} rip={:#x}",
        vector, frame.rip
    ));
}
