#!/usr/bin/env python3
"""Derives the table-level fuzz seeds from the qemu-img images make-seeds.sh made.

Usage: make-seeds.py WORKDIR OUTDIR. Input formats are those of fuzz/fuzz_targets/*.rs.
"""
import struct
import sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])


def header(data):
    (cluster_bits,) = struct.unpack_from(">I", data, 20)
    (size,) = struct.unpack_from(">Q", data, 24)
    l1_size, l1_offset = struct.unpack_from(">IQ", data, 36)
    nb_snapshots, snapshots_offset = struct.unpack_from(">IQ", data, 60)
    (version,) = struct.unpack_from(">I", data, 4)
    incompatible = struct.unpack_from(">Q", data, 72)[0] if version >= 3 else 0
    compression = data[104] if version >= 3 and struct.unpack_from(">I", data, 100)[0] > 104 else 0
    return dict(cluster_bits=cluster_bits, size=size, l1_size=l1_size, l1_offset=l1_offset,
                nb=nb_snapshots, snap_offset=snapshots_offset,
                extended=bool(incompatible & 16), compression=compression)


for name in ["v3", "deflate", "zstd", "extl2", "snaps", "over-qcow2"]:
    data = (work / f"{name}.qcow2").read_bytes()
    h = header(data)
    cs = 1 << h["cluster_bits"]
    shape = (h["cluster_bits"] - 9) | (0x80 if h["extended"] else 0)
    l1 = data[h["l1_offset"]:h["l1_offset"] + 8 * h["l1_size"]]
    first_l2 = struct.unpack_from(">Q", l1, 0)[0] & 0x00FFFFFFFFFFFE00
    l2 = data[first_l2:first_l2 + cs] if first_l2 else b""
    seed = bytes([shape, h["l1_size"] % 8]) + struct.pack(">QQ", 0, h["size"]) + l1 + l2
    (out / "l2_decode" / name).write_bytes(seed)

    # Compressed clusters: the bytes each descriptor names, with the decompress target's shape byte.
    if h["compression"] or name == "deflate":
        x = 62 - (h["cluster_bits"] - 8)
        entries = len(l2) // 8
        n = 0
        for i in range(entries):
            (e,) = struct.unpack_from(">Q", l2, 8 * i)
            if not e & (1 << 62):
                continue
            off = e & ((1 << x) - 1)
            sectors = ((e & ((1 << 62) - 1)) >> x) + 1
            length = sectors * 512 - (off & 511)
            kind = 1 if h["compression"] == 1 else 0
            dshape = kind | ((h["cluster_bits"] - 9) << 1)
            (out / "decompress" / f"{name}-{n}").write_bytes(bytes([dshape]) + data[off:off + length])
            n += 1

    if h["nb"]:
        # The table runs to the end of the entries; 4-byte count first.
        table = data[h["snap_offset"]:h["snap_offset"] + 4096]
        (out / "snapshot_table" / name).write_bytes(struct.pack(">I", h["nb"]) + table)
        (out / "snapshot_table" / f"{name}-one").write_bytes(struct.pack(">I", 1) + table)


# bitmap_directory: nb_bitmaps, cluster-size byte, virtual size, directory offset and length,
# then the whole image file (tables and data clusters at their offsets).
for cs in [512, 4096]:
    data = (work / f"bitmaps-{cs}.qcow2").read_bytes()
    (cluster_bits,) = struct.unpack_from(">I", data, 20)
    (size,) = struct.unpack_from(">Q", data, 24)
    (header_length,) = struct.unpack_from(">I", data, 100)
    at = header_length
    while True:
        magic, length = struct.unpack_from(">II", data, at)
        if magic == 0:
            raise SystemExit(f"bitmaps-{cs}.qcow2: no bitmaps extension")
        if magic == 0x23852875:
            nb, _, dir_size, dir_offset = struct.unpack_from(">IIQQ", data, at + 8)
            break
        at += 8 + (length + 7) // 8 * 8
    seed = struct.pack(">IBQIH", nb, cluster_bits - 9, size, dir_offset, dir_size) + data
    (out / "bitmap_directory" / f"bitmaps-{cs}").write_bytes(seed)
