//! Save and restore of live objects through plain serde state structs.
//!
//! As in Firecracker, every live object that has state to carry across a
//! snapshot or a migration implements [`Persist`]: `save` produces a plain data
//! struct (serde, no file descriptors, no pointers) and `restore` rebuilds the
//! live object from it plus whatever non-serialisable context it needs.

/// Save/restore of a live object through a plain state struct.
pub trait Persist: Sized {
    /// The plain, serialisable state.
    type State;
    /// What `restore` needs besides the state (file descriptors, memory, a VM handle).
    type ConstructorArgs;
    /// The error `restore` can return.
    type Error;

    /// Capture the state. The caller guarantees the object is quiescent (vCPUs paused).
    fn save(&self) -> Self::State;
    /// Rebuild the live object.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
