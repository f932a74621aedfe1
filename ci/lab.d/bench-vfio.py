#!/usr/bin/env python3
"""VFIO passthrough: ffmk-vmm vs QEMU's vfio-pci on the same device, in the lab.

Runs inside L1 of ci/lab (started by ci/bench-vfio), where QEMU's edu device
(0000:00:05.0) sits behind intel-iommu. Each round runs, in turn:
  - the probe (task=edu msi=0 rounds=N) under ffmk-vmm with the BAR mapped
    into the guest and with every access trapped (mmap=off), and under QEMU
    (q35, -device vfio-pci) mapped and trapped (x-no-mmap=on): the median
    nanoseconds of one 32-bit BAR read, measured in the guest;
  - ffmk-vmm with MSI (task=edu rounds=N): the median microseconds from the
    guest's write that makes the device raise an interrupt to the guest's
    handler counting it;
  - start -> first ring-3 output for guests of 1, 2 and 4 GiB (SIZES) with and without
    the device, ffmk-vmm and QEMU, with and without 2 MiB huge pages: the
    difference is what passing the device through costs at start, almost
    all of it pinning and mapping guest RAM for DMA (ffmk-vmm also logs its
    own DMA-map time).
A warm-up run of each VMM first: L0 backs L1's memory on first touch.
Everything here is nested under TCG: compare the VMMs (ratios), never the
absolute figures with hardware.
"""
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FFMK = os.environ.get("FFMK", os.path.join(ROOT, "target/release/ffmk-vmm"))
PROBE = os.path.join(ROOT, "guest-images/out/probe.elf")
DEV = "0000:00:05.0"
OUT = sys.argv[1] if len(sys.argv) > 1 else "/tmp/bench-vfio.json"
RUNS = int(os.environ.get("RUNS", "5"))
ROUNDS = int(os.environ.get("ROUNDS", "64"))
# Guest sizes for the start-up and DMA-map runs (L1 has 8 GiB; a 4 GiB
# guest pins half of it).
SIZES = os.environ.get("SIZES", "1G,2G,4G").split(",")


def ffmk(task, mem="128M", device=True, mmap=True, huge=False):
    a = [FFMK, "--log-level", "info", "run", "--kernel", PROBE, "--cmdline", task,
         "--memory", mem, "--test-exit-port"]
    if device:
        a += ["--device", f"vfio={DEV}" + ("" if mmap else ",mmap=off")]
    if huge:
        a += ["--hugepages"]
    return a


def qemu(task, mem="128M", device=True, mmap=True, huge=False):
    a = ["qemu-system-x86_64", "-M", "q35", "-accel", "kvm", "-cpu", "host",
         "-m", mem, "-nographic", "-nodefaults", "-no-user-config", "-serial", "stdio",
         "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=1",
         "-kernel", PROBE, "-append", task]
    if device:
        a += ["-device", f"vfio-pci,host={DEV}" + ("" if mmap else ",x-no-mmap=on")]
    if huge:
        a += ["-mem-path", "/dev/hugepages", "-mem-prealloc"]
    return a


def run(argv, want_rc):
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = b""
    ring3 = None
    while True:
        c = os.read(p.stdout.fileno(), 65536)
        if not c:
            break
        out += c
        if ring3 is None and b"probe=ring3" in out:
            ring3 = time.monotonic() - t0
    err = p.stderr.read().decode(errors="replace")
    rc = p.wait()
    text = out.decode(errors="replace")
    if rc != want_rc or ring3 is None:
        sys.exit(f"bench-vfio: failed (exit {rc}): {' '.join(argv)}\n{text}\n{err}")
    vals = dict(re.findall(r"^(\w+)=(\S+)", text, re.M))
    m = re.search(r"DMA map of (\d+) MiB of guest RAM took (\d+) ms", err)
    if m:
        vals["dma_map_ms"] = m.group(2)
    vals["ring3_ms"] = ring3 * 1e3
    return vals


def main():
    subprocess.run([FFMK, "vfio", "bind", DEV], check=True)
    os.makedirs("/dev/hugepages", exist_ok=True)
    subprocess.run(["mount", "-t", "hugetlbfs", "none", "/dev/hugepages"], check=False)

    def set_huge(pages):
        """Reserves `pages` 2 MiB huge pages (0: none); returns how many L1 gave."""
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(str(pages))
        with open("/proc/sys/vm/nr_hugepages") as f:
            return int(f.read())

    res = {}

    def add(k, v):
        res.setdefault(k, []).append(float(v))

    task = f"task=edu msi=0 rounds={ROUNDS}"
    # Warm-up: L1's memory is backed by L0 (QEMU TCG) on first touch, which
    # costs seconds per GiB once; whichever VMM ran first would pay it.
    for mem in SIZES:
        for vmm, mk, rc in (("ffmk-vmm", ffmk, 0), ("qemu", qemu, 1)):
            run(mk("task=hello", mem=mem, device=True), rc)
    for i in range(RUNS):
        for vmm, mk, rc in (("ffmk-vmm", ffmk, 0), ("qemu", qemu, 1)):
            for mapped in (True, False):
                v = run(mk(task, mmap=mapped), rc)
                add(f"{vmm} {'mapped' if mapped else 'trapped'} mmio_read_ns",
                    v["edu_mmio_read_ns"])
        v = run(ffmk(f"task=edu rounds={ROUNDS}"), 0)
        add("ffmk-vmm msi_latency_us", v["edu_msi_latency_us"])
        for mem in SIZES:
            gib = int(mem[:-1])
            for huge in (False, True):
                # Huge pages only while they are used: L1 has 8 GiB, and
                # a 4 GiB guest cannot have 4 GiB of them reserved beside it.
                if huge and set_huge(gib * 512 + 64) < gib * 512 + 8:
                    print(f"bench-vfio: L1 has too few huge pages for {mem}; skipped", flush=True)
                    set_huge(0)
                    continue
                for vmm, mk, rc in (("ffmk-vmm", ffmk, 0), ("qemu", qemu, 1)):
                    kind = f"{mem}{' hugepages' if huge else ''}"
                    without = run(mk("task=hello", mem=mem, device=False, huge=huge), rc)
                    with_dev = run(mk("task=hello", mem=mem, device=True, huge=huge), rc)
                    add(f"{vmm} {kind} start_ms", without["ring3_ms"])
                    add(f"{vmm} {kind} start_with_device_ms", with_dev["ring3_ms"])
                    if "dma_map_ms" in with_dev:
                        add(f"{vmm} {kind} own_dma_map_ms", with_dev["dma_map_ms"])
                if huge:
                    set_huge(0)
        print(f"bench-vfio: round {i + 1}/{RUNS} done", flush=True)
    summary = {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
               for k, v in res.items()}
    with open(OUT, "w") as f:
        json.dump({"runs": RUNS, "rounds": ROUNDS, "results": summary}, f, indent=1)
    for k, s in summary.items():
        print(f"{k:45s} {s['median']:10.1f}  [{s['min']:.1f}-{s['max']:.1f}]")


main()
