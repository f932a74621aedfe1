//! x86_64 specifics: guest memory layout, CPUID and MSR policy, boot-time
//! register state, ACPI tables.
pub mod acpi;
pub mod cpuid;
pub mod layout;
pub mod msr;
pub mod pvm_assist;
pub mod regs;
pub mod state;
