//! The VM-exit side: the stub, the dispatcher and the handlers.
pub mod hypercall;
