//! x86 shapes and the instructions the x86 crate lacks. No policy, no state.
pub mod apic;
pub mod debug;
pub mod gdt;
pub mod idt;
pub mod msr;
pub mod regs;
