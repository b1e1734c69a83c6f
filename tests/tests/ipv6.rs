//! NAT mode over IPv6: an app on `[::]:80` serves IPv6 and IPv4 clients, each sticking to the
//! worker of its band (an IPv6 source's band is the low bits of its last 32 bits, an IPv4
//! source's the low bits of its address, so a client lands on the same band either way); a
//! specific IPv6 address is routed on that address only; a redeploy under a load of both
//! families drops nothing; and another host, over a veth pair with IPv6 addresses, reaches the
//! public ports but no worker port, of a dual-stack app or of an IPv4-only one, not even by
//! claiming one of the server's own addresses as its source.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::LazyLock,
    time::Duration,
};

use ipcluster_e2e::{
    Sandbox,
    bus::live_by_band,
    client::{self, Load},
    cluster,
    fixture::Demo,
    netns::{add_addresses, client_namespace, curl, field},
    text,
};

/// The app most scenarios here deploy.
static WEB: LazyLock<String> = LazyLock::new(|| Demo::new(4).listen(&["[::]:80"]).toml());

/// IPv6 sources on the sandbox's loopback interface: `fd00::7:0:N`, last 32 bits `0x0007_0000 +
/// N` (so the band is the low bits of those 32 bits, not of a short suffix that happens to be
/// `N`).
fn sources(n: u16) -> Vec<Ipv6Addr> {
    client::ipv6_sources("fd00::7:0:0".parse().unwrap(), n)
}

/// The last 32 bits of an IPv6 address: what decides its band.
fn last32(a: Ipv6Addr) -> u32 {
    u128::from(a) as u32
}

#[test]
fn ipv6_and_ipv4_clients_each_stick_to_the_worker_of_their_band() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    let v6 = sources(16);
    add_addresses(&sb, false, "lo", &v6.iter().map(|a| format!("{a}/128")).collect::<Vec<_>>());
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let by_band = live_by_band(&bus.list_workers("web"));
    assert_eq!(by_band.len(), 4, "{by_band:?}");

    // The IPv6 nat table: one rule per band, on the low bits.
    let nat = sb.check(["ip6tables", "-t", "nat", "-S", "IPC-web"]).unwrap();
    for (band, source) in ["::", "::1", "::2", "::3"].iter().enumerate() {
        let rule = format!("-A IPC-web -s {source}/::3 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports");
        assert!(nat.contains(&rule), "band {band}: {rule}\n{nat}");
    }
    assert_eq!(nat.matches("REDIRECT").count(), 4, "{nat}");

    let v4 = client::loopback_sources(16);
    // To the wildcard's addresses of both families: ::1, one of the added addresses, 127.0.0.1.
    let targets: Vec<(IpAddr, SocketAddr)> = v6
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let dst: Ipv6Addr = if i % 2 == 0 { Ipv6Addr::LOCALHOST } else { v6[0] };
            (IpAddr::V6(*a), SocketAddr::new(dst.into(), 80))
        })
        .chain(v4.iter().map(|a| (IpAddr::V4(*a), SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 80))))
        .collect();
    let answers = sb
        .in_netns(move || {
            let mut out = Vec::new();
            for (src, dst) in targets {
                for _ in 0..3 {
                    out.push((src, client::get(src, dst)));
                }
            }
            out
        })
        .unwrap();
    let mut seen: BTreeMap<IpAddr, BTreeSet<u32>> = BTreeMap::new();
    for (src, answer) in answers {
        let a = answer.unwrap_or_else(|e| panic!("request from {src} failed: {e:?}"));
        let band = match src {
            IpAddr::V6(s) => last32(s) & 3,
            IpAddr::V4(s) => u32::from(s) & 3,
        };
        assert_eq!(a.band, band, "{src} reached band {} instead of {band}", a.band);
        assert_eq!(a.pid, by_band[&band], "{src} reached pid {} instead of band {band}'s", a.pid);
        assert_eq!(a.peer, src.to_string(), "the worker sees the client's own address");
        seen.entry(src).or_default().insert(a.pid);
    }
    assert!(seen.values().all(|p| p.len() == 1), "a source reached two workers: {seen:?}");
    // Both families reach all four workers, and the same band means the same worker.
    for family_v6 in [true, false] {
        let used: BTreeSet<u32> =
            seen.iter().filter(|(s, _)| s.is_ipv6() == family_v6).flat_map(|(_, p)| p).copied().collect();
        assert_eq!(used.len(), 4, "all four workers serve (IPv6: {family_v6}): {seen:?}");
    }
    let (six, four) = (IpAddr::V6(v6[2]), IpAddr::V4(v4[2]));
    assert_eq!(seen[&six], seen[&four], "{six} and {four} are both in band 3");
}

/// A redeploy switches both families in the same Deploy: new connections of either family
/// reach the new generation as soon as it returns, and a load of both families loses nothing.
#[test]
fn redeploys_under_a_load_of_both_families_drop_nothing() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    let v6 = sources(8);
    add_addresses(&sb, false, "lo", &v6.iter().map(|a| format!("{a}/128")).collect::<Vec<_>>());
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let six = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 80);
    let four = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 80);
    let targets: Vec<(IpAddr, SocketAddr)> = v6
        .iter()
        .map(|a| (IpAddr::V6(*a), six))
        .chain(client::loopback_sources(8).into_iter().map(|a| (IpAddr::V4(a), four)))
        .collect();
    let load = Load::start_to(&sb, targets);
    std::thread::sleep(Duration::from_millis(300));
    for expected in 2..=4u64 {
        assert_eq!(bus.deploy_plain("web"), Ok(expected));
        let (s6, s4) = (v6[0], Ipv4Addr::new(127, 0, 0, 9));
        let fresh = sb.in_netns(move || (client::get(s6, six), client::get(s4, four))).unwrap();
        assert_eq!(fresh.0.unwrap().generation, expected, "IPv6");
        assert_eq!(fresh.1.unwrap().generation, expected, "IPv4");
        std::thread::sleep(Duration::from_millis(300));
    }
    let outcomes = load.finish();
    let failures: Vec<_> = outcomes.iter().filter(|(_, r)| r.is_err()).collect();
    let ipv6 = outcomes.iter().filter(|(s, _)| s.is_ipv6()).count();
    assert!(
        ipv6 > 50 && outcomes.len() - ipv6 > 50,
        "the load ran ({ipv6} IPv6 of {} requests)",
        outcomes.len()
    );
    assert!(failures.is_empty(), "{} of {} requests failed: {failures:?}", failures.len(), outcomes.len());
}

static TWO: LazyLock<String> = LazyLock::new(|| Demo::new(4).listen(&["[::]:80", "[fd09::2]:8080"]).toml());

/// An IPv4-only app: its workers (the demo) still listen dual-stack, so its ports must be
/// guarded from IPv6 hosts too.
static FOUR: LazyLock<String> = LazyLock::new(|| Demo::new(2).listen(&["0.0.0.0:81"]).toml());

/// The sandbox's addresses on the link to the client namespace.
const SERVER: [&str; 2] = ["fd09::1", "fd09::2"];
/// The client's addresses: one per band (the low two bits: 4, 5, 6, 7 → bands 0..3).
const CLIENTS: [&str; 4] = ["fd09::4", "fd09::5", "fd09::6", "fd09::7"];

/// What a failure message shows: both families' rules with their counters, the listening
/// sockets and the link.
fn diagnose(sb: &Sandbox) -> String {
    let show = |argv: &[&str]| sb.run(argv).map(|o| text(&o)).unwrap_or_default();
    format!(
        "{}\n{}\n{}\n{}",
        show(&["ip6tables-save", "-c"]),
        show(&["iptables-save", "-c"]),
        show(&["ss", "-ltn"]),
        show(&["ip", "netns", "exec", "cli", "ip", "addr"])
    )
}

/// Packets the IPv6 guard dropped so far (the counters of filter `IPCLUSTER`).
fn guard_drops(sb: &Sandbox) -> u64 {
    let out = sb.check(["ip6tables", "-L", "IPCLUSTER", "-v", "-x", "-n"]).unwrap();
    out.lines()
        .filter(|l| l.contains("DROP"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn another_ipv6_host_reaches_the_public_addresses_but_no_worker_port() {
    let (sb, bus) = cluster(&[("web", TWO.as_str()), ("four", FOUR.as_str())]);
    client_namespace(&sb, &SERVER, &["10.9.0.6", CLIENTS[0], CLIENTS[1], CLIENTS[2], CLIENTS[3]]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    assert_eq!(bus.deploy_plain("web"), Ok(2));
    assert_eq!(bus.deploy_plain("four"), Ok(1));
    let workers = bus.list_workers("web");
    let port = |generation: u64, band: u32| {
        workers.iter().find(|w| w.generation == generation && w.band == band).unwrap().ports[0].1
    };
    let (retired, live) = (port(1, 1), port(2, 2));
    let four = bus.list_workers("four")[0].ports[0].1;

    // The public addresses: each client its band's live worker, which sees its address; the
    // wildcard on either of the server's addresses, the specific entry on its own address only.
    for (i, src) in CLIENTS.iter().enumerate() {
        for url in [format!("http://[{}]/", SERVER[0]), format!("http://[{}]:8080/", SERVER[1])] {
            let body =
                curl(&sb, src, &url).unwrap_or_else(|e| panic!("{src} → {url}: {e:?}\n{}", diagnose(&sb)));
            assert_eq!(field(&body, "peer"), *src, "{body}");
            assert_eq!(field(&body, "generation"), "2", "{body}");
            assert_eq!(field(&body, "band"), i.to_string(), "{src} is in band {i}: {body}");
        }
    }
    let other = format!("http://[{}]:8080/", SERVER[0]);
    let (err, _) = curl(&sb, CLIENTS[0], &other).expect_err("[fd09::2]:8080 is not served on fd09::1");
    assert!(err.contains("Couldn't connect") || err.contains("refused"), "{err}");
    // IPv4 from the same host: the dual-stack wildcard serves it too (10.9.0.6: band 2).
    let body =
        curl(&sb, "10.9.0.6", "http://10.9.0.1/").unwrap_or_else(|e| panic!("{e:?}\n{}", diagnose(&sb)));
    assert_eq!((field(&body, "peer"), field(&body, "band")), ("10.9.0.6", "2"), "{body}");

    // Worker ports over IPv6, live, retired and the IPv4-only app's: nothing answers, quickly.
    let before = guard_drops(&sb);
    for (src, port) in [(CLIENTS[0], live), (CLIENTS[1], retired), (CLIENTS[2], four)] {
        let url = format!("http://[{}]:{port}/", SERVER[0]);
        // Dropped (a connect timeout), never answered; the guard's counters below say by whom.
        let (err, _) = curl(&sb, src, &url).expect_err(&format!("{src} reached {url}"));
        assert!(err.contains("Timeout") || err.contains("connect"), "{url}: {err}");
        let public = curl(&sb, src, &format!("http://[{}]/", SERVER[0]));
        assert!(public.is_ok(), "the public port from {src} right after: {public:?}");
    }
    let dropped = guard_drops(&sb);
    assert!(dropped >= before + 3, "the IPv6 guard dropped them ({before} → {dropped})\n{}", diagnose(&sb));

    // A source claiming one of the server's own addresses: IPv6 lets such a packet in (IPv4
    // would drop it as a martian), so a guard asking "is the source local?" would let it
    // through. The guard asks where it came in, and drops it.
    // Its neighbour entry for the server is fixed: the server's answers to a neighbour
    // solicitation from one of its own addresses would stay with the server.
    // (`ip -br link`: name, state, address; /sys inside the sandbox is the host's.)
    let link = sb.check(["ip", "-br", "link", "show", "dev", "veth0"]).unwrap();
    let mac = link.split_whitespace().nth(2).unwrap_or_default().to_owned();
    let neigh = [
        "ip",
        "netns",
        "exec",
        "cli",
        "ip",
        "-6",
        "neigh",
        "replace",
        SERVER[0],
        "lladdr",
        &mac,
        "dev",
        "veth1",
        "nud",
        "permanent",
    ];
    sb.check(neigh).unwrap();
    add_addresses(&sb, true, "veth1", &[format!("{}/128", SERVER[1])]);
    let before = guard_drops(&sb);
    let url = format!("http://[{}]:{live}/", SERVER[0]);
    assert!(curl(&sb, SERVER[1], &url).is_err(), "a forged source cannot complete a handshake anyway");
    let dropped = guard_drops(&sb);
    assert!(
        dropped > before,
        "the forged SYN reached the worker port ({before} → {dropped})\n{}",
        diagnose(&sb)
    );

    // Local clients still reach worker ports over IPv6 (::1 and the server's own addresses).
    for (src, dst) in [("::1", "::1"), (SERVER[0], SERVER[1])] {
        let url = format!("http://[{dst}]:{live}/");
        let out = sb.check(["curl", "-sS", "-g", "--interface", src, "-m", "5", &url]).unwrap();
        assert!(out.contains("app=web"), "{src} → {url}: {out}");
    }
}
