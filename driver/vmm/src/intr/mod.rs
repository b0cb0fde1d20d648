//! Interrupt modes, delivery policy and the external-interrupt exit path.
mod mode;
pub use mode::Mode;
