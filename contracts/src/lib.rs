//! The typed contracts between the programs of this project.
//!
//! noded and nodectl (crate `node`) and the launcher (crate `launcher`) are separate
//! programs; what crosses between them is defined here once, and both ends use it:
//! the launcher's control API ([`launcher`]), the migration report ([`report`]), the
//! launcher's command line ([`launch`]), the limits of a VM ([`limits`]) and the bounded
//! HTTP/1.1 they travel in ([`http`]), and the one size grammar ([`quantity`]). Every
//! wire type is camelCase and refuses unknown fields.

pub mod http;
pub mod launch;
pub mod launcher;
pub mod limits;
pub mod quantity;
pub mod report;
