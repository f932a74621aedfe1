#!/usr/bin/env python3
"""Live migration with a passthrough device that moves along (VFIO migration
v2), ffmk-vmm beside QEMU, in the lab (started by ci/bench-vfio-migration).

Runs inside L1 (the backports kernel, with the mtty sample driver loaded
from MTTY_MODULE). Each round migrates the probe guest (task=counter,
256 MiB) over loopback, in turn:
  - ffmk-vmm without a device, and with an mtty device (--device
    vfio=/sys/bus/mdev/devices/A; the destination gets B);
  - QEMU (q35, -accel kvm) without a device, and with the same mtty
    devices (-device vfio-pci,sysfsdev=...; QEMU 10 migrates them with
    VFIO migration v2).
Downtime as each VMM reports it (ffmk-vmm's `downtime_ms`: pause to the
destination running; QEMU's `downtime`), the part of ours that QEMU's
counts (pause to the last byte sent), and the total time. Everything is
nested under TCG: compare the VMMs and with/without (ratios), never the
absolute figures with hardware.
"""
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchlib import FFMK, PROBE, ensure_cluster_key, qemu_migrate, wait_counter  # noqa: E402

RUNS = int(os.environ.get("RUNS", "5"))
MEM = 256
TYPES = "/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2"
UUIDS = ["d1b2c3d4-0000-4000-8000-00000000000a", "d1b2c3d4-0000-4000-8000-00000000000b"]
TASK = "task=counter hz=20"


def mdevs():
    if not os.path.exists(TYPES):
        subprocess.run(["insmod", os.environ["MTTY_MODULE"]], check=True)
    for u in UUIDS:
        if not os.path.exists(f"/sys/bus/mdev/devices/{u}"):
            with open(f"{TYPES}/create", "w") as f:
                f.write(u)
    return [f"/sys/bus/mdev/devices/{u}" for u in UUIDS]


def ffmk(work, port, devices):
    src_sock, dst_sock = f"{work}/src.sock", f"{work}/dst.sock"
    dev = lambda i: ["--device", f"vfio={devices[i]}"] if devices else []
    dst = subprocess.Popen([FFMK, "run", "--incoming", f"tcp://127.0.0.1:{port}", "--memory",
                            f"{MEM}M", "--console", "none", "--api-socket", dst_sock, *dev(1)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in dst.stderr:
        if "waiting for a migration" in line:
            break
    src = subprocess.Popen([FFMK, "run", "--kernel", PROBE, "--cmdline", TASK, "--memory",
                            f"{MEM}M", "--api-socket", src_sock, *dev(0)],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        wait_counter(src, 10)
        out = subprocess.run([FFMK, "migrate", "--api-socket", src_sock, "--to",
                              f"tcp://127.0.0.1:{port}", "--json"],
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            sys.stderr.write(f"ffmk-vmm migration failed: {out.stderr}\n")
            return None
        o = json.loads(out.stdout.strip().splitlines()[-1])
        sw = o.get("switch_over")
        # What QEMU's `downtime` counts: from the pause until the source has
        # sent the last byte (our STATE), without the destination's load
        # and start.
        sent = sw["pause_ms"] + sw["last_pages_ms"] + sw["state_ms"] if sw else o["downtime_ms"]
        return {"downtime_ms": o["downtime_ms"], "sent_ms": sent, "total_s": o["total_ms"] / 1e3}
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()


def qemu_cmd(qsock, devices, i, *extra):
    a = ["qemu-system-x86_64", "-M", "q35", "-accel", "kvm", "-cpu", "host", "-m", f"{MEM}M",
         "-nographic", "-nodefaults", "-no-user-config", "-serial", "stdio",
         "-kernel", PROBE, "-append", TASK, "-qmp", f"unix:{qsock},server=on,wait=off", *extra]
    if devices:
        # mtty offers device DMA logging but fails its report (EOPNOTSUPP),
        # which stops QEMU's RAM setup: take the container's dirty tracking
        # (type1: every pinned page dirty) instead; QEMU migrates a device
        # without dirty tracking only when told to (enable-migration=on).
        a += ["-device", f"vfio-pci,sysfsdev={devices[i]},x-device-dirty-page-tracking=off,enable-migration=on"]
    return a


def qemu(work, port, devices):
    ssock, dsock = f"{work}/qsrc.sock", f"{work}/qdst.sock"
    dst = subprocess.Popen(qemu_cmd(dsock, devices, 1, "-incoming", f"tcp:127.0.0.1:{port}"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    src = subprocess.Popen(qemu_cmd(ssock, devices, 0), stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
    try:
        wait_counter(src, 10)
        st = qemu_migrate(ssock, f"tcp:127.0.0.1:{port}")
        if st is None or st["status"] != "completed":
            sys.stderr.write(f"QEMU migration failed: {st and st.get('error-desc', '')}\n")
            return None
        return {"downtime_ms": float(st.get("downtime", 0)),
                "sent_ms": float(st.get("downtime", 0)),
                "total_s": float(st.get("total-time", 0)) / 1e3}
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()


def med(v):
    return f"{statistics.median(v):8.1f} [{min(v):.1f}-{max(v):.1f}]" if v else "  failed"


def main():
    out_path = sys.argv[1]
    devices = mdevs()
    work = f"/tmp/bench-vfio-migration-{os.getpid()}"
    os.makedirs(work, exist_ok=True)
    ensure_cluster_key(work)
    cases = [("ffmk-vmm", ffmk, None), ("ffmk-vmm + mtty", ffmk, devices),
             ("QEMU", qemu, None), ("QEMU + mtty", qemu, devices)]
    results = {name: [] for name, _, _ in cases}
    port = 7600
    # A warm-up of each: L0 backs L1's memory on first touch.
    for name, f, devs in cases:
        port += 1
        f(work, port, devs)
    for r in range(RUNS):
        for name, f, devs in cases:
            port += 1
            res = f(work, port, devs)
            if res:
                results[name].append(res)
            sys.stderr.write(f"round {r + 1} {name}: {res}\n")
    print(f"{'':18} {'downtime ms':>24} {'QEMU-counted ms':>24} {'total s':>22}"
          f"   (medians [min-max] of {RUNS})")
    for name, _, _ in cases:
        v = results[name]
        print(f"{name:18} {med([x['downtime_ms'] for x in v]):>24} "
              f"{med([x['sent_ms'] for x in v]):>24} {med([x['total_s'] for x in v]):>22}")
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
