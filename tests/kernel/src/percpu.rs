//! Per-CPU state, like NT's KPCR: each CPU has its own GDT, TSS, IDT, ISR stack, trap stacks,
//! interrupt counters and marks, found through GS base (set once, never swapped: the kernel has
//! no SWAPGS, ring 3 cannot change GS base, and GS's selector stays null so IRETQ to ring 3
//! leaves it alone).
//!
//! Selectors follow NT's x64 GDT so gate validation sees the values it sees on Windows:
//! 0x10 kernel CS, 0x18 kernel SS, 0x2B user data, 0x33 user CS, 0x40 TSS.
//!
//! **Runs in:** PASSIVE (init), any context (accessors; counters are single-writer: the owning
//! CPU with IF=0).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

use crate::arch::{self, DescriptorPointer};

/// Most CPUs the test machine runs (Bochs `cpu: count=` up to this).
pub const MAX_CPUS: usize = 4;

/// Kernel code selector (NT KGDT64_R0_CODE).
pub const KERNEL_CS: u16 = 0x10;
/// Kernel stack selector (NT KGDT64_R0_DATA).
pub const KERNEL_SS: u16 = 0x18;
/// User data selector with RPL 3 (NT KGDT64_R3_DATA): also DS/ES in the kernel, as on NT.
pub const USER_DS: u16 = 0x2B;
/// User 64-bit code selector with RPL 3 (NT KGDT64_R3_CODE).
pub const USER_CS: u16 = 0x33;
/// TSS selector (NT KGDT64_SYS_TSS).
pub const TSS_SEL: u16 = 0x40;

const GDT_ENTRIES: usize = 10;
const ISR_STACK_BYTES: usize = 16 * 1024;
const TRAP_STACK_BYTES: usize = 16 * 1024;
const IST_STACK_BYTES: usize = 8 * 1024;
const IA32_GS_BASE: u32 = 0xC000_0101;

/// 64-bit TSS (SDM "Task-State Segment (TSS) in 64-Bit Mode").
#[repr(C, packed)]
pub struct Tss {
    _reserved0: u32,
    /// RSP0..2: stacks for privilege changes (RSP0 for ring 3 → 0).
    pub rsp: [u64; 3],
    _reserved1: u64,
    /// IST1..7.
    pub ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    /// I/O map base (= size: no I/O bitmap).
    pub iomap_base: u16,
}
const _: () = assert!(size_of::<Tss>() == 104);

/// One IDT gate (SDM "64-Bit Mode IDT").
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Gate {
    /// Offset 15:0, selector, IST, type/DPL/P, offset 31:16.
    pub low: u64,
    /// Offset 63:32.
    pub high: u64,
}
const _: () = assert!(size_of::<Gate>() == 16);

/// What a gate looks like beyond its target.
#[derive(Clone, Copy)]
pub struct GateShape {
    /// IST index (0 = none).
    pub ist: u8,
    /// Descriptor privilege level.
    pub dpl: u8,
}

impl GateShape {
    /// A 64-bit interrupt gate, DPL 0, no IST: what NT uses for device vectors.
    pub const NT: GateShape = GateShape { ist: 0, dpl: 0 };
}

impl Gate {
    /// A present 64-bit interrupt gate (type 0xE) to `target` through the kernel CS.
    pub fn interrupt(target: u64, shape: GateShape) -> Gate {
        let type_attr = 0x80 | (u64::from(shape.dpl & 3) << 5) | 0xE;
        Gate {
            low: (target & 0xFFFF)
                | (u64::from(KERNEL_CS) << 16)
                | (u64::from(shape.ist & 7) << 32)
                | (type_attr << 40)
                | (((target >> 16) & 0xFFFF) << 48),
            high: target >> 32,
        }
    }
}

#[repr(C, align(16))]
struct Stack<const N: usize>([u8; N]);

impl<const N: usize> Stack<N> {
    fn top(&self) -> u64 {
        self.0.as_ptr() as u64 + N as u64
    }
    fn bottom(&self) -> u64 {
        self.0.as_ptr() as u64
    }
}

#[repr(C, align(4096))]
struct Tables {
    idt: [Gate; 256],
    gdt: [u64; GDT_ENTRIES],
    tss: Tss,
    isr_stack: Stack<ISR_STACK_BYTES>,
    trap_stack: Stack<TRAP_STACK_BYTES>,
    ist1: Stack<IST_STACK_BYTES>,
    ist2: Stack<IST_STACK_BYTES>,
}

/// Per-vector counters of one CPU. Written only by the owning CPU with IF=0, so a Relaxed load
/// plus store is enough (and nothing else would be correct across a VM exit either).
pub struct VectorCounts(pub [AtomicU32; 256]);

impl VectorCounts {
    /// All zero.
    pub const fn new() -> Self {
        Self([const { AtomicU32::new(0) }; 256])
    }
    /// Count of `v`.
    pub fn get(&self, v: u8) -> u32 {
        self.0[usize::from(v)].load(Ordering::Relaxed)
    }
    /// Adds one to `v`.
    pub fn bump(&self, v: u8) {
        let c = &self.0[usize::from(v)];
        c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }
    /// Zeroes every vector.
    pub fn reset(&self) {
        for c in &self.0 {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// A single-writer event counter.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Zero.
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }
    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    /// Adds one.
    pub fn bump(&self) {
        self.0.store(self.get().wrapping_add(1), Ordering::Relaxed);
    }
    /// Back to zero.
    pub fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// What the interrupt entry records on this CPU (see `interrupts`).
pub struct IntrCounts {
    /// Interrupts requested by this CPU's sources (self-IPIs sent, one-shot clock armed).
    pub raised: VectorCounts,
    /// Handler runs.
    pub runs: VectorCounts,
    /// Runs in the guest (or natively, before virtualizing).
    pub guest: VectorCounts,
    /// Runs the core called by replay (frame RIP = replay return site).
    pub replayed: VectorCounts,
    /// Runs in the core's exit-sti window (frame RIP = sti window site).
    pub sti_window: VectorCounts,
    /// Runs delivered by the CPU in root, nested inside a root-run handler (never an exit).
    pub nested_root: VectorCounts,
    /// Root runs that the core entered with CR8 < 2 (DESIGN §4 asks for ≥ DISPATCH).
    pub replay_low_cr8: VectorCounts,
    /// Runs that interrupted another handler on this CPU (nesting happened).
    pub nested: VectorCounts,
    /// Replays that interrupted a guest handler (their frame went below its live frames).
    pub replayed_nested: VectorCounts,
    /// Cross-CPU IPIs this CPU sent, by target CPU index (always its own vector,
    /// `interrupts::cross_vector(self)`).
    pub sent_to: [AtomicU32; MAX_CPUS],
    /// Ring-3 excursions that did not end where they should.
    pub ring3_bad_exits: Counter,
    /// A handler ran while the code it interrupted had IF=0 or CR8 ≥ its class.
    pub ctx_violations: Counter,
    /// A canary in a live frame changed while the handler ran (a nested frame overwrote it).
    pub canary_broken: Counter,
    /// The DISPATCH-class software vector ran in root.
    pub dpc_in_root: Counter,
    /// A per-CPU gate was reached on another CPU (the core used a foreign IDT).
    pub wrong_idt: Counter,
    /// Vectors with no source in this kernel.
    pub unexpected: Counter,
    /// Spurious interrupts (vector 0xFF).
    pub spurious: Counter,
    /// Last violation, for the report: vector << 56 | interrupted RIP.
    pub last_violation: AtomicU64,
    /// The books the core's statistics are compared with (`books`).
    pub books: crate::books::Books,
}

impl IntrCounts {
    const fn new() -> Self {
        Self {
            raised: VectorCounts::new(),
            runs: VectorCounts::new(),
            guest: VectorCounts::new(),
            replayed: VectorCounts::new(),
            sti_window: VectorCounts::new(),
            nested_root: VectorCounts::new(),
            replay_low_cr8: VectorCounts::new(),
            nested: VectorCounts::new(),
            replayed_nested: VectorCounts::new(),
            sent_to: [const { AtomicU32::new(0) }; MAX_CPUS],
            ring3_bad_exits: Counter::new(),
            ctx_violations: Counter::new(),
            canary_broken: Counter::new(),
            dpc_in_root: Counter::new(),
            wrong_idt: Counter::new(),
            unexpected: Counter::new(),
            spurious: Counter::new(),
            last_violation: AtomicU64::new(0),
            books: crate::books::Books::new(),
        }
    }

    /// Zeroes everything (call with no interrupt outstanding).
    pub fn reset(&self) {
        for v in [
            &self.raised,
            &self.runs,
            &self.guest,
            &self.replayed,
            &self.sti_window,
            &self.nested_root,
            &self.replay_low_cr8,
            &self.nested,
            &self.replayed_nested,
        ] {
            v.reset();
        }
        for c in [
            &self.ring3_bad_exits,
            &self.ctx_violations,
            &self.canary_broken,
            &self.dpc_in_root,
            &self.wrong_idt,
            &self.unexpected,
            &self.spurious,
        ] {
            c.reset();
        }
        for c in &self.sent_to {
            c.store(0, Ordering::Relaxed);
        }
        self.last_violation.store(0, Ordering::Relaxed);
        self.books.reset();
    }

    /// Interrupts of `v` raised on this CPU by this CPU but not yet handled.
    pub fn outstanding(&self, v: u8) -> u32 {
        self.raised.get(v).wrapping_sub(self.runs.get(v))
    }
}

impl Cpu {
    /// Interrupts of `v` requested for this CPU: its own raises, or for a cross-CPU vector
    /// what its sender sent here.
    pub fn raised(&self, v: u8) -> u32 {
        match crate::interrupts::cross_sender(v) {
            Some(sender) => CPUS.get(sender as usize).map_or(0, |s| {
                let me = self.index.load(Ordering::Relaxed) as usize;
                s.counts
                    .sent_to
                    .get(me)
                    .map_or(0, |c| c.load(Ordering::Relaxed))
            }),
            None => self.counts.raised.get(v),
        }
    }

    /// Interrupts of `v` requested for this CPU and not handled yet.
    pub fn outstanding(&self, v: u8) -> u32 {
        self.raised(v).wrapping_sub(self.counts.runs.get(v))
    }
}

/// A fault the current code expects: at `fault_rip`, resume at `resume_rip` and record it.
pub struct Recovery {
    /// RIP of the instruction expected to fault (0 = none armed).
    pub fault_rip: AtomicU64,
    /// Where the handler continues.
    pub resume_rip: AtomicU64,
    /// Vector of the last recovered fault (+1, so 0 means "none").
    pub vector_plus_one: AtomicU64,
}

/// Ring-3 excursion state (`user`): where the exception handler returns to in the kernel.
pub struct UserEscape {
    /// Kernel RSP saved by `user::enter`, 0 when no excursion is running.
    pub kernel_rsp: AtomicU64,
    /// Vector that ended the excursion.
    pub vector: AtomicU64,
    /// RIP (in ring 3) it was raised at.
    pub rip: AtomicU64,
    /// RAX at that point (what a returning VMCALL left).
    pub rax: AtomicU64,
}

/// State of the `for_each_cpu` mailbox.
pub mod mailbox {
    /// Nothing posted.
    pub const IDLE: u32 = 0;
    /// Work posted, not finished.
    pub const POSTED: u32 = 1;
    /// Finished; result in `result`.
    pub const DONE: u32 = 2;
}

/// The function type `Platform::for_each_cpu` runs.
pub type WorkFn<'a> = dyn Fn(ackvisor_vmm::CpuIndex) -> Result<(), ackvisor_vmm::Error> + Sync + 'a;

/// Work posted to an AP by `Platform::for_each_cpu`.
pub struct Mailbox {
    /// One of [`mailbox`]'s states.
    pub state: AtomicU32,
    /// The function (valid while `state` is POSTED; the poster waits for DONE).
    pub work: UnsafeCell<Option<*const WorkFn<'static>>>,
    /// Result (valid once `state` is DONE).
    pub result: UnsafeCell<Result<(), ackvisor_vmm::Error>>,
}

/// One CPU. The first fields are read by the interrupt entry stub through GS: their offsets
/// come from `offset_of!`.
#[repr(C)]
pub struct Cpu {
    /// Linear address of this struct (GS:[0]).
    pub self_ptr: AtomicU64,
    /// Top (exclusive) of the ISR stack.
    pub isr_stack_top: AtomicU64,
    /// Bottom of the ISR stack.
    pub isr_stack_bottom: AtomicU64,
    /// Index (0 = BSP).
    pub index: AtomicU32,
    /// APIC ID.
    pub apic_id: AtomicU32,
    /// Set once this CPU's tables are loaded.
    pub online: AtomicBool,
    /// Mark: the code the next interrupt would interrupt runs with IF=0 (set after `cli`,
    /// cleared before `sti`, so it is never set while IF=1).
    pub ctx_if_off: AtomicBool,
    /// Mark: that code's CR8 (raised before set, cleared before lowered).
    pub ctx_cr8: AtomicU8,
    /// Depth of handlers running in VMX root on this CPU.
    pub root_depth: AtomicU32,
    /// Depth of handlers running on this CPU, wherever they run.
    pub depth: AtomicU32,
    /// The one-shot clock re-arms itself while set.
    pub clock_on: AtomicBool,
    /// Clock period in TSC ticks.
    pub clock_period: AtomicU32,
    /// Interrupt counters.
    pub counts: IntrCounts,
    /// Expected fault.
    pub recovery: Recovery,
    /// Ring-3 excursion.
    pub user: UserEscape,
    /// `for_each_cpu` work.
    pub mailbox: Mailbox,
    tables: UnsafeCell<Tables>,
}

// SAFETY: `tables` is written only by its own CPU during `init`, before any other CPU looks at
// it (the IDT base is read by the core after that); the mailbox cells follow the state protocol
// in `platform`; everything else is atomic.
unsafe impl Sync for Cpu {}

#[allow(clippy::declare_interior_mutable_const)]
const CPU_INIT: Cpu = Cpu {
    self_ptr: AtomicU64::new(0),
    isr_stack_top: AtomicU64::new(0),
    isr_stack_bottom: AtomicU64::new(0),
    index: AtomicU32::new(0),
    apic_id: AtomicU32::new(0),
    online: AtomicBool::new(false),
    ctx_if_off: AtomicBool::new(false),
    ctx_cr8: AtomicU8::new(0),
    root_depth: AtomicU32::new(0),
    depth: AtomicU32::new(0),
    clock_on: AtomicBool::new(false),
    clock_period: AtomicU32::new(0),
    counts: IntrCounts::new(),
    recovery: Recovery {
        fault_rip: AtomicU64::new(0),
        resume_rip: AtomicU64::new(0),
        vector_plus_one: AtomicU64::new(0),
    },
    user: UserEscape {
        kernel_rsp: AtomicU64::new(0),
        vector: AtomicU64::new(0),
        rip: AtomicU64::new(0),
        rax: AtomicU64::new(0),
    },
    mailbox: Mailbox {
        state: AtomicU32::new(mailbox::IDLE),
        work: UnsafeCell::new(None),
        result: UnsafeCell::new(Ok(())),
    },
    tables: UnsafeCell::new(Tables {
        idt: [Gate { low: 0, high: 0 }; 256],
        gdt: [0; GDT_ENTRIES],
        tss: Tss {
            _reserved0: 0,
            rsp: [0; 3],
            _reserved1: 0,
            ist: [0; 7],
            _reserved2: 0,
            _reserved3: 0,
            iomap_base: 0,
        },
        isr_stack: Stack([0; ISR_STACK_BYTES]),
        trap_stack: Stack([0; TRAP_STACK_BYTES]),
        ist1: Stack([0; IST_STACK_BYTES]),
        ist2: Stack([0; IST_STACK_BYTES]),
    }),
};

/// Every CPU's state, indexed by CPU index.
pub static CPUS: [Cpu; MAX_CPUS] = [CPU_INIT; MAX_CPUS];

/// Offsets the entry stubs use.
pub const OFFSET_ISR_TOP: usize = core::mem::offset_of!(Cpu, isr_stack_top);
/// See [`OFFSET_ISR_TOP`].
pub const OFFSET_ISR_BOTTOM: usize = core::mem::offset_of!(Cpu, isr_stack_bottom);
const _: () = assert!(core::mem::offset_of!(Cpu, self_ptr) == 0);

/// This CPU's state (through GS base, set by [`Cpu::init`]).
#[inline(always)]
pub fn this_cpu() -> &'static Cpu {
    let p: u64;
    // SAFETY: GS:[0] is `self_ptr` of this CPU's entry in `CPUS` once `init` ran; every caller
    // runs after that (kmain and ap_main call init first).
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) p, options(nostack, readonly, preserves_flags))
    };
    // SAFETY: `p` points into the static `CPUS`.
    unsafe { &*(p as *const Cpu) }
}

/// CPUs that have loaded their tables.
pub fn online_count() -> u32 {
    CPUS.iter()
        .filter(|c| c.online.load(Ordering::Acquire))
        .count() as u32
}

impl Cpu {
    /// Sets or clears the busy bit of this CPU's TSS descriptor in its GDT. The loaded TR keeps
    /// its cached descriptor, so nothing changes for the running CPU; only what a reader of the
    /// GDT (the core capturing guest state) sees. VM entry insists on a busy 64-bit TSS, so a
    /// cleared bit makes the first VM entry fail its guest-state checks (`cycles` scenario).
    ///
    /// # Safety
    /// Call on this CPU with IF=0, and set the bit again before anything executes LTR.
    pub unsafe fn set_tss_busy(&'static self, busy: bool) {
        const BUSY: u64 = 1 << 41;
        // SAFETY: only this CPU touches its tables (caller's duty).
        let t = unsafe { &mut *self.tables.get() };
        let slot = usize::from(TSS_SEL / 8);
        if let Some(d) = t.gdt.get_mut(slot) {
            *d = if busy { *d | BUSY } else { *d & !BUSY };
        }
    }

    /// Builds and loads this CPU's GDT, TSS and IDT and points GS base at `self`.
    /// `gates` fills the IDT for CPU `index`.
    ///
    /// # Safety
    /// Call once per CPU, on that CPU, with IF=0, before any interrupt can arrive.
    pub unsafe fn init(&'static self, index: u32, gates: fn(u32, &mut [Gate; 256])) {
        let me = self as *const Cpu as u64;
        // SAFETY: only this CPU touches its tables, and only now (caller's duty).
        let t = unsafe { &mut *self.tables.get() };
        let tss_base = &t.tss as *const Tss as u64;
        t.tss.rsp[0] = t.trap_stack.top();
        t.tss.ist[0] = t.ist1.top();
        t.tss.ist[1] = t.ist2.top();
        t.tss.iomap_base = size_of::<Tss>() as u16;
        let limit = size_of::<Tss>() as u64 - 1;
        t.gdt = [0; GDT_ENTRIES];
        t.gdt[usize::from(KERNEL_CS / 8)] = 0x0020_9B00_0000_0000; // L=1, P, DPL0, code, accessed
        t.gdt[usize::from(KERNEL_SS / 8)] = 0x0000_9300_0000_0000; // P, DPL0, data RW, accessed
        t.gdt[usize::from(USER_DS / 8)] = 0x0000_F300_0000_0000; // P, DPL3, data RW, accessed
        t.gdt[usize::from(USER_CS / 8)] = 0x0020_FB00_0000_0000; // L=1, P, DPL3, code, accessed
        t.gdt[usize::from(TSS_SEL / 8)] = (limit & 0xFFFF)
            | ((tss_base & 0xFF_FFFF) << 16)
            | (0x89 << 40) // P, 64-bit available TSS
            | (((tss_base >> 24) & 0xFF) << 56);
        t.gdt[usize::from(TSS_SEL / 8) + 1] = tss_base >> 32;
        gates(index, &mut t.idt);

        self.self_ptr.store(me, Ordering::Relaxed);
        self.isr_stack_top
            .store(t.isr_stack.top(), Ordering::Relaxed);
        self.isr_stack_bottom
            .store(t.isr_stack.bottom(), Ordering::Relaxed);
        self.index.store(index, Ordering::Relaxed);
        self.apic_id.store(crate::apic::id(), Ordering::Relaxed);

        let gdtr = DescriptorPointer {
            limit: (GDT_ENTRIES * 8 - 1) as u16,
            base: t.gdt.as_ptr() as u64,
        };
        let idtr = DescriptorPointer {
            limit: (256 * 16 - 1) as u16,
            base: t.idt.as_ptr() as u64,
        };
        // SAFETY: the GDT above has the selectors loaded right after; the boot GDT's code64 (0x18)
        // is replaced by KERNEL_CS through a far return.
        unsafe {
            core::arch::asm!("lgdt [{}]", in(reg) &gdtr, options(readonly, nostack, preserves_flags))
        };
        // SAFETY: reload CS with KERNEL_CS (far return to the next label), SS with KERNEL_SS,
        // DS/ES with USER_DS as NT does, FS/GS null (GS base is set below through the MSR).
        unsafe {
            core::arch::asm!(
                "push {cs}",
                "lea {tmp}, [rip + 2f]",
                "push {tmp}",
                "retfq",
                "2:",
                "mov {tmp:e}, {ss}",
                "mov ss, {tmp:e}",
                "mov {tmp:e}, {ds}",
                "mov ds, {tmp:e}",
                "mov es, {tmp:e}",
                "xor {tmp:e}, {tmp:e}",
                "mov fs, {tmp:e}",
                "mov gs, {tmp:e}",
                cs = const KERNEL_CS as u64,
                ss = const KERNEL_SS as u32,
                ds = const USER_DS as u32,
                tmp = out(reg) _,
            )
        };
        // SAFETY: TSS_SEL is an available 64-bit TSS in the GDT just loaded.
        unsafe {
            core::arch::asm!("ltr {0:x}", in(reg) TSS_SEL, options(nostack, preserves_flags))
        };
        // SAFETY: the IDT is filled by `gates` and lives in this static for ever.
        unsafe {
            core::arch::asm!("lidt [{}]", in(reg) &idtr, options(readonly, nostack, preserves_flags))
        };
        // SAFETY: GS base = this struct; nothing used GS before.
        unsafe { arch::wrmsr(IA32_GS_BASE, me) };
        self.online.store(true, Ordering::Release);
    }
}
