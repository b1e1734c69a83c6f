//! The app files the scenarios deploy: ipcluster-demo, described the way an operator would,
//! with settings a test can rely on (no autostart, short timeouts). One builder, so a scenario
//! names only what it cares about.

use std::fmt::Write;

/// The demo worker's path in a sandbox (`cargo xtask install` puts it there).
pub const DEMO: &str = "/usr/local/bin/ipcluster-demo";

/// An app file of ipcluster-demo workers.
#[derive(Debug, Clone)]
pub struct Demo {
    args: Vec<String>,
    workers: u32,
    listen: Vec<String>,
    extra: Vec<String>,
    ready_timeout: &'static str,
    stop_timeout: &'static str,
}

impl Demo {
    /// `workers` workers on `0.0.0.0:80` (NAT), not autostarted, ready within 5 s, stopped
    /// within 2 s.
    pub fn new(workers: u32) -> Self {
        Self {
            args: Vec::new(),
            workers,
            listen: vec!["0.0.0.0:80".into()],
            extra: Vec::new(),
            ready_timeout: "5s",
            stop_timeout: "2s",
        }
    }

    /// The demo's flags (`--log-requests`, `--delay-ready 400`, …).
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args = args.iter().map(|a| (*a).to_owned()).collect();
        self
    }

    /// The `listen` entries.
    pub fn listen(mut self, listen: &[&str]) -> Self {
        self.listen = listen.iter().map(|l| (*l).to_owned()).collect();
        self
    }

    /// `routing = "socket"`.
    pub fn socket(self) -> Self {
        self.with("routing = \"socket\"")
    }

    pub fn ready_timeout(mut self, t: &'static str) -> Self {
        self.ready_timeout = t;
        self
    }

    pub fn stop_timeout(mut self, t: &'static str) -> Self {
        self.stop_timeout = t;
        self
    }

    /// One more line of the file (`user = "nobody"`).
    pub fn with(mut self, line: &str) -> Self {
        self.extra.push(line.to_owned());
        self
    }

    /// The file's text.
    pub fn toml(&self) -> String {
        let quoted = |v: &[String]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
        let command: Vec<String> =
            std::iter::once(DEMO.to_owned()).chain(self.args.iter().cloned()).collect();
        let mut t = format!(
            "\ncommand = [{}]\nworkers = {}\nlisten = [{}]\n",
            quoted(&command),
            self.workers,
            quoted(&self.listen)
        );
        for line in &self.extra {
            let _ = writeln!(t, "{line}");
        }
        let _ = write!(
            t,
            "autostart = false\nready_timeout = \"{}\"\nstop_timeout = \"{}\"\n",
            self.ready_timeout, self.stop_timeout
        );
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_app_is_what_the_scenarios_assume() {
        assert_eq!(
            Demo::new(4).toml(),
            "\ncommand = [\"/usr/local/bin/ipcluster-demo\"]\nworkers = 4\nlisten = [\"0.0.0.0:80\"]\n\
             autostart = false\nready_timeout = \"5s\"\nstop_timeout = \"2s\"\n"
        );
        let t = Demo::new(2).args(&["--delay-ready", "400"]).listen(&["[::]:80"]).socket().toml();
        assert!(
            t.contains("command = [\"/usr/local/bin/ipcluster-demo\", \"--delay-ready\", \"400\"]\n"),
            "{t}"
        );
        assert!(t.contains("listen = [\"[::]:80\"]\nrouting = \"socket\"\nautostart"), "{t}");
    }
}
