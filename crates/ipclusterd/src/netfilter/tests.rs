//! The [`super::Iptables`] router with stand-in programs: time limits, what it runs, the checks it spares.

use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::netfilter::IF_INET6;
use std::path::PathBuf;

/// `p` as one shell word (a checkout's path may hold spaces).
fn quoted(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn route() -> AppRoute {
    route_on("web", &["0.0.0.0:80"])
}

fn route_on(app: &str, listen: &[&str]) -> AppRoute {
    AppRoute {
        app: ipcluster_core::name::AppName::new(app).unwrap(),
        listen: listen.iter().map(|l| l.parse().unwrap()).collect(),
        bands: vec![(20000..).take(listen.len()).collect()],
        guarded: (20000..).take(listen.len()).collect(),
        sessions: None,
    }
}

fn no_ipv6() -> Ipv6 {
    Ipv6::Absent("this host has no IPv6 (test)".into())
}

/// A program that hangs (as iptables-restore waiting on a lock another program holds) is
/// killed at the time limit, and the caller gets an error saying so.
#[tokio::test]
async fn a_hanging_program_is_killed_at_the_time_limit() {
    let dir = crate::test_dir("netfilter-timeout");
    let pidfile = dir.join("pid");
    let save = script(&dir, "save", "");
    let restore = script(&dir, "restore", &format!("echo $$ > {}\nexec sleep 30", quoted(&pidfile)));
    let ipt = Iptables::with_tools(Tools { save, restore }, no_ipv6(), Duration::from_millis(300));
    let started = std::time::Instant::now();
    let e = ipt.apply(&[route()]).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(e.0.contains("did not finish") && e.0.contains("killed"), "{e}");
    let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_owned();
    // Killed: gone, or a zombie until tokio reaps it.
    let gone = (0..100).any(|_| {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        let alive = state.is_some_and(|s| s.rsplit_once(") ").is_some_and(|(_, r)| !r.starts_with('Z')));
        if alive {
            std::thread::sleep(Duration::from_millis(20));
        }
        !alive
    });
    assert!(gone, "process {pid} still runs");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn failures_carry_the_programs_message_and_missing_programs_are_named() {
    let dir = crate::test_dir("netfilter-fail");
    let save = script(&dir, "save", "echo '*nat' ; echo COMMIT");
    let restore =
        script(&dir, "restore", "cat > /dev/null; echo 'iptables-restore: line 3 failed' >&2; exit 2");
    let ipt = Iptables::with_tools(Tools { save, restore: restore.clone() }, no_ipv6(), TIMEOUT);
    assert_eq!(ipt.check(), Ok(()));
    let e = ipt.apply(&[route()]).await.unwrap_err();
    assert!(e.0.contains("restore failed") && e.0.contains("line 3 failed"), "{e}");
    // Nothing to change: restore is not even run.
    assert_eq!(ipt.apply(&[]).await, Ok(Applied::Unchanged));

    let missing = Iptables::with(Err(RouterError("iptables is not installed".into())), no_ipv6(), TIMEOUT);
    assert!(missing.check().unwrap_err().0.contains("not installed"));
    assert!(missing.apply(&[route()]).await.unwrap_err().0.contains("not installed"));
    let gone = Iptables::with_tools(Tools { save: dir.join("nope"), restore }, no_ipv6(), TIMEOUT);
    assert!(gone.current().await.unwrap_err().0.contains("cannot run"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn programs_are_found_by_absolute_path() {
    // On a machine with iptables (CI installs it) all four are found where Debian puts them.
    for family in Family::ALL {
        match Tools::find(family) {
            Ok(t) => {
                assert!(t.save.is_absolute() && t.restore.is_absolute(), "{t:?}");
                let name = t.restore.file_name().unwrap().to_string_lossy().into_owned();
                assert_eq!(name, format!("{}-restore", family.program()));
            }
            Err(e) => assert!(e.0.contains("apt-get install iptables"), "{e}"),
        }
    }
    // This host's IPv6 as the router sees it, and the kernel agree.
    match Ipv6::detect() {
        Ipv6::Absent(why) => {
            assert!(!Path::new(IF_INET6).exists());
            assert!(why.contains("no IPv6"), "{why}");
        }
        Ipv6::Present(_) => assert!(Path::new(IF_INET6).exists()),
    }
}

/// What the code under test logged (a `tracing` writer).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

/// Programs that log every run (name, arguments and stdin) to a log of their family (the
/// two families run at the same time); the saves print `*nat` (IPv4) and `save6`; a
/// restore whose family is in `failing` fails.
struct Fake {
    dir: PathBuf,
}

impl Fake {
    fn new(test: &str, save6: &str, failing: &[Family]) -> Fake {
        let dir = crate::test_dir(test);
        for (family, save) in [(Family::V4, "*nat\nCOMMIT\n"), (Family::V6, save6)] {
            let p = family.program();
            let log = dir.join(format!("{p}.log"));
            std::fs::write(dir.join(format!("{p}.out")), save).unwrap();
            let out = dir.join(format!("{p}.out"));
            script(
                &dir,
                &format!("{p}-save"),
                &format!("echo {p}-save >> {}\ncat {}", quoted(&log), quoted(&out)),
            );
            let fail = if failing.contains(&family) { "echo 'line 2 failed' >&2; exit 1" } else { "" };
            script(
                &dir,
                &format!("{p}-restore"),
                &format!("echo \"{p}-restore $*\" >> {0}\ncat >> {0}\n{fail}", quoted(&log)),
            );
        }
        Fake { dir }
    }

    fn tools(&self, family: Family) -> Tools {
        let p = family.program();
        Tools { save: self.dir.join(format!("{p}-save")), restore: self.dir.join(format!("{p}-restore")) }
    }

    fn router(&self, ipv6: Option<Ipv6>) -> Iptables {
        let ipv6 = ipv6.unwrap_or_else(|| Ipv6::Present(Ok(self.tools(Family::V6))));
        Iptables::with_tools(self.tools(Family::V4), ipv6, TIMEOUT)
    }

    /// One family's log since the last call.
    fn take_of(&self, family: Family) -> String {
        let log = self.dir.join(format!("{}.log", family.program()));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        text
    }

    /// Both logs since the last call, IPv4's first.
    fn take(&self) -> String {
        self.take_of(Family::V4) + &self.take_of(Family::V6)
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Without IPv6, `[::]` is IPv4's wildcard and nothing of ip6tables runs; a specific IPv6
/// address cannot be routed, the error says why, and nothing changes.
#[tokio::test]
async fn without_ipv6_the_wildcard_is_ipv4s_and_an_ipv6_address_is_refused_with_why() {
    let fake = Fake::new("netfilter-no-ipv6", "", &[]);
    let ipt = fake.router(Some(no_ipv6()));
    assert_eq!(ipt.apply(&[route_on("web", &["[::]:80"])]).await, Ok(Applied::Changed));
    let log = fake.take();
    assert!(log.contains("-A IPC-web -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20000"), "{log}");
    assert!(!log.contains("ip6tables"), "{log}");
    let e = ipt.apply(&[route_on("web", &["[::]:80"]), route_on("api", &["[2001:db8::1]:443"])]).await;
    assert_eq!(
        e,
        Err(RouterError("cannot route [2001:db8::1]:443 of app api: this host has no IPv6 (test)".into()))
    );
    assert_eq!(fake.take(), "", "nothing ran");
    assert_eq!(ipt.check(), Ok(()), "IPv4 is usable");
}

/// With IPv6 but no usable ip6tables, IPv4-only apps are routed (their IPv6 guard is
/// missing, and the journal says so); an entry IPv6 serves is refused with the reason and
/// the way to serve IPv4 alone, and nothing changes.
#[tokio::test]
async fn without_ip6tables_ipv4_apps_still_work_and_ipv6_entries_are_refused_with_why() {
    let fake = Fake::new("netfilter-no-ip6tables", "", &[]);
    let missing =
        Ipv6::Present(Err(RouterError("ip6tables is not installed: no executable ip6tables-save".into())));
    let ipt = fake.router(Some(missing));
    assert_eq!(ipt.apply(&[route()]).await, Ok(Applied::Changed));
    let log = fake.take();
    assert!(log.starts_with("iptables-save\niptables-restore --noflush --wait 5\n"), "{log}");
    assert!(!log.contains("ip6tables"), "{log}");
    for (listen, hint) in [("[::]:80", true), ("[2001:db8::1]:80", false)] {
        let e = ipt.apply(&[route(), route_on("six", &[listen])]).await.unwrap_err();
        assert!(
            e.0.starts_with(&format!(
                "cannot route {listen} of app six over IPv6: ip6tables is not installed"
            )),
            "{e}"
        );
        assert_eq!(e.0.contains("listen on 0.0.0.0:80 to serve IPv4 clients only"), hint, "{e}");
    }
    assert_eq!(fake.take(), "", "nothing ran");

    // ip6tables-save fails at run time (say, a kernel without IPv6 netfilter): the same.
    let fake = Fake::new("netfilter-ip6tables-fails", "", &[]);
    script(&fake.dir, "ip6tables-save", "echo 'ip6tables-save: table nat does not exist' >&2; exit 1");
    let ipt = fake.router(None);
    assert_eq!(ipt.apply(&[route()]).await, Ok(Applied::Changed));
    assert!(fake.take().contains("iptables-restore"));
    let e = ipt.apply(&[route(), route_on("six", &["[::]:81"])]).await.unwrap_err();
    assert!(
        e.0.contains("[::]:81 of app six over IPv6: ip6tables-save failed") && e.0.contains("does not exist"),
        "{e}"
    );
    assert!(!fake.take().contains("restore"), "nothing was written for the refused routes");
}

/// The IPv6 tables are read while an app runs (its ports are guarded there too), and, with
/// no app, only until a read showed nothing of ours.
#[tokio::test]
async fn the_ipv6_tables_are_read_only_when_needed_or_ours_are_there() {
    let fake = Fake::new("netfilter-v6-reads", "*nat\nCOMMIT\n", &[]);
    let ipt = fake.router(None);
    assert_eq!(ipt.apply(&[]).await, Ok(Applied::Unchanged));
    // Both at once: in either order.
    let mut runs: Vec<String> = fake.take().lines().map(str::to_owned).collect();
    runs.sort();
    assert_eq!(runs, ["ip6tables-save", "iptables-save"], "the first time: is anything of ours there?");
    assert_eq!(ipt.apply(&[]).await, Ok(Applied::Unchanged));
    assert_eq!(fake.take(), "", "nothing was, in either family: neither is read again");
    // An IPv4-only app: the guard of its ports goes into both families.
    assert_eq!(ipt.apply(&[route()]).await, Ok(Applied::Changed));
    let log = fake.take();
    let v6 = log.split("ip6tables-restore --noflush --wait 5\n").nth(1).unwrap();
    let v6 = v6.split("iptables-restore").next().unwrap();
    assert!(v6.starts_with("*filter\n") && !v6.contains("*nat") && v6.contains("! -i lo"), "{log}");
    // Ours is there now (the fake's save still says otherwise, so make it say so).
    let ours = "*filter\n:IPCLUSTER - [0:0]\n-A INPUT ! -i lo -p tcp -m conntrack --ctstate NEW -m conntrack ! --ctstate DNAT -j IPCLUSTER\nCOMMIT\n";
    std::fs::write(fake.dir.join("ip6tables.out"), ours).unwrap();
    for _ in 0..2 {
        let _ = ipt.apply(&[]).await;
        assert!(fake.take().contains("ip6tables-save"), "ours may be there: read every time");
    }
}

/// The periodic check forks nothing while the nf_tables generation id stays where it was
/// when a read found the routes in place; any change to the ruleset (by anyone), a write of
/// ours or other routes make the next check read again.
#[tokio::test]
async fn an_unmoved_generation_id_spares_the_read() {
    let fake = Fake::new("netfilter-generation", "", &[]);
    let routes = [route()];
    // What the kernel shows once the routes are in place: their rules, written to empty tables.
    let text = routing::render(Family::V4, &Tables::default(), &routes).unwrap();
    assert!(!text.contains("\n-D ") && !text.contains("\n-X "), "{text}");
    std::fs::write(fake.dir.join("iptables.out"), &text).unwrap();
    assert!(routing::family_up_to_date(Family::V4, &Tables::parse(Family::V4, &text), &routes));
    let id = Arc::new(std::sync::atomic::AtomicU32::new(7));
    let mut ipt = fake.router(Some(no_ipv6()));
    ipt.generation = Generation::Fake(id.clone());
    assert_eq!(ipt.apply(&routes).await, Ok(Applied::Unchanged));
    assert_eq!(fake.take(), "iptables-save\n", "the first check reads");
    for _ in 0..3 {
        assert_eq!(ipt.apply(&routes).await, Ok(Applied::Unchanged));
    }
    assert_eq!(fake.take(), "", "the id did not move: nothing ran");
    // Another tool changed something (a flush, or anything else): read, and repaired.
    id.store(8, Ordering::Relaxed);
    std::fs::write(fake.dir.join("iptables.out"), "*nat\nCOMMIT\n").unwrap();
    assert_eq!(ipt.apply(&routes).await, Ok(Applied::Changed));
    assert!(fake.take().starts_with("iptables-save\niptables-restore"));
    // Our own write moved it too; until a read finds the rules in place, every check reads.
    id.store(9, Ordering::Relaxed);
    std::fs::write(fake.dir.join("iptables.out"), &text).unwrap();
    assert_eq!(ipt.apply(&routes).await, Ok(Applied::Unchanged));
    assert_eq!(fake.take(), "iptables-save\n");
    assert_eq!(ipt.apply(&routes).await, Ok(Applied::Unchanged));
    assert_eq!(fake.take(), "");
    // Other routes: read, whatever the id.
    let other = [route_on("web", &["0.0.0.0:81"])];
    assert_eq!(ipt.apply(&other).await, Ok(Applied::Changed));
    assert!(fake.take().starts_with("iptables-save\n"));
}

/// Programs of iptables-legacy (or ones we cannot tell) leave the id alone: every check
/// reads them. The fakes here are shell scripts, neither.
#[test]
fn the_generation_id_is_used_only_for_nf_tables_programs() {
    let fake = Fake::new("netfilter-generation-off", "", &[]);
    assert!(matches!(fake.router(None).generation, Generation::Off));
    assert!(!crate::nftgen::counts_iptables(&fake.tools(Family::V4).save));
}

/// Both families are written at once; when one fails, the other's nat table is taken
/// back, so that routing is as it was in both families.
#[tokio::test]
async fn when_one_family_fails_the_other_nat_change_is_undone() {
    let restores = |log: &str| log.lines().filter(|l| l.contains("-restore ")).count();
    let fake = Fake::new("netfilter-undo", "*nat\nCOMMIT\n", &[Family::V4]);
    let ipt = fake.router(None);
    let e = ipt.apply(&[route_on("web", &["[::]:80"])]).await.unwrap_err();
    assert!(e.0.contains("iptables-restore failed") && e.0.contains("line 2 failed"), "{e}");
    let (v4, v6) = (fake.take_of(Family::V4), fake.take_of(Family::V6));
    assert_eq!((restores(&v4), restores(&v6)), (1, 2), "{v4}\n{v6}");
    let undo = v6.rsplit("ip6tables-restore --noflush --wait 5\n").next().unwrap();
    assert!(
        undo.starts_with("*nat\n") && undo.contains("-D PREROUTING ") && undo.contains("-X IPC-web\n"),
        "{undo}"
    );
    // Only the guard changed in IPv6 (an IPv4-only app): nothing to undo.
    let _ = ipt.apply(&[route()]).await.unwrap_err();
    assert_eq!(restores(&fake.take_of(Family::V6)), 1);
    // The undo fails too: the error says both.
    script(&fake.dir, "ip6tables-restore", "if grep -q '^-D ' ; then echo 'undo refused' >&2; exit 1; fi");
    let e = ipt.apply(&[route_on("web", &["[::]:80"])]).await.unwrap_err();
    assert!(
        e.0.contains("line 2 failed") && e.0.contains("IPv6 nat rules") && e.0.contains("undo refused"),
        "{e}"
    );

    // IPv6 fails for an app it serves: IPv4's change is taken back.
    let fake = Fake::new("netfilter-undo-4", "*nat\nCOMMIT\n", &[Family::V6]);
    let ipt = fake.router(None);
    let e = ipt.apply(&[route_on("web", &["[::]:80"])]).await.unwrap_err();
    assert!(e.0.starts_with("cannot route [::]:80 of app web over IPv6: ip6tables-restore failed"), "{e}");
    let v4 = fake.take_of(Family::V4);
    assert_eq!(restores(&v4), 2, "{v4}");
    let undo = v4.rsplit("iptables-restore --noflush --wait 5\n").next().unwrap();
    assert!(undo.starts_with("*nat\n") && undo.contains("-X IPC-web\n"), "{undo}");
    // For an IPv4-only app IPv6 carries only the guard: logged, and IPv4's change stands.
    let logs = Logs::default();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt().with_writer(logs.clone()).with_ansi(false).finish(),
    );
    assert_eq!(ipt.apply(&[route()]).await, Ok(Applied::Changed));
    assert_eq!(restores(&fake.take_of(Family::V4)), 1);
    let warning = "worker ports are not guarded from IPv6 hosts: ip6tables-restore failed";
    assert_eq!(logs.text().matches(warning).count(), 1, "{}", logs.text());
    // Once, not at every comparison: reading the IPv6 tables works, writing them still not.
    for _ in 0..3 {
        // (The fake's IPv4 save never shows what was written: IPv4 is written again.)
        assert_eq!(ipt.apply(&[route()]).await, Ok(Applied::Changed));
    }
    assert_eq!(logs.text().matches(warning).count(), 1, "{}", logs.text());
    // IPv6 works again; its next failure is news again.
    script(&fake.dir, "ip6tables-restore", "cat > /dev/null");
    assert_eq!(ipt.apply(&[route()]).await, Ok(Applied::Changed));
    script(&fake.dir, "ip6tables-restore", "cat > /dev/null; exit 1");
    let _ = ipt.apply(&[route_on("web", &["0.0.0.0:81"])]).await;
    assert_eq!(logs.text().matches("worker ports are not guarded").count(), 2, "{}", logs.text());
}
