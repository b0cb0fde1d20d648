//! x86 shapes and the instructions the x86 crate lacks. No policy, no state.
pub mod regs;
