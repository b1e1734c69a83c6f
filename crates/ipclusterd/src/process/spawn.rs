//! Forking a worker held at its gate.
//!
//! The daemon forks, and the child — still the daemon's code, not yet the worker's program —
//! prepares itself (its sockets at fd 3 on, its own session, the seccomp filter, the worker's
//! user, the working directory), tells the daemon it is ready, and waits at its *gate*: a pipe
//! the daemon writes one byte to only once the child is inside its scope (the daemon creates the
//! scope around the child's PID, then moves it into a cgroup of its own). Released, the child
//! connects its stdout and stderr to journald (from inside the scope, so the lines belong to the
//! scope's unit) and executes the worker's command with the worker's environment. If the gate
//! closes without a release — the daemon gave up, or died — the child exits with 127 without
//! running anything.
//!
//! Why by hand and not `std::process::Command`: `Command::spawn` returns only once the child has
//! executed its program, so the wait at the gate could not happen before the exec. It used to
//! happen in a second program (the daemon's own binary, executed again as a launcher), which cost
//! every worker a second `execve` of a 60 MB binary, its dynamic linking and a Rust runtime's
//! start: about 1 ms of CPU each, spent while the serving generation answers. And
//! `LISTEN_PID`/`WATCHDOG_PID` must name the worker's own PID, known only after the fork: here the
//! child writes it into its environment, prepared with room for it.
//!
//! Between fork and exec only async-signal-safe calls are allowed: everything the child uses —
//! the argument and environment arrays, the paths to try, the filter, the journal's address and
//! header, the error texts — is built before the fork, and the child makes system calls only.
//! Signals are blocked across the fork and stay blocked while the child waits; the child resets
//! every handler to its default first, so none of the daemon's handlers (which write to pipes
//! the daemon shares with it) can run in the child; the worker starts with none blocked.
//!
//! Nothing of the worker's environment — `LD_PRELOAD` included — acts before the worker's own
//! `execve`: no program runs between the daemon's and the worker's. The child closes every fd of
//! the daemon's (its bus connection, its pidfds, the gates of other children) before it becomes
//! the worker's user. A process of that user may stop the child from then on; the daemon waits
//! at most 10 s for the child's report, and kills a child it drops at its gate rather than wait
//! for it to read the gate's end.

use std::{
    ffi::{CString, OsStr},
    io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
};

use rustix::process::{PidfdFlags, WaitId, WaitIdOptions};

use super::{SpawnSpec, WORKER_NOFILE, WORKER_PATH, pid_of};
use crate::journal;

/// The first fd handed to a worker (sd_listen_fds(3)).
pub const FIRST_FD: i32 = 3;
/// What the child's name (`comm`) is while it waits at its gate.
const GATE_NAME: &[u8] = b"ipclusterd-gate\0";
/// The byte that releases a child.
const RELEASE: u8 = b'G';
/// Room for a PID in `LISTEN_PID=` and `WATCHDOG_PID=` (u32::MAX has 10 digits).
const PID_ROOM: usize = 10;
/// Longest the daemon waits for a forked child to report that it is ready at its gate.
const READY_TIMEOUT_SECS: i64 = 10;

/// A child held at its gate: forked, not yet running the worker's command.
#[derive(Debug)]
pub struct Gated {
    pub pid: u32,
    /// `None` once released.
    pidfd: Option<OwnedFd>,
    gate: Option<OwnedFd>,
}

/// Forks the child for `spec`, held at its gate. Fails, with nothing left running, if the child
/// could not prepare itself (a working directory the worker's user cannot enter, say). Closing
/// the [`Gated`] without [`Gated::release`] makes the child exit without running anything.
pub fn spawn_gated(spec: &SpawnSpec) -> io::Result<Gated> {
    let prepared = Prepared::new(spec)?;
    let (gate_r, gate_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let (status_r, status_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    // The child's fds: 0–2 /dev/null, the handed sockets at 3, 4, …, then its gate and its
    // status pipe (close-on-exec: the worker never sees them), and nothing else (it closes every
    // fd above). The sources are first copied above every target here, so no dup2 in the child
    // overwrites a source it still needs.
    let n = i32::try_from(spec.fds.len()).map_err(|_| io::Error::from_raw_os_error(libc::EMFILE))?;
    let above = |fd: &OwnedFd| rustix::io::fcntl_dupfd_cloexec(fd, FIRST_FD + n + 2);
    let sources: Vec<OwnedFd> = spec.fds.iter().map(above).collect::<Result<_, _>>()?;
    let null = above(&std::fs::File::options().read(true).write(true).open("/dev/null")?.into())?;
    let gate = above(&gate_r)?;
    let status = above(&status_w)?;
    drop((gate_r, status_w));
    let fds = ChildFds {
        sources: sources.iter().map(AsRawFd::as_raw_fd).collect(),
        null: null.as_raw_fd(),
        gate: gate.as_raw_fd(),
        status: status.as_raw_fd(),
        first_free: FIRST_FD + n,
    };

    // SAFETY: sigset_t is plain data, filled by sigfillset before use.
    let (mut all, mut old) =
        unsafe { (std::mem::zeroed::<libc::sigset_t>(), std::mem::zeroed::<libc::sigset_t>()) };
    // SAFETY: blocks every signal in this thread across the fork (the child inherits the mask);
    // the parent restores its own mask right after.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: the child runs `child` alone, which makes async-signal-safe calls only and never
    // returns; everything it reads was built above.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: in the child just forked, as `child` requires.
        unsafe { child(&prepared, &fds) }
    }
    let forked = if pid < 0 { Err(io::Error::last_os_error()) } else { Ok(pid as u32) };
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop((sources, null, gate, status));
    let pid = forked?;
    // The child cannot have been reaped (only we wait for it), so the PID is still ours.
    let pidfd = match pid_of(pid).and_then(|p| Ok(rustix::process::pidfd_open(p, PidfdFlags::empty())?)) {
        Ok(fd) => fd,
        Err(e) => {
            // SAFETY: our own child, not yet reaped: killed and reaped here, nothing else waits
            // for it.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
                libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
            }
            return Err(e);
        }
    };
    // Ready (one byte 0) or not (1, then its errno): the child's report of its preparation,
    // which takes system calls only — but a process of the worker's user may stop the child
    // once it is that user, and the daemon must not wait for it forever.
    let mut report = [0u8; 5];
    let mut ready = [rustix::event::PollFd::new(&status_r, rustix::event::PollFlags::IN)];
    let timeout = rustix::event::Timespec { tv_sec: READY_TIMEOUT_SECS, tv_nsec: 0 };
    let failed = loop {
        break match rustix::event::poll(&mut ready, Some(&timeout)) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the worker's process did not get ready to start",
            )),
            Ok(_) => read_full(&status_r, &mut report[..1]),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => Err(e.into()),
        };
    };
    let failed = match failed {
        Ok(1) if report[0] == 0 => None,
        Ok(1) if report[0] == 1 && matches!(read_full(&status_r, &mut report[1..]), Ok(4)) => {
            Some(io::Error::from_raw_os_error(i32::from_le_bytes([
                report[1], report[2], report[3], report[4],
            ])))
        }
        Ok(_) => Some(io::Error::other("the worker's process ended before it was ready")),
        Err(e) => Some(e),
    };
    let gated = Gated { pid, pidfd: Some(pidfd), gate: Some(gate_w) };
    match failed {
        // Dropping it ends the child and reaps it.
        Some(e) => Err(e),
        None => Ok(gated),
    }
}

/// Reads until `buf` is full or the other end closes; how many bytes came.
fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match rustix::io::read(fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

impl Gated {
    /// Lets the child go on to run the worker's command.
    pub fn release(mut self) -> io::Result<OwnedFd> {
        let gate = self.gate.take().ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
        rustix::io::write(&gate, &[RELEASE])?;
        self.pidfd.take().ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))
    }
}

impl Drop for Gated {
    /// Not released: nothing of the worker's has run, and the child ends — closing its gate would
    /// end it, but a child a process of the worker's user stopped would never read it, so it is
    /// killed — and is reaped here so no zombie is left behind.
    fn drop(&mut self) {
        drop(self.gate.take());
        if let Some(pidfd) = self.pidfd.take() {
            let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
            let _ = rustix::process::waitid(
                WaitId::PidFd(rustix::fd::AsFd::as_fd(&pidfd)),
                WaitIdOptions::EXITED,
            );
        }
    }
}

/// The child's descriptors (raw: the child only passes them to system calls).
struct ChildFds {
    sources: Vec<i32>,
    null: i32,
    gate: i32,
    status: i32,
    /// The first fd after the handed sockets: the gate goes there, the status pipe after it.
    first_free: i32,
}

/// Everything the child needs, built before the fork.
struct Prepared {
    /// Paths to execute, in order (the command's, or each `PATH` directory's).
    paths: Vec<CString>,
    /// Owns what `argv_ptrs` points at.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    /// `/bin/sh`, and the arguments it gets for a file that is not an executable (`ENOEXEC`),
    /// as execvp(3) does: `/bin/sh`, the file (written in the child), then the command's
    /// arguments; `_sh_argv` owns the array `sh_argv_ptr` points at.
    sh: CString,
    _sh_argv: Vec<*const libc::c_char>,
    sh_argv_ptr: *mut *const libc::c_char,
    /// Owns the NUL-terminated `KEY=VALUE` entries `env_ptrs` points at (the PID slots are
    /// written in the child, through `env_ptrs`).
    _env: Vec<Vec<u8>>,
    env_ptrs: Vec<*const libc::c_char>,
    /// (entry, offset) of each `…_PID=` value to fill with the child's PID.
    pid_slots: Vec<(usize, usize)>,
    filter: seccompiler::BpfProgram,
    cwd: CString,
    user: Option<(u32, u32)>,
    delay: libc::timespec,
    nofile: Option<libc::rlimit>,
    journal: Option<journal::Stream>,
    /// "ipclusterd: cannot execute "<argv0>": "
    exec_failed: Vec<u8>,
    /// [`errno_texts`], read in the child.
    texts: &'static [Vec<u8>],
}

impl Prepared {
    fn new(spec: &SpawnSpec) -> io::Result<Self> {
        let invalid = || io::Error::from_raw_os_error(libc::EINVAL);
        let cstring = |b: &[u8]| CString::new(b).map_err(|_| invalid());
        let program = spec.argv.first().filter(|a| !a.is_empty()).ok_or_else(invalid)?;
        let argv: Vec<CString> = spec.argv.iter().map(|a| cstring(a.as_bytes())).collect::<Result<_, _>>()?;
        let argv_ptrs = argv.iter().map(|a| a.as_ptr()).chain([std::ptr::null()]).collect();
        let sh = cstring(b"/bin/sh")?;
        let mut sh_argv: Vec<*const libc::c_char> = [sh.as_ptr(), std::ptr::null()]
            .into_iter()
            .chain(argv[1..].iter().map(|a| a.as_ptr()))
            .chain([std::ptr::null()])
            .collect();
        let sh_argv_ptr = sh_argv.as_mut_ptr();

        // PATH first, then the worker's entries (a later one replaces an earlier of the same key).
        let mut vars: Vec<(&str, &str)> = vec![("PATH", WORKER_PATH)];
        for (k, v) in &spec.env {
            if k.is_empty() || k.contains('=') {
                return Err(invalid());
            }
            match vars.iter_mut().find(|(key, _)| key == k) {
                Some(slot) => slot.1 = v,
                None => vars.push((k, v)),
            }
        }
        // sd_watchdog_enabled(3), sd_listen_fds(3): the watchdog and the sockets are meant for
        // this very process, which the worker is once it execs.
        let has = |key: &str| vars.iter().any(|(k, _)| *k == key);
        let slots: Vec<&str> = [("WATCHDOG_USEC", "WATCHDOG_PID"), ("LISTEN_FDS", "LISTEN_PID")]
            .into_iter()
            .filter(|(when, _)| has(when))
            .map(|(_, slot)| slot)
            .collect();
        vars.retain(|(k, _)| !slots.contains(k));
        let search = vars.iter().find(|(k, _)| *k == "PATH").map_or(WORKER_PATH, |(_, v)| v).to_owned();
        let mut env: Vec<Vec<u8>> = Vec::with_capacity(vars.len() + slots.len());
        for (k, v) in vars {
            let entry = format!("{k}={v}");
            env.push(cstring(entry.as_bytes())?.into_bytes_with_nul());
        }
        let mut pid_slots = Vec::new();
        for slot in slots {
            let mut entry = format!("{slot}=").into_bytes();
            pid_slots.push((env.len(), entry.len()));
            entry.extend_from_slice(&[b'0'; PID_ROOM + 1]);
            env.push(entry);
        }
        let env_ptrs =
            env.iter_mut().map(|e| e.as_mut_ptr() as *const libc::c_char).chain([std::ptr::null()]).collect();

        // As execvp(3) looks: a command with a slash as it is, otherwise each PATH directory
        // (the worker's PATH; an empty entry is the working directory).
        let paths = if program.contains('/') {
            vec![cstring(program.as_bytes())?]
        } else {
            search
                .split(':')
                .map(|dir| if dir.is_empty() { "." } else { dir })
                .map(|dir| cstring(format!("{dir}/{program}").as_bytes()))
                .collect::<Result<_, _>>()?
        };
        let journal = journal::Stream::prepare(
            std::path::Path::new(journal::STDOUT_SOCKET),
            &spec.identifier,
            &spec.unit,
        )
        .ok();
        Ok(Self {
            texts: errno_texts(),
            paths,
            _argv: argv,
            argv_ptrs,
            sh,
            _sh_argv: sh_argv,
            sh_argv_ptr,
            _env: env,
            env_ptrs,
            pid_slots,
            filter: crate::confine::worker_filter(!spec.fds.is_empty())?,
            cwd: cstring(OsStr::new(&spec.cwd).as_bytes())?,
            user: spec.user,
            delay: libc::timespec {
                tv_sec: spec.delay.as_secs().min(3600) as libc::time_t,
                tv_nsec: spec.delay.subsec_nanos() as libc::c_long,
            },
            nofile: WORKER_NOFILE.get().copied(),
            journal,
            exec_failed: format!("ipclusterd: cannot execute {program:?}: ").into_bytes(),
        })
    }
}

/// The text of each errno, made once before any fork (strerror is not async-signal-safe).
fn errno_texts() -> &'static [Vec<u8>] {
    static TEXTS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    TEXTS.get_or_init(|| {
        (0..200).map(|e| format!("{}\n", io::Error::from_raw_os_error(e)).into_bytes()).collect()
    })
}

/// The forked child: prepares itself, waits at its gate, runs the worker's command.
///
/// # Safety
/// Only in a child just forked from a thread with every signal blocked. Async-signal-safe: system
/// calls only, nothing allocates; never returns.
unsafe fn child(p: &Prepared, fds: &ChildFds) -> ! {
    // SAFETY: system calls with pointers into `p` and the stack, alive for each (the whole body).
    unsafe {
        // No handler of the daemon's may run here: every signal's action is its default (an
        // ignored one included, which exec would keep: SIGPIPE, which Rust programs ignore, or
        // 32 and 33, which glibc's sigaction will not touch — hence the system call itself).
        // The kernel's struct is the handler, flags, (restorer,) mask: all zeroes is SIG_DFL,
        // no flags, an empty mask, whatever the architecture.
        let dfl = [0u64; 4];
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(libc::SYS_rt_sigaction, sig, dfl.as_ptr(), std::ptr::null_mut::<u64>(), 8usize);
            }
        }
        // The gate and the status pipe first, where nothing of the child's will be (the sources
        // are all above): a report is never written to a copy of one of the daemon's fds. If
        // they cannot move, the daemon reads the end of the pipe: "ended before it was ready".
        let (gate, status) = (fds.first_free, fds.first_free + 1);
        if libc::dup3(fds.gate, gate, libc::O_CLOEXEC) < 0
            || libc::dup3(fds.status, status, libc::O_CLOEXEC) < 0
        {
            libc::_exit(127);
        }
        let prepare = || -> Result<(), i32> {
            let check = |ret: libc::c_int| if ret < 0 { Err(*libc::__errno_location()) } else { Ok(()) };
            for target in 0..3 {
                check(libc::dup2(fds.null, target))?;
            }
            for (i, src) in fds.sources.iter().enumerate() {
                check(libc::dup2(*src, FIRST_FD + i as i32))?;
            }
            // Then nothing of the daemon's: no copy of its bus connection, its pidfds, or the
            // gates of the other children it holds (a child waiting at its gate would otherwise
            // keep another's open, which then could never be closed to end it).
            if libc::syscall(libc::SYS_close_range, status + 1, libc::c_uint::MAX, 0) < 0 {
                // A kernel before 5.9 (or a filter that refuses the call): one by one, up to
                // the limit on open files or 65 536 (a daemon with more open is not expected).
                let mut lim: libc::rlimit = std::mem::zeroed();
                let max = match libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) {
                    0 => lim.rlim_cur.min(1 << 16) as i32,
                    _ => 1 << 16,
                };
                for fd in status + 1..max {
                    libc::close(fd);
                }
            }
            if let Some(lim) = &p.nofile {
                libc::setrlimit(libc::RLIMIT_NOFILE, lim);
            }
            // Its own session: a worker never shares the daemon's process group or terminal.
            libc::setsid();
            // The filter while still root (without no_new_privs, only root may install it), then
            // the worker's user, then its directory as that user: a directory the user cannot
            // enter fails the spawn as it would for the user.
            crate::confine::install(&p.filter).map_err(|e| e.raw_os_error().unwrap_or(libc::EPERM))?;
            if let Some((uid, gid)) = p.user {
                // No supplementary groups (the daemon's are root's), then the group, then the user.
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setgid(gid))?;
                check(libc::setuid(uid))?;
            }
            check(libc::chdir(p.cwd.as_ptr()))?;
            libc::prctl(libc::PR_SET_NAME, GATE_NAME.as_ptr() as libc::c_ulong, 0, 0, 0);
            Ok(())
        };
        if let Err(errno) = prepare() {
            let mut report = [1u8; 5];
            report[1..].copy_from_slice(&errno.to_le_bytes());
            journal::write_all(status, &report);
            libc::_exit(127);
        }
        journal::write_all(status, &[0]);
        libc::close(status);

        // The gate: one byte, written once the child is in its scope; anything else ends it.
        let mut byte = 0u8;
        loop {
            match libc::read(gate, (&mut byte as *mut u8).cast(), 1) {
                1 if byte == RELEASE => break,
                -1 if *libc::__errno_location() == libc::EINTR => continue,
                _ => libc::_exit(127),
            }
        }
        libc::close(gate);
        // Released with the others of its deploy: each waits its turn (see `SpawnSpec::delay`).
        let (mut wait, mut rest) = (p.delay, p.delay);
        while (wait.tv_sec > 0 || wait.tv_nsec > 0)
            && libc::nanosleep(&wait, &mut rest) != 0
            && *libc::__errno_location() == libc::EINTR
        {
            wait = rest;
        }
        // A signal that came while it waited (at the gate or after) is a stop (the daemon's
        // `stop_signal`, which may be one whose default is to do nothing, like SIGWINCH): the
        // worker's command never runs.
        let mut pending: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut pending);
        if libc::sigpending(&mut pending) == 0 && (1..=64).any(|sig| libc::sigismember(&pending, sig) == 1) {
            libc::_exit(127);
        }

        if let Some(fd) = p.journal.as_ref().and_then(journal::Stream::connect) {
            // Both stdout and stderr go to the stream; /dev/null stays at stdin.
            libc::dup2(fd, 1);
            libc::dup2(fd, 2);
            libc::close(fd);
        }
        let pid = libc::getpid() as u32;
        for &(entry, offset) in &p.pid_slots {
            write_decimal(p.env_ptrs[entry].cast_mut().cast::<u8>().add(offset), pid);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());

        // execvp(3)'s rules: a missing file or directory tries the next path; a refused one is
        // remembered and the search goes on; anything else ends it.
        let mut errno = libc::ENOENT;
        let mut refused = false;
        for path in &p.paths {
            libc::execve(path.as_ptr(), p.argv_ptrs.as_ptr(), p.env_ptrs.as_ptr());
            errno = *libc::__errno_location();
            if errno == libc::ENOEXEC {
                // A script without `#!`: the shell runs it.
                *p.sh_argv_ptr.add(1) = path.as_ptr();
                libc::execve(p.sh.as_ptr(), p.sh_argv_ptr.cast_const(), p.env_ptrs.as_ptr());
                errno = *libc::__errno_location();
                break;
            }
            match errno {
                libc::EACCES => refused = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => break,
            }
        }
        if refused
            && matches!(errno, libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT)
        {
            errno = libc::EACCES;
        }
        // Signals blocked again: a SIGPIPE from a closed journal stream must not end the child
        // before it says why it failed and exits 127.
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        journal::write_all(2, &p.exec_failed);
        journal::write_all(2, p.texts.get(errno as usize).map_or(b"unknown error\n", |t| t.as_slice()));
        libc::_exit(127)
    }
}

/// Writes `n` in decimal at `at`, then a NUL. Async-signal-safe.
///
/// # Safety
/// `at` must have room for `PID_ROOM + 1` bytes.
unsafe fn write_decimal(at: *mut u8, n: u32) {
    let mut digits = [0u8; PID_ROOM];
    let mut len = 0;
    let mut rest = n;
    loop {
        digits[len] = b'0' + (rest % 10) as u8;
        len += 1;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: within the room the caller vouches for.
        unsafe { *at.add(i) = digits[len - 1 - i] };
    }
    // SAFETY: as above.
    unsafe { *at.add(len) = 0 };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_is_written_in_decimal_and_ended() {
        for (n, text) in [(0, "0"), (7, "7"), (4_194_304, "4194304"), (u32::MAX, "4294967295")] {
            let mut buf = [b'x'; PID_ROOM + 2];
            // SAFETY: the buffer has PID_ROOM + 2 bytes.
            unsafe { write_decimal(buf.as_mut_ptr(), n) };
            let end = buf.iter().position(|b| *b == 0).unwrap();
            assert_eq!(&buf[..end], text.as_bytes());
        }
    }

    fn spec(argv: &[&str], env: &[(&str, &str)]) -> SpawnSpec {
        SpawnSpec {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            cwd: "/".into(),
            user: None,
            identifier: "t".into(),
            unit: "t.scope".into(),
            fds: Vec::new(),
            delay: std::time::Duration::ZERO,
        }
    }

    #[test]
    fn the_environment_is_path_then_the_workers_and_the_pid_slots_have_room() {
        let p = Prepared::new(&spec(
            &["node", "app.js"],
            &[("LISTEN_FDS", "1"), ("PATH", "/opt/bin:"), ("LISTEN_PID", "1"), ("A", "1=2")],
        ))
        .unwrap();
        let env: Vec<String> = p._env.iter().map(|e| String::from_utf8_lossy(e).into_owned()).collect();
        assert_eq!(env[..3], ["PATH=/opt/bin:\0", "LISTEN_FDS=1\0", "A=1=2\0"]);
        assert_eq!(env.len(), 4, "a worker's own LISTEN_PID is replaced by the slot: {env:?}");
        assert_eq!(p.pid_slots, [(3, "LISTEN_PID=".len())]);
        assert_eq!(p._env[3].len(), "LISTEN_PID=".len() + PID_ROOM + 1);
        assert_eq!(p.env_ptrs.len(), 5, "NULL-terminated");
        assert!(p.env_ptrs[..4].iter().zip(&p._env).all(|(ptr, e)| ptr.cast::<u8>() == e.as_ptr()));
        assert!(p.env_ptrs[4].is_null() && p.argv_ptrs[2].is_null());
        let paths: Vec<&str> = p.paths.iter().map(|c| c.to_str().unwrap()).collect();
        assert_eq!(paths, ["/opt/bin/node", "./node"], "the worker's PATH is searched");
        let p = Prepared::new(&spec(&["/bin/sh"], &[])).unwrap();
        assert_eq!(p.paths, [CString::new("/bin/sh").unwrap()]);
        assert!(p.pid_slots.is_empty());
    }

    #[test]
    fn an_empty_command_or_a_nul_or_a_bad_key_is_refused_before_any_fork() {
        assert!(Prepared::new(&spec(&[], &[])).is_err());
        assert!(Prepared::new(&spec(&[""], &[])).is_err());
        assert!(Prepared::new(&spec(&["/bin/sh", "a\0b"], &[])).is_err());
        assert!(Prepared::new(&spec(&["/bin/sh"], &[("A=B", "1")])).is_err());
        assert!(Prepared::new(&spec(&["/bin/sh"], &[("A", "1\0x")])).is_err());
    }
}
