//! A generated test of internal snapshots (issue 4, "How it is checked", second point): for
//! several seeds, a random interleaving of writes (and zeroing) through `live.raw`, creates,
//! reverts, deletes, growing the disk, refused commands and remounts, checked after every step
//! against a model kept in memory (one `Vec<u8>` for the live disk and one per snapshot):
//! `live.raw` and every `snapshots/NAME.raw` must have the model's size and bytes, and
//! `snapshots/` must list exactly the model's snapshots. At each remount and at the end,
//! `qemu-img check` must find the image clean and `qemu-img snapshot -l` must list the model's
//! snapshots; at the end every snapshot and the live disk are also compared through qemu-img.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::common::snapshot_support::*;
use crate::common::*;

/// Steps per seed.
const STEPS: usize = 120;
/// Most snapshots at a time.
const MAX_SNAPS: usize = 5;
/// The disk never grows past this.
const MAX_SIZE: u64 = 16 * MIB;
const LIMIT: Duration = Duration::from_secs(150);

struct Model {
    live: Vec<u8>,
    /// Snapshot contents by name, and the names in creation order (the table order).
    snaps: BTreeMap<String, Vec<u8>>,
    order: Vec<String>,
}

#[derive(Debug, Clone)]
enum Step {
    Write {
        off: u64,
        len: usize,
    },
    Zero {
        off: u64,
        len: u64,
        how: ZeroHow,
    },
    Create {
        name: String,
        desc: bool,
    },
    Revert(String),
    Delete(String),
    Grow(u64),
    /// A command that must be refused with the errno, changing nothing.
    Refused {
        file: &'static str,
        text: String,
        errno: i32,
        hold: Hold,
    },
    Remount,
}

/// What the test holds open while a refused command runs.
#[derive(Debug, Clone)]
enum Hold {
    Nothing,
    Live,
    Snapshot(String),
}

struct Run {
    seed: u64,
    img: PathBuf,
    rng: Rng,
    model: Model,
    cs: u64,
    /// A version 2 image (compat=0.10).
    v2: bool,
    counter: u64,
    log: Vec<String>,
}

impl Run {
    fn pick_step(&mut self) -> Step {
        let size = self.model.live.len() as u64;
        let names: Vec<String> = self.model.order.clone();
        loop {
            let r = self.rng.below(100);
            return match r {
                0..=39 => {
                    let (off, len) = match self.rng.below(3) {
                        // cluster-aligned whole clusters
                        0 => {
                            let n = self.rng.range(1, 4);
                            let c = self.rng.below(size / self.cs - n);
                            (c * self.cs, (n * self.cs) as usize)
                        }
                        // anywhere, up to 256 KiB, unaligned
                        1 => {
                            let len = self.rng.range(1, 256 * KIB);
                            (self.rng.below(size - len), len as usize)
                        }
                        // a few bytes
                        _ => {
                            let len = self.rng.range(1, 100);
                            (self.rng.below(size - len), len as usize)
                        }
                    };
                    Step::Write { off, len }
                }
                40..=45 => {
                    let len = self.rng.range(1, 4 * self.cs.max(64 * KIB));
                    let off = self.rng.below(size - len);
                    let how = if self.rng.chance(50) {
                        ZeroHow::Punch
                    } else {
                        ZeroHow::ZeroRange
                    };
                    Step::Zero { off, len, how }
                }
                46..=63 => {
                    if names.len() >= MAX_SNAPS {
                        continue;
                    }
                    self.counter += 1;
                    let name = if self.rng.chance(20) {
                        format!("ü-{}.{}", self.seed, self.counter)
                    } else {
                        format!("m{}-{}", self.seed, self.counter)
                    };
                    Step::Create {
                        name,
                        desc: self.rng.chance(30),
                    }
                }
                64..=75 => {
                    if names.is_empty() {
                        continue;
                    }
                    Step::Revert(self.rng.pick(&names).clone())
                }
                76..=87 => {
                    if names.is_empty() {
                        continue;
                    }
                    Step::Delete(self.rng.pick(&names).clone())
                }
                88..=90 => {
                    if size + 2 * MIB > MAX_SIZE {
                        continue;
                    }
                    Step::Grow(self.rng.range(1, 32) * 64 * KIB)
                }
                91..=96 => {
                    let unknown = format!("nosuch-{}", self.rng.below(1000));
                    match self.rng.below(5) {
                        0 if !names.is_empty() => Step::Refused {
                            file: "create",
                            text: self.rng.pick(&names).clone(),
                            errno: libc::EEXIST,
                            hold: Hold::Nothing,
                        },
                        1 => Step::Refused {
                            file: if self.rng.chance(50) {
                                "revert"
                            } else {
                                "delete"
                            },
                            text: unknown,
                            errno: libc::ENOENT,
                            hold: Hold::Nothing,
                        },
                        2 if !names.is_empty() => Step::Refused {
                            file: "revert",
                            text: self.rng.pick(&names).clone(),
                            errno: libc::EBUSY,
                            hold: Hold::Live,
                        },
                        3 if !names.is_empty() => {
                            let n = self.rng.pick(&names).clone();
                            Step::Refused {
                                file: "delete",
                                text: n.clone(),
                                errno: libc::EBUSY,
                                hold: Hold::Snapshot(n),
                            }
                        }
                        _ => Step::Refused {
                            file: "delete",
                            text: "two names".to_string(),
                            errno: libc::EINVAL,
                            hold: Hold::Nothing,
                        },
                    }
                }
                _ => Step::Remount,
            };
        }
    }

    /// Applies a step to the mount and the model.
    fn apply(&mut self, m: &Mount, step: &Step) {
        let mp = m.path();
        let live = m.live();
        match step {
            Step::Write { off, len } => {
                let data = self.rng.bytes(*len);
                pwrite(&live, *off, &data);
                self.model.live[*off as usize..*off as usize + len].copy_from_slice(&data);
            }
            Step::Zero { off, len, how } => {
                zero_range(&live, *off, *len, *how);
                self.model.live[*off as usize..(*off + *len) as usize].fill(0);
            }
            Step::Create { name, desc } => {
                let text = if *desc {
                    format!("{name} taken at step {}", self.log.len())
                } else {
                    name.clone()
                };
                control_ok(mp, "create", &text);
                assert_status_ok(mp, &format!("create {name}"));
                self.model
                    .snaps
                    .insert(name.clone(), self.model.live.clone());
                self.model.order.push(name.clone());
            }
            Step::Revert(name) => {
                control_ok(mp, "revert", name);
                assert_status_ok(mp, &format!("revert {name}"));
                self.model.live = self.model.snaps[name].clone();
            }
            Step::Delete(name) => {
                control_ok(mp, "delete", name);
                assert_status_ok(mp, &format!("delete {name}"));
                self.model.snaps.remove(name);
                self.model.order.retain(|n| n != name);
            }
            Step::Grow(n) => {
                let f = OpenOptions::new().write(true).open(&live).unwrap();
                let new = self.model.live.len() as u64 + n;
                if self.v2 && !self.model.snaps.is_empty() {
                    // like QEMU ("Can't resize a v2 image which has snapshots"): refused
                    let r = f.set_len(new);
                    assert!(
                        r.is_err(),
                        "growing a v2 image that has internal snapshots succeeded; QEMU refuses it \
                         (the v2 snapshot table may not record each snapshot's size)"
                    );
                } else {
                    f.set_len(new)
                        .unwrap_or_else(|e| panic!("truncate live.raw to {new}: {e}"));
                    self.model.live.resize(new as usize, 0);
                }
            }
            Step::Refused {
                file,
                text,
                errno,
                hold,
            } => {
                fsync(&live);
                let before = read_all(&self.img);
                let held: Option<File> = match hold {
                    Hold::Nothing => None,
                    Hold::Live => Some(File::open(&live).unwrap()),
                    Hold::Snapshot(n) => Some(File::open(m.snapshot(&format!("{n}.raw"))).unwrap()),
                };
                control_err(mp, file, text, *errno);
                let s = last_status(mp);
                assert!(s.error.is_some(), "status after a refused command: {s:?}");
                drop(held);
                if let Some(d) = diff_bytes(&read_all(&self.img), &before) {
                    panic!("a refused command ({file} {text:?}) changed the image file: {d}");
                }
            }
            Step::Remount => unreachable!(),
        }
    }

    /// Every view of the mount against the model.
    fn verify(&self, m: &Mount) -> Vec<String> {
        let mut problems = Vec::new();
        let live = m.live();
        let size = file_size(&live);
        if size != self.model.live.len() as u64 {
            problems.push(format!(
                "live.raw st_size {size}, model {}",
                self.model.live.len()
            ));
        }
        if let Some(d) = diff_bytes(&read_whole(&live), &self.model.live) {
            problems.push(format!("live.raw: {d}"));
        }
        let names = snapshot_dir_names(m.path());
        let want: std::collections::BTreeSet<String> = self.model.snaps.keys().cloned().collect();
        if names != want {
            problems.push(format!("snapshots/ lists {names:?}, model {want:?}"));
        }
        for (name, content) in &self.model.snaps {
            let f = m.snapshot(&format!("{name}.raw"));
            if !f.exists() {
                continue;
            }
            if let Some(d) = diff_bytes(&read_whole(&f), content) {
                problems.push(format!("snapshots/{name}.raw: {d}"));
            }
        }
        problems
    }

    /// Unmounted: qemu-img check and the snapshot table against the model.
    fn verify_image(&self, when: &str, full: bool) {
        assert_check_clean(&self.img, &format!("seed {} {when}", self.seed));
        let tags = snapshot_tags(&self.img);
        assert_eq!(
            tags, self.model.order,
            "seed {} {when}: qemu-img snapshot -l vs the model",
            self.seed
        );
        if full {
            if let Some(d) = diff_bytes(&qemu_content(&self.img, None), &self.model.live) {
                panic!(
                    "seed {} {when}: live disk per qemu-img vs model: {d}",
                    self.seed
                );
            }
            for (name, content) in &self.model.snaps {
                if let Some(d) = diff_bytes(&qemu_snapshot_content(&self.img, name), content) {
                    panic!(
                        "seed {} {when}: snapshot {name} per qemu-img vs model: {d}",
                        self.seed
                    );
                }
            }
        }
    }
}

fn run_seed(seed: u64, opts: &str, cs: u64) {
    let t = Instant::now();
    let dir = workdir();
    let img = dir.path().join(format!("model-{seed}.qcow2"));
    let size = 8 * MIB;
    create_qcow2(&img, size, opts, None);
    qemu_io(&img, &["write -P 0x6d 0 1M", "write -P 0x6e 5M 512k"]);
    let live = qemu_content(&img, None);
    let mut run = Run {
        seed,
        img: img.clone(),
        rng: Rng::new(seed),
        model: Model {
            live,
            snaps: BTreeMap::new(),
            order: Vec::new(),
        },
        cs,
        v2: opts.contains("compat=0.10"),
        counter: 0,
        log: Vec::new(),
    };
    let mut m = Some(Mount::new(&img));
    let mut deadline = Some(Deadline::new(m.as_ref().unwrap().path(), LIMIT, "model"));
    let mut remounts = 0;
    let mut kinds: BTreeMap<&'static str, u64> = BTreeMap::new();
    for i in 0..STEPS {
        let step = run.pick_step();
        run.log.push(format!("{i}: {step:?}"));
        let kind = match &step {
            Step::Write { .. } => "write",
            Step::Zero { .. } => "zero",
            Step::Create { .. } => "create",
            Step::Revert(_) => "revert",
            Step::Delete(_) => "delete",
            Step::Grow(_) => "grow",
            Step::Refused { .. } => "refused",
            Step::Remount => "remount",
        };
        *kinds.entry(kind).or_insert(0) += 1;
        if let Step::Remount = step {
            deadline.take();
            m.take();
            run.verify_image(&format!("remount at step {i}"), false);
            m = Some(Mount::new(&img));
            deadline = Some(Deadline::new(m.as_ref().unwrap().path(), LIMIT, "model"));
            remounts += 1;
        } else {
            let mount = m.as_ref().unwrap();
            let r =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run.apply(mount, &step)));
            if let Err(e) = r {
                panic!(
                    "seed {seed} ({opts}): step {i} {step:?} failed: {}\nsteps:\n{}\ncontrol/status:\n{}\nsnapfs stderr:\n{}",
                    panic_text(&*e),
                    run.log.join("\n"),
                    status_text(mount.path()),
                    mount.stderr_text()
                );
            }
        }
        let mount = m.as_ref().unwrap();
        let problems = run.verify(mount);
        if !problems.is_empty() {
            panic!(
                "seed {seed} ({opts}): after step {i} the mount differs from the model:\n- {}\nsteps:\n{}\ncontrol/status:\n{}\nsnapfs stderr:\n{}",
                problems.join("\n- "),
                run.log.join("\n"),
                status_text(mount.path()),
                mount.stderr_text()
            );
        }
    }
    deadline.take();
    m.take();
    run.verify_image("at the end", true);
    eprintln!(
        "seed {seed} ({opts}): {STEPS} steps {kinds:?}, {remounts} remounts, {} snapshots at the end, {:.1} s",
        run.model.order.len(),
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn seed_1_default_64k() {
    run_seed(1, "", 64 * KIB);
}

#[test]
fn seed_2_small_clusters() {
    run_seed(2, "cluster_size=4096", 4 * KIB);
}

#[test]
fn seed_3_extended_l2() {
    run_seed(3, "extended_l2=on,cluster_size=32768", 32 * KIB);
}

#[test]
fn seed_4_v2_16k() {
    run_seed(4, "compat=0.10,cluster_size=16384", 16 * KIB);
}

#[test]
fn seed_5_refcount_bits_8() {
    run_seed(5, "refcount_bits=8,cluster_size=8192", 8 * KIB);
}
