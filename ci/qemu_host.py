"""The -cpu the host-side benchmarks give QEMU (imported by ci/bench-*).

On a PVM-backed KVM host (docs/pvm-hosts.md) IA32_ARCH_CAPABILITIES (MSR
0x10a) cannot be written, and QEMU 7.2 aborts at start when its CPU model
has it ("failed to set MSR 0x10a"), as `-cpu host` does on hosts whose CPU
reports it. ffmk-vmm's pvm CPU profile hides it too, so both VMMs show
their guests the same thing.
"""
import os

CPU = "host,-arch-capabilities" if os.path.exists("/sys/module/kvm_pvm") else "host"
