//! The launcher: the first program a worker process runs (`ipclusterd __launch …`).
//!
//! The daemon forks the launcher, then creates the generation's scope with the launcher's PID in
//! it, and only then releases it by writing a byte to its gate pipe (fd 3). So the worker is
//! inside its scope from its first instruction, as with `systemd-run --scope`. (The wait cannot
//! happen inside `pre_exec`: `Command::spawn` blocks until the child has exec'd.)
//!
//! Released, the launcher connects stdout and stderr to journald (from inside the scope, so the
//! lines belong to the scope's unit) and execs the worker's command. If the gate closes without
//! a byte, the daemon gave up: exit 127 without running anything.

use std::{
    ffi::OsString,
    io::Read,
    os::{fd::FromRawFd, unix::process::CommandExt},
    path::Path,
};

/// argv[1] that selects the launcher.
pub const ARG: &str = "__launch";
/// The fd the gate's read end is passed on.
pub const GATE_FD: i32 = 3;

/// Runs the launcher: `__launch <identifier> <unit> -- <argv…>`. Never returns on success.
pub fn main(args: Vec<OsString>) -> i32 {
    let mut it = args.into_iter().skip(2);
    let (Some(identifier), Some(unit), Some(sep)) = (it.next(), it.next(), it.next()) else {
        eprintln!("ipclusterd {ARG}: usage: {ARG} IDENTIFIER UNIT -- ARGV…");
        return 2;
    };
    let argv: Vec<OsString> = it.collect();
    if sep != "--" || argv.is_empty() {
        eprintln!("ipclusterd {ARG}: usage: {ARG} IDENTIFIER UNIT -- ARGV…");
        return 2;
    }
    // SAFETY: fd 3 is the gate's read end, set up by the daemon for this process alone; we own it.
    let mut gate = unsafe { std::fs::File::from_raw_fd(GATE_FD) };
    let mut byte = [0u8; 1];
    match gate.read(&mut byte) {
        Ok(1) => {}
        _ => return 127,
    }
    drop(gate);

    let identifier = identifier.to_string_lossy();
    let unit = unit.to_string_lossy();
    if let Ok(stream) = crate::journal::connect(Path::new(crate::journal::STDOUT_SOCKET), &identifier, &unit)
    {
        // Both stdout and stderr go to the stream; the original descriptors (/dev/null) close.
        let _ = rustix::stdio::dup2_stdout(&stream);
        let _ = rustix::stdio::dup2_stderr(&stream);
    }
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    // sd_watchdog_enabled(3): the watchdog is meant for this very process.
    if std::env::var_os("WATCHDOG_USEC").is_some() {
        cmd.env("WATCHDOG_PID", std::process::id().to_string());
    }
    let err = cmd.exec();
    eprintln!("ipclusterd: cannot execute {:?}: {err}", argv[0]);
    127
}
