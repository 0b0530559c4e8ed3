//! A real libvirtd (QEMU driver) for the tests that check what `virsh` makes of snapfs's libvirt
//! metadata, each in a private root so that tests run in parallel.
//!
//! libvirtd running as root keeps its state in fixed places (`/run/libvirt`, `/var/lib/libvirt`,
//! `/etc/libvirt/qemu`, `/var/log/libvirt`); [`Libvirtd::start`] runs it in a mount namespace of its
//! own (`unshare -m`) in which those folders are bind mounts of folders under a temporary root.
//! Outside the namespace the test (and snapfs) reach the same files under that root: the domain
//! definitions in `ROOT/etc/qemu/DOMAIN.xml`, the snapshot metadata in
//! `ROOT/lib/qemu/snapshot/DOMAIN/`, the socket `ROOT/run/libvirt-sock` that `virsh -c` names.
//! The QEMU capabilities cache (`/var/cache/libvirt`) and the test `qemu.conf` of
//! `scripts/common.sh` (`ensure_libvirt`) are shared. The domains' emulator is the unpacked QEMU
//! system emulator of `ensure_qemu_system` (libvirt only probes it: no domain is started).
//!
//! The daemon is stopped when the guard is dropped, also when the test panics; [`Libvirtd::stop`]
//! and [`Libvirtd::restart`] stop and start it over the same root (libvirtd reads the snapshot
//! folder at start: that is how a test checks what a file written without a daemon means to it).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::qemu_vm::qemu_system_root;

/// One libvirtd over a private root.
pub struct Libvirtd {
    root: tempfile::TempDir,
    pid: Option<i32>,
}

const NAMESPACE_SCRIPT: &str = r#"
set -e
R=$1
mount --make-rprivate /
mkdir -p /run/libvirt /var/lib/libvirt /var/log/libvirt /etc/libvirt/qemu
mount --bind "$R/run" /run/libvirt
mount --bind "$R/lib" /var/lib/libvirt
mount --bind "$R/log" /var/log/libvirt
mount --bind "$R/etc/qemu" /etc/libvirt/qemu
exec libvirtd -d -p "$R/libvirtd.pid"
"#;

impl Libvirtd {
    /// Starts a daemon over a new, empty root and waits until `virsh` reaches it.
    pub fn start() -> Libvirtd {
        let root = tempfile::Builder::new()
            .prefix("snapfs-libvirtd-")
            .tempdir()
            .expect("temp dir");
        for dir in ["run", "lib/qemu/snapshot", "log/qemu", "etc/qemu"] {
            fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        let mut daemon = Libvirtd { root, pid: None };
        daemon.launch();
        daemon
    }

    fn launch(&mut self) {
        let root = self.root.path();
        let _ = fs::remove_file(root.join("libvirtd.pid"));
        let out = super::run_status(
            Command::new("unshare")
                .arg("-m")
                .arg("sh")
                .arg("-c")
                .arg(NAMESPACE_SCRIPT)
                .arg("sh")
                .arg(root),
        );
        assert!(
            out.status.success(),
            "libvirtd did not start ({}): {}{} (scripts/test.sh installs it: common.sh ensure_libvirt)",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.pid.is_none() {
                self.pid = fs::read_to_string(root.join("libvirtd.pid"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
            }
            if self.pid.is_some() && self.socket().exists() {
                let probe = self.virsh_status(&["list", "--all"]);
                if probe.status.success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "libvirtd over {} did not answer within 30 s",
                root.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The private root.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The daemon's read-write socket.
    pub fn socket(&self) -> PathBuf {
        self.root.path().join("run/libvirt-sock")
    }

    /// The connection URI for `virsh -c`.
    pub fn uri(&self) -> String {
        format!("qemu:///system?socket={}", self.socket().display())
    }

    /// The folder libvirt keeps the snapshot XML of `domain` in.
    pub fn snapshot_dir(&self, domain: &str) -> PathBuf {
        self.root.path().join("lib/qemu/snapshot").join(domain)
    }

    /// The file libvirt keeps the (inactive) definition of `domain` in.
    pub fn domain_file(&self, domain: &str) -> PathBuf {
        self.root
            .path()
            .join("etc/qemu")
            .join(format!("{domain}.xml"))
    }

    /// `virsh -c URI ARGS...`, whatever its exit status.
    pub fn virsh_status(&self, args: &[&str]) -> Output {
        super::run_status(Command::new("virsh").arg("-c").arg(self.uri()).args(args))
    }

    /// `virsh -c URI ARGS...`; panics (with virsh's words) unless it succeeds. Returns stdout.
    pub fn virsh(&self, args: &[&str]) -> String {
        let out = self.virsh_status(args);
        assert!(
            out.status.success(),
            "virsh {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Defines a shut-off domain `name` whose disks are `(target dev, qcow2 file)`, in order.
    pub fn define(&self, name: &str, disks: &[(&str, &Path)]) {
        let xml = domain_xml(name, disks);
        let file = self.root.path().join(format!("define-{name}.xml"));
        fs::write(&file, xml).unwrap();
        self.virsh(&["define", file.to_str().unwrap()]);
    }

    /// Stops the daemon (its in-memory state goes; the files stay).
    pub fn stop(&mut self) {
        if let Some(pid) = self.pid.take() {
            stop_process(pid);
        }
    }

    /// Stops the daemon if it runs and starts it again over the same root.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn alive(pid: i32) -> bool {
    // A zombie has exited: /proc/PID/stat's state is Z.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// SIGTERM, up to 10 s for it to go, then SIGKILL.
fn stop_process(pid: i32) {
    // SAFETY: signals to the daemon this guard started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if alive(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        while alive(pid) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A minimal domain definition: TCG, 64 MiB, the unpacked emulator, virtio qcow2 disks.
pub fn domain_xml(name: &str, disks: &[(&str, &Path)]) -> String {
    let emulator = qemu_system_root().join("usr/bin/qemu-system-x86_64");
    assert!(
        emulator.is_file(),
        "{} is missing: scripts/test.sh unpacks it (common.sh ensure_qemu_system)",
        emulator.display()
    );
    let mut x = format!(
        "<domain type='qemu'>\n  <name>{name}</name>\n  <memory unit='KiB'>65536</memory>\n  \
         <os><type arch='x86_64' machine='pc'>hvm</type></os>\n  <devices>\n    \
         <emulator>{}</emulator>\n",
        emulator.display()
    );
    for (dev, file) in disks {
        x.push_str(&format!(
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      \
             <source file='{}'/>\n      <target dev='{dev}' bus='virtio'/>\n    </disk>\n",
            file.display()
        ));
    }
    x.push_str("  </devices>\n</domain>\n");
    x
}
