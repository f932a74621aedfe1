"""The -cpu the host-side benchmarks give QEMU (imported by ci/bench-*).

On a PVM-backed KVM host (docs/pvm-hosts.md) IA32_ARCH_CAPABILITIES (MSR
0x10a) cannot be written, and QEMU 7.2 aborts at start when its CPU model
has it ("failed to set MSR 0x10a"), as `-cpu host` does on hosts whose CPU
reports it. ffmk-vmm's pvm CPU profile hides it too, so both VMMs show
their guests the same thing.
"""
import os

CPU = "host,-arch-capabilities" if os.path.exists("/sys/module/kvm_pvm") else "host"

# QEMU's microvm firmware for the benchmarks: qboot, QEMU's fast one.
# QEMU 10's default microvm firmware (SeaBIOS) runs about 2.9 s of ring-0
# code before the kernel on a PVM host (docs/perf.md, boot); with qboot
# QEMU starts as QEMU 7.2 did. Empty where qemu-system-data has no qboot.
QBOOT = "/usr/share/qemu/qboot.rom"
MICROVM_BIOS = ["-bios", QBOOT] if os.path.exists(QBOOT) else []
