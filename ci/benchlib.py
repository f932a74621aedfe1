"""What the ci/ benchmarks share: where ffmk-vmm and the probe guest are,
reading a guest's console, QMP, the two network namespaces that stand for
two hosts, the cluster key, the checkpoint endpoint, and one live
migration of the probe guest with ffmk-vmm and with QEMU.

Benchmarks import it (`from benchlib import ...`; Python puts the script's
own directory, ci/, on the path) and never each other.
"""
import json
import os
import socket
import subprocess
import sys
import time

from qemu_host import CPU as QEMU_CPU, MICROVM_BIOS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(ROOT, "guest-images", "out", "probe.elf")
FFMK = os.path.join(ROOT, "target", "release", "ffmk-vmm")


# ----- guests and QMP -----

def wait_line(proc, prefix, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"VM ended before '{prefix}'")
        if line.startswith(prefix):
            return line
    raise RuntimeError(f"no '{prefix}' within {timeout}s")


def wait_counter(proc, n):
    while True:
        line = wait_line(proc, "counter=")
        try:
            if int(line.strip().split("=")[1]) >= n:
                return
        except ValueError:
            pass


def qmp(sock_path):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(200):
        try:
            s.connect(sock_path)
            break
        except OSError:
            time.sleep(0.02)
    f = s.makefile("rw")
    f.readline()  # greeting

    def call(cmd, args=None):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        f.write(json.dumps(msg) + "\n")
        f.flush()
        while True:
            resp = json.loads(f.readline())
            if "return" in resp or "error" in resp:
                return resp
    call("qmp_capabilities")
    return s, call


# ----- two hosts: network namespaces, the cluster key, the checkpoint endpoint -----

NS = [f"ffmk-bl{i}-{os.getpid()}" for i in range(2)]
ADDR = ["10.78.0.1", "10.78.0.2"]


def ensure_cluster_key(work):
    """The cluster key every ffmk-vmm of the run uses (FFMK_CLUSTER_KEY, else a
    fresh one in `work`)."""
    if os.environ.get("FFMK_CLUSTER_KEY"):
        return
    key = os.path.join(work, "cluster.key")
    subprocess.run([FFMK, "key", "generate", key], check=True, capture_output=True)
    os.environ["FFMK_CLUSTER_KEY"] = key


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def netns_up():
    for n in NS:
        sh("ip", "netns", "add", n)
    sh("ip", "-n", NS[0], "link", "add", "v0", "type", "veth", "peer", "name", "v1",
       "netns", NS[1])
    for i, n in enumerate(NS):
        sh("ip", "-n", n, "addr", "add", f"{ADDR[i]}/24", "dev", f"v{i}")
        sh("ip", "-n", n, "link", "set", f"v{i}", "up")
        sh("ip", "-n", n, "link", "set", "lo", "up")


def netns_down():
    for n in NS:
        subprocess.run(["ip", "netns", "del", n], capture_output=True)


def in_ns(i, *cmd):
    return ["ip", "netns", "exec", NS[i], *cmd]


def endpoint(i, port, store):
    p = subprocess.Popen(in_ns(i, FFMK, "checkpoint", "serve", "--listen",
                               f"{ADDR[i]}:{port}", "--dir", store),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    p.stderr.readline()  # "checkpoint endpoint on ..."
    return p


def take(cfg, sock, *flags):
    out = subprocess.run(in_ns(0, FFMK, "checkpoint", "take", "--config", cfg,
                               "--api-socket", sock, "--json", *flags),
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"checkpoint take: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])["checkpoint"]


def level(o, name):
    return next(x for x in o["levels"] if x["level"] == name)


# ----- one live migration of the probe guest -----

PORT = 7400
LIMIT_S = 120


def migration_task(mem, rate):
    return f"task=dirty mib={mem // 4} rate={rate} hz=20"


def migrate_ffmk(mem, rate, work, *extra, plane=()):
    """ffmk-vmm migrates the probe guest dirtying `rate` MiB/s between the
    namespaces; `plane`: cluster-plane flags of both VMMs ([] = the key from
    FFMK_CLUSTER_KEY). None when it fails."""
    sock = os.path.join(work, "src.sock")
    dsock = os.path.join(work, "dst.sock")
    dst = subprocess.Popen(in_ns(1, FFMK, "run", "--incoming", f"tcp://{ADDR[1]}:{PORT}",
                                 "--memory", f"{mem}M", "--console", "none",
                                 "--api-socket", dsock, *plane),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in dst.stderr:  # "waiting for a migration on ..." (after any warning)
        if "waiting for a migration" in line:
            break
    src = subprocess.Popen(in_ns(0, FFMK, "run", "--kernel", PROBE, "--cmdline",
                                 migration_task(mem, rate), "--memory", f"{mem}M", "--api-socket", sock,
                                 *plane),
                           stdout=subprocess.PIPE,
                           stderr=None if os.environ.get("FFMK_BENCH_TRACE") else subprocess.DEVNULL,
                           text=True)
    try:
        wait_counter(src, 10)
        out = subprocess.run([FFMK, "migrate", "--api-socket", sock, "--to",
                              f"tcp://{ADDR[1]}:{PORT}", "--json", *extra],
                             capture_output=True, text=True, timeout=LIMIT_S)
        if out.returncode != 0:
            return None
        lines = out.stdout.strip().splitlines()
        if os.environ.get("FFMK_BENCH_TRACE"):
            sys.stderr.write("".join(f"    {x}\n" for x in lines))
        o = json.loads(lines[-1])
        sw = o.get("switch_over")
        return {"downtime_ms": o["downtime_ms"], "total_s": o["total_ms"] / 1e3,
                "mib": o["sent_bytes"] / (1 << 20), "rounds": o["rounds"],
                "throttle": o["throttle_pct"], "switch_over": sw,
                # What QEMU's `downtime` counts: from the pause until the
                # source has sent the last byte (our STATE), without the
                # destination's load and start.
                "sent_downtime_ms": (sw["pause_ms"] + sw["last_pages_ms"] + sw["state_ms"]
                                     if sw else o["downtime_ms"])}
    except subprocess.TimeoutExpired:
        return None
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()


def migration_qemu_cmd(mem, rate, qsock, *extra):
    return ["qemu-system-x86_64", *MICROVM_BIOS, "-M", "microvm", "-accel", "kvm",
            "-cpu", QEMU_CPU, "-m", f"{mem}M", "-nographic", "-nodefaults", "-no-user-config",
            "-serial", "stdio", "-kernel", PROBE, "-append", migration_task(mem, rate),
            "-qmp", f"unix:{qsock},server=on,wait=off", *extra]


def qemu_migrate(qsock, uri, auto_converge=False):
    """Migrates the QEMU behind `qsock` to `uri` (50 ms downtime target, no
    bandwidth cap) and waits for the end: the last `query-migrate` answer,
    or None when QEMU refused to start or it ran past LIMIT_S (cancelled)."""
    s, call = qmp(qsock)
    try:
        if auto_converge:
            call("migrate-set-capabilities",
                 {"capabilities": [{"capability": "auto-converge", "state": True}]})
        call("migrate-set-parameters", {"max-bandwidth": 100 << 30, "downtime-limit": 50})
        r = call("migrate", {"uri": uri})
        if "error" in r:
            sys.stderr.write(f"QEMU refused the migration: {r['error']}\n")
            return None
        deadline = time.time() + LIMIT_S
        while True:
            st = call("query-migrate")["return"]
            if st.get("status") in ("completed", "failed", "cancelled"):
                return st
            if time.time() > deadline:
                call("migrate_cancel")
                return None
            time.sleep(0.01)
    finally:
        s.close()


def migrate_qemu(mem, rate, work):
    """QEMU migrates the same guest over the same link (auto-converge, 50 ms
    downtime target). None when it fails."""
    ssock = os.path.join(work, "qsrc.sock")
    dsock = os.path.join(work, "qdst.sock")
    dst = subprocess.Popen(in_ns(1, *migration_qemu_cmd(mem, rate, dsock, "-incoming",
                                              f"tcp:{ADDR[1]}:{PORT + 1}")),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    src = subprocess.Popen(in_ns(0, *migration_qemu_cmd(mem, rate, ssock)), stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
    try:
        wait_counter(src, 10)
        st = qemu_migrate(ssock, f"tcp:{ADDR[1]}:{PORT + 1}", auto_converge=True)
        if st is None or st["status"] != "completed":
            return None
        ram = st.get("ram", {})
        return {"downtime_ms": float(st.get("downtime", 0)),
                "total_s": float(st.get("total-time", 0)) / 1e3,
                "mib": ram.get("transferred", 0) / (1 << 20)}
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()
