//! Confinement of the ffmk-vmm process.
//!
//! - [`seccomp`]: one system-call allow list per kind of thread (vCPU, I/O,
//!   API, control, migration, post-copy, placement), compiled to BPF with
//!   `seccompiler` and installed by the thread itself before it touches
//!   anything the guest or a client controls. A call outside the list stops
//!   the VMM with one line naming the thread and the call (`on`), is only
//!   logged by the kernel (`log`), or filters are not installed (`off`).
//! - [`landlock`]: the file system the process may reach after start-up,
//!   limited to the paths its configuration names.

pub mod landlock;
mod names;
pub mod seccomp;

pub use names::name as syscall_name;
pub use seccomp::{Mode, ThreadKind};
