//! Helpers shared by the end-to-end scenarios in `tests/tests/`.
//!
//! Each scenario boots its own sandbox, installs the build with `cargo xtask install` inside it
//! and drives it the way an operator would: `systemctl`, `busctl`, `journalctl`, `iptables`.

use std::time::{Duration, Instant};

pub use ipcluster_sandbox::Sandbox;

/// Boots a sandbox with the build installed. Panics with the reason if this machine cannot run
/// end-to-end tests (not root, no systemd): a skipped end-to-end test must never look like a pass.
/// (`cargo xtask test` leaves these tests out, loudly, when they cannot run.)
pub fn installed_sandbox() -> Sandbox {
    if let Some(why) = ipcluster_sandbox::unavailable_reason() {
        panic!("end-to-end test cannot run: {why}");
    }
    let sandbox = Sandbox::boot().expect("sandbox boots");
    sandbox.install().expect("cargo xtask install succeeds inside the sandbox");
    sandbox
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Output of a command as text.
pub fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}
