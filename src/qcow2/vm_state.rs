//! Where an internal snapshot keeps the VM state QEMU's `savevm` saved with it.
//!
//! Spec (`docs/interop/qcow2.rst`, snapshot table): `vm_state_size` bytes of VM state (QEMU's
//! migration stream, starting with the magic `QEVM`) are stored "like guest disk content ... at
//! offsets that are larger than the virtual disk". QEMU (`block/qcow2.h`, `qcow2_vm_state_offset`)
//! puts them at `l1_vm_state_index << (cluster_bits + l2_bits)`, where `l1_vm_state_index =
//! size_to_l1(disk size)`: the disk size rounded up to whole L1 entries (512 MiB with 64 KiB
//! clusters). `qcow2_save_vmstate`/`qcow2_load_vmstate` are plain guest writes and reads at that
//! offset plus the position in the stream, so reading the state back is reading guest clusters
//! through the snapshot's own L1 table. After `savevm` QEMU discards those clusters from the
//! active L1 ("The VM state isn't needed any more in the active L1 table"): only the snapshot's
//! table reaches them.

use super::offsets::Geometry;
use super::snapshot::Snapshot;

/// The guest offset at which a snapshot's VM state starts, for a snapshot of a disk of
/// `disk_size` bytes (the snapshot's own `disk_size`: QEMU loads a snapshot only into a disk of
/// that size, and its L1 index for the state follows from it).
pub fn vm_state_offset(geometry: &Geometry, disk_size: u64) -> u64 {
    geometry.l1_entries_for(disk_size) << (geometry.cluster_bits + geometry.l2_bits)
}

/// `(offset, length)` of `snap`'s VM state in its guest address space, `None` without state (or
/// if the range would not fit in 64 bits, which no image QEMU wrote has).
pub fn vm_state_range(geometry: &Geometry, snap: &Snapshot, disk_size: u64) -> Option<(u64, u64)> {
    if snap.vm_state_size == 0 {
        return None;
    }
    let offset = vm_state_offset(geometry, disk_size);
    offset.checked_add(snap.vm_state_size)?;
    Some((offset, snap.vm_state_size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_as_qemu_computes_them() {
        // 64 KiB clusters: one L1 entry covers 512 MiB.
        let g = Geometry::new(16, false);
        assert_eq!(vm_state_offset(&g, 64 << 20), 512 << 20);
        assert_eq!(vm_state_offset(&g, 512 << 20), 512 << 20);
        assert_eq!(vm_state_offset(&g, (512 << 20) + 1), 1 << 30);
        // 4 KiB clusters: 2 MiB per L1 entry; extended L2 halves the entries per table.
        assert_eq!(vm_state_offset(&Geometry::new(12, false), 3 << 20), 4 << 20);
        assert_eq!(
            vm_state_offset(&Geometry::new(16, true), 64 << 20),
            256 << 20
        );
    }
}
