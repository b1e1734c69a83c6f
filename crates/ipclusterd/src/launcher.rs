//! The launcher: the first program a worker process runs (`ipclusterd __launch …`).
//!
//! The daemon forks the launcher, then creates the generation's scope with the launcher's PID in
//! it, and only then releases it through its gate pipe (the fd after the handed sockets, named
//! on its command line). So the worker is
//! inside its scope from its first instruction, as with `systemd-run --scope`. (The wait cannot
//! happen inside `pre_exec`: `Command::spawn` blocks until the child has exec'd.)
//!
//! Released, the launcher connects stdout and stderr to journald (from inside the scope, so the
//! lines belong to the scope's unit) and execs the worker's command. If the gate closes without
//! a release, the daemon gave up: exit 127 without running anything.
//!
//! The release carries the worker's environment: `G`, then `KEY=VALUE` entries each ended by a
//! NUL byte. The launcher itself runs with `PATH` alone (and already as the worker's user), so
//! nothing in the worker's environment — `LD_PRELOAD` included — acts before the worker's own
//! `execve`.

use std::{
    ffi::OsString,
    io::Read,
    os::{fd::FromRawFd, unix::process::CommandExt},
    path::Path,
};

/// argv[1] that selects the launcher.
pub const ARG: &str = "__launch";
/// The first fd handed to a worker (sd_listen_fds(3)); the gate comes after the handed sockets.
pub const FIRST_FD: i32 = 3;
/// Most bytes a release may carry (the environment is bounded by the config's limits).
const MAX_RELEASE: u64 = 4 << 20;

/// The bytes that release a launcher with the worker's environment `env`.
pub fn encode_release(env: &[(String, String)]) -> Vec<u8> {
    let mut out = vec![b'G'];
    for (k, v) in env {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// The environment a release carries; `None` when the gate closed without one.
pub fn decode_release(bytes: &[u8]) -> Option<Vec<(OsString, OsString)>> {
    use std::os::unix::ffi::OsStrExt;
    let rest = bytes.strip_prefix(b"G")?;
    Some(
        rest.split(|b| *b == 0)
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| {
                let eq = kv.iter().position(|b| *b == b'=')?;
                let k = std::ffi::OsStr::from_bytes(&kv[..eq]).to_owned();
                let v = std::ffi::OsStr::from_bytes(&kv[eq + 1..]).to_owned();
                Some((k, v))
            })
            .collect(),
    )
}

/// Runs the launcher: `__launch <gate fd> <identifier> <unit> -- <argv…>`. Never returns on
/// success.
pub fn main(args: Vec<OsString>) -> i32 {
    let usage = || {
        eprintln!("ipclusterd {ARG}: usage: {ARG} GATE_FD IDENTIFIER UNIT -- ARGV…");
        2
    };
    let mut it = args.into_iter().skip(2);
    let (Some(gate_fd), Some(identifier), Some(unit), Some(sep)) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return usage();
    };
    let argv: Vec<OsString> = it.collect();
    let Some(gate_fd) = gate_fd.to_str().and_then(|f| f.parse::<i32>().ok()).filter(|f| *f >= FIRST_FD)
    else {
        return usage();
    };
    if sep != "--" || argv.is_empty() {
        return usage();
    }
    // SAFETY: the gate's read end is at `gate_fd`, set up by the daemon for this process alone
    // (process.rs); we own it.
    let gate = unsafe { std::fs::File::from_raw_fd(gate_fd) };
    let mut release = Vec::new();
    if gate.take(MAX_RELEASE).read_to_end(&mut release).is_err() {
        return 127;
    }
    let Some(env) = decode_release(&release) else { return 127 };

    let identifier = identifier.to_string_lossy();
    let unit = unit.to_string_lossy();
    if let Ok(stream) = crate::journal::connect(Path::new(crate::journal::STDOUT_SOCKET), &identifier, &unit)
    {
        // Both stdout and stderr go to the stream; the original descriptors (/dev/null) close.
        let _ = rustix::stdio::dup2_stdout(&stream);
        let _ = rustix::stdio::dup2_stderr(&stream);
    }
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env("PATH", crate::process::WORKER_PATH)
        .envs(env.iter().map(|(k, v)| (k, v)));
    // sd_watchdog_enabled(3), sd_listen_fds(3): the watchdog and the sockets are meant for this
    // very process, which the worker is once it execs.
    if env.iter().any(|(k, _)| k == "WATCHDOG_USEC") {
        cmd.env("WATCHDOG_PID", std::process::id().to_string());
    }
    if env.iter().any(|(k, _)| k == "LISTEN_FDS") {
        cmd.env("LISTEN_PID", std::process::id().to_string());
    }
    let err = cmd.exec();
    eprintln!("ipclusterd: cannot execute {:?}: {err}", argv[0]);
    127
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_carries_the_environment_and_nothing_else_releases() {
        let env = vec![("A".to_owned(), "1=2".to_owned()), ("LD_PRELOAD".to_owned(), "/x.so".to_owned())];
        let decoded = decode_release(&encode_release(&env)).unwrap();
        assert_eq!(decoded, [("A".into(), "1=2".into()), ("LD_PRELOAD".into(), "/x.so".into())]);
        assert_eq!(decode_release(b""), None, "the gate closed: the daemon gave up");
        assert_eq!(decode_release(b"1"), None);
        assert_eq!(decode_release(b"G").unwrap(), []);
    }
}
