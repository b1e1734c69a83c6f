//! `ipclusterctl deploy` and `rollback`: the call and its progress, complete and in order — the
//! generation starting, each band ready, the generation live — whatever order the signals
//! (GenerationStateChanged, WorkerReady) and the method reply arrive in. A rollback that needs
//! no new generation (the same workers are live again) says so in one line.
//!
//! They race: the daemon emits signals from its own task, and zbus hands each signal stream and
//! the reply to this client separately. [`Progress`] orders them: ready bands seen before the
//! generation is known are held back; when the reply arrives, bands whose signal has not (yet)
//! arrived are taken from ListWorkers (every band of a live generation has a pid there), and only
//! then is the generation reported live.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use futures_util::{FutureExt, StreamExt};
use zbus::wire::OwnedVariant;

use ipcluster_bus::{ErrorName, ManagerProxy, option};

/// A line of progress, in the order [`Progress`] emits them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// The generation was created and its workers are starting.
    Starting { generation: u64 },
    /// A band's worker is ready; `ready` bands are ready so far.
    BandReady { generation: u64, band: u32, pid: u32, ready: usize },
    /// Every band is ready and the generation serves (Deploy returned).
    Live { generation: u64 },
    /// A rollback made a retired generation live again, with the same workers.
    LiveAgain { generation: u64 },
    /// A canary serves its bands (Deploy with `canary` returned).
    Canary { generation: u64, bands: usize },
}

impl Line {
    /// The line as people read it.
    pub fn text(&self, app: &str) -> String {
        match self {
            Line::Starting { generation } => format!("{app}: generation {generation} starting"),
            Line::BandReady { generation, band, pid, ready } => {
                format!("{app}: generation {generation}: band {band} ready (pid {pid}), {ready} ready")
            }
            Line::Live { generation } => format!("{app}: generation {generation} is live"),
            Line::LiveAgain { generation } => {
                format!("{app}: generation {generation} is live again (rolled back: the same workers)")
            }
            Line::Canary { generation, bands } => {
                format!(
                    "{app}: generation {generation} is a canary on {bands} bands (ipclusterctl promote {app}, or rollback {app})"
                )
            }
        }
    }
}

/// Puts the progress of one deploy in order. Feed it the app's signals and the reply; print what
/// each call returns.
#[derive(Debug, Default)]
pub struct Progress {
    /// The deploy's generation, once a `starting` signal or the reply named it.
    generation: Option<u64>,
    /// Ready bands (band → pid) per generation, seen while the generation was not known.
    early: BTreeMap<u64, BTreeMap<u32, u32>>,
    /// Bands already reported.
    shown: BTreeSet<u32>,
    done: bool,
}

impl Progress {
    /// GenerationStateChanged for the app. The first `starting` names the deploy's generation
    /// (Deploy is refused with Busy while another deploy of the app is under way).
    pub fn on_state(&mut self, generation: u64, state: &str) -> Vec<Line> {
        if self.done || self.generation.is_some() || state != "starting" {
            return Vec::new();
        }
        self.start(generation)
    }

    /// WorkerReady for the app.
    pub fn on_ready(&mut self, generation: u64, band: u32, pid: u32) -> Vec<Line> {
        if self.done {
            return Vec::new();
        }
        match self.generation {
            None => {
                self.early.entry(generation).or_default().entry(band).or_insert(pid);
                Vec::new()
            }
            Some(g) if g == generation => self.band(band, pid).into_iter().collect(),
            // Another generation's worker (a respawn in the live one, say).
            Some(_) => Vec::new(),
        }
    }

    /// Whether a new generation was seen starting.
    pub fn started(&self) -> bool {
        self.generation.is_some()
    }

    /// The reply: `generation` is live (a canary, with `canary`). `workers` are (band, pid) of its
    /// workers from ListWorkers, for the bands whose signal has not arrived. Everything after this
    /// is ignored.
    pub fn finish(&mut self, generation: u64, workers: &[(u32, u32)], canary: bool) -> Vec<Line> {
        if self.done {
            return Vec::new();
        }
        let mut lines = Vec::new();
        if self.generation != Some(generation) {
            self.shown.clear();
            lines.extend(self.start(generation));
        }
        let missing: BTreeMap<u32, u32> =
            workers.iter().filter(|(band, _)| !self.shown.contains(band)).copied().collect();
        for (band, pid) in missing {
            lines.extend(self.band(band, pid));
        }
        lines.push(if canary {
            Line::Canary { generation, bands: self.shown.len() }
        } else {
            Line::Live { generation }
        });
        self.done = true;
        lines
    }

    fn start(&mut self, generation: u64) -> Vec<Line> {
        self.generation = Some(generation);
        let mut lines = vec![Line::Starting { generation }];
        let early = self.early.remove(&generation).unwrap_or_default();
        self.early.clear();
        for (band, pid) in early {
            lines.extend(self.band(band, pid));
        }
        lines
    }

    fn band(&mut self, band: u32, pid: u32) -> Option<Line> {
        let generation = self.generation?;
        if !self.shown.insert(band) {
            return None;
        }
        Some(Line::BandReady { generation, band, pid, ready: self.shown.len() })
    }
}

/// Calls Deploy and reports its progress on stderr (none with `json`), then the result on
/// stdout. With `no_block`, returns as soon as the generation has a number.
pub async fn deploy(
    manager: &ManagerProxy<'_>,
    app: &str,
    options: HashMap<&str, OwnedVariant>,
    no_block: bool,
    json: bool,
) -> zbus::Result<()> {
    follow(manager, app, Call::Deploy(options), no_block, json).await
}

/// Calls Promote: the canary's other bands start, then every band moves.
pub async fn promote(manager: &ManagerProxy<'_>, app: &str, json: bool) -> zbus::Result<()> {
    let generation = manager.promote(app).await?;
    if json {
        println!("{}", serde_json::json!({"app": app, "generation": generation, "state": "live"}));
    } else {
        println!("{app}: generation {generation} is live (promoted)");
    }
    Ok(())
}

/// Calls Rollback (generation 0: the newest that was live before) and reports it like a deploy.
pub async fn rollback(
    manager: &ManagerProxy<'_>,
    app: &str,
    generation: u64,
    json: bool,
) -> zbus::Result<()> {
    follow(manager, app, Call::Rollback(generation), false, json).await
}

/// The call whose progress is followed.
#[derive(Debug)]
enum Call<'a> {
    Deploy(HashMap<&'a str, OwnedVariant>),
    Rollback(u64),
}

async fn follow(
    manager: &ManagerProxy<'_>,
    app: &str,
    call: Call<'_>,
    no_block: bool,
    json: bool,
) -> zbus::Result<()> {
    // Subscribed before the call, so no signal of this deploy is missed.
    let mut states = manager.receive_generation_state_changed_with_args(&[(0, app)]).await?;
    let mut ready = manager.receive_worker_ready_with_args(&[(0, app)]).await?;
    let mut ended = manager.receive_canary_ended_with_args(&[(0, app)]).await?;
    let rollback = matches!(call, Call::Rollback(_));
    let (canary, canary_for) = match &call {
        Call::Deploy(o) => (o.contains_key(option::CANARY), o.contains_key(option::CANARY_FOR)),
        Call::Rollback(_) => (false, false),
    };
    let call = async {
        match call {
            Call::Deploy(options) => manager.deploy(app, options).await,
            Call::Rollback(g) => manager.rollback(app, g).await,
        }
    };
    tokio::pin!(call);
    let mut progress = Progress::default();
    let show = |lines: Vec<Line>| {
        for line in lines {
            match line {
                Line::Live { generation } | Line::LiveAgain { generation } if json => {
                    println!("{}", serde_json::json!({"app": app, "generation": generation, "state": "live"}))
                }
                // With --canary-for the outcome is the one document (--json prints one).
                Line::Canary { .. } if json && canary_for => {}
                Line::Canary { generation, .. } if json => {
                    println!(
                        "{}",
                        serde_json::json!({"app": app, "generation": generation, "state": "canary"})
                    )
                }
                Line::Live { .. } | Line::LiveAgain { .. } | Line::Canary { .. } => {
                    println!("{}", line.text(app))
                }
                _ if json => {}
                _ => eprintln!("{}", line.text(app)),
            }
        }
    };
    loop {
        tokio::select! {
            result = &mut call => {
                let generation = result?;
                // Signals already received come first; then what never arrived, from the daemon.
                while let Some(Some(s)) = states.next().now_or_never() {
                    if let Ok(a) = s.args() {
                        show(progress.on_state(a.generation, &a.state));
                    }
                }
                while let Some(Some(s)) = ready.next().now_or_never() {
                    if let Ok(a) = s.args() {
                        show(progress.on_ready(a.generation, a.band, a.pid));
                    }
                }
                if rollback && !progress.started() {
                    show(vec![Line::LiveAgain { generation }]);
                    return Ok(());
                }
                // The deploy succeeded whatever this says; without the list, fewer bands are shown.
                let workers: Vec<(u32, u32)> = if json {
                    Vec::new()
                } else {
                    let rows = manager.list_workers(app).await.unwrap_or_default();
                    rows.iter().filter(|w| w.generation == generation).map(|w| (w.band, w.pid)).collect()
                };
                show(progress.finish(generation, &workers, canary));
                if canary_for {
                    return canary_outcome(&mut ended, app, generation, json).await;
                }
                return Ok(());
            }
            Some(signal) = states.next() => {
                let Ok(a) = signal.args() else { continue };
                let lines = progress.on_state(a.generation, &a.state);
                if no_block && !lines.is_empty() {
                    if json {
                        println!("{}", serde_json::json!({"app": app, "generation": a.generation, "state": "starting"}));
                    } else {
                        println!("{app}: generation {} is starting", a.generation);
                    }
                    return Ok(());
                }
                show(lines);
            }
            Some(signal) = ready.next() => {
                let Ok(a) = signal.args() else { continue };
                show(progress.on_ready(a.generation, a.band, a.pid));
            }
        }
    }
}

/// `--canary-for`: waits until the canary ends and says how; a rolled back canary is a failed
/// deploy (exit status 1).
async fn canary_outcome(
    ended: &mut ipcluster_bus::CanaryEndedStream,
    app: &str,
    generation: u64,
    json: bool,
) -> zbus::Result<()> {
    if !json {
        eprintln!("{app}: waiting for canary generation {generation} to promote itself or roll back");
    }
    while let Some(signal) = ended.next().await {
        let Ok(a) = signal.args() else { continue };
        if a.generation != generation {
            continue;
        }
        if a.result == "promoted" {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"app": app, "generation": generation, "state": "live", "reason": a.reason})
                );
            } else {
                println!("{app}: generation {generation} is live (promoted: {})", a.reason);
            }
            return Ok(());
        }
        return Err(zbus::Error::Failure(format!(
            "{}: {app} generation {generation}: the canary was rolled back: {}",
            ErrorName::DeployFailed.as_str(),
            a.reason
        )));
    }
    Err(zbus::Error::InputOutput(std::io::Error::other("the signal stream ended").into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What reaches the client, in some order.
    #[derive(Debug, Clone, Copy)]
    enum Event {
        State(u64, &'static str),
        Ready(u64, u32, u32),
        Reply(u64),
    }

    fn run(events: &[Event], list: &[(u32, u32)]) -> Vec<Line> {
        let mut p = Progress::default();
        let mut out = Vec::new();
        for e in events {
            out.extend(match *e {
                Event::State(g, s) => p.on_state(g, s),
                Event::Ready(g, b, pid) => p.on_ready(g, b, pid),
                Event::Reply(g) => p.finish(g, list, false),
            });
        }
        out
    }

    /// Every order of `items` (Heap's algorithm).
    fn permutations<T: Clone>(items: &[T]) -> Vec<Vec<T>> {
        fn heap<T: Clone>(k: usize, a: &mut Vec<T>, out: &mut Vec<Vec<T>>) {
            if k <= 1 {
                out.push(a.clone());
                return;
            }
            for i in 0..k {
                heap(k - 1, a, out);
                let j = if k.is_multiple_of(2) { i } else { 0 };
                a.swap(j, k - 1);
            }
        }
        let mut out = Vec::new();
        heap(items.len(), &mut items.to_vec(), &mut out);
        out
    }

    /// Starting first, then each band exactly once with the count rising, then live.
    fn assert_complete_and_in_order(lines: &[Line], generation: u64, bands: &BTreeMap<u32, u32>) {
        assert_eq!(lines.first(), Some(&Line::Starting { generation }), "{lines:?}");
        assert_eq!(lines.last(), Some(&Line::Live { generation }), "{lines:?}");
        let middle = &lines[1..lines.len() - 1];
        let mut seen = BTreeMap::new();
        for (i, line) in middle.iter().enumerate() {
            let Line::BandReady { generation: g, band, pid, ready } = line else {
                panic!("not a band line in the middle: {lines:?}");
            };
            assert_eq!((*g, *ready), (generation, i + 1), "{lines:?}");
            assert!(seen.insert(*band, *pid).is_none(), "band {band} twice: {lines:?}");
        }
        assert_eq!(&seen, bands, "{lines:?}");
    }

    #[test]
    fn every_arrival_order_gives_starting_every_band_once_then_live() {
        let bands = BTreeMap::from([(0, 100), (1, 101), (2, 102), (3, 103)]);
        let list: Vec<(u32, u32)> = bands.iter().map(|(b, p)| (*b, *p)).collect();
        let mut signals = vec![Event::State(7, "starting")];
        signals.extend(bands.iter().map(|(b, p)| Event::Ready(7, *b, *p)));
        let mut orders = 0;
        for order in permutations(&signals) {
            // The reply at every position: signals after it are never seen.
            for cut in 0..=order.len() {
                let mut events = order[..cut].to_vec();
                events.push(Event::Reply(7));
                events.extend_from_slice(&order[cut..]);
                assert_complete_and_in_order(&run(&events, &list), 7, &bands);
                orders += 1;
            }
        }
        assert_eq!(orders, 120 * 6);
    }

    #[test]
    fn the_reply_first_is_filled_in_from_list_workers_in_band_order() {
        let list = [(2, 12), (0, 10), (3, 13), (1, 11)];
        let lines = run(&[Event::Reply(3)], &list);
        assert_eq!(
            lines,
            [
                Line::Starting { generation: 3 },
                Line::BandReady { generation: 3, band: 0, pid: 10, ready: 1 },
                Line::BandReady { generation: 3, band: 1, pid: 11, ready: 2 },
                Line::BandReady { generation: 3, band: 2, pid: 12, ready: 3 },
                Line::BandReady { generation: 3, band: 3, pid: 13, ready: 4 },
                Line::Live { generation: 3 },
            ]
        );
    }

    #[test]
    fn other_generations_repeated_bands_and_other_states_are_not_shown() {
        let events = [
            Event::Ready(2, 0, 50),     // a respawn in the live generation, before ours is known
            Event::State(2, "retired"), // not a start
            Event::Ready(3, 1, 61),
            Event::State(3, "starting"), // ours: band 1 was ready already
            Event::Ready(2, 1, 51),      // the old generation again
            Event::Ready(3, 0, 60),
            Event::Ready(3, 0, 70), // band 0 again (replaced): shown once
            Event::State(3, "live"),
            Event::Reply(3),
            Event::Ready(3, 0, 80), // after the reply
        ];
        let lines = run(&events, &[(0, 70), (1, 61)]);
        let bands = BTreeMap::from([(0, 60), (1, 61)]);
        assert_complete_and_in_order(&lines, 3, &bands);
    }

    #[test]
    fn lines_read_as_before() {
        let band = Line::BandReady { generation: 2, band: 1, pid: 42, ready: 3 };
        assert_eq!(band.text("web"), "web: generation 2: band 1 ready (pid 42), 3 ready");
        assert_eq!(Line::Starting { generation: 2 }.text("web"), "web: generation 2 starting");
        assert_eq!(Line::Live { generation: 2 }.text("web"), "web: generation 2 is live");
    }
}
