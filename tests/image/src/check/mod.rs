//! The image check.
