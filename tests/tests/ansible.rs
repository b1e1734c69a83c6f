//! The Ansible collection `ipcluster.ipclusterd` (`ansible/`, docs/fleet.md "Ansible") driven as
//! an operator drives it: `ansible-playbook` on the balancer of the sandboxed fleet
//! ([`ipcluster_e2e::fleet`]), over ssh to the hosts, with the example inventory and app of
//! docs/fleet.md. Ansible is the one `cargo xtask ansible` installs from PyPI into a virtual
//! environment under the target directory, and the collection the archive it built, installed
//! there; both are shared read-only with the balancer. The hosts run the modules with their own
//! /usr/bin/python3 (the machine's, overlaid). `IPCLUSTER_SHOW_ANSIBLE=1` shows what each run
//! printed.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant, SystemTime},
};

use ipcluster_e2e::{
    Sandbox,
    fixture::Demo,
    fleet::{
        Fleet, HOSTS, OpenLoop, SERVERS, Server, StatsSampler, ask_all, assert_banded, doc_block, host_of,
        servers,
    },
    text,
};

/// The app file on each host.
const WEB_FILE: &str = "/etc/ipcluster/apps/web.toml";
/// Where the operator's files are on the balancer (its /root is a tmpfs of its own).
const WORK: &str = "/root/ansible";

/// Where `cargo xtask ansible` put Ansible and the collection.
fn ansible_dir() -> PathBuf {
    let dir = std::env::var_os("IPCLUSTER_ANSIBLE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| ipcluster_sandbox::target_dir().join("ansible"));
    let collection = dir.join("collections/ansible_collections/ipcluster/ipclusterd");
    assert!(
        dir.join("venv/bin/python3").exists() && collection.is_dir(),
        "no Ansible or no collection in {}: run `cargo xtask ansible` first (cargo xtask test does)",
        dir.display()
    );
    dir
}

/// Ansible on a sandbox: the shared virtual environment's Python and the installed collection.
#[derive(Debug)]
struct Ansible<'a> {
    sb: &'a Sandbox,
    python: PathBuf,
    collections: PathBuf,
}

impl<'a> Ansible<'a> {
    fn new(sb: &'a Sandbox, dir: &Path) -> Self {
        let inside = sb.inside(dir).expect("the Ansible directory is shared with the sandbox");
        sb.check(["mkdir", "-p", WORK]).unwrap();
        Ansible { sb, python: inside.join("venv/bin/python3"), collections: inside.join("collections") }
    }

    /// `ansible-playbook ARGS…` (run as `python -m ansible playbook`: the venv's scripts name its
    /// path on the machine), with `env` added; its output, whatever its status.
    fn playbook(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut argv: Vec<&str> = vec![self.python.to_str().unwrap(), "-m", "ansible", "playbook"];
        argv.extend_from_slice(args);
        let mut cmd = self.sb.command(argv);
        cmd.env("HOME", "/root")
            .env("ANSIBLE_COLLECTIONS_PATH", &self.collections)
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
            .env("PYTHONDONTWRITEBYTECODE", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let started = Instant::now();
        let out = cmd.output().expect("ansible-playbook runs");
        eprintln!(
            "ansible-playbook {} took {:?} (exit {:?})",
            args.join(" "),
            started.elapsed(),
            out.status.code()
        );
        if std::env::var_os("IPCLUSTER_SHOW_ANSIBLE").is_some() {
            eprintln!("{}", text(&out));
        }
        out
    }

    /// The rolling playbook of the collection with the inventory and `app` (a vars file in
    /// [`WORK`]), and `more` arguments.
    fn rolling(&self, app: &str, more: &[&str]) -> Output {
        let (inventory, vars) = (format!("{WORK}/inventory.ini"), format!("@{WORK}/{app}"));
        let mut args = vec!["-i", &inventory, "ipcluster.ipclusterd.rolling", "-e", &vars];
        args.extend_from_slice(more);
        self.playbook(&args, &[])
    }

    /// A playbook of `tasks` against `host`, with the JSON callback: each task's result by name.
    fn tasks(&self, host: &str, tasks: &str) -> (Output, BTreeMap<String, serde_json::Value>) {
        let play = format!("- hosts: {host}\n  gather_facts: false\n  tasks:\n{tasks}");
        self.sb.write_file(format!("{WORK}/tasks.yml"), play, 0o644).unwrap();
        let inventory = format!("{WORK}/inventory.ini");
        let out = self.playbook(
            &["-i", &inventory, &format!("{WORK}/tasks.yml")],
            &[("ANSIBLE_STDOUT_CALLBACK", "ansible.posix.json")],
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("the json callback's output: {e}: {}", text(&out)));
        let mut results = BTreeMap::new();
        for task in json["plays"][0]["tasks"].as_array().expect("tasks") {
            let name = task["task"]["name"].as_str().unwrap_or_default().to_owned();
            results.insert(name, task["hosts"][host].clone());
        }
        (out, results)
    }
}

/// PLAY RECAP: per host, its counts (`ok`, `changed`, `failed`, `rescued`…).
fn recap(out: &Output) -> BTreeMap<String, BTreeMap<String, u32>> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let after = stdout.split_once("PLAY RECAP").map(|(_, r)| r).unwrap_or_default();
    after
        .lines()
        .filter_map(|l| l.split_once(" : "))
        .map(|(host, counts)| {
            let counts = counts
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.parse().unwrap_or(0)))
                .collect();
            (host.trim().to_owned(), counts)
        })
        .collect()
}

/// `count` of `host` in the recap (0 when the host is not there: it ran nothing).
fn count(recap: &BTreeMap<String, BTreeMap<String, u32>>, host: &str, count: &str) -> u32 {
    recap.get(host).and_then(|c| c.get(count)).copied().unwrap_or(0)
}

/// When each server was drained: the first and last sample that showed it `DRAIN`, per drain.
fn drains(
    samples: &[(SystemTime, BTreeMap<String, Server>)],
) -> BTreeMap<String, Vec<(SystemTime, SystemTime)>> {
    let mut out: BTreeMap<String, Vec<(SystemTime, SystemTime)>> = BTreeMap::new();
    for server in SERVERS {
        let mut current: Option<(SystemTime, SystemTime)> = None;
        for (at, states) in samples {
            let drained = states.get(server).is_some_and(|s| s.status == "DRAIN");
            current = match (current, drained) {
                (None, true) => Some((*at, *at)),
                (Some((from, _)), true) => Some((from, *at)),
                (Some(span), false) => {
                    out.entry(server.to_owned()).or_default().push(span);
                    None
                }
                (None, false) => None,
            };
        }
        out.entry(server.to_owned()).or_default().extend(current);
    }
    out
}

/// The app file and its time stamp on each host.
fn files(fleet: &Fleet) -> Vec<(String, i64)> {
    fleet
        .hosts
        .iter()
        .map(|h| {
            let meta = std::fs::metadata(h.host_path(WEB_FILE)).unwrap();
            (h.read_file(WEB_FILE).unwrap(), meta.mtime_nsec() + meta.mtime() * 1_000_000_000)
        })
        .collect()
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

#[test]
fn the_rolling_playbook_deploys_host_by_host_each_drained_in_haproxy_and_stops_at_a_failed_host() {
    let dir = ansible_dir();
    let started = Instant::now();
    let fleet = Fleet::new("web", &Demo::new(4).toml(), vec![dir.clone()]);
    eprintln!("fleet up in {:?}", started.elapsed());
    let ansible = Ansible::new(&fleet.lb, &dir);
    ansible.sb.write_file(format!("{WORK}/inventory.ini"), doc_block("inventory.ini"), 0o644).unwrap();
    let web = doc_block("web.yml");
    ansible.sb.write_file(format!("{WORK}/web.yml"), &web, 0o644).unwrap();
    let homes: BTreeMap<Ipv4Addr, usize> = ask_all(&fleet.lb)
        .iter()
        .map(|(c, a)| {
            assert_banded(*c, a);
            (*c, host_of(a.pid))
        })
        .collect();

    rolling_under_load(&fleet, &ansible, &homes);
    eprintln!("rolling run done at {:?}", started.elapsed());
    a_second_run_changes_nothing(&fleet, &ansible);
    eprintln!("second run done at {:?}", started.elapsed());
    let web3 = web.replace("RELEASE: \"2\"", "RELEASE: \"3\"");
    assert_ne!(web3, web);
    ansible.sb.write_file(format!("{WORK}/web3.yml"), &web3, 0o644).unwrap();
    check_and_diff_change_nothing(&fleet, &ansible);
    eprintln!("check and diff done at {:?}", started.elapsed());
    a_deploy_that_fails_stops_the_play_after_the_first_host(&fleet, &ansible, &web3);
    eprintln!("failed deploy done at {:?}", started.elapsed());
    a_host_that_fails_its_probe_is_rolled_back(&fleet, &ansible);
    eprintln!("failed probe done at {:?}", started.elapsed());
    the_modules_fail_with_the_daemons_errors_and_wait_for_autostart(&fleet, &ansible);
    eprintln!("modules done at {:?}", started.elapsed());
}

/// The rolling playbook under an open-loop load through HAProxy: no request fails; each host is
/// drained in HAProxy while it deploys (the stats show it), one at a time, and gets no new
/// connection meanwhile; every host ends on its new generation, back in the balancer; clients
/// stay on their host outside its drain.
fn rolling_under_load(fleet: &Fleet, ansible: &Ansible<'_>, homes: &BTreeMap<Ipv4Addr, usize>) {
    let sampler = StatsSampler::start(&fleet.lb);
    let load = OpenLoop::start(&fleet.lb, 100, 8);
    load.requests(100);
    let run_started = SystemTime::now();
    let out = ansible.rolling("web.yml", &[]);
    let run_took = run_started.elapsed().unwrap();
    load.requests(100);
    let requests = load.finish();
    let samples = sampler.finish();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let recap = recap(&out);
    for server in SERVERS {
        assert_eq!((count(&recap, server, "failed"), count(&recap, server, "rescued")), (0, 0), "{recap:?}");
        assert!(count(&recap, server, "changed") >= 3, "drained, deployed, put back: {recap:?}");
    }

    // Zero failed requests, from every client address.
    let failed: Vec<_> = requests.iter().filter(|r| r.result.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        requests.len(),
        &failed[..failed.len().min(5)]
    );
    // The load ran the whole time: 100 before, 100 after, and at least 80 % of its rate
    // (100/s) over the run (how long the run takes depends on the machine, not the count).
    let floor = 200 + (80.0 * run_took.as_secs_f64()) as usize;
    assert!(
        requests.len() >= floor,
        "only {} requests over a {run_took:?} run (at least {floor})",
        requests.len()
    );

    // Each host drained once, one after another, while its new generation started.
    let drains = drains(&samples);
    let mut previous_end = run_started;
    let mut numbers = Vec::new();
    for (i, server) in SERVERS.iter().enumerate() {
        let spans = &drains[*server];
        assert_eq!(spans.len(), 1, "{server} drained once: {spans:?}");
        let (from, to) = spans[0];
        assert!(from >= previous_end, "{server} was drained after the host before it was back");
        previous_end = to;
        let generation = fleet.started(i, 2);
        assert!(
            from <= generation && generation <= to,
            "{server}'s generation 2 started while it was drained"
        );
        // No new connection reached the drained host (a connection HAProxy made in the moment
        // the drain began may still land there: 100 ms of grace).
        let during: Vec<_> =
            requests.iter().filter(|r| r.sent > from + Duration::from_millis(100) && r.sent < to).collect();
        let reached: Vec<_> =
            during.iter().filter(|r| r.result.as_ref().is_ok_and(|a| host_of(a.pid) == i)).collect();
        assert!(
            reached.is_empty(),
            "{} requests reached {server} while it was drained: {reached:?}",
            reached.len()
        );
        let moved = during.iter().filter(|r| homes[&r.client] == i).count();
        assert!(moved > 0, "{server}'s clients were served by the other hosts while it was drained");
        numbers.push(format!(
            "{server} drained {} ({} of its clients' requests served by the other hosts meanwhile)",
            secs(to.duration_since(from).unwrap()),
            moved
        ));
    }

    // Outside the drains (with a margin), every client stayed on its host, in its band.
    let margin = Duration::from_millis(500);
    let spans: Vec<(SystemTime, SystemTime)> = drains.values().flatten().copied().collect();
    for r in &requests {
        let a = r.result.as_ref().unwrap();
        assert_banded(r.client, a);
        if spans.iter().all(|(from, to)| r.sent + margin < *from || r.sent > *to + margin) {
            assert_eq!(
                host_of(a.pid),
                homes[&r.client],
                "{} stays on its host outside the drains: {a:?}",
                r.client
            );
        }
    }

    // Every host on the new generation, its file as Ansible wrote it (owner root, mode 0644),
    // back in the balancer.
    for (i, h) in fleet.hosts.iter().enumerate() {
        assert_eq!(fleet.live(i), 2, "{}", HOSTS[i]);
        let file = h.read_file(WEB_FILE).unwrap();
        assert!(file.contains("environment = { \"RELEASE\" = \"2\" }\n"), "{file}");
        let meta = std::fs::metadata(h.host_path(WEB_FILE)).unwrap();
        assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (0, 0, 0o644));
    }
    assert!(servers(&fleet.lb).values().all(|s| s.status == "UP"), "{:?}", servers(&fleet.lb));

    let worst = requests.iter().map(|r| r.late).max().unwrap_or_default();
    eprintln!(
        "ROLLING RUN: {} requests, {} failed, playbook {}; {}; the load's worst lag {:?}",
        requests.len(),
        failed.len(),
        secs(run_took),
        numbers.join("; "),
        worst
    );
}

/// The same playbook again: nothing to change on any host, so no host is drained and nothing is
/// deployed; the recap says so.
fn a_second_run_changes_nothing(fleet: &Fleet, ansible: &Ansible<'_>) {
    let before = files(fleet);
    let sampler = StatsSampler::start(&fleet.lb);
    let out = ansible.rolling("web.yml", &[]);
    let samples = sampler.finish();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let recap = recap(&out);
    for server in SERVERS {
        assert_eq!(count(&recap, server, "changed"), 0, "{}", text(&out));
        assert_eq!(count(&recap, server, "failed"), 0, "{}", text(&out));
    }
    assert!(drains(&samples).values().all(Vec::is_empty), "no host was drained");
    assert_eq!(files(fleet), before, "no file was written");
    assert_eq!((fleet.live(0), fleet.live(1), fleet.live(2)), (2, 2, 2));
}

/// `--check --diff` with a changed app: the diff of each host's file and the deploy it would
/// make; nothing changes (files, generations, HAProxy).
fn check_and_diff_change_nothing(fleet: &Fleet, ansible: &Ansible<'_>) {
    let before = files(fleet);
    let generations: Vec<_> = (0..3).map(|i| fleet.generations(i)).collect();
    let sampler = StatsSampler::start(&fleet.lb);
    let out = ansible.rolling("web3.yml", &["--check", "--diff"]);
    let samples = sampler.finish();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("-environment = { \"RELEASE\" = \"2\" }").count(), 3, "{stdout}");
    assert_eq!(stdout.matches("+environment = { \"RELEASE\" = \"3\" }").count(), 3, "{stdout}");
    assert!(stdout.contains(&format!("--- before: {WEB_FILE}")), "{stdout}");
    assert_eq!(stdout.matches("+a new generation (deploy)").count(), 3, "{stdout}");
    assert_eq!(files(fleet), before, "no file was written");
    let after: Vec<_> = (0..3).map(|i| fleet.generations(i)).collect();
    assert_eq!(after, generations, "nothing was deployed");
    assert!(drains(&samples).values().all(Vec::is_empty), "no host was drained");
}

/// An app whose new workers never become ready: the first host's deploy fails with the daemon's
/// error; that host keeps its generation and gets its file back, is put back in the balancer,
/// and the play stops: the other hosts are not touched.
fn a_deploy_that_fails_stops_the_play_after_the_first_host(fleet: &Fleet, ansible: &Ansible<'_>, web3: &str) {
    let broken = web3.replace(
        "command: [/usr/local/bin/ipcluster-demo]",
        "command: [/usr/local/bin/ipcluster-demo, --exit-at-start, \"4\"]",
    );
    assert_ne!(&broken, web3);
    ansible.sb.write_file(format!("{WORK}/broken.yml"), broken, 0o644).unwrap();
    let before = files(fleet);
    let workers: Vec<_> = (0..3).map(|i| fleet.live_workers(i)).collect();
    let generations: Vec<_> = (0..3).map(|i| fleet.generations(i)).collect();
    let sampler = StatsSampler::start(&fleet.lb);
    let out = ansible.rolling("broken.yml", &[]);
    let samples = sampler.finish();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("org.ipcluster1.Error.DeployFailed: web generation 3: band"), "{stdout}");
    assert!(stdout.contains("h1 failed at \"Write the app file and deploy it\""), "{stdout}");
    let recap = recap(&out);
    assert_eq!(count(&recap, "h1", "failed"), 1, "{recap:?}");
    assert_eq!(count(&recap, "h2", "ok") + count(&recap, "h3", "ok"), 0, "h2 and h3 not reached: {recap:?}");

    // h1: drained during the attempt, back now; the same workers serve; a failed generation 3;
    // its file as it was, time stamp included.
    let drains = drains(&samples);
    assert_eq!(drains["h1"].len(), 1, "{drains:?}");
    assert!(drains["h2"].is_empty() && drains["h3"].is_empty(), "{drains:?}");
    assert_eq!(servers(&fleet.lb)["h1"].status, "UP");
    assert_eq!(fleet.live_workers(0), workers[0], "h1 serves with the workers it had");
    assert_eq!(fleet.generations(0).iter().find(|(g, _)| *g == 3).map(|(_, s)| s.as_str()), Some("failed"));
    assert_eq!(files(fleet), before, "every file as it was");
    assert_eq!(fleet.generations(1), generations[1], "h2 was not touched");
    assert_eq!(fleet.generations(2), generations[2], "h3 was not touched");
}

/// A new generation that goes live but fails the balancer's probe (here the probe asks a port
/// nothing listens on): the host is rolled back to the generation it had (the same workers, still
/// running), put back, and the play stops. Its file keeps the new content, written after the
/// generation now live started: the next run would deploy there again, and says so in check mode.
fn a_host_that_fails_its_probe_is_rolled_back(fleet: &Fleet, ansible: &Ansible<'_>) {
    let workers = fleet.live_workers(0);
    let generations: Vec<_> = (1..3).map(|i| fleet.generations(i)).collect();
    let probe = "ipcluster_probe_url=http://{{ ansible_host }}:81/";
    let out = ansible.rolling("web3.yml", &["-e", probe]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("h1 failed at \"Probe the host from the balancer\""), "{stdout}");
    let recap = recap(&out);
    assert_eq!(count(&recap, "h1", "failed"), 1, "{recap:?}");
    assert_eq!(fleet.live(0), 2, "h1 rolled back to generation 2");
    assert_eq!(fleet.live_workers(0), workers, "with the very workers it had");
    assert_eq!(fleet.generations(0).iter().find(|(g, _)| *g == 4).map(|(_, s)| s.as_str()), Some("retired"));
    assert_eq!(servers(&fleet.lb)["h1"].status, "UP");
    assert_eq!((1..3).map(|i| fleet.generations(i)).collect::<Vec<_>>(), generations, "h2, h3 not touched");
    assert!(fleet.hosts[0].read_file(WEB_FILE).unwrap().contains("\"RELEASE\" = \"3\""));

    // In check mode: h1 would deploy although its file has nothing to change; h2 and h3 would
    // change their files and deploy.
    let out = ansible.rolling("web3.yml", &["--check", "--diff"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("+a new generation (deploy)").count(), 3, "{stdout}");
    assert_eq!(
        stdout.matches("+environment = { \"RELEASE\" = \"3\" }").count(),
        2,
        "h2 and h3 only: {stdout}"
    );
}

/// The modules against h3, each task's result read from Ansible's JSON output: a bad option
/// value fails with the daemon's error and changes nothing; a new app with autostart starts on
/// the Reload and the module waits for that generation (no second deploy); stopped, absent,
/// each idempotent; info; deploy with overrides, rollback, kill_retired; a canary promoted once,
/// one rolled back, one promoted by the daemon (`canary_for`).
fn the_modules_fail_with_the_daemons_errors_and_wait_for_autostart(fleet: &Fleet, ansible: &Ansible<'_>) {
    let h3 = &fleet.hosts[2];
    let before = h3.read_file(WEB_FILE).unwrap();
    let generations = fleet.generations(2);
    let api = "ipcluster.ipclusterd.app:\n        name: api\n        command: [/usr/local/bin/ipcluster-demo]\n        \
               listen: [\"0.0.0.0:8080\"]\n        workers: 2\n        stop_timeout: 1s\n";
    let tasks = format!(
        r#"    - name: info
      ipcluster.ipclusterd.info:
    - name: deploy with a bad workers value
      ipcluster.ipclusterd.deploy: {{app: web, workers: 3}}
      ignore_errors: true
    - name: an app file with a bad workers value
      ipcluster.ipclusterd.app: {{name: web, command: [/usr/local/bin/ipcluster-demo], listen: ["0.0.0.0:80"], workers: 3}}
      ignore_errors: true
    - name: a bad app name
      ipcluster.ipclusterd.app: {{name: Web, command: [x], listen: ["0.0.0.0:80"]}}
      ignore_errors: true
    - name: rollback to a generation that never was
      ipcluster.ipclusterd.deploy: {{app: web, action: rollback, generation: 99}}
      ignore_errors: true
    - name: a new app
      {api}    - name: the new app again
      {api}    - name: the new app stopped
      {api}        state: stopped
    - name: the new app stopped again
      {api}        state: stopped
    - name: the new app removed
      ipcluster.ipclusterd.app: {{name: api, state: absent}}
    - name: the new app removed again
      ipcluster.ipclusterd.app: {{name: api, state: absent}}
    - name: deploy with overrides
      ipcluster.ipclusterd.deploy: {{app: web, workers: 2, env: {{MODE: x}}}}
    - name: rollback
      ipcluster.ipclusterd.deploy: {{app: web, action: rollback}}
    - name: kill retired
      ipcluster.ipclusterd.deploy: {{app: web, action: kill_retired}}
    - name: a canary
      ipcluster.ipclusterd.deploy: {{app: web, canary: 1}}
    - name: promote
      ipcluster.ipclusterd.deploy: {{app: web, action: promote}}
    - name: promote again
      ipcluster.ipclusterd.deploy: {{app: web, action: promote}}
    - name: a canary that ends by a rollback
      ipcluster.ipclusterd.deploy: {{app: web, canary: 2}}
    - name: the canary rolled back
      ipcluster.ipclusterd.deploy: {{app: web, action: rollback}}
    - name: a canary promoted by the daemon
      ipcluster.ipclusterd.deploy: {{app: web, canary: 1, canary_for: 2s}}
    - name: values that try to be keys
      ipcluster.ipclusterd.app:
        name: esc
        command: [/usr/local/bin/ipcluster-demo, "--x\"]\nworkers = 8"]
        listen: ["0.0.0.0:8081"]
        autostart: false
        deploy: never
        environment: {{NOTE: "a\"b\nworkers = 8\u0001"}}
      diff: true
    - name: values that try to be keys, removed
      ipcluster.ipclusterd.app: {{name: esc, state: absent}}
    - name: a deploy that outlives its timeout
      ipcluster.ipclusterd.deploy:
        app: web
        command: [/usr/local/bin/ipcluster-demo, --delay-ready, "3000"]
        timeout: 1
      ignore_errors: true
"#
    );
    let (out, results) = ansible.tasks("h3", &tasks);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let r = |name: &str| results.get(name).unwrap_or_else(|| panic!("no task {name}: {results:?}")).clone();

    let info = r("info");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"), "{info}");
    assert_eq!(info["apps"]["web"]["live"], 2, "{info}");
    // Generation 2's 4 workers and generation 1's, retired by the rolling run (not reaped).
    assert_eq!(info["apps"]["web"]["workers"].as_array().map(Vec::len), Some(8), "{info}");

    let bad = r("deploy with a bad workers value");
    assert_eq!((&bad["failed"], &bad["changed"]), (&true.into(), &false.into()), "{bad}");
    assert_eq!(bad["error"], "org.freedesktop.DBus.Error.InvalidArgs", "{bad}");
    let message = bad["error_message"].as_str().unwrap_or_default();
    assert!(message.contains("workers: 3: must be a power of two"), "{bad}");
    assert_eq!((&bad["generation_before"], &bad["generation"]), (&2.into(), &2.into()), "{bad}");

    let bad = r("an app file with a bad workers value");
    assert_eq!(bad["failed"], true, "{bad}");
    assert_eq!(bad["error"], "org.ipcluster1.Error.InvalidConfig", "{bad}");
    assert!(bad["msg"].as_str().unwrap_or_default().contains("workers: 3: must be a power of two"), "{bad}");
    assert_eq!(r("a bad app name")["error"], "org.freedesktop.DBus.Error.InvalidArgs");
    assert_eq!(
        r("rollback to a generation that never was")["error"],
        "org.ipcluster1.Error.NoSuchGeneration"
    );

    // The new app started on the Reload (autostart), once: generation 1 and no other.
    let new = r("a new app");
    assert_eq!((&new["changed"], &new["deployed"]), (&true.into(), &true.into()), "{new}");
    assert_eq!(
        (&new["generation_before"], &new["generation"]),
        (&serde_json::Value::Null, &1.into()),
        "{new}"
    );
    let again = r("the new app again");
    assert_eq!((&again["changed"], &again["generation"]), (&false.into(), &1.into()), "{again}");
    assert_eq!(again["msg"], "api: nothing to change (generation 1 is live)", "{again}");
    let stopped = r("the new app stopped");
    assert_eq!((&stopped["changed"], &stopped["stopped"]), (&true.into(), &true.into()), "{stopped}");
    assert_eq!(r("the new app stopped again")["changed"], false);
    assert_eq!(r("the new app removed")["changed"], true);
    assert_eq!(r("the new app removed again")["changed"], false);
    assert!(h3.read_file("/etc/ipcluster/apps/api.toml").is_err(), "the file is gone");

    let deployed = r("deploy with overrides");
    assert_eq!(
        (&deployed["generation_before"], &deployed["generation"]),
        (&2.into(), &3.into()),
        "{deployed}"
    );
    let rolled = r("rollback");
    assert_eq!((&rolled["generation"], &rolled["changed"]), (&2.into(), &true.into()), "{rolled}");
    let killed = r("kill retired");
    // Generation 1's 4 workers (retired by the rolling run) and generation 3's 2.
    assert_eq!((&killed["changed"], &killed["stopping"]), (&true.into(), &6.into()), "{killed}");
    // A canary is waited for as a canary (not until a timeout for "live"), then promoted once.
    let canary = r("a canary");
    assert_eq!(
        (&canary["changed"], &canary["generation_before"], &canary["generation"], &canary["state"]),
        (&true.into(), &2.into(), &4.into(), &"canary".into()),
        "{canary}"
    );
    let promoted = r("promote");
    assert_eq!(
        (&promoted["changed"], &promoted["generation"], &promoted["state"]),
        (&true.into(), &4.into(), &"live".into()),
        "{promoted}"
    );
    let again = r("promote again");
    assert_eq!((&again["changed"], &again["generation"]), (&false.into(), &4.into()), "{again}");
    // A rollback during a canary ends it (a change; generation 4 stays live).
    assert_eq!(r("a canary that ends by a rollback")["generation"], 5);
    let ended = r("the canary rolled back");
    assert_eq!((&ended["changed"], &ended["generation"]), (&true.into(), &4.into()), "{ended}");
    // canary_for: ipclusterctl --json waits for the outcome and prints one document.
    let promoted = r("a canary promoted by the daemon");
    assert_eq!(
        (&promoted["changed"], &promoted["generation"], &promoted["state"]),
        (&true.into(), &6.into(), &"live".into()),
        "{promoted}"
    );

    // web's file on h3 is as it was; the bad values made no generation, the overrides one.
    assert_eq!(h3.read_file(WEB_FILE).unwrap(), before);
    let now = fleet.generations(2);
    let new_ones: BTreeSet<u64> =
        now.iter().map(|(g, _)| *g).filter(|g| !generations.iter().any(|(o, _)| o == g)).collect();
    assert_eq!(new_ones, BTreeSet::from([3, 4, 5, 6, 7]), "{now:?}");

    // Values are TOML strings, escaped: no key was added. deploy: never made no generation.
    let esc = r("values that try to be keys");
    assert_eq!(
        (&esc["changed"], &esc["deployed"], &esc["generation"]),
        (&true.into(), &false.into(), &serde_json::Value::Null),
        "{esc}"
    );
    let written = esc["diff"][0]["after"].as_str().unwrap_or_default();
    let expected = [
        r#"command = ["/usr/local/bin/ipcluster-demo", "--x\"]\nworkers = 8"]"#,
        r#"environment = { "NOTE" = "a\"b\nworkers = 8\u0001" }"#,
    ];
    for line in expected {
        assert!(written.lines().any(|l| l == line), "{line} in {written:?}");
    }
    assert!(!written.lines().any(|l| l.starts_with("workers")), "{written:?}");
    assert_eq!(r("values that try to be keys, removed")["changed"], true);

    // The time ran out: the task failed saying so, and the deploy went on in the daemon.
    let late = r("a deploy that outlives its timeout");
    assert_eq!((&late["failed"], &late["error"]), (&true.into(), &"timeout".into()), "{late}");
    assert!(late["msg"].as_str().unwrap_or_default().contains("goes on"), "{late}");
    ipcluster_e2e::wait_for("generation 7 to go live on h3", Duration::from_secs(15), || {
        (fleet.live(2) == 7).then_some(())
    });
}

/// The install role on a host without ipclusterd: the package from the controller, the service
/// enabled and running; a second run changes nothing.
#[test]
fn the_install_role_installs_the_package_and_keeps_the_service_running() {
    let dir = ansible_dir();
    let sb = ipcluster_e2e::bare_host_with(vec![dir.clone()]);
    let deb = ipcluster_e2e::build_deb(&sb, env!("CARGO_PKG_VERSION"));
    let ansible = Ansible::new(&sb, &dir);
    sb.write_file(
        format!("{WORK}/inventory.ini"),
        "host ansible_connection=local ansible_python_interpreter=/usr/bin/python3\n",
        0o644,
    )
    .unwrap();
    let play = format!(
        "- hosts: host\n  gather_facts: false\n  roles:\n    - role: ipcluster.ipclusterd.install\n      ipclusterd_deb: {deb}\n"
    );
    sb.write_file(format!("{WORK}/install.yml"), play, 0o644).unwrap();
    let (inventory, playbook) = (format!("{WORK}/inventory.ini"), format!("{WORK}/install.yml"));
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    let out = ansible.playbook(&["-i", &inventory, &playbook], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(count(&recap(&out), "host", "changed") >= 2, "{}", text(&out));
    let version =
        sb.check(["dpkg-query", "-W", "-f", "${Version} ${db:Status-Abbrev}", "ipclusterd"]).unwrap();
    assert_eq!(version.trim(), format!("{} ii", env!("CARGO_PKG_VERSION")));
    assert_eq!(sb.check(["systemctl", "is-enabled", "ipclusterd"]).unwrap().trim(), "enabled");
    assert_eq!(sb.check(["systemctl", "is-active", "ipclusterd"]).unwrap().trim(), "active");
    assert_eq!(sb.check(["ipclusterctl", "version"]).unwrap().trim(), env!("CARGO_PKG_VERSION"));

    // Stopped by hand: the role starts it again; otherwise it changes nothing.
    sb.check(["systemctl", "stop", "ipclusterd"]).unwrap();
    let out = ansible.playbook(&["-i", &inventory, &playbook], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(count(&recap(&out), "host", "changed"), 1, "only the service was started: {}", text(&out));
    assert_eq!(sb.check(["systemctl", "is-active", "ipclusterd"]).unwrap().trim(), "active");
    let out = ansible.playbook(&["-i", &inventory, &playbook], &env);
    assert_eq!(count(&recap(&out), "host", "changed"), 0, "{}", text(&out));
}
