//! [`Notifier`]: what the daemon tells its service manager — `READY=1` once what it found
//! running is adopted and the autostart deploys are done, `WATCHDOG=1`, and a `STATUS=` line.
//! [`Systemd`] sends them with sd_notify(3) (harmless when not started by systemd); the
//! supervisor's tests record them.

/// The service manager's notifications. Fire and forget: a failure is logged, never fatal.
pub trait Notifier: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// The daemon is up (`READY=1`).
    fn ready(&self);
    /// Still alive (`WATCHDOG=1`).
    fn watchdog(&self);
    /// How often the service manager wants [`Notifier::watchdog`] at the latest (its
    /// `WatchdogSec=`), if it watches at all.
    fn watchdog_timeout(&self) -> Option<std::time::Duration>;
    /// The one-line status `systemctl status` shows (`STATUS=`).
    fn status(&self, line: &str);
}

/// sd_notify(3) to `$NOTIFY_SOCKET`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Systemd;

impl Notifier for Systemd {
    fn ready(&self) {
        crate::notify_systemd(&[sd_notify::NotifyState::Ready]);
    }
    fn watchdog(&self) {
        crate::notify_systemd(&[sd_notify::NotifyState::Watchdog]);
    }
    fn watchdog_timeout(&self) -> Option<std::time::Duration> {
        // sd_watchdog_enabled(3): `$WATCHDOG_USEC`, if `$WATCHDOG_PID` is this process.
        sd_notify::watchdog_enabled()
    }
    fn status(&self, line: &str) {
        crate::notify_systemd(&[sd_notify::NotifyState::Status(line)]);
    }
}
