//! Power cuts (issue 16 point 3): real workloads run through the engine on recording storages,
//! then every crash state the storage contract allows is checked with `qemu-img check` and
//! against the data each completed flush or command acknowledged (see `tests/common/powercut.rs`
//! for the model). Each test covers some of the write paths: allocating writes, copy-on-write of
//! shared clusters and L2 tables, discard and zero writes, growth of the L1 table, the refcount
//! table and refcount blocks, snapshot create / revert / delete, commit of the top and of an
//! inner layer, delete of a layer (pull), external create and resize.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use snapfs::chain::Chain;
use snapfs::qcow2::{Caches, OpenOptions};
use snapfs::view::{StartTable, View};

use crate::common::powercut::{Ack, Recording, SECTOR, Simulator, Verdict};
use crate::common::write_support::{Rng, seed_for};
use crate::common::{qemu_img, require_env};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// States checked per test unless `SNAPFS_TEST_POWERCUT_STATES` says otherwise.
const STATES: usize = 500;

/// A disk driven through the engine as the FUSE side drives it, with the model of what each
/// acknowledgement promised.
struct Disk {
    dir: tempfile::TempDir,
    rec: Arc<Recording>,
    chain: Arc<Chain>,
    disk: Vec<u8>,
    snapshots: Vec<(String, Arc<Vec<u8>>)>,
    written: BTreeSet<u64>,
    done: Vec<String>,
    rng: Rng,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run a command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-io -c "write -P PATTERN OFF LEN"` for each (pattern, offset, len).
fn qemu_io_fill(image: &Path, writes: &[(u8, u64, u64)]) {
    let mut cmd = Command::new("qemu-io");
    for (p, off, len) in writes {
        cmd.arg("-c").arg(format!("write -P {p} {off} {len}"));
    }
    run(cmd.arg(image));
}

impl Disk {
    /// Opens `top` in `dir` (its backing files must be there) with every file recorded.
    fn open(dir: tempfile::TempDir, top: &str, seed: u64) -> Disk {
        let top_path = dir.path().join(top);
        // The files as made are durable: the model starts from them.
        run(&mut Command::new("sync"));
        let out = dir.path().join("initial.raw");
        qemu_img(&[
            "convert",
            "-O",
            "raw",
            top_path.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        let disk = std::fs::read(&out).expect("initial view");
        std::fs::remove_file(&out).unwrap();
        let rec = Recording::new();
        let chain = Chain::open_interposed(
            &top_path,
            Caches::new(64 * MIB),
            OpenOptions {
                writable: true,
                lock: true,
                share: false,
            },
            rec.interpose(),
        )
        .expect("open the chain");
        let mut d = Disk {
            dir,
            rec,
            chain: Arc::new(chain),
            disk,
            snapshots: Vec::new(),
            written: BTreeSet::new(),
            done: Vec::new(),
            rng: Rng::new(seed),
        };
        d.done.push("open".into());
        d.ack();
        d
    }

    fn view(&self) -> View {
        View::new(
            self.chain.clone(),
            0,
            StartTable::Active,
            self.disk.len() as u64,
        )
    }

    fn top_name(&self) -> PathBuf {
        self.chain.top_image().path().to_owned()
    }

    fn ack(&mut self) {
        let top = self.rec.file_index(&self.top_name());
        self.rec.ack(Ack {
            at: self.rec.ops(),
            disk: Arc::new(self.disk.clone()),
            top,
            snapshots: Arc::new(self.snapshots.clone()),
            written: Arc::new(std::mem::take(&mut self.written)),
            what: std::mem::take(&mut self.done).join(", "),
        });
    }

    fn note_written(&mut self, offset: u64, len: u64) {
        for s in offset / SECTOR..(offset + len).div_ceil(SECTOR) {
            self.written.insert(s);
        }
    }

    fn write(&mut self, offset: u64, len: u64) {
        let mut data = vec![0u8; len as usize];
        self.rng.fill(&mut data);
        self.view().write_at(&data, offset).expect("write");
        self.disk[offset as usize..(offset + len) as usize].copy_from_slice(&data);
        self.note_written(offset, len);
        self.done.push(format!("write {offset:#x}+{len}"));
    }

    /// A write of `len` bytes somewhere in the disk, aligned to `align`.
    fn random_write(&mut self, max_len: u64, align: u64) {
        let size = self.disk.len() as u64;
        let len = self.rng.range(1, max_len / align + 1) * align;
        let offset = self.rng.below((size - len) / align + 1) * align;
        self.write(offset, len);
    }

    fn zero(&mut self, offset: u64, len: u64) {
        self.view().zero_range(offset, len).expect("zero range");
        self.disk[offset as usize..(offset + len) as usize].fill(0);
        self.note_written(offset, len);
        self.done.push(format!("zero {offset:#x}+{len}"));
    }

    fn flush(&mut self) {
        self.view().flush_writes().expect("flush");
        self.done.push("flush".into());
        self.ack();
    }

    fn resize(&mut self, size: u64) {
        self.view().grow(size).expect("resize");
        self.disk.resize(size as usize, 0);
        self.done.push(format!("resize {size}"));
    }

    fn snapshot_id(&self, name: &str) -> Vec<u8> {
        self.chain
            .top_image()
            .snapshots()
            .iter()
            .find(|s| s.name_str() == Some(name))
            .map(|s| s.id.clone())
            .unwrap_or_else(|| panic!("no snapshot {name}"))
    }

    fn snapshot_create(&mut self, name: &str) {
        self.chain
            .top_image()
            .create_snapshot(name)
            .expect("create snapshot");
        self.snapshots
            .push((name.to_owned(), Arc::new(self.disk.clone())));
        self.done.push(format!("snapshot create {name}"));
        self.ack();
    }

    fn snapshot_revert(&mut self, name: &str) {
        let id = self.snapshot_id(name);
        self.chain
            .top_image()
            .apply_snapshot(&id)
            .expect("revert to snapshot");
        let content = self
            .snapshots
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.clone())
            .unwrap();
        self.disk = content.as_ref().clone();
        self.done.push(format!("snapshot revert {name}"));
        self.ack();
    }

    fn snapshot_delete(&mut self, name: &str) {
        let id = self.snapshot_id(name);
        self.chain
            .top_image()
            .delete_snapshot(&id)
            .expect("delete snapshot");
        self.snapshots.retain(|(n, _)| n != name);
        self.done.push(format!("snapshot delete {name}"));
        self.ack();
    }

    fn commit(&mut self, index: usize) {
        self.chain = snapfs::ops::commit(&self.chain, index, &|_, _| {}).expect("commit");
        self.done.push(format!("commit layer {index}"));
        self.ack();
    }

    fn pull(&mut self, index: usize) {
        self.chain =
            snapfs::ops::pull_into_above(&self.chain, index, &|_, _| {}).expect("delete layer");
        self.done.push(format!("delete layer {index}"));
        self.ack();
    }

    /// `pull [BASE]`: the top copies what it reads from the layers above `base` (`None`: all).
    fn pull_into_top(&mut self, base: Option<usize>) {
        self.chain = snapfs::ops::pull(&self.chain, base, &|_, _| {}).expect("pull");
        self.done.push(format!("pull {base:?}"));
        self.ack();
    }

    fn external(&mut self, file: &str) {
        let path = self.dir.path().join(file);
        let folder = std::fs::File::open(self.dir.path()).expect("open folder");
        self.chain =
            snapfs::ops::create_external(&self.chain, &folder, std::ffi::OsStr::new(file), &path)
                .expect("create --external");
        self.snapshots.clear();
        self.done.push(format!("create --external {file}"));
        self.ack();
    }

    /// A clean unmount: live.raw flushed, then the bitmaps stored (`SnapFs::destroy`).
    fn unmount_store(&mut self) {
        self.view().flush().expect("flush");
        self.chain.store_bitmaps().expect("store the bitmaps");
        self.done.push("unmount (bitmaps stored)".into());
        self.ack();
    }

    /// A big-endian header field of `file` (in the work folder) as the engine left it.
    fn header_field(&self, file: &str, offset: usize) -> u64 {
        let bytes = std::fs::read(self.dir.path().join(file)).expect("read an image");
        u64::from_be_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    /// Closes the chain and checks every recorded crash state.
    fn simulate(self, workload: &str, seed: u64) -> Verdict {
        let Disk {
            dir, rec, chain, ..
        } = self;
        drop(chain);
        let states = std::env::var("SNAPFS_TEST_POWERCUT_STATES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(STATES);
        let v = Simulator {
            workload: workload.into(),
            rec,
            seed,
            states,
            threads: 2,
        }
        .run();
        drop(dir);
        v
    }
}

fn assert_no_damage(v: &Verdict) {
    assert!(
        v.corrupt == 0 && v.data_lost == 0,
        "{}\n{}",
        v.summary(),
        v.failures.join("\n")
    );
    assert!(v.distinct >= 50, "too few distinct states: {}", v.summary());
}

fn new_dir() -> tempfile::TempDir {
    require_env();
    tempfile::Builder::new()
        .prefix("snapfs-powercut-work-")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("temp dir")
}

fn create(dir: &Path, name: &str, opts: &str, size: u64, backing: Option<&str>) -> PathBuf {
    let path = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", opts];
    if let Some(b) = backing {
        args.extend(["-b", b, "-F", "qcow2"]);
    }
    let size = size.to_string();
    let p = path.to_str().unwrap().to_owned();
    args.push(&p);
    args.push(&size);
    qemu_img(&args);
    path
}

#[test]
fn powercut_allocating_writes() {
    let seed = seed_for("powercut_allocating_writes");
    let dir = new_dir();
    create(dir.path(), "disk.qcow2", "cluster_size=4096", 2 * MIB, None);
    let mut d = Disk::open(dir, "disk.qcow2", seed);
    for round in 0..8 {
        for _ in 0..4 {
            // Partial clusters, whole clusters and runs over L2 boundaries.
            let align = if round % 2 == 0 { SECTOR } else { 4 * KIB };
            d.random_write(24 * KIB, align);
        }
        d.flush();
    }
    assert_no_damage(&d.simulate("allocating writes", seed));
}

#[test]
fn powercut_snapshots_and_cow() {
    let seed = seed_for("powercut_snapshots_and_cow");
    let dir = new_dir();
    let img = create(dir.path(), "disk.qcow2", "cluster_size=4096", MIB, None);
    qemu_io_fill(&img, &[(0x11, 0, 256 * KIB), (0x22, 512 * KIB, 128 * KIB)]);
    let mut d = Disk::open(dir, "disk.qcow2", seed);
    d.snapshot_create("s1");
    // Copy-on-write of the shared L2 tables and clusters.
    for _ in 0..6 {
        d.random_write(12 * KIB, SECTOR);
    }
    d.flush();
    d.snapshot_create("s2");
    for _ in 0..4 {
        d.random_write(8 * KIB, SECTOR);
    }
    d.flush();
    d.snapshot_revert("s1");
    for _ in 0..3 {
        d.random_write(8 * KIB, SECTOR);
    }
    d.flush();
    d.snapshot_delete("s2");
    d.random_write(8 * KIB, SECTOR);
    d.flush();
    d.snapshot_delete("s1");
    d.random_write(8 * KIB, SECTOR);
    d.flush();
    assert_no_damage(&d.simulate("snapshots and copy-on-write", seed));
}

/// Deleting a snapshot on a full host disk (`snapshot_ops/delete.rs`): the new snapshot table
/// finds no room, so the entry is emptied in place first, what the snapshot alone used is freed
/// and punched, and the delete and the writes after it live in the space that gave back.
#[test]
fn powercut_snapshot_delete_on_a_full_disk() {
    let seed = seed_for("powercut_snapshot_delete_on_a_full_disk");
    let dir = new_dir();
    let img = create(dir.path(), "disk.qcow2", "cluster_size=4096", MIB, None);
    qemu_io_fill(&img, &[(0x11, 0, 512 * KIB)]);
    let mut d = Disk::open(dir, "disk.qcow2", seed);
    d.snapshot_create("old");
    // "old" alone keeps what these overwrite; it shares the rest with "later" and the disk.
    d.write(0, 128 * KIB);
    for _ in 0..3 {
        d.random_write(16 * KIB, SECTOR);
    }
    d.flush();
    d.snapshot_create("later");
    d.random_write(8 * KIB, SECTOR);
    d.flush();
    d.rec.fill_disk();
    let from = d.rec.ops();
    d.snapshot_delete("old");
    let emptied = d.rec.writes_since(from).iter().any(|&(_, len)| len == 4);
    assert!(
        emptied,
        "the delete found room for a new snapshot table: the full disk was not full"
    );
    // Writes into the space the delete gave back.
    for _ in 0..2 {
        d.random_write(8 * KIB, SECTOR);
    }
    d.flush();
    d.rec.free_disk();
    d.snapshot_delete("later");
    d.random_write(8 * KIB, SECTOR);
    d.flush();
    assert_no_damage(&d.simulate("snapshot delete on a full disk", seed));
}

#[test]
fn powercut_discard_and_zero_writes() {
    let seed = seed_for("powercut_discard_and_zero_writes");
    let dir = new_dir();
    let base = create(dir.path(), "base.qcow2", "cluster_size=4096", MIB, None);
    qemu_io_fill(&base, &[(0x33, 0, MIB)]);
    let top = create(
        dir.path(),
        "top.qcow2",
        "cluster_size=4096",
        MIB,
        Some("base.qcow2"),
    );
    qemu_io_fill(&top, &[(0x44, 64 * KIB, 256 * KIB)]);
    let mut d = Disk::open(dir, "top.qcow2", seed);
    for round in 0..6 {
        for _ in 0..3 {
            let size = d.disk.len() as u64;
            let len = d.rng.range(1, 64) * SECTOR * if round % 2 == 0 { 1 } else { 8 };
            let offset = d.rng.below((size - len) / SECTOR) * SECTOR;
            d.zero(offset, len);
            d.random_write(8 * KIB, SECTOR);
        }
        d.flush();
    }
    assert_no_damage(&d.simulate("discard and zero writes", seed));
}

#[test]
fn powercut_table_growth_and_resize() {
    let seed = seed_for("powercut_table_growth_and_resize");
    let dir = new_dir();
    // 512-byte clusters with 64-bit refcounts: a refcount block counts 64 clusters (32 KiB) and
    // a refcount table cluster 64 blocks (2 MiB), an L1 cluster 64 L2 tables (2 MiB).
    create(
        dir.path(),
        "disk.qcow2",
        "cluster_size=512,refcount_bits=64",
        MIB,
        None,
    );
    let mut d = Disk::open(dir, "disk.qcow2", seed);
    // Header fields: l1_table_offset (40), refcount_table_offset (48).
    let tables = |d: &Disk| {
        (
            d.header_field("disk.qcow2", 40),
            d.header_field("disk.qcow2", 48),
        )
    };
    let before = tables(&d);
    for _ in 0..4 {
        for _ in 0..3 {
            d.random_write(64 * KIB, SECTOR);
        }
        d.flush();
    }
    d.resize(3 * MIB);
    d.flush();
    // Past 2 MiB of host clusters: the refcount table moves too.
    for _ in 0..4 {
        for _ in 0..4 {
            d.random_write(384 * KIB, SECTOR);
        }
        d.flush();
    }
    let after = tables(&d);
    assert!(
        after.0 != before.0 && after.1 != before.1,
        "the workload moved neither the L1 table nor the refcount table: {before:x?} -> {after:x?} ({} bytes)",
        std::fs::metadata(d.dir.path().join("disk.qcow2"))
            .unwrap()
            .len()
    );
    assert_no_damage(&d.simulate("table growth and resize", seed));
}

#[test]
fn powercut_chain_operations() {
    let seed = seed_for("powercut_chain_operations");
    let dir = new_dir();
    let base = create(dir.path(), "base.qcow2", "cluster_size=4096", MIB, None);
    qemu_io_fill(&base, &[(0x55, 0, 512 * KIB)]);
    let mid = create(
        dir.path(),
        "mid.qcow2",
        "cluster_size=4096",
        MIB,
        Some("base.qcow2"),
    );
    qemu_io_fill(&mid, &[(0x66, 128 * KIB, 256 * KIB)]);
    let top = create(
        dir.path(),
        "top.qcow2",
        "cluster_size=4096",
        MIB,
        Some("mid.qcow2"),
    );
    qemu_io_fill(&top, &[(0x77, 320 * KIB, 128 * KIB)]);
    let mut d = Disk::open(dir, "top.qcow2", seed);
    for _ in 0..3 {
        d.random_write(16 * KIB, SECTOR);
    }
    d.flush();
    d.commit(1);
    for _ in 0..3 {
        d.random_write(16 * KIB, SECTOR);
    }
    d.flush();
    d.commit(0);
    d.random_write(16 * KIB, SECTOR);
    d.flush();
    d.external("next.qcow2");
    for _ in 0..3 {
        d.random_write(16 * KIB, SECTOR);
    }
    d.flush();
    d.pull(1);
    d.random_write(16 * KIB, SECTOR);
    d.flush();
    d.pull_into_top(None);
    d.random_write(16 * KIB, SECTOR);
    d.flush();
    assert_no_damage(&d.simulate("chain operations", seed));
}

/// Commit into a smaller base: an inner layer commits into a base a tenth its size, which grows
/// (its L1 table and size, `grow_locked`) before the data goes in; then the top commits into the
/// grown base.
#[test]
fn powercut_commit_grows_the_base() {
    const SIZE: u64 = 2 * MIB + 256 * KIB;
    let seed = seed_for("powercut_commit_grows_the_base");
    let dir = new_dir();
    let base = create(
        dir.path(),
        "base.qcow2",
        "cluster_size=4096",
        256 * KIB,
        None,
    );
    qemu_io_fill(&base, &[(0x13, 0, 128 * KIB)]);
    let mid = create(
        dir.path(),
        "mid.qcow2",
        "cluster_size=4096",
        SIZE,
        Some("base.qcow2"),
    );
    qemu_io_fill(&mid, &[(0x14, 2 * MIB, 128 * KIB)]);
    let top = create(
        dir.path(),
        "top.qcow2",
        "cluster_size=4096",
        SIZE,
        Some("mid.qcow2"),
    );
    qemu_io_fill(&top, &[(0x15, 64 * KIB, 64 * KIB)]);
    let mut d = Disk::open(dir, "top.qcow2", seed);
    for _ in 0..3 {
        d.random_write(32 * KIB, SECTOR);
    }
    d.flush();
    // mid into base (256 KiB): the base grows to two L1 entries (an L2 table maps 2 MiB).
    d.commit(1);
    d.random_write(32 * KIB, SECTOR);
    d.flush();
    d.commit(0);
    d.random_write(16 * KIB, SECTOR);
    d.flush();
    let grown = d.header_field("base.qcow2", 24);
    assert_eq!(grown, SIZE, "the commit did not grow the base");
    assert_no_damage(&d.simulate("commit that grows the base", seed));
}

/// Extended L2 entries (subclusters): partial writes allocate subclusters, zero writes set their
/// zero bits, and a snapshot makes the tables copy on write.
#[test]
fn powercut_extended_l2() {
    let seed = seed_for("powercut_extended_l2");
    let dir = new_dir();
    let img = create(
        dir.path(),
        "disk.qcow2",
        "extended_l2=on,cluster_size=16384",
        MIB,
        None,
    );
    qemu_io_fill(&img, &[(0x16, 0, 96 * KIB), (0x17, 512 * KIB, 5 * KIB)]);
    let mut d = Disk::open(dir, "disk.qcow2", seed);
    for round in 0..4 {
        for _ in 0..3 {
            d.random_write(12 * KIB, SECTOR);
        }
        let size = d.disk.len() as u64;
        let len = d.rng.range(1, 24) * SECTOR;
        let offset = d.rng.below((size - len) / SECTOR) * SECTOR;
        d.zero(offset, len);
        d.flush();
        if round == 1 {
            d.snapshot_create("s1");
        }
    }
    d.snapshot_delete("s1");
    d.random_write(12 * KIB, SECTOR);
    d.flush();
    assert_no_damage(&d.simulate("extended L2", seed));
}

/// Compressed clusters (written by `qemu-io write -c`) overwritten in part (the rest of the
/// cluster copied from the decompressed data), whole, and zeroed, also while a snapshot shares
/// them.
#[test]
fn powercut_compressed_overwrite() {
    let seed = seed_for("powercut_compressed_overwrite");
    let dir = new_dir();
    let img = create(dir.path(), "disk.qcow2", "cluster_size=4096", MIB, None);
    let mut cmd = Command::new("qemu-io");
    for i in 0..64u64 {
        cmd.arg("-c").arg(format!(
            "write -c -P {} {} 4096",
            0x20 + i % 16,
            i * 8 * KIB
        ));
    }
    run(cmd.arg(&img));
    let mut d = Disk::open(dir, "disk.qcow2", seed);
    for round in 0..4 {
        for _ in 0..3 {
            // Mostly inside the compressed half.
            let len = d.rng.range(1, 16) * SECTOR;
            let offset = d.rng.below((512 * KIB - len) / SECTOR) * SECTOR;
            d.write(offset, len);
        }
        let offset = d.rng.below(64) * 8 * KIB;
        d.zero(offset, 4 * KIB);
        let whole = d.rng.below(64) * 8 * KIB;
        d.write(whole, 4 * KIB);
        d.flush();
        if round == 1 {
            d.snapshot_create("s1");
        }
    }
    d.snapshot_delete("s1");
    d.random_write(8 * KIB, SECTOR);
    d.flush();
    assert_no_damage(&d.simulate("compressed clusters overwritten", seed));
}

/// The persistent bitmaps: stored at unmount (new bitmap data, tables and directory, then the
/// header extension, then the old ones freed), and made for a new overlay at external create.
#[test]
fn powercut_bitmap_store() {
    let seed = seed_for("powercut_bitmap_store");
    let dir = new_dir();
    let img = create(dir.path(), "disk.qcow2", "cluster_size=4096", MIB, None);
    qemu_io_fill(&img, &[(0x18, 0, 128 * KIB)]);
    for name in ["b0", "b1"] {
        qemu_img(&["bitmap", "--add", "-g", "4096", img.to_str().unwrap(), name]);
    }
    let mut d = Disk::open(dir, "disk.qcow2", seed);
    for _ in 0..2 {
        for _ in 0..3 {
            d.random_write(32 * KIB, SECTOR);
        }
        d.flush();
        d.unmount_store();
    }
    d.external("next.qcow2");
    for _ in 0..3 {
        d.random_write(16 * KIB, SECTOR);
    }
    d.flush();
    d.unmount_store();
    d.random_write(16 * KIB, SECTOR);
    d.unmount_store();
    assert_no_damage(&d.simulate("bitmap store", seed));
}
