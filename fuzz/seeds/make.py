#!/usr/bin/env python3
"""Writes the hand-made seeds of every fuzz target into fuzz/corpus/<target>/
(well-formed inputs in each harness's format; the fuzzer mutates from
there). The snapshot seeds come from a real snapshot directory (a probe VM's,
see docs/security.md); give it with --snapshot DIR.

    fuzz/seeds/make.py --snapshot /tmp/seedsnap
"""
import argparse, json, os, struct, zlib

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "corpus")

def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)

# --- virtio_chains: device, flags, descriptor table, avail ring, buffers.
NEXT, WRITE = 1, 2
DATA = 0x4000

def chains(device, descs, buffers=b"", event_idx=0, tail=b""):
    table = b"".join(struct.pack("<QIHH", a, l, f, n) for a, l, f, n in descs)
    table = table.ljust(256, b"\0")
    avail = struct.pack("<HH", 0, 1) + struct.pack("<H", 0) + b"\0" * 32 + b"\0\0"
    mem = buffers.ljust(0x10000 - DATA, b"\0") if tail else buffers
    return bytes([device, event_idx]) + table + avail + mem + tail

def blk_header(kind, sector):
    return struct.pack("<IIQ", kind, 0, sector)

def virtio_seeds():
    # block: read, write, flush, get id, discard (header, data, status).
    put("virtio_chains", "blk-read", chains(0, [(DATA, 16, NEXT, 1), (DATA + 0x100, 512, NEXT | WRITE, 2), (DATA + 0x400, 1, WRITE, 0)], blk_header(0, 1)))
    put("virtio_chains", "blk-write", chains(0, [(DATA, 16, NEXT, 1), (DATA + 0x100, 1024, NEXT, 2), (DATA + 0x600, 1, WRITE, 0)], blk_header(1, 3).ljust(0x100, b"\0") + b"\xab" * 1024))
    put("virtio_chains", "blk-flush", chains(0, [(DATA, 16, NEXT, 1), (DATA + 0x400, 1, WRITE, 0)], blk_header(4, 0)))
    put("virtio_chains", "blk-getid", chains(0, [(DATA, 16, NEXT, 1), (DATA + 0x100, 20, NEXT | WRITE, 2), (DATA + 0x400, 1, WRITE, 0)], blk_header(8, 0)))
    seg = struct.pack("<QII", 2, 4, 0)
    put("virtio_chains", "blk-discard", chains(0, [(DATA, 16, NEXT, 1), (DATA + 0x100, 16, NEXT, 2), (DATA + 0x400, 1, WRITE, 0)], blk_header(11, 0).ljust(0x100, b"\0") + seg, event_idx=1))
    # indirect table (flag 4) holding the three descriptors of a read
    ind = b"".join(struct.pack("<QIHH", a, l, f, n) for a, l, f, n in [(DATA, 16, NEXT, 1), (DATA + 0x100, 512, NEXT | WRITE, 2), (DATA + 0x400, 1, WRITE, 0)])
    put("virtio_chains", "blk-indirect", chains(0, [(DATA + 0x800, 48, 4, 0)], blk_header(0, 0).ljust(0x800, b"\0") + ind))
    # net transmit: 12-byte header + an Ethernet frame
    frame = b"\0" * 12 + b"\xff" * 6 + b"\x52\x54\0\x12\x34\x56" + b"\x08\x06" + b"\0" * 28
    put("virtio_chains", "net-tx", chains(1, [(DATA, len(frame), 0, 0)], frame))
    put("virtio_chains", "net-rx", chains(2, [(DATA, 2048, WRITE, 0)], tail=frame))
    put("virtio_chains", "net-rx-mergeable", chains(3, [(DATA, 32, WRITE, 0)], tail=frame))
    # vsock: a REQUEST (op 1) from guest port 1024 to host port 5000, then a RW with payload
    hdr = struct.pack("<QQIIIHHIII", 3, 2, 1024, 5000, 0, 1, 1, 0, 65536, 0)
    put("virtio_chains", "vsock-request", chains(4, [(DATA, 44, 0, 0)], hdr))
    rw = struct.pack("<QQIIIHHIII", 3, 2, 1024, 5000, 5, 1, 5, 0, 65536, 0) + b"hello"
    put("virtio_chains", "vsock-rw", chains(4, [(DATA, 44, NEXT, 1), (DATA + 0x100, 5, 0, 0)], rw[:44].ljust(0x100, b"\0") + b"hello"))
    put("virtio_chains", "console", chains(5, [(DATA, 13, 0, 0)], b"hello, world\n"))
    put("virtio_chains", "rng", chains(6, [(DATA, 64, WRITE, 0)]))
    # vsock receive: a 144-byte writable chain for a 200-byte packet from the host
    put("virtio_chains", "vsock-rx", chains(7, [(DATA, 144, WRITE, 0)], tail=b"from the host " * 15))

# --- pci_virtio: device kind, then operations (see the target).
def pci_seeds():
    for kind, name in [(0, "rng"), (1, "blk"), (2, "console"), (3, "vsock")]:
        ops = bytearray([kind])
        # bring-up: 4 mask bytes, features (select 0, select 1 = VERSION_1),
        # config vector, queue count, per queue size/vector/base.
        ops += bytes([7]) + b"\0\0\0\0" + struct.pack("<II", 0, 1) + b"\0" + bytes([2])
        for q, base in [(0, 0x1000), (1, 0x2000), (2, 0x3000)]:
            ops += struct.pack("<HBH", 16, q + 1, base)
        # a descriptor for queue 0 (64 writable bytes at 0x8000), avail idx 1
        ops += bytes([4 | 0x30]) + struct.pack("<H", 0x1000) + struct.pack("<QIHH", 0x8000, 64, 2, 0)[:8]
        ops += bytes([4 | 0x30]) + struct.pack("<H", 0x1008) + struct.pack("<IHH", 64, 2, 0)
        ops += bytes([4 | 0x30]) + struct.pack("<H", 0x1800) + struct.pack("<HHHH", 0, 1, 0, 0)
        ops += bytes([8, 0])           # notify queue 0
        ops += bytes([3 | 0x20]) + struct.pack("<H", 0x14)   # read status
        ops += bytes([3 | 0x20]) + struct.pack("<H", 0x1000)  # read ISR
        ops += bytes([1 | 0x20, 1, 0x00])                   # vendor/device id
        ops += bytes([10])                                  # config changed
        ops += bytes([2]) + struct.pack("<H", 0x14) + b"\0" * 8  # reset
        put("pci_virtio", name, bytes(ops))

# --- migration: records of (kind, u16 length, payload).
def rec(kind, payload=b""):
    return bytes([kind]) + struct.pack("<H", len(payload)) + payload

def hello(postcopy):
    return json.dumps({
        "state_version": 2, "memory_bytes": 0x100000,
        "regions": [[0, 0x80000], [0x100000, 0x80000]], "cpus": 2,
        "cpu_vendor": "AuthenticAMD", "cpu_profile": "pvm",
        "devices": ["virtio-rng (getrandom)"], "postcopy": postcopy,
    }, separators=(",", ":")).encode()

def pages(entries):
    out = struct.pack("<I", len(entries))
    data = b""
    for page, content in entries:
        out += struct.pack("<Q", page << 1 | (1 if content is None else 0))
        if content is not None:
            data += content
    return out + data

def migration_seeds(state):
    HELLO, ACCEPT, PAGES, STATE, READY, GO, RUNNING, ABORT, SYNC, SYNCED, POSTCOPY, REQUEST, COMPLETE, DONE = 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
    p = pages([(0, b"\x11" * 4096), (1, None), (255, b"\x22" * 4096)])
    put("migration_dest", "precopy", b"\0" + rec(HELLO, hello(False)) + rec(PAGES, p) + rec(SYNC) + rec(STATE, state) + rec(GO))
    bitmap = (b"\xff" + b"\0" * 31)
    put("migration_dest", "postcopy", b"\1" + rec(HELLO, hello(True)) + rec(PAGES, p) + rec(POSTCOPY, struct.pack("<I", len(state)) + state + bitmap))
    put("migration_dest", "abort", b"\0" + rec(HELLO, hello(False)) + rec(ABORT, b"the source gave up"))
    # source side: dirty rounds, then the destination's answers
    dirty = bytes([2, 3, 1, 2, 3, 0])
    put("migration_source", "precopy", b"\0" + dirty + rec(ACCEPT) + rec(SYNCED) + rec(SYNCED) + rec(SYNCED) + rec(READY) + rec(RUNNING))
    put("migration_source", "postcopy", b"\3" + dirty + rec(ACCEPT) + rec(SYNCED) + rec(READY) + rec(REQUEST, struct.pack("<QQ", 5, 7)) + rec(RUNNING) + rec(DONE))
    put("migration_source", "refused", b"\0" + bytes([0]) + rec(3, b"no room for 1 MiB"))

# --- checkpoint_wire: records of (kind, u16 length, payload); kind 1 = JSON message.
def ckpt_seeds(manifest):
    env = lambda req: json.dumps({"protocol": "ffmk-checkpoint", "version": 1, "request": req}).encode()
    put("checkpoint_wire", "list", rec(1, env({"op": "list", "job": "job1"})))
    put("checkpoint_wire", "fetch", rec(1, env({"op": "fetch", "job": "job1", "name": "c1"})))
    if manifest is not None:
        offer = env({"op": "offer", "job": "job1", "name": "c1", "manifest": manifest})
        put("checkpoint_wire", "offer", rec(1, offer) + rec(2, b"\0" * 512) + rec(3))
    put("checkpoint_wire", "bad-version", rec(1, json.dumps({"protocol": "ffmk-checkpoint", "version": 9, "request": {"op": "list", "job": "x"}}).encode()))

# --- gossip_datagram: window byte, then datagrams (u16 length each).
def gossip_seeds():
    def msg(sender, inc, entries):
        b = struct.pack("<IIIII", 0x42474646, 1, sender, inc, len(entries))
        for slot, einc, age, load, free, vms, health, cores in entries:
            b += struct.pack("<IIffIIBBH", slot, einc, age, load, free, vms, health, 0, cores)
        return b
    m1 = msg(1, 1, [(1, 1, 0.0, 2.5, 4096, 2, 0, 16), (2, 3, 1.5, 0.0, 100, 0, 1, 8)])
    m2 = msg(3, 2, [(0, 5, 0.5, 1.0, 1, 1, 0, 1), (3, 2, 0.0, 7.0, 9, 3, 2, 32), (7, 1, 3.0, 0.0, 0, 0, 0, 0)])
    for w in range(3):
        put("gossip_datagram", f"w{w}", bytes([w]) + struct.pack("<H", len(m1)) + m1 + struct.pack("<H", len(m2)) + m2)

# --- broadcast_datagram: group size byte, then datagrams (u16 length each).
def broadcast_seeds():
    def msg(kind, direction, origin, n, sender, group=b"all", payload=b"echo hi"):
        return (b"FFBC" + bytes([1, kind, 0, direction]) + struct.pack("<QIIIQHH", 7, origin, n, sender, 1, len(group), len(payload))
                + group + payload)
    tree = msg(0, 0, 0, 16, 8)
    up = msg(1, 1, 0, 16, 15)
    down = msg(1, 2, 0, 16, 1)
    d = lambda m: struct.pack("<H", len(m)) + m
    put("broadcast_datagram", "tree-then-corrections", bytes([15]) + d(tree) + b"\x01\x10" + d(up) + b"\x01\x10" + d(down) + b"\x01\x40")
    put("broadcast_datagram", "originate", bytes([3]) + d(msg(2, 0, 0, 0, 0)))
    put("broadcast_datagram", "bad-rank", bytes([15]) + d(msg(1, 1, 0, 16, 16)))

# --- api_request: raw HTTP requests.
def api_seeds():
    reqs = {
        "get": b"GET /vm HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "vcpus": b"GET /vm/vcpus HTTP/1.1\r\n\r\n",
        "pause": b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        "snapshot": b'PUT /vm/snapshot HTTP/1.1\r\nContent-Length: 54\r\n\r\n{"dest":"/tmp/s","kind":"incremental","live":true} ',
        "migrate": b'PUT /vm/migrate HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 46\r\n\r\n{"to":"10.0.0.2:7000","postcopy":true,"x":1}  ',
        "resize": b'PUT /vm/disks/0/resize HTTP/1.1\r\nContent-Length: 19\r\n\r\n{"bytes":134217728}',
    }
    for n, r in reqs.items():
        put("api_request", n, r)

# --- vfio_user_server: what a server sends, replies in the client's order
# (ids 0: VERSION, 1: DEVICE_GET_INFO, 2-9: regions 0-7, 10-14: IRQ
# indices 0-4, then the accesses), a DMA write and read request among them.
def vu(msg_id, command, payload, reply=True, error=0):
    flags = (1 if reply else 0) | (0x20 if error else 0)
    return struct.pack("<HHIII", msg_id, command, 16 + len(payload), flags, error) + payload

def vfio_user_seeds():
    out = vu(0, 1, struct.pack("<HH", 0, 1) + b'{"capabilities":{}}\0')
    out += vu(1, 4, struct.pack("<IIII", 16, 3, 9, 5))
    for i in range(8):
        size = {0: 1 << 20, 7: 256}.get(i, 0)
        out += vu(2 + i, 5, struct.pack("<IIIIQQ", 32, 3 if size else 0, i, 0, size, 0))
    for i in range(5):
        out += vu(10 + i, 7, struct.pack("<IIII", 16, 1, i, 4 if i == 2 else 0))
    good = out
    config = bytearray(256)
    config[0:4] = struct.pack("<HH", 0x15b3, 0x101c)
    out += vu(15, 9, struct.pack("<QII", 0, 7, 4) + bytes(config[0:4]))
    out += vu(0x8000, 12, struct.pack("<QQ", 0x10000, 16) + b"\x01" * 16, reply=False)
    out += vu(16, 10, struct.pack("<QII", 4, 7, 2))
    out += vu(0x8001, 11, struct.pack("<QQ", 0x10000, 16), reply=False)
    out += vu(17, 9, struct.pack("<QII", 0x800, 0, 4) + b"\x14\0\x1f\0")
    put("vfio_user_server", "connectx", out)
    put("vfio_user_server", "setup-only", good)
    put("vfio_user_server", "error-reply", vu(0, 1, b"", error=95))
    put("vfio_user_server", "dma-outside", good + vu(0x8000, 12, struct.pack("<QQ", 1 << 40, 4) + b"abcd", reply=False))

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshot", help="a snapshot directory (for snapshot_files and state seeds)")
    a = ap.parse_args()
    virtio_seeds(); pci_seeds(); gossip_seeds(); api_seeds(); vfio_user_seeds(); broadcast_seeds()
    state, manifest = b'{"version":2}', None
    if a.snapshot:
        m = json.load(open(os.path.join(a.snapshot, "manifest.json")))
        manifest = m
        state = open(os.path.join(a.snapshot, m["state"]["name"]), "rb").read()
        for fix in (1, 0):
            out = bytes([fix])
            text = json.dumps(m).encode()
            out += struct.pack("<H", len(text)) + text + struct.pack("<H", len(state)) + state
            for layer in m["layers"]:
                bits = open(os.path.join(a.snapshot, layer["pages"]["name"]), "rb").read()
                mem = open(os.path.join(a.snapshot, layer["memory"]["name"]), "rb")
                # the first defined page's run, at most 8 pages, as the layer's data
                first = next((i * 8 + b for i, x in enumerate(bits) for b in range(8) if x >> b & 1), 0)
                first = min(first, 255)
                mem.seek(first * 4096)
                data = mem.read(8 * 4096)
                out += struct.pack("<H", len(bits)) + bits + bytes([first]) + struct.pack("<H", len(data)) + data
            put("snapshot_files", f"probe-fix{fix}", out)
    migration_seeds(state)
    ckpt_seeds(manifest)

if __name__ == "__main__":
    main()
