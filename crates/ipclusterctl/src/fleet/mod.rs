//! `ipclusterctl deploy APP --hosts H1,H2,… [--pause DURATION] [--rollback-on-failure]`: a
//! rolling deploy, host by host, each over its own ssh connection ([`crate::remote`]).
//!
//! A host's turn: read which generation is live, subscribe to `WorkerExited`, Deploy (with the
//! same options on every host), and once the new generation is live watch it for `--pause`: a
//! worker of it that exits, or a live worker that is no longer the one it was, fails the host.
//! The next host starts only after that. The first failure stops the roll:
//!
//! - the failed host keeps its previous generation: a failed Deploy changed nothing, and a
//!   generation that went live but did not stay healthy is rolled back (`Rollback` to the
//!   generation that was live before), so a failed host is left on the new version only if that
//!   rollback fails;
//! - the hosts not reached are not contacted;
//! - with `--rollback-on-failure`, the hosts already done roll back too, last done first.
//!
//! Progress goes to stderr as it happens; stdout gets one line per host (its final state) and a
//! summary, or with `--json` one document with a result per host. Exit status 1 if any host
//! failed. The order of the turns is [`roll`], separate from the bus so its tests can play hosts.

use std::{collections::BTreeMap, collections::HashMap, process::ExitCode, time::Duration};

use futures_util::StreamExt;
use serde::Serialize;
use zbus::wire::OwnedVariant;

use ipcluster_bus::{ManagerProxy, WorkerExitedStream, WorkerRow, option};

use crate::remote::{self, Destination, Tunnel};

/// What a deploy may override, for this generation only (the same on every host of a roll).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DeployOptions {
    /// Number of workers (a power of two) for this generation.
    #[arg(long)]
    pub workers: Option<u32>,
    /// The worker's argv for this generation (the rest of the line: put it last).
    #[arg(long, num_args = 1.., allow_hyphen_values = true, value_name = "ARG")]
    pub command: Option<Vec<String>>,
    /// Extra environment K=V for this generation (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Working directory for this generation.
    #[arg(long)]
    pub workdir: Option<String>,
    /// Deploy a canary on K bands (spread over the band space); the live generation keeps the
    /// others until `ipclusterctl promote` (or `rollback`).
    #[arg(long, value_name = "K")]
    pub canary: Option<u32>,
    /// With --canary: promote it by itself after DURATION (`10m`) if none of its workers crashed,
    /// was replaced or failed a health check; roll it back at the first that does. Waits and
    /// says which.
    #[arg(long, value_name = "DURATION", requires = "canary", value_parser = canary_for)]
    pub canary_for: Option<u64>,
}

/// `--canary-for`: a duration, in whole seconds (at least one).
fn canary_for(s: &str) -> Result<u64, String> {
    let d = ipcluster_core::units::parse_duration(s)?;
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    ipcluster_core::canary::check_for(secs).map(|d| d.as_secs())
}

impl DeployOptions {
    /// Deploy's `a{sv}` options.
    pub fn to_bus(&self) -> zbus::Result<HashMap<&'static str, OwnedVariant>> {
        fn opt<'a>(v: impl Into<zbus::wire::Variant<'a>>) -> zbus::Result<OwnedVariant> {
            v.into().try_to_owned()
        }
        let mut options = HashMap::new();
        if let Some(w) = self.workers {
            options.insert(option::WORKERS, opt(w)?);
        }
        if let Some(c) = &self.command {
            options.insert(option::COMMAND, opt(c.clone())?);
        }
        if !self.env.is_empty() {
            options.insert(option::ENVIRONMENT, opt(self.env.clone())?);
        }
        if let Some(d) = &self.workdir {
            options.insert(option::WORKING_DIRECTORY, opt(d.clone())?);
        }
        if let Some(k) = self.canary {
            options.insert(option::CANARY, opt(k)?);
        }
        if let Some(secs) = self.canary_for {
            options.insert(option::CANARY_FOR, opt(secs)?);
        }
        Ok(options)
    }
}

/// How a deploy rolls across hosts.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Roll {
    /// Deploy on each of these hosts over ssh, one after another: [USER@]HOST[:PORT],…
    #[arg(long, value_delimiter = ',', value_name = "HOSTS", conflicts_with = "no_block")]
    pub hosts: Vec<Destination>,
    /// With --hosts: how long each host's new generation must serve with no worker exiting
    /// before the next host (e.g. 30s, 2min).
    #[arg(long, requires = "hosts", value_name = "DURATION", value_parser = parse_pause)]
    pub pause: Option<Duration>,
    /// With --hosts: when a host fails, roll the hosts already done back to the generation they
    /// had.
    #[arg(long, requires = "hosts")]
    pub rollback_on_failure: bool,
}

fn parse_pause(s: &str) -> Result<Duration, String> {
    ipcluster_core::units::parse_duration(s)
}

/// A duration as people write it: `1500ms`, `30s`.
fn shown(d: Duration) -> String {
    if d.subsec_millis() == 0 { format!("{}s", d.as_secs()) } else { format!("{}ms", d.as_millis()) }
}

/// What a host serves after it failed, as far as the roll knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    /// This generation is live.
    Live(u64),
    /// No generation is live (the app had none).
    Nothing,
    /// Nothing was changed there: it serves what it served.
    Untouched,
    /// The connection broke during a call that changes things (which goes on without its
    /// caller): only the host can say.
    Unknown,
}

/// How one host's deploy went.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Turn {
    /// The new generation is live (and stayed healthy for the pause).
    Live { previous: Option<u64>, generation: u64 },
    /// The deploy failed, or the host could not be reached.
    Failed { previous: Option<u64>, error: String, after: After },
    /// The new generation went live but did not stay healthy (or could not be watched).
    Unhealthy { previous: Option<u64>, generation: u64, error: String },
}

/// A rollback that failed; `lost` if the connection broke during the call.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fault {
    error: String,
    lost: bool,
}

/// Where a host ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Its new generation is live.
    Deployed { previous: Option<u64>, generation: u64 },
    /// It failed; `generation` is the one that went live but did not stay healthy, if any.
    Failed { previous: Option<u64>, generation: Option<u64>, after: After, error: String },
    /// It was deployed, then rolled back because a later host failed; `live` serves again.
    RolledBack { previous: u64, generation: u64, live: u64 },
    /// It was deployed, and rolling it back failed: `generation` is still live, unless the
    /// connection broke during the rollback (`lost`).
    RollbackFailed { previous: Option<u64>, generation: u64, error: String, lost: bool },
    /// Not contacted.
    NotReached,
}

/// What a roll asks of its hosts (the real ones over ssh; the tests' fakes).
trait Hosts {
    /// Deploys on host `i` and, with a pause, watches the new generation.
    async fn deploy(&mut self, i: usize) -> Turn;
    /// Rolls host `i` back to generation `to`; returns the generation now live.
    async fn rollback(&mut self, i: usize, to: u64) -> Result<u64, Fault>;
}

/// Deploys on hosts `0..n` in order until one fails; then, with `rollback_on_failure`, rolls
/// back the hosts already done, last first. A host whose new generation went live but failed
/// its pause is rolled back in any case: a failed host keeps its previous generation.
async fn roll(hosts: &mut impl Hosts, n: usize, rollback_on_failure: bool) -> Vec<Outcome> {
    let mut out = vec![Outcome::NotReached; n];
    let mut failed = false;
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = match hosts.deploy(i).await {
            Turn::Live { previous, generation } => Outcome::Deployed { previous, generation },
            Turn::Failed { previous, error, after } => {
                failed = true;
                Outcome::Failed { previous, generation: None, after, error }
            }
            Turn::Unhealthy { previous, generation, error } => {
                failed = true;
                let (after, error) = match previous {
                    Some(p) => match hosts.rollback(i, p).await {
                        Ok(live) => (After::Live(live), error),
                        Err(f) => {
                            let after = if f.lost { After::Unknown } else { After::Live(generation) };
                            (after, format!("{error}; rolling back failed: {}", f.error))
                        }
                    },
                    None => {
                        (After::Live(generation), format!("{error}; no previous generation to return to"))
                    }
                };
                Outcome::Failed { previous, generation: Some(generation), after, error }
            }
        };
        if failed {
            break;
        }
    }
    if failed && rollback_on_failure {
        for i in (0..n).rev() {
            let Outcome::Deployed { previous, generation } = out[i] else { continue };
            out[i] = match previous {
                Some(p) => match hosts.rollback(i, p).await {
                    Ok(live) => Outcome::RolledBack { previous: p, generation, live },
                    Err(Fault { error, lost }) => {
                        Outcome::RollbackFailed { previous, generation, error, lost }
                    }
                },
                None => Outcome::RollbackFailed {
                    previous,
                    generation,
                    error: "no previous generation to return to".into(),
                    lost: false,
                },
            };
        }
    }
    out
}

/// A host's final line.
fn line(app: &str, host: &str, outcome: &Outcome) -> String {
    let was = |g: Option<u64>| g.map_or("none".to_owned(), |g| g.to_string());
    let unknown = format!("its state is unknown (ipclusterctl -H {host} generations {app})");
    match outcome {
        Outcome::Deployed { previous, generation } => {
            format!("{host}: {app} generation {generation} is live (was {})", was(*previous))
        }
        Outcome::Failed { after, error, .. } => match after {
            After::Live(g) => format!("{host}: failed: {error}; generation {g} is live"),
            After::Nothing => format!("{host}: failed: {error}; no generation is live"),
            After::Untouched => format!("{host}: failed: {error}; untouched"),
            After::Unknown => format!("{host}: failed: {error}; {unknown}"),
        },
        Outcome::RolledBack { previous, generation, live } if live == previous => {
            format!("{host}: rolled back to {app} generation {live} (generation {generation} retired)")
        }
        Outcome::RolledBack { previous, generation, live } => format!(
            "{host}: rolled back: {app} generation {live} runs what generation {previous} ran (generation {generation} retired)"
        ),
        Outcome::RollbackFailed { error, lost: true, .. } => {
            format!("{host}: rollback failed: {error}; {unknown}")
        }
        Outcome::RollbackFailed { generation, error, .. } => {
            format!("{host}: rollback failed: {error}; generation {generation} is still live")
        }
        Outcome::NotReached => format!("{host}: not reached, untouched"),
    }
}

/// The last line: what happened to the whole fleet.
fn summary(app: &str, hosts: &[String], outcomes: &[Outcome]) -> String {
    let count = |f: fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
    let deployed = count(|o| matches!(o, Outcome::Deployed { .. }));
    if deployed == outcomes.len() {
        return format!("{app}: deployed on all {deployed} hosts");
    }
    let failed_on: Vec<&str> = hosts
        .iter()
        .zip(outcomes)
        .filter(|(_, o)| matches!(o, Outcome::Failed { .. }))
        .map(|(h, _)| h.as_str())
        .collect();
    let parts = [
        (deployed, "deployed"),
        (failed_on.len(), "failed"),
        (count(|o| matches!(o, Outcome::RolledBack { .. })), "rolled back"),
        (count(|o| matches!(o, Outcome::RollbackFailed { .. })), "rollback failed"),
        (count(|o| matches!(o, Outcome::NotReached)), "not reached"),
    ];
    let parts: Vec<String> =
        parts.iter().filter(|(n, _)| *n > 0).map(|(n, what)| format!("{n} {what}")).collect();
    format!("{app}: failed on {}: {}", failed_on.join(", "), parts.join(", "))
}

/// One host's result, as `--json` gives it.
#[derive(Debug, Serialize, PartialEq, Eq)]
struct HostResult<'a> {
    host: &'a str,
    /// `deployed`, `failed`, `rolled-back`, `rollback-failed` or `not-reached`.
    result: &'static str,
    /// The generation live before the roll (null: none, or not known).
    previous: Option<u64>,
    /// The generation this roll made live (null: none).
    generation: Option<u64>,
    /// The generation live now (null: none, or not known: see `known`).
    live: Option<u64>,
    /// Whether the roll knows what the host serves now (false when a connection broke during a
    /// deploy or rollback, which goes on without its caller).
    known: bool,
    error: Option<&'a str>,
}

fn result<'a>(host: &'a str, outcome: &'a Outcome) -> HostResult<'a> {
    let r = |result, previous, generation, live, known, error| HostResult {
        host,
        result,
        previous,
        generation,
        live,
        known,
        error,
    };
    match outcome {
        Outcome::Deployed { previous, generation } => {
            r("deployed", *previous, Some(*generation), Some(*generation), true, None)
        }
        Outcome::Failed { previous, generation, after, error } => {
            let live = match after {
                After::Live(g) => Some(*g),
                After::Untouched => *previous,
                After::Nothing | After::Unknown => None,
            };
            let known = *after != After::Unknown && !(*after == After::Untouched && previous.is_none());
            r("failed", *previous, *generation, live, known, Some(error.as_str()))
        }
        Outcome::RolledBack { previous, generation, live } => {
            r("rolled-back", Some(*previous), Some(*generation), Some(*live), true, None)
        }
        Outcome::RollbackFailed { previous, generation, error, lost } => {
            let live = (!lost).then_some(*generation);
            r("rollback-failed", *previous, Some(*generation), live, !lost, Some(error.as_str()))
        }
        Outcome::NotReached => r("not-reached", None, None, None, false, None),
    }
}

/// The live generation's band → pid.
fn live_pids(rows: &[WorkerRow], generation: u64) -> BTreeMap<u32, u32> {
    rows.iter().filter(|w| w.generation == generation && w.state == "live").map(|w| (w.band, w.pid)).collect()
}

/// Whether generation `generation` still serves with the workers it had when its pause began.
fn still_healthy(generation: u64, before: &BTreeMap<u32, u32>, after: &[WorkerRow]) -> Result<(), String> {
    let now = live_pids(after, generation);
    if now.is_empty() {
        return Err(format!("generation {generation} is no longer live"));
    }
    for (band, pid) in before {
        match now.get(band) {
            Some(p) if p == pid => {}
            Some(p) => return Err(format!("band {band}'s worker (pid {pid}) was replaced by pid {p}")),
            None => return Err(format!("band {band}'s worker (pid {pid}) is gone")),
        }
    }
    Ok(())
}

/// The ssh connection to the host whose turn it is.
#[derive(Debug)]
struct Link {
    host: usize,
    conn: zbus::Connection,
    tunnel: Tunnel,
}

/// The real hosts: each reached over ssh, one at a time.
#[derive(Debug)]
struct Ssh<'a> {
    app: &'a str,
    hosts: &'a [Destination],
    options: &'a DeployOptions,
    pause: Option<Duration>,
    json: bool,
    link: Option<Link>,
}

impl Ssh<'_> {
    fn say(&self, i: usize, text: &str) {
        if !self.json {
            eprintln!("{}: {text}", self.hosts[i]);
        }
    }

    /// The connection to host `i` (the current one is reused).
    async fn connect(&mut self, i: usize) -> Result<zbus::Connection, String> {
        if let Some(link) = self.link.as_ref().filter(|l| l.host == i) {
            return Ok(link.conn.clone());
        }
        self.link = None;
        let (conn, tunnel) = remote::connect(&self.hosts[i]).await.map_err(|e| e.to_string())?;
        self.link = Some(Link { host: i, conn: conn.clone(), tunnel });
        Ok(conn)
    }

    /// A failed call as the host's error: the daemon's answer, or, when the connection broke
    /// (it is dropped then), what ssh said.
    fn explain(&mut self, i: usize, e: &zbus::Error) -> String {
        if !crate::is_transport(e) {
            return crate::describe_at(e, Some(&self.hosts[i])).1;
        }
        match self.link.take() {
            Some(mut link) => {
                let reason = link.tunnel.reason(&e.to_string());
                format!("lost the connection to ipclusterd on {}: {reason}", link.tunnel.host())
            }
            None => format!("lost the connection to ipclusterd on {}: {e}", self.hosts[i]),
        }
    }

    /// Before the deploy: the manager, the live generation, and `WorkerExited` subscribed (so
    /// that no exit of the new generation's workers is missed).
    async fn prepare(
        &self,
        conn: &zbus::Connection,
    ) -> zbus::Result<(ManagerProxy<'static>, Option<u64>, WorkerExitedStream)> {
        let manager = ManagerProxy::new(conn).await?;
        let generations = manager.list_generations(self.app).await?;
        let previous = generations.iter().filter(|g| g.state == "live").map(|g| g.generation).max();
        let exited = manager.receive_worker_exited_with_args(&[(0, self.app)]).await?;
        Ok((manager, previous, exited))
    }

    /// Whether generation `generation` serves for `pause` with none of its workers exiting:
    /// `Ok(Some(why))` if not.
    async fn watch(
        &self,
        manager: &ManagerProxy<'_>,
        generation: u64,
        pause: Duration,
        exited: &mut WorkerExitedStream,
    ) -> zbus::Result<Option<String>> {
        let before = live_pids(&manager.list_workers(self.app).await?, generation);
        let sleep = tokio::time::sleep(pause);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                signal = exited.next() => {
                    // The stream ends only with the connection; the list below then fails too.
                    let Some(signal) = signal else { break };
                    let Ok(a) = signal.args() else { continue };
                    if a.generation == generation {
                        return Ok(Some(format!(
                            "generation {generation}: band {}'s worker (pid {}) exited within the pause ({})",
                            a.band, a.pid, a.reason
                        )));
                    }
                }
            }
        }
        let after = manager.list_workers(self.app).await?;
        Ok(still_healthy(generation, &before, &after).err().map(|e| format!("generation {generation}: {e}")))
    }

    /// Host `i`'s turn on `conn`.
    async fn turn(&mut self, i: usize, conn: &zbus::Connection) -> Turn {
        let app = self.app;
        // Whatever fails before the Deploy call, nothing was changed on the host.
        let (manager, previous, mut exited) = match self.prepare(conn).await {
            Ok(ready) => ready,
            Err(e) => {
                return Turn::Failed { previous: None, error: self.explain(i, &e), after: After::Untouched };
            }
        };
        let options = match self.options.to_bus() {
            Ok(o) => o,
            Err(e) => return Turn::Failed { previous, error: e.to_string(), after: After::Untouched },
        };
        match previous {
            Some(g) => self.say(i, &format!("deploying {app} (generation {g} is live)")),
            None => self.say(i, &format!("deploying {app} (no generation is live)")),
        }
        let generation = match manager.deploy(app, options).await {
            Ok(g) => g,
            Err(e) => {
                // A failed deploy changes nothing; a broken connection leaves it going on there.
                let after = if crate::is_transport(&e) {
                    After::Unknown
                } else {
                    previous.map_or(After::Nothing, After::Live)
                };
                return Turn::Failed { previous, error: self.explain(i, &e), after };
            }
        };
        self.say(i, &format!("{app} generation {generation} is live"));
        let Some(pause) = self.pause.filter(|p| !p.is_zero()) else {
            return Turn::Live { previous, generation };
        };
        self.say(i, &format!("watching generation {generation} for {}", shown(pause)));
        match self.watch(&manager, generation, pause, &mut exited).await {
            Ok(None) => Turn::Live { previous, generation },
            Ok(Some(error)) => Turn::Unhealthy { previous, generation, error },
            // A generation that could not be watched is not known to be healthy.
            Err(e) => {
                drop(manager);
                let error = format!("generation {generation} could not be watched: {}", self.explain(i, &e));
                Turn::Unhealthy { previous, generation, error }
            }
        }
    }
}

impl Hosts for Ssh<'_> {
    async fn deploy(&mut self, i: usize) -> Turn {
        let turn = match self.connect(i).await {
            Ok(conn) => self.turn(i, &conn).await,
            Err(error) => Turn::Failed { previous: None, error, after: After::Untouched },
        };
        match &turn {
            Turn::Live { .. } => {}
            Turn::Failed { error, .. } | Turn::Unhealthy { error, .. } => {
                self.say(i, &format!("failed: {error}"))
            }
        }
        turn
    }

    async fn rollback(&mut self, i: usize, to: u64) -> Result<u64, Fault> {
        self.say(i, &format!("rolling {} back to generation {to}", self.app));
        // Unreachable: nothing was sent, so nothing changed.
        let conn = self.connect(i).await.map_err(|error| Fault { error, lost: false })?;
        let result = match ManagerProxy::new(&conn).await {
            Ok(manager) => manager.rollback(self.app, to).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(live) => {
                self.say(i, &format!("{} generation {live} is live", self.app));
                Ok(live)
            }
            Err(e) => {
                let lost = crate::is_transport(&e);
                let error = self.explain(i, &e);
                self.say(i, &format!("rollback failed: {error}"));
                Err(Fault { error, lost })
            }
        }
    }
}

/// Runs the roll and prints its result; exit status 1 if any host failed, 2 if a host is named
/// twice.
pub async fn deploy(app: &str, options: &DeployOptions, roll_args: &Roll, json: bool) -> ExitCode {
    let names: Vec<String> = roll_args.hosts.iter().map(ToString::to_string).collect();
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            eprintln!("ipclusterctl: --hosts names {name} twice");
            return ExitCode::from(2);
        }
    }
    let mut hosts = Ssh { app, hosts: &roll_args.hosts, options, pause: roll_args.pause, json, link: None };
    let outcomes = roll(&mut hosts, names.len(), roll_args.rollback_on_failure).await;
    drop(hosts);
    if json {
        let results: Vec<HostResult<'_>> = names.iter().zip(&outcomes).map(|(h, o)| result(h, o)).collect();
        let ok = outcomes.iter().all(|o| matches!(o, Outcome::Deployed { .. }));
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"app": app, "ok": ok, "hosts": results}))
                .unwrap_or_default()
        );
    } else {
        for (host, outcome) in names.iter().zip(&outcomes) {
            println!("{}", line(app, host, outcome));
        }
        println!("{}", summary(app, &names, &outcomes));
    }
    if outcomes.iter().all(|o| matches!(o, Outcome::Deployed { .. })) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests;
