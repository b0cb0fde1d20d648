//! One-instruction register accessors the x86 crate lacks (CR8, ...).
//!
//! **Runs in:** anywhere at CPL 0.

/// Reads CR8 (the task-priority class, = IRQL on x64).
#[inline(always)]
pub fn cr8() -> u8 {
    let v: u64;
    // SAFETY: reading CR8 has no side effects; this crate only runs at CPL 0.
    unsafe {
        core::arch::asm!("mov {}, cr8", out(reg) v, options(nomem, nostack, preserves_flags))
    };
    (v & 0xF) as u8
}

/// Raises CR8 to `to` if it is lower; returns the previous value.
#[inline(always)]
pub fn raise_cr8(to: u8) -> u8 {
    let old = cr8();
    if old < to {
        // SAFETY: raising the task priority only masks interrupts; it cannot break memory.
        unsafe { set_cr8(to) };
    }
    old
}

/// Puts CR8 back to `to` (a value [`raise_cr8`] returned).
#[inline(always)]
pub fn lower_cr8(to: u8) {
    if cr8() != to {
        // SAFETY: restores the caller's own earlier task priority.
        unsafe { set_cr8(to) };
    }
}

/// Writes CR8.
///
/// # Safety
/// Lowering CR8 lets interrupts of lower classes in: the caller must be ready for them.
#[inline(always)]
pub unsafe fn set_cr8(v: u8) {
    // SAFETY: caller's duty (see above).
    unsafe {
        core::arch::asm!("mov cr8, {}", in(reg) u64::from(v & 0xF), options(nomem, nostack, preserves_flags))
    };
}

/// A descriptor-table register image (SGDT/SIDT/LGDT/LIDT operand).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DescriptorTable {
    /// Limit (size - 1).
    pub limit: u16,
    /// Linear base.
    pub base: u64,
}

/// Reads GDTR.
#[inline(always)]
pub fn sgdt() -> DescriptorTable {
    let mut d = DescriptorTable::default();
    // SAFETY: SGDT stores 10 bytes into `d`, which is exactly that large.
    unsafe { core::arch::asm!("sgdt [{}]", in(reg) &mut d, options(nostack, preserves_flags)) };
    d
}

/// Reads IDTR.
#[inline(always)]
pub fn sidt() -> DescriptorTable {
    let mut d = DescriptorTable::default();
    // SAFETY: SIDT stores 10 bytes into `d`, which is exactly that large.
    unsafe { core::arch::asm!("sidt [{}]", in(reg) &mut d, options(nostack, preserves_flags)) };
    d
}

/// Loads GDTR.
///
/// # Safety
/// `d` must describe a valid GDT that stays alive while loaded.
#[inline(always)]
pub unsafe fn lgdt(d: &DescriptorTable) {
    // SAFETY: caller's duty.
    unsafe {
        core::arch::asm!("lgdt [{}]", in(reg) d, options(readonly, nostack, preserves_flags))
    };
}

/// Loads IDTR.
///
/// # Safety
/// `d` must describe a valid IDT that stays alive while loaded.
#[inline(always)]
pub unsafe fn lidt(d: &DescriptorTable) {
    // SAFETY: caller's duty.
    unsafe {
        core::arch::asm!("lidt [{}]", in(reg) d, options(readonly, nostack, preserves_flags))
    };
}

macro_rules! read_reg {
    ($(#[$m:meta])* $name:ident, $insn:literal, $ty:ty) => {
        $(#[$m])*
        #[inline(always)]
        pub fn $name() -> $ty {
            let v: $ty;
            // SAFETY: reading this register has no side effects at CPL 0.
            unsafe { core::arch::asm!($insn, out(reg) v, options(nomem, nostack, preserves_flags)) };
            v
        }
    };
}

read_reg!(/// Reads CR0.
    cr0, "mov {}, cr0", u64);
read_reg!(/// Reads CR3.
    cr3, "mov {}, cr3", u64);
read_reg!(/// Reads CR4.
    cr4, "mov {}, cr4", u64);
read_reg!(/// Reads DR7.
    dr7, "mov {}, dr7", u64);
read_reg!(/// Reads CS.
    cs, "mov {:x}, cs", u16);
read_reg!(/// Reads SS.
    ss, "mov {:x}, ss", u16);
read_reg!(/// Reads DS.
    ds, "mov {:x}, ds", u16);
read_reg!(/// Reads ES.
    es, "mov {:x}, es", u16);
read_reg!(/// Reads FS.
    fs, "mov {:x}, fs", u16);
read_reg!(/// Reads GS.
    gs, "mov {:x}, gs", u16);
read_reg!(/// Reads the task register's selector.
    tr, "str {:x}", u16);
read_reg!(/// Reads the LDT selector.
    ldtr, "sldt {:x}", u16);

/// Loads DS, ES and FS (in this order; FS last, since loading it also resets the FS base).
///
/// # Safety
/// Each selector must be null or name a data segment the CPU may load at CPL 0 in the current
/// GDT; the FS base must be rewritten afterwards if it matters.
#[inline(always)]
pub unsafe fn load_data_selectors(ds: u16, es: u16, fs: u16) {
    // SAFETY: caller's duty.
    unsafe {
        core::arch::asm!("mov ds, {0:x}", "mov es, {1:x}", "mov fs, {2:x}",
            in(reg) ds, in(reg) es, in(reg) fs, options(nostack, preserves_flags))
    };
}

/// Reads RFLAGS.
#[inline(always)]
pub fn rflags() -> u64 {
    let v: u64;
    // SAFETY: PUSHFQ/POP only use the stack slot they free again.
    unsafe { core::arch::asm!("pushfq", "pop {}", out(reg) v, options(nomem, preserves_flags)) };
    v
}

/// Writes CR0.
///
/// # Safety
/// The value must keep paging and protection as the running code needs them.
#[inline(always)]
pub unsafe fn write_cr0(v: u64) {
    // SAFETY: caller's duty.
    unsafe { core::arch::asm!("mov cr0, {}", in(reg) v, options(nostack, preserves_flags)) };
}

/// Writes CR3.
///
/// # Safety
/// `v` must map the running code, its stack and its data.
#[inline(always)]
pub unsafe fn write_cr3(v: u64) {
    // SAFETY: caller's duty.
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) v, options(nostack, preserves_flags)) };
}

/// Writes CR4.
///
/// # Safety
/// The value must keep paging and the running code's features enabled.
#[inline(always)]
pub unsafe fn write_cr4(v: u64) {
    // SAFETY: caller's duty.
    unsafe { core::arch::asm!("mov cr4, {}", in(reg) v, options(nostack, preserves_flags)) };
}

/// Writes DR7.
///
/// # Safety
/// Enabling breakpoints changes how the OS's debug handler is entered.
#[inline(always)]
pub unsafe fn write_dr7(v: u64) {
    // SAFETY: caller's duty.
    unsafe { core::arch::asm!("mov dr7, {}", in(reg) v, options(nomem, nostack, preserves_flags)) };
}

/// Reads an MSR.
///
/// # Safety
/// The MSR must exist on this CPU (else #GP).
#[inline(always)]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: caller's duty.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi,
            options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes an MSR.
///
/// # Safety
/// The MSR must exist and the value must be valid and harmless to the running OS.
#[inline(always)]
pub unsafe fn wrmsr(msr: u32, v: u64) {
    // SAFETY: caller's duty.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32,
            options(nomem, nostack, preserves_flags))
    };
}

/// Reads the time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the counter (CR4.TSD does not apply at CPL 0).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// CPUID leaf/subleaf → (eax, ebx, ecx, edx).
#[inline(always)]
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Writes XCR `index`.
///
/// # Safety
/// The value must have been validated against CPUID leaf 0xD (else #GP).
#[inline(always)]
pub unsafe fn xsetbv(index: u32, v: u64) {
    // SAFETY: caller's duty.
    unsafe {
        core::arch::asm!("xsetbv", in("ecx") index, in("eax") v as u32, in("edx") (v >> 32) as u32,
            options(nomem, nostack, preserves_flags))
    };
}

/// Writes back and invalidates caches (what INVD is emulated as: never drop dirty lines).
#[inline(always)]
pub fn wbinvd() {
    // SAFETY: WBINVD only flushes caches; no memory changes meaning.
    unsafe { core::arch::asm!("wbinvd", options(nostack, preserves_flags)) };
}

read_reg!(/// Reads DR0.
    dr0, "mov {}, dr0", u64);
read_reg!(/// Reads DR1.
    dr1, "mov {}, dr1", u64);
read_reg!(/// Reads DR2.
    dr2, "mov {}, dr2", u64);
read_reg!(/// Reads DR3.
    dr3, "mov {}, dr3", u64);
read_reg!(/// Reads DR6.
    dr6, "mov {}, dr6", u64);

/// Reads debug register `n` (0–3 or 6; any other number reads DR6).
#[inline(always)]
pub fn read_dr(n: u8) -> u64 {
    match n {
        0 => dr0(),
        1 => dr1(),
        2 => dr2(),
        3 => dr3(),
        _ => dr6(),
    }
}

macro_rules! write_dr_n {
    ($name:ident, $insn:literal) => {
        /// Writes one debug register.
        ///
        /// # Safety
        /// As [`write_dr`].
        #[inline(always)]
        unsafe fn $name(v: u64) {
            // SAFETY: caller's duty.
            unsafe { core::arch::asm!($insn, in(reg) v, options(nomem, nostack, preserves_flags)) };
        }
    };
}
write_dr_n!(write_dr0, "mov dr0, {}");
write_dr_n!(write_dr1, "mov dr1, {}");
write_dr_n!(write_dr2, "mov dr2, {}");
write_dr_n!(write_dr3, "mov dr3, {}");
write_dr_n!(write_dr6, "mov dr6, {}");

/// Writes debug register `n` (0–3 or 6; any other number writes DR6).
///
/// # Safety
/// For DR6, bits 63:32 must be clear (else #GP). A breakpoint address only matters once DR7
/// enables it: the caller owns that decision.
#[inline(always)]
pub unsafe fn write_dr(n: u8, v: u64) {
    match n {
        // SAFETY: caller's duty.
        0 => unsafe { write_dr0(v) },
        // SAFETY: caller's duty.
        1 => unsafe { write_dr1(v) },
        // SAFETY: caller's duty.
        2 => unsafe { write_dr2(v) },
        // SAFETY: caller's duty.
        3 => unsafe { write_dr3(v) },
        // SAFETY: caller's duty.
        _ => unsafe { write_dr6(v) },
    }
}

/// VERW with a memory operand: on a CPU that enumerates MD_CLEAR it also overwrites the CPU's
/// internal buffers (Intel, "Deep Dive: Intel Analysis of Microarchitectural Data Sampling").
/// `selector` should name a writable data segment (the kernel's SS) for the fast path.
#[inline(always)]
pub fn verw(selector: u16) {
    let s = selector;
    // SAFETY: VERW only reads its 16-bit operand (a local) and sets ZF; it writes no memory.
    unsafe { core::arch::asm!("verw word ptr [{}]", in(reg) &s, options(readonly, nostack)) };
}
