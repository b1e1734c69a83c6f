//! The injectors of the fault kinds of `faults.rs`, one function each: `(ctx, pick, id)`, where
//! `pick` chooses the target among what runs now. Each says what it hit and whether the daemon
//! did what it promises ([`Hit`]); the invariants are checked elsewhere, all along.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ipcluster_bus::WorkerRow;
use zbus::wire::OwnedVariant;

use super::{
    account::{Hit, Secs},
    bus::{CallError, opt},
    faults::{Ctx, Fault},
    host::{APPS, App, Host, Role},
    record::Shared,
};

fn choose<T>(items: &[T], pick: u64) -> Option<&T> {
    (!items.is_empty()).then(|| &items[(pick % items.len() as u64) as usize])
}

fn app_of(pick: u64) -> &'static App {
    &APPS[(pick % APPS.len() as u64) as usize]
}

/// Live workers (of `role`'s app, or of every app).
fn live(ctx: &Ctx, role: Option<Role>) -> Result<Vec<WorkerRow>> {
    let rows = ctx.bus.list_workers().map_err(|e| anyhow::anyhow!("ListWorkers: {e}"))?;
    let wanted = |w: &WorkerRow| role.is_none_or(|r| APPS.iter().any(|a| a.role == r && a.name == w.app));
    Ok(rows.into_iter().filter(|w| w.state == "live" && wanted(w)).collect())
}

/// Whether `worker` is still live, as far as the daemon answers (`None` when it does not).
fn still_live(ctx: &Ctx, w: &WorkerRow) -> Option<bool> {
    let rows = ctx.bus.list_workers().ok()?;
    Some(rows.iter().any(|r| r.pid == w.pid && r.generation == w.generation && r.state == "live"))
}

/// Polls `f` every 100 ms until it is true; false after `timeout`.
fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// A daemon restart, kill or upgrade that overlapped `[start, now]`.
fn daemon_went_away(shared: &Shared, start: Secs) -> Option<Fault> {
    let now = shared.now();
    shared
        .timeline()
        .iter()
        .filter(|e| matches!(e.fault, Fault::DaemonKill | Fault::DaemonRestart | Fault::PackageUpgrade))
        .find(|e| e.start <= now && e.end.is_none_or(|end| end >= start))
        .map(|e| e.fault)
}

/// How a Deploy or Rollback went: refusals the daemon documents and calls cut short by a
/// daemon restart are as promised; anything else is not.
fn call_outcome(shared: &Shared, start: Secs, app: &str, r: Result<String, CallError>, fine: &[&str]) -> Hit {
    let mut hit = match r {
        Ok(s) => Hit::ok(s),
        Err(e) if fine.contains(&e.short()) => Hit::ok(format!("refused as documented: {e}")),
        Err(e) => match daemon_went_away(shared, start) {
            Some(f) => Hit::ok(format!("cut short by {}: {e}", f.name())),
            None => Hit::failed(e.to_string()),
        },
    };
    hit.app = Some(app.into());
    hit
}

pub fn deploy(ctx: &mut Ctx, pick: u64, id: usize) -> Result<Option<Hit>> {
    let app = app_of(pick).name;
    let (bus, shared) = (ctx.bus.clone(), ctx.shared.clone());
    ctx.background.push(std::thread::spawn(move || {
        let start = shared.now();
        let r = bus.deploy(app).map(|g| format!("generation {g} is live"));
        shared.finish(id, call_outcome(&shared, start, app, r, &["Busy"]));
    }));
    Ok(None)
}

pub fn rollback(ctx: &mut Ctx, pick: u64, id: usize) -> Result<Option<Hit>> {
    let app = app_of(pick).name;
    let (bus, shared) = (ctx.bus.clone(), ctx.shared.clone());
    ctx.background.push(std::thread::spawn(move || {
        let start = shared.now();
        let r = bus.rollback(app).map(|g| format!("generation {g} is live"));
        shared.finish(id, call_outcome(&shared, start, app, r, &["Busy", "NoSuchGeneration"]));
    }));
    Ok(None)
}

pub fn kill_retired(ctx: &mut Ctx, pick: u64, _: usize) -> Result<Option<Hit>> {
    // One app, or every app ("").
    let app = match pick % (APPS.len() as u64 + 1) {
        i if i < APPS.len() as u64 => APPS[i as usize].name,
        _ => "",
    };
    let start = ctx.shared.now();
    let r = ctx.bus.kill_retired(app).map(|n| format!("{n} retired workers stopped"));
    Ok(Some(call_outcome(&ctx.shared, start, if app.is_empty() { "every app" } else { app }, r, &[])))
}

pub fn sigusr1(ctx: &mut Ctx, _: u64, _: usize) -> Result<Option<Hit>> {
    ctx.host.sb.check(["systemctl", "kill", "--kill-whom=main", "-s", "USR1", "ipclusterd"])?;
    Ok(Some(Hit::ok("sent to the daemon")))
}

pub fn worker_kill(ctx: &mut Ctx, pick: u64, _: usize) -> Result<Option<Hit>> {
    let workers = live(ctx, None)?;
    let Some(w) = choose(&workers, pick) else { return Ok(Some(Hit::ok("no live worker to kill"))) };
    ctx.host.sb.check(["kill", "-9", &w.pid.to_string()])?;
    Ok(Some(Hit::ok(format!("killed pid {} (band {})", w.pid, w.band)).on(
        &w.app,
        w.band,
        w.pid,
        w.generation,
    )))
}

pub fn worker_stop(ctx: &mut Ctx, pick: u64, _: usize) -> Result<Option<Hit>> {
    let workers = live(ctx, Some(Role::Nat))?;
    let Some(w) = choose(&workers, pick).cloned() else { return Ok(Some(Hit::ok("no live worker to stop"))) };
    let pid = w.pid.to_string();
    ctx.host.sb.check(["kill", "-STOP", &pid])?;
    let started = Instant::now();
    let replaced = wait_until(Duration::from_secs(30), || still_live(ctx, &w) == Some(false));
    let hit = if replaced {
        Hit::ok(format!("pid {} stopped, replaced after {:.1} s", w.pid, started.elapsed().as_secs_f64()))
    } else {
        // Let it go on, so that the rest of the run is not about this one worker.
        let _ = ctx.host.sb.run(["kill", "-CONT", &pid]);
        Hit::failed(format!("pid {} stopped and still live after 30 s (continued)", w.pid))
    };
    Ok(Some(hit.on(&w.app, w.band, w.pid, w.generation)))
}

/// Waits until systemd runs a daemon other than `old` and it answers on the bus.
fn wait_daemon(ctx: &Ctx, old: u32, timeout: Duration) -> Result<u32> {
    let mut new = 0;
    let back = wait_until(timeout, || {
        new = ctx.host.daemon_pid();
        new != 0 && new != old && ctx.bus.list_generations().is_ok()
    });
    if !back {
        bail!("the daemon was not back after {timeout:?} (main pid {new})");
    }
    Ok(new)
}

pub fn daemon_restart(ctx: &mut Ctx, _: u64, _: usize) -> Result<Option<Hit>> {
    let old = ctx.host.daemon_pid();
    let out = ctx.host.sb.run(["systemctl", "restart", "ipclusterd"])?;
    if !out.status.success() {
        return Ok(Some(Hit::failed(format!(
            "systemctl restart: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))));
    }
    Ok(Some(match wait_daemon(ctx, old, Duration::from_secs(30)) {
        Ok(new) => Hit::ok(format!("daemon pid {old} -> {new}")),
        Err(e) => Hit::failed(format!("{e:#}")),
    }))
}

pub fn daemon_kill(ctx: &mut Ctx, _: u64, _: usize) -> Result<Option<Hit>> {
    let old = ctx.host.daemon_pid();
    ctx.host.sb.check(["systemctl", "kill", "--kill-whom=main", "-s", "KILL", "ipclusterd"])?;
    Ok(Some(match wait_daemon(ctx, old, Duration::from_secs(30)) {
        Ok(new) => Hit::ok(format!("daemon pid {old} killed, {new} runs")),
        Err(e) => Hit::failed(format!("{e:#}")),
    }))
}

pub fn nat_flush(ctx: &mut Ctx, pick: u64, _: usize) -> Result<Option<Hit>> {
    let families: &[&str] = if pick.is_multiple_of(3) { &["iptables", "ip6tables"] } else { &["iptables"] };
    for f in families {
        ctx.host.sb.check([*f, "-t", "nat", "-F"])?;
    }
    let started = Instant::now();
    let nat_apps: Vec<&str> = APPS.iter().filter(|a| a.role != Role::Socket).map(|a| a.name).collect();
    let repaired = wait_until(Duration::from_secs(30), || {
        families.iter().all(|f| {
            let rules = ctx.host.sb.check([*f, "-t", "nat", "-S"]).unwrap_or_default();
            rules.lines().any(|l| l.starts_with("-A PREROUTING") && l.ends_with("-j IPCLUSTER"))
                && nat_apps.iter().all(|a| rules.contains(&format!("-A IPC-{a} ")))
        })
    });
    let took = started.elapsed().as_secs_f64();
    let which = families.join(" and ");
    Ok(Some(if repaired {
        Hit::ok(format!("{which} nat flushed, repaired after {took:.1} s"))
    } else {
        Hit::failed(format!("{which} nat flushed, not repaired after {took:.0} s"))
    }))
}

pub fn reload_changed(ctx: &mut Ctx, pick: u64, _: usize) -> Result<Option<Hit>> {
    let i = (pick % APPS.len() as u64) as usize;
    ctx.reloads[i] += 1;
    ctx.host.write_app(&APPS[i], ctx.reloads[i])?;
    ctx.host.sb.check(["systemctl", "reload", "ipclusterd"])?;
    let mut hit = Hit::ok(format!("SOAK_RELOADS={} in its file, reloaded", ctx.reloads[i]));
    hit.app = Some(APPS[i].name.into());
    Ok(Some(hit))
}

/// Per app: its live generation and its newest generation.
fn generations(ctx: &Ctx) -> Result<BTreeMap<String, (Option<u64>, u64)>> {
    let rows = ctx.bus.list_generations().map_err(|e| anyhow::anyhow!("ListGenerations: {e}"))?;
    let mut out: BTreeMap<String, (Option<u64>, u64)> = BTreeMap::new();
    for g in rows {
        let e = out.entry(g.app.clone()).or_default();
        e.1 = e.1.max(g.generation);
        if g.state == "live" {
            e.0 = Some(g.generation);
        }
    }
    Ok(out)
}

pub fn invalid_app_file(ctx: &mut Ctx, pick: u64, _: usize) -> Result<Option<Hit>> {
    ctx.settle();
    let i = (pick % APPS.len() as u64) as usize;
    let app = &APPS[i];
    let good = ctx.host.app_file(app, ctx.reloads[i]);
    let (bad, what) = match (pick / 3) % 3 {
        0 => (good.replace("workers = 4", "workers = 6"), "workers = 6"),
        1 => (format!("{good}colour = \"blue\"\n"), "an unknown key"),
        _ => (format!("{good}command = [\n"), "a TOML syntax error"),
    };
    let before = generations(ctx)?;
    ctx.host.sb.write_file(Host::app_path(app), &bad, 0o644)?;
    let mut wrong = Vec::new();
    let result: Result<()> = (|| {
        ctx.host.sb.check(["systemctl", "reload", "ipclusterd"])?;
        match ctx.bus.deploy(app.name) {
            Err(e) if e.short() == "InvalidConfig" => {}
            other => wrong.push(format!("Deploy said {other:?}, not InvalidConfig")),
        }
        let check = ctx.host.sb.run(["ipclusterctl", "check-config", &Host::app_path(app)])?;
        if check.status.code() != Some(1) {
            wrong.push(format!("ipclusterctl check-config exited {:?}", check.status.code()));
        }
        Ok(())
    })();
    let after = generations(ctx);
    // Restored whatever happened.
    ctx.host.sb.write_file(Host::app_path(app), &good, 0o644)?;
    ctx.host.sb.check(["systemctl", "reload", "ipclusterd"])?;
    result?;
    if after.as_ref().ok() != Some(&before) {
        wrong.push(format!("generations changed: {before:?} -> {after:?}"));
    }
    let mut hit = if wrong.is_empty() {
        Hit::ok(format!("{what}: Deploy refused with InvalidConfig, nothing changed; restored"))
    } else {
        Hit::failed(format!("{what}: {}", wrong.join("; ")))
    };
    hit.app = Some(app.name.into());
    Ok(Some(hit))
}

/// The flooder: joins the cgroup of worker `pid` (mode `worker`) or stays outside every scope
/// (`outside`), forks to 4 senders, and sends for `secs` every kind of datagram but WATCHDOG=1
/// to the daemon's notify socket; prints how many it sent.
const FLOODER: &str = r#"
import os, socket, sys, time
pid, secs, mode = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if mode == "worker":
    cg = open("/proc/%d/cgroup" % pid).read().split("::", 1)[1].strip()
    open("/sys/fs/cgroup%s/cgroup.procs" % cg, "w").write(str(os.getpid()))
kids = []
for _ in range(3):
    k = os.fork()
    if k == 0:
        kids = None
        break
    kids.append(k)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
msgs = [b"READY=1", b"STATUS=soak flood", b"X" * 4000, b"Y" * 9000, b"\x00\xff\xfe garbage", b"READY=1\nSTATUS=x", b"MAINPID=1", b"=", b""]
end, n = time.time() + secs, 0
while time.time() < end:
    try:
        s.sendto(msgs[n % len(msgs)], "/run/ipcluster/notify")
        n += 1
    except OSError:
        time.sleep(0.001)
if kids is None:
    os._exit(0)
for k in kids:
    os.waitpid(k, 0)
print(n * 4)
"#;

pub fn notify_flood(ctx: &mut Ctx, pick: u64, _: usize) -> Result<Option<Hit>> {
    let workers: Vec<WorkerRow> = live(ctx, None)?
        .into_iter()
        .filter(|w| APPS.iter().any(|a| a.name == w.app && a.role != Role::Sessions))
        .collect();
    let Some(w) = choose(&workers, pick).cloned() else {
        return Ok(Some(Hit::ok("no live worker to flood from")));
    };
    let pid = w.pid.to_string();
    let floods: Vec<_> = ["worker", "outside"]
        .iter()
        .map(|mode| {
            ctx.host
                .sb
                // In a scope of the sandbox's systemd: a process can only move between cgroups
                // below its cgroup namespace's root.
                .command([
                    "systemd-run",
                    "--scope",
                    "--quiet",
                    "--collect",
                    "--",
                    "python3",
                    "-c",
                    FLOODER,
                    &pid,
                    "3",
                    mode,
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut sent = Vec::new();
    for f in floods {
        let out = f.wait_with_output()?;
        sent.push(String::from_utf8_lossy(&out.stdout).trim().to_owned());
        if !out.status.success() {
            // The worker may have gone meanwhile (its cgroup with it).
            sent.push(String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("").to_owned());
        }
    }
    let hit = Hit::ok(format!(
        "~{} datagrams from pid {}'s cgroup, ~{} from outside, in 3 s",
        sent[0], w.pid, sent[1]
    ));
    Ok(Some(hit.on(&w.app, w.band, w.pid, w.generation)))
}

pub fn memory_growth(ctx: &mut Ctx, pick: u64, _: usize) -> Result<Option<Hit>> {
    let workers = live(ctx, Some(Role::Nat))?;
    let Some(w) = choose(&workers, pick).cloned() else { return Ok(Some(Hit::ok("no live worker to grow"))) };
    let port = w.ports.first().context("a NAT worker's port")?.1;
    let mib = super::host::MEMORY_MAX_MIB + 24;
    let grown = ctx.host.sb.in_netns(move || -> Result<(), String> {
        use std::io::{Read, Write};
        let dst = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut s = ipcluster_load::connect(Ipv4Addr::LOCALHOST, dst).map_err(|e| format!("{e:?}"))?;
        s.write_all(format!("GET /alloc/{mib} HTTP/1.1\r\nHost: soak\r\n\r\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 512];
        s.read(&mut buf).map(drop).map_err(|e| e.to_string())
    })?;
    if let Err(e) = grown {
        return Ok(Some(Hit::ok(format!("pid {} did not take the request ({e})", w.pid)).on(
            &w.app,
            w.band,
            w.pid,
            w.generation,
        )));
    }
    let started = Instant::now();
    let replaced = wait_until(Duration::from_secs(30), || still_live(ctx, &w) == Some(false));
    let took = started.elapsed().as_secs_f64();
    let hit = if replaced {
        Hit::ok(format!("pid {} grew by {mib} MiB, replaced after {took:.1} s", w.pid))
    } else {
        Hit::failed(format!("pid {} grew by {mib} MiB and was still live after {took:.0} s", w.pid))
    };
    Ok(Some(hit.on(&w.app, w.band, w.pid, w.generation)))
}

type Options = HashMap<String, OwnedVariant>;

/// App names of malformed calls that must never reach the journal as they are: a long one, and
/// one with a line break and a terminal escape (a forged journal line, a coloured one).
pub const LONG_NAME_LEN: usize = 10_000;
pub const FORGED_NAME: &str = "soak\nipclusterd: \u{1b}[31mforged line";

pub fn bad_dbus_input(ctx: &mut Ctx, pick: u64, _: usize) -> Result<Option<Hit>> {
    ctx.settle();
    let app = app_of(pick).name;
    let before = generations(ctx)?;
    let t = Duration::from_secs(30);
    let bus = &ctx.bus;
    let none = Options::new();
    let unknown: Options = (0..1000).map(|i| (format!("k{i}"), opt(1u32))).collect();
    let huge_command: Options = [("command".to_owned(), opt(vec!["x".repeat(1 << 20)]))].into();
    let huge_env: Options =
        [("environment".to_owned(), opt((0..10_000).map(|i| format!("V{i}=x")).collect::<Vec<_>>()))].into();
    let text_workers: Options = [("workers".to_owned(), opt("4"))].into();
    let odd_workers: Options = [("workers".to_owned(), opt(3u32))].into();
    let calls: Vec<(&str, &str, Result<(), CallError>)> = vec![
        (
            "Deploy of a 10000-character app name",
            "InvalidArgs",
            bus.call_any("Deploy", &("a".repeat(LONG_NAME_LEN), &none), t),
        ),
        (
            "Deploy of a name with a line break",
            "InvalidArgs",
            bus.call_any("Deploy", &(FORGED_NAME, &none), t),
        ),
        (
            "RetireGeneration of a name with a line break",
            "InvalidArgs",
            bus.call_any("RetireGeneration", &(FORGED_NAME, 1u64), t),
        ),
        ("StopApp of a name with a line break", "InvalidArgs", bus.call_any("StopApp", &(FORGED_NAME,), t)),
        ("Deploy of ../etc", "InvalidArgs", bus.call_any("Deploy", &("../etc", &none), t)),
        ("Deploy of demo;reboot", "InvalidArgs", bus.call_any("Deploy", &("demo;reboot", &none), t)),
        ("Deploy with 1000 unknown options", "InvalidArgs", bus.call_any("Deploy", &(app, &unknown), t)),
        ("Deploy with a 1 MiB command", "InvalidArgs", bus.call_any("Deploy", &(app, &huge_command), t)),
        ("Deploy with 10000 variables", "InvalidArgs", bus.call_any("Deploy", &(app, &huge_env), t)),
        ("Deploy with workers as a string", "InvalidArgs", bus.call_any("Deploy", &(app, &text_workers), t)),
        ("Deploy with 3 workers", "InvalidArgs", bus.call_any("Deploy", &(app, &odd_workers), t)),
        ("Deploy(ss)", "InvalidArgs", bus.call_any("Deploy", &(app, "x"), t)),
        ("RetireGeneration(ss)", "InvalidArgs", bus.call_any("RetireGeneration", &(app, "one"), t)),
        ("KillRetired(u)", "InvalidArgs", bus.call_any("KillRetired", &(7u32,), t)),
        ("ListWorkers of ../etc", "InvalidArgs", bus.call_any("ListWorkers", &("../etc",), t)),
        ("Rollback to generation 2^64-1", "NoSuchGeneration", bus.call_any("Rollback", &(app, u64::MAX), t)),
        ("Deploy of an app that does not exist", "NoSuchApp", bus.call_any("Deploy", &("nope", &none), t)),
    ];
    let mut wrong: Vec<String> = calls
        .iter()
        .filter(|(_, want, got)| got.as_ref().err().map(CallError::short) != Some(*want))
        .map(|(what, want, got)| format!("{what}: {got:?}, not {want}"))
        .collect();
    let after = generations(ctx)?;
    if after != before {
        wrong.push(format!("generations changed: {before:?} -> {after:?}"));
    }
    let mut hit = if wrong.is_empty() {
        Hit::ok(format!(
            "{} malformed or oversized calls refused as documented, nothing changed",
            calls.len()
        ))
    } else {
        Hit::failed(wrong.join("; "))
    };
    hit.app = Some(app.into());
    Ok(Some(hit))
}

pub fn package_upgrade(ctx: &mut Ctx, _: u64, _: usize) -> Result<Option<Hit>> {
    let old = ctx.host.daemon_pid();
    let started = Instant::now();
    if let Err(e) = ctx.host.apt_install(true) {
        return Ok(Some(Hit::failed(format!("{e:#}"))));
    }
    let took = started.elapsed().as_secs_f64();
    Ok(Some(match wait_daemon(ctx, old, Duration::from_secs(30)) {
        Ok(new) => Hit::ok(format!("reinstalled in {took:.1} s, daemon pid {old} -> {new}")),
        Err(e) => Hit::failed(format!("reinstalled in {took:.1} s; {e:#}")),
    }))
}
