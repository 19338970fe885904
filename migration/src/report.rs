//! The migration report: what `launcher migrate` prints and noded records. The types
//! live in the `contracts` crate, shared with noded; the sender fills them in.

pub use contracts::report::{Outcome, Progress, Report, SwitchOverTimes, Verdict};
