//! The typed contracts between the programs of this project.
//!
//! noded and nodectl (crate `node`) and the launcher (crate `launcher`) are separate
//! programs; what crosses between them is defined here once, and both ends use it.

pub mod http;
