//! A real QEMU VM for the tests that need real VM state: `qemu-system-x86_64` with no guest OS
//! (TCG, 64 MiB, no display, no default devices, one virtio disk), driven over QMP. HMP's
//! `savevm`/`loadvm` work on it without any guest: the firmware runs and the migration stream
//! holds RAM and device state.
//!
//! The emulator is the unpacked one of `scripts/common.sh`'s `ensure_qemu_system` (Debian 12's
//! qemu-system-x86 cannot be installed beside qemu-utils 10): `$SNAPFS_QEMU_SYSTEM_ROOT`, default
//! `/var/cache/snapfs-test/qemu-system`. A missing emulator fails the test, saying how to get it.
//!
//! [`Vm`] always kills its QEMU when dropped, also when the test panics.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Where `ensure_qemu_system` unpacks the emulator.
pub fn qemu_system_root() -> PathBuf {
    match std::env::var_os("SNAPFS_QEMU_SYSTEM_ROOT") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from("/var/cache/snapfs-test/qemu-system"),
    }
}

fn qemu_system_bin() -> PathBuf {
    let bin = qemu_system_root().join("usr/bin/qemu-system-x86_64");
    assert!(
        bin.is_file(),
        "{} is missing: these tests need QEMU's system emulator; scripts/test.sh unpacks it \
         (scripts/common.sh, ensure_qemu_system)",
        bin.display()
    );
    bin
}

/// One running QEMU (daemonized), its QMP connection, and the times its savevm/loadvm took.
pub struct Vm {
    pid: i32,
    _dir: tempfile::TempDir,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// (command, duration) of every savevm/loadvm, for the test's report line.
    pub timings: Vec<(String, Duration)>,
}

impl Vm {
    /// Starts QEMU on `image` (qcow2, read-write) and negotiates QMP. Panics with QEMU's stderr
    /// if it does not start (e.g. because another process holds the image's write lock).
    pub fn start(image: &Path) -> Vm {
        Self::try_start(image).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Vm::start`], returning QEMU's complaint instead of panicking when it refuses to run.
    pub fn try_start(image: &Path) -> Result<Vm, String> {
        let root = qemu_system_root();
        let dir = tempfile::Builder::new()
            .prefix("snapfs-vm-")
            .tempdir()
            .expect("temp dir");
        let sock = dir.path().join("qmp.sock");
        let pidfile = dir.path().join("qemu.pid");
        let mut cmd = Command::new(qemu_system_bin());
        // Debian builds the emulator with its firmware path compiled in (/usr/share/qemu,
        // /usr/share/seabios, /usr/lib/ipxe/qemu); unpacked, each is given with -L.
        for fw in ["usr/share/qemu", "usr/share/seabios", "usr/lib/ipxe/qemu"] {
            cmd.arg("-L").arg(root.join(fw));
        }
        cmd.args([
            "-accel",
            "tcg",
            "-display",
            "none",
            "-nodefaults",
            "-m",
            "64",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},format=qcow2,if=virtio",
            image.display().to_string().replace(',', ",,")
        ))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .arg("-pidfile")
        .arg(&pidfile)
        .arg("-daemonize");
        let out = super::run_status(&mut cmd);
        if !out.status.success() {
            return Err(format!(
                "qemu-system-x86_64 on {} exited {}: {}",
                image.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        // -daemonize returns once the monitor socket is listening and the pid file written.
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("QEMU wrote no pid to {}", pidfile.display()));
        let stream = match UnixStream::connect(&sock) {
            Ok(s) => s,
            Err(e) => {
                kill_and_wait(pid);
                panic!("connect to QMP at {}: {e}", sock.display());
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .expect("set QMP read timeout");
        let writer = stream.try_clone().expect("dup QMP socket");
        let mut vm = Vm {
            pid,
            _dir: dir,
            reader: BufReader::new(stream),
            writer,
            timings: Vec::new(),
        };
        let greeting = vm.read_reply();
        assert!(greeting.get("QMP").is_some(), "no QMP greeting: {greeting}");
        vm.qmp("qmp_capabilities", None)
            .unwrap_or_else(|e| panic!("qmp_capabilities: {e}"));
        Ok(vm)
    }

    /// QEMU's process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    fn read_reply(&mut self) -> Value {
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .unwrap_or_else(|e| panic!("read from QMP: {e}"));
            assert!(n > 0, "QMP connection closed by QEMU");
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("QMP sent something not JSON ({e}): {line}"));
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    /// One QMP command; `Err` carries QEMU's error description.
    pub fn qmp(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, String> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("write to QMP: {e}"));
        let reply = self.read_reply();
        match (reply.get("return"), reply.get("error")) {
            (Some(r), _) => Ok(r.clone()),
            (None, Some(e)) => Err(e.to_string()),
            _ => panic!("unexpected QMP reply to {command}: {reply}"),
        }
    }

    /// One HMP command through QMP's `human-monitor-command`; returns what HMP printed.
    pub fn hmp(&mut self, command_line: &str) -> String {
        let r = self
            .qmp(
                "human-monitor-command",
                Some(json!({ "command-line": command_line })),
            )
            .unwrap_or_else(|e| panic!("human-monitor-command {command_line:?}: {e}"));
        r.as_str().unwrap_or_default().to_string()
    }

    /// HMP `savevm NAME`: an internal snapshot of every disk plus the VM state. HMP prints
    /// nothing on success, an error line otherwise.
    pub fn savevm(&mut self, name: &str) {
        let start = Instant::now();
        let out = self.hmp(&format!("savevm {name}"));
        self.timings
            .push((format!("savevm {name}"), start.elapsed()));
        assert!(out.trim().is_empty(), "savevm {name}: {out}");
    }

    /// HMP `loadvm NAME`; `Err` with what HMP printed when QEMU refused or failed.
    pub fn loadvm(&mut self, name: &str) -> Result<(), String> {
        let start = Instant::now();
        let out = self.hmp(&format!("loadvm {name}"));
        self.timings
            .push((format!("loadvm {name}"), start.elapsed()));
        if out.trim().is_empty() {
            Ok(())
        } else {
            Err(out.trim().to_string())
        }
    }

    /// HMP `info status`, e.g. "VM status: running".
    pub fn status(&mut self) -> String {
        self.hmp("info status").trim().to_string()
    }

    /// `loadvm NAME`, then asserts that the VM runs: what a user restoring a checkpoint needs.
    pub fn assert_loadvm_runs(&mut self, name: &str, context: &str) {
        if let Err(e) = self.loadvm(name) {
            panic!("{context}: loadvm {name} failed: {e}");
        }
        let status = self.status();
        assert_eq!(
            status, "VM status: running",
            "{context}: after loadvm {name}"
        );
    }

    /// QMP `stop`: pauses the guest.
    pub fn stop(&mut self) {
        self.qmp("stop", None)
            .unwrap_or_else(|e| panic!("stop: {e}"));
    }

    /// The savevm/loadvm timings as one line, for the test's output.
    pub fn timings_line(&self) -> String {
        self.timings
            .iter()
            .map(|(c, d)| format!("{c}: {} ms", d.as_millis()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// QMP `quit`, then waits until the process is gone (its image closed and unlocked).
    pub fn quit(mut self) {
        // QEMU may close the socket before or after replying.
        let _ = self.writer.write_all(b"{\"execute\":\"quit\"}\n");
        let deadline = Instant::now() + Duration::from_secs(30);
        while alive(self.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Drop kills it if it is still there.
    }
}

fn alive(pid: i32) -> bool {
    // A daemonized QEMU is not our child; once it exits, init reaps it. A zombie counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

fn kill_and_wait(pid: i32) {
    if alive(pid) {
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        kill_and_wait(self.pid);
    }
}
