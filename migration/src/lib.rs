//! Pre-copy live migration of a VM between launcher processes.
//!
//! - [`protocol`]: the wire protocol (messages, versions, state machines);
//! - [`frame`]: framing, bounds and checksums, zero-copy memory frames;
//! - [`transport`]: `unix:`/`tcp:` URIs, streams, bandwidth limit, fd passing;
//! - [`tls`]: TLS with mutual certificates for `tcp:` (rustls);
//! - [`dirty`]: dirty page bitmaps;
//! - [`policy`]: the switch-over decision and auto-converge.
//!
//! The wire format is described for readers in `docs/wire-protocol.md`.

pub mod boost;
pub mod dirty;
pub mod frame;
pub mod policy;
pub mod protocol;
pub mod receiver;
pub mod report;
pub mod sender;
pub mod tls;
pub mod transport;
