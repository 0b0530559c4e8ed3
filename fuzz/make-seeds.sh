#!/usr/bin/env bash
# Regenerates fuzz/corpus-seeds/ from images made by qemu-img (needs qemu-img, qemu-io, python3).
# The seeds are committed; run this only to change them. Tiny virtual sizes and 512-byte clusters
# keep every seed a few KiB (the extended-L2 one needs 16 KiB clusters).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out="$here/corpus-seeds"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

img() { qemu-img create -q -f qcow2 "$@"; }
io() { local f=$1; shift; for c in "$@"; do qemu-io -f qcow2 -c "$c" "$f" >/dev/null; done; }

img -o cluster_size=512 v3.qcow2 64K
io v3.qcow2 "write -P 0x11 0 4K" "write -z 8K 2K" "write -P 0x22 33K 1K"
img -o cluster_size=512,compat=0.10 v2.qcow2 64K
io v2.qcow2 "write -P 0x33 1K 3K"
img -o cluster_size=512 deflate.qcow2 64K
io deflate.qcow2 "write -c -P 0x44 0 2K" "write -c -P 0x45 4K 512" "write -P 0x46 8K 1K"
img -o cluster_size=512,compression_type=zstd zstd.qcow2 64K
io zstd.qcow2 "write -c -P 0x55 0 2K" "write -c -P 0x56 4K 512"
img -o cluster_size=16K,extended_l2=on extl2.qcow2 64K
io extl2.qcow2 "write -P 0x66 0 1K" "write -z 2K 1K" "write -P 0x67 20K 512"
img -o cluster_size=512 snaps.qcow2 64K
io snaps.qcow2 "write -P 0x71 0 2K"
qemu-img snapshot -c first snaps.qcow2
io snaps.qcow2 "write -P 0x72 1K 2K"
qemu-img snapshot -c second snaps.qcow2
io snaps.qcow2 "write -P 0x73 0 512"
cp v3.qcow2 base.qcow2
img -o cluster_size=512 -b base.qcow2 -F qcow2 over-qcow2.qcow2 64K
io over-qcow2.qcow2 "write -P 0x81 2K 1K"
head -c 65536 /dev/zero | tr '\0' '\141' > base.raw
img -o cluster_size=512 -b base.raw -F raw over-raw.qcow2 64K
io over-raw.qcow2 "write -P 0x82 0 512"

# Persistent bitmaps (enabled and disabled, three granularities) with a few dirty ranges.
for cs in 512 4096; do
    img -o cluster_size=$cs "bitmaps-$cs.qcow2" 1M
    qemu-img bitmap --add bitmaps-$cs.qcow2 chk1
    qemu-img bitmap --add -g 4096 --disable "bitmaps-$cs.qcow2" frozen
    qemu-img bitmap --add -g 65536 "bitmaps-$cs.qcow2" coarse
    io "bitmaps-$cs.qcow2" "write -P 0x91 0 4K" "write -P 0x92 700K 3K"
done

rm -rf "$out"
mkdir -p "$out"/{header,snapshot_table,l2_decode,decompress,image_read,libvirt_xml,bitmap_directory}
for f in v3 v2 deflate zstd extl2 snaps over-qcow2 over-raw; do
    cp "$f.qcow2" "$out/image_read/$f.qcow2"
    # The header target sees the first cluster (and the backing name after the extensions).
    head -c 1024 "$f.qcow2" > "$out/header/$f"
done
python3 "$here/make-seeds.py" "$work" "$out"

# libvirt snapshot XML in the shapes libvirt writes (shared/reference/libvirt-snapshots.md), and
# one with every escape a reader must undo.
cat > "$out/libvirt_xml/internal.xml" <<'XML'
<domainsnapshot>
  <name>pkg-updated</name>
  <description>after apt upgrade</description>
  <state>shutoff</state>
  <parent>
    <name>bare-os-install</name>
  </parent>
  <creationTime>1706250054</creationTime>
  <memory snapshot='no'/>
  <disks>
    <disk name='vda' snapshot='internal'/>
  </disks>
  <domain type='kvm'>
    <name>vm</name>
    <devices><disk type='file'><source file='/var/lib/libvirt/images/vm.qcow2'/></disk></devices>
  </domain>
  <active>1</active>
</domainsnapshot>
XML
cat > "$out/libvirt_xml/external.xml" <<'XML'
<domainsnapshot>
  <name>1270477159</name>
  <state>disk-snapshot</state>
  <parent>
    <name>bare-os-install</name>
  </parent>
  <creationTime>1270477159</creationTime>
  <memory snapshot='no'/>
  <disks>
    <disk name='vda' snapshot='external' type='file'>
      <driver type='qcow2'/>
      <source file='/var/lib/libvirt/images/vm.1270477159'/>
    </disk>
    <disk name='vdb' snapshot='no'/>
  </disks>
  <active>0</active>
</domainsnapshot>
XML
cat > "$out/libvirt_xml/escapes.xml" <<'XML'
<?xml version="1.0" encoding="UTF-8"?>
<!-- a comment -->
<domainsnapshot>
  <name>a &lt;b&gt; &amp; &apos;c&apos; &quot;d&quot; &#xe9;&#233;</name>
  <description>line&#xD;
two&#9;tab <![CDATA[<raw> & ]]> end</description>
  <parent><name> p&#x2028;q </name></parent>
  <disks>
    <disk name='v&#xA;d&#x9;a' snapshot='manual'><source file="/a b/&apos;q&apos;.qcow2"/></disk>
  </disks>
</domainsnapshot>
XML
ls -l "$out"/*
