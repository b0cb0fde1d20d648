//! The local APIC in xAPIC mode (MMIO at 0xFEE0_0000, the address Bochs's BIOS leaves it at).
//!
//! **Runs in:** anywhere at CPL 0, VMX root included (same identity mapping).

/// Virtual (= physical) base of the xAPIC register page.
pub const XAPIC_BASE: usize = 0xFEE0_0000;

const ID: usize = 0x20;
const TPR: usize = 0x80;
const EOI: usize = 0xB0;
const SVR: usize = 0xF0;
const ISR0: usize = 0x100;
const IRR0: usize = 0x200;
const ICR_LO: usize = 0x300;
const ICR_HI: usize = 0x310;
const LVT_TIMER: usize = 0x320;
const TIMER_INITIAL: usize = 0x380;
const TIMER_DIVIDE: usize = 0x3E0;

/// SVR bit 8: APIC software enable.
const SVR_ENABLE: u32 = 1 << 8;
/// ICR delivery status: send pending.
const ICR_BUSY: u32 = 1 << 12;
/// ICR destination shorthand "self".
const ICR_SELF: u32 = 1 << 18;
/// ICR destination shorthand "all excluding self".
const ICR_ALL_BUT_SELF: u32 = 3 << 18;
/// ICR level assert (needed for INIT).
const ICR_ASSERT: u32 = 1 << 14;
const ICR_INIT: u32 = 5 << 8;
const ICR_STARTUP: u32 = 6 << 8;
/// LVT mask bit.
const LVT_MASKED: u32 = 1 << 16;
/// Timer divide configuration value for "divide by 1": one count per TSC tick under Bochs.
const DIVIDE_BY_1: u32 = 0xB;

/// The spurious-interrupt vector (no EOI for it).
pub const SPURIOUS_VECTOR: u8 = 0xFF;

fn read(reg: usize) -> u32 {
    // SAFETY: the xAPIC page is identity-mapped uncached (boot.rs) and `reg` is a register offset.
    unsafe { core::ptr::read_volatile((XAPIC_BASE + reg) as *const u32) }
}

fn write(reg: usize, value: u32) {
    // SAFETY: as in `read`; every caller writes a register with an architected meaning.
    unsafe { core::ptr::write_volatile((XAPIC_BASE + reg) as *mut u32, value) }
}

/// This CPU's APIC ID.
pub fn id() -> u32 {
    read(ID) >> 24
}

/// Software-enables the APIC with TPR 0 (CR8 is the priority we use).
pub fn enable() {
    write(TPR, 0);
    write(SVR, SVR_ENABLE | u32::from(SPURIOUS_VECTOR));
    write(LVT_TIMER, LVT_MASKED);
}

/// End of interrupt for the highest in-service vector.
pub fn eoi() {
    write(EOI, 0);
}

/// 256-bit in-service register.
pub fn isr() -> [u32; 8] {
    core::array::from_fn(|i| read(ISR0 + i * 0x10))
}

/// 256-bit interrupt-request register.
pub fn irr() -> [u32; 8] {
    core::array::from_fn(|i| read(IRR0 + i * 0x10))
}

fn wait_icr() {
    let mut n = 0;
    while read(ICR_LO) & ICR_BUSY != 0 && n < 1_000_000 {
        n += 1;
        core::hint::spin_loop();
    }
}

/// Fixed self-IPI.
pub fn self_ipi(vector: u8) {
    write(ICR_LO, ICR_SELF | u32::from(vector));
    wait_icr();
}

/// Fixed IPI to the APIC with ID `dest`.
pub fn ipi(dest: u32, vector: u8) {
    write(ICR_HI, dest << 24);
    write(ICR_LO, u32::from(vector));
    wait_icr();
}

/// INIT then two SIPIs to every other CPU (Intel MP spec order). `spin` waits TSC ticks.
pub fn start_aps(sipi_page: u8, spin: fn(u64)) {
    write(ICR_LO, ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_INIT);
    wait_icr();
    spin(1_000_000);
    for _ in 0..2 {
        write(
            ICR_LO,
            ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | u32::from(sipi_page),
        );
        wait_icr();
        spin(200_000);
    }
}

/// Arms the one-shot timer: `vector` fires once, `ticks` TSC ticks from now.
pub fn timer_one_shot(vector: u8, ticks: u32) {
    write(TIMER_DIVIDE, DIVIDE_BY_1);
    write(LVT_TIMER, u32::from(vector));
    write(TIMER_INITIAL, ticks.max(1));
}
