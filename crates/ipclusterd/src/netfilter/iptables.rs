//! [`Iptables`]: the [`Router`] of the real host (see the module above for how it reads,
//! writes and checks the rules).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ipcluster_core::{
    name::AppName,
    routing::{self, AppRoute, Family, Tables},
};

use super::ipsets::Ipsets;
use super::{Applied, Ipv6, LOCK_WAIT_SECS, Router, RouterError, TIMEOUT, Tools};

/// [`Router`] with iptables and ip6tables (iptables-nft on Debian 12).
#[derive(Debug, Clone)]
pub struct Iptables {
    tools: Result<Tools, RouterError>,
    ipv6: Ipv6,
    timeout: Duration,
    /// Set when the IPv6 tables were last read with nothing of ours in them, and nothing was
    /// written there since: with no app to route, they need not be read again.
    v6_clean: Arc<AtomicBool>,
    /// The last IPv6 problem logged for IPv4-only apps (each is logged once, not every 2 s).
    v6_warned: Arc<Mutex<Option<String>>>,
    /// The session sets the rules name (session affinity).
    sets: Ipsets,
    /// The same as `v6_clean` for IPv4.
    v4_clean: Arc<AtomicBool>,
    /// Where the nf_tables generation id comes from, if the tables are nf_tables.
    generation: Generation,
    /// The generation id at which a read last found `routes` fully in place, and those routes:
    /// while both are the same, the rules are too. Cleared by every write.
    checked: Arc<Mutex<Option<Checked>>>,
    /// The generation id could not be read (logged once; every check then reads the rules).
    generation_warned: Arc<AtomicBool>,
}

/// A generation id and the routes a read at it found in place.
type Checked = (u32, Vec<AppRoute>);

/// The source of the nf_tables generation id.
#[derive(Debug, Clone)]
enum Generation {
    /// iptables-legacy, or programs we cannot tell: every check reads the rules.
    Off,
    /// The kernel's, over netlink.
    Kernel,
    /// A counter the test moves.
    #[cfg(test)]
    Fake(Arc<std::sync::atomic::AtomicU32>),
}

impl Default for Iptables {
    fn default() -> Self {
        Self::new()
    }
}

impl Iptables {
    /// The programs in their usual places and IPv6 as this host has it, resolved now;
    /// missing ones are reported by [`Router::check`] and by every call.
    pub fn new() -> Self {
        Self::with(Tools::find(Family::V4), Ipv6::detect(), TIMEOUT)
    }

    /// Given IPv4 programs, IPv6 and time limit (tests).
    pub fn with_tools(tools: Tools, ipv6: Ipv6, timeout: Duration) -> Self {
        Self::with(Ok(tools), ipv6, timeout)
    }

    fn with(tools: Result<Tools, RouterError>, ipv6: Ipv6, timeout: Duration) -> Self {
        let nft = |t: &Tools| crate::nftgen::counts_iptables(&t.save);
        let v6_nft = match &ipv6 {
            Ipv6::Present(Ok(t)) => nft(t),
            Ipv6::Present(Err(_)) | Ipv6::Absent(_) => true,
        };
        let generation =
            if tools.as_ref().is_ok_and(nft) && v6_nft { Generation::Kernel } else { Generation::Off };
        Self {
            tools,
            ipv6,
            timeout,
            v6_clean: Arc::default(),
            v6_warned: Arc::default(),
            sets: Ipsets::new(timeout),
            v4_clean: Arc::default(),
            generation,
            checked: Arc::default(),
            generation_warned: Arc::default(),
        }
    }

    /// The nf_tables generation id now, when the rules are nf_tables and it can be read.
    fn generation(&self) -> Option<u32> {
        match &self.generation {
            Generation::Off => None,
            Generation::Kernel => match crate::nftgen::current() {
                Ok(g) => Some(g),
                Err(e) => {
                    if !self.generation_warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "cannot read the nf_tables generation id ({e}): the rules are read at every check"
                        );
                    }
                    None
                }
            },
            #[cfg(test)]
            Generation::Fake(g) => Some(g.load(Ordering::Relaxed)),
        }
    }

    fn checked(&self) -> std::sync::MutexGuard<'_, Option<Checked>> {
        self.checked.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn tools(&self) -> Result<&Tools, RouterError> {
        self.tools.as_ref().map_err(Clone::clone)
    }

    /// Runs `program` with `args` and `input` on its stdin; its stdout on success (see
    /// [`super::run_tool`]).
    async fn run(&self, program: &Path, args: &[&str], input: Option<&str>) -> Result<Vec<u8>, RouterError> {
        super::run_tool(
            program,
            args,
            input,
            self.timeout,
            (None, " (xtables lock held by another program?)"),
        )
        .await
    }

    /// What of ours is in one family's tables (every table at once, one process; only nat and
    /// filter are read).
    async fn read(&self, family: Family, tools: &Tools) -> Result<Tables, RouterError> {
        let save = self.run(&tools.save, &[], None).await?;
        let tables = Tables::parse(family, &String::from_utf8_lossy(&save));
        if tables.is_empty() {
            self.clean(family).store(true, Ordering::Relaxed);
        }
        Ok(tables)
    }

    /// One `--noflush` transaction per table in `text`.
    async fn restore(&self, family: Family, tools: &Tools, text: &str) -> Result<(), RouterError> {
        self.clean(family).store(false, Ordering::Relaxed);
        *self.checked() = None;
        let wait = LOCK_WAIT_SECS.to_string();
        self.run(&tools.restore, &["--noflush", "--wait", &wait], Some(text)).await.map(drop)
    }

    /// Set when `family`'s tables were last read with nothing of ours in them, and nothing was
    /// written there since.
    fn clean(&self, family: Family) -> &AtomicBool {
        match family {
            Family::V4 => &self.v4_clean,
            Family::V6 => &self.v6_clean,
        }
    }

    /// The IPv6 programs to read and write with for `routes`, `None` when the IPv6 tables are
    /// left alone; an error when `routes` need IPv6 and this host cannot give it.
    fn ipv6_for(&self, routes: &[AppRoute]) -> Result<Option<&Tools>, RouterError> {
        match &self.ipv6 {
            Ipv6::Absent(why) => match routing::first_entry(routes, Family::V6, true) {
                Some((app, entry)) => Err(RouterError(format!("cannot route {entry} of app {app}: {why}"))),
                None => Ok(None),
            },
            Ipv6::Present(Err(e)) => self.ipv6_failed(routes, e).map(|()| None),
            Ipv6::Present(Ok(tools)) => {
                Ok((!routes.is_empty() || !self.v6_clean.load(Ordering::Relaxed)).then_some(tools))
            }
        }
    }

    /// ip6tables failed (or is missing) with `e`: an error for routes with an entry IPv6
    /// serves; for IPv4-only routes, the journal says once that their ports are not guarded
    /// from IPv6 hosts, and IPv4 goes on.
    fn ipv6_failed(&self, routes: &[AppRoute], e: &RouterError) -> Result<(), RouterError> {
        if let Some((app, entry)) = routing::first_entry(routes, Family::V6, false) {
            let hint = if routing::served_by(Family::V4, &entry).is_some() {
                format!("; listen on 0.0.0.0:{} to serve IPv4 clients only", entry.port())
            } else {
                String::new()
            };
            return Err(RouterError(format!("cannot route {entry} of app {app} over IPv6: {e}{hint}")));
        }
        if !routes.is_empty() {
            let warning = format!("worker ports are not guarded from IPv6 hosts: {e}");
            let mut last = self.v6_warned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.as_deref() != Some(warning.as_str()) {
                tracing::warn!("{warning}");
                *last = Some(warning);
            }
        }
        Ok(())
    }
}

fn conflict(e: routing::Conflict) -> RouterError {
    RouterError(e.to_string())
}

impl Router for Iptables {
    fn forget(&self, ports: &[u16]) {
        if ports.is_empty() {
            return;
        }
        let Some(tool) = super::conntrack::tool() else {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(
                    "conntrack is not installed: a client may be refused for up to 10 s after a worker it was connected to stopped (apt install conntrack)"
                );
            });
            return;
        };
        let ports = ports.to_vec();
        tokio::spawn(async move {
            if let Err(e) = super::conntrack::forget_closed(tool, ports.clone()).await {
                tracing::warn!("cannot drop the closed connections of ports {ports:?}: {e}");
            }
        });
    }

    async fn current(&self) -> Result<routing::Existing, RouterError> {
        let tools = self.tools()?;
        let six = match &self.ipv6 {
            Ipv6::Present(Ok(t)) => Some(t),
            _ => None,
        };
        let (v4, v6) = tokio::join!(self.read(Family::V4, tools), async {
            match six {
                Some(t) => Some(self.read(Family::V6, t).await),
                None => None,
            }
        });
        // Unreadable IPv6 tables are reported and left out: what IPv4 says still counts (an
        // adoption learns from it which generations are live).
        let v6 = v6.and_then(|r| r.map_err(|e| tracing::warn!("cannot read the IPv6 rules: {e}")).ok());
        Ok(routing::Existing { v4: v4?, v6 })
    }

    async fn apply(&self, routes: &[AppRoute]) -> Result<Applied, RouterError> {
        let tools = self.tools()?;
        let six = self.ipv6_for(routes)?;
        // Taken before the reads: a change made after it moves the id, so the next check reads.
        let generation = self.generation();
        if generation.is_some()
            && self.checked().as_ref().is_some_and(|(g, r)| Some(*g) == generation && r == routes)
        {
            return Ok(Applied::Unchanged);
        }
        // No route to make, and nothing of ours anywhere when last read.
        if routes.is_empty() && six.is_none() && self.v4_clean.load(Ordering::Relaxed) {
            return Ok(Applied::Unchanged);
        }
        let (v4, v6) = tokio::join!(self.read(Family::V4, tools), async {
            match six {
                Some(t) => Some(self.read(Family::V6, t).await),
                None => None,
            }
        });
        let v4 = v4?;
        let v6 = match v6 {
            Some(Ok(t)) => Some(t),
            Some(Err(e)) => {
                self.ipv6_failed(routes, &e)?;
                None
            }
            None => None,
        };
        let text = |family: Family, t: &Tables| {
            (!routing::family_up_to_date(family, t, routes))
                .then(|| routing::render(family, t, routes).map_err(conflict))
                .transpose()
        };
        let text4 = text(Family::V4, &v4)?;
        let text6 = match (six, &v6) {
            (Some(t6), Some(before)) => text(Family::V6, before)?.map(|text| (t6, before, text)),
            _ => None,
        };
        // The session sets the rules name exist before the rules are written.
        let mut wanted: BTreeMap<String, (Family, u32)> =
            routing::sets(Family::V4, routes).into_iter().map(|(n, t)| (n, (Family::V4, t))).collect();
        if v6.is_some() {
            wanted.extend(routing::sets(Family::V6, routes).into_iter().map(|(n, t)| (n, (Family::V6, t))));
        }
        self.sets.ensure(&wanted).await?;
        // Both families at once: a dual-stack cutover costs the slower of the two, and the
        // moment in which they disagree is as short as it can be.
        let (r6, r4) = tokio::join!(
            async {
                match &text6 {
                    Some((t6, _, text)) => Some(self.restore(Family::V6, t6, text).await),
                    None => None,
                }
            },
            async {
                match &text4 {
                    Some(text) => Some(self.restore(Family::V4, tools, text).await),
                    None => None,
                }
            }
        );
        let (ok6, ok4) = (matches!(r6, Some(Ok(()))), matches!(r4, Some(Ok(()))));
        if v6.is_some() && !matches!(r6, Some(Err(_))) {
            // IPv6 works again: its next failure is worth a line in the journal.
            *self.v6_warned.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
        let mut errors = Vec::new();
        if let Some(Err(e)) = r4 {
            errors.push(e.0);
        }
        if let Some(Err(e)) = r6 {
            // For IPv4-only routes only the IPv6 guard failed: logged, and IPv4's change stands.
            if let Err(e) = self.ipv6_failed(routes, &e) {
                errors.push(e.0);
            }
        }
        if errors.is_empty() {
            // Sets no rule names any more go (a generation that stopped draining, or stopped).
            self.sets.prune(&wanted.into_keys().collect::<BTreeSet<_>>()).await;
            if ok6 || ok4 {
                return Ok(Applied::Changed);
            }
            // Both families read and found as they should be: remembered with the id.
            if let Some(g) = generation
                && (six.is_none() || v6.is_some())
            {
                *self.checked() = Some((g, routes.to_vec()));
            }
            return Ok(Applied::Unchanged);
        }
        // One family failed: the other's nat table is taken back, so that routing is as it
        // was in both (its filter keeps the guard of the ports workers hold: right either way).
        let undo = [
            (ok6, Family::V6, text6.as_ref().map(|(t6, before, _)| (*t6, *before))),
            (ok4, Family::V4, Some((tools, &v4))),
        ];
        for (family, tools, before) in
            undo.into_iter().filter(|(ok, ..)| *ok).filter_map(|(_, f, tb)| tb.map(|(t, b)| (f, t, b)))
        {
            if let Some(text) = routing::render_undo(family, before, routes)
                && let Err(u) = self.restore(family, tools, &text).await
            {
                errors.push(format!("the {family} nat rules, already changed, could not be taken back: {u}"));
            }
        }
        Err(RouterError(errors.join("; ")))
    }

    fn check(&self) -> Result<(), RouterError> {
        self.tools().map(|_| ())
    }

    async fn sessions(&self) -> Result<BTreeMap<(AppName, u8), u32>, RouterError> {
        self.sets.sessions().await
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
