//! Tests of rule rendering, parsing what iptables-save prints, and ownership.

use super::{Family::V4, *};

fn route(app: &str, listen: &[&str], bands: &[&[u16]]) -> AppRoute {
    AppRoute {
        app: AppName::new(app).unwrap(),
        listen: listen.iter().map(|l| l.parse().unwrap()).collect(),
        bands: bands.iter().map(|b| b.to_vec()).collect(),
        guarded: bands.iter().flat_map(|b| b.iter().copied()).collect(),
        sessions: None,
    }
}

#[test]
fn band_is_the_low_bits_of_the_source() {
    assert_eq!(band_of(Ipv4Addr::new(127, 0, 0, 7), 4), 3);
    assert_eq!(band_of(Ipv4Addr::new(10, 1, 2, 8), 4), 0);
    assert_eq!(band_of(Ipv4Addr::new(10, 1, 2, 8), 1), 0);
    assert_eq!(band_of(Ipv4Addr::new(10, 1, 2, 255), 1024), 0x2ff);
}

#[test]
fn renders_the_guard_then_one_rule_per_band_and_listen_entry() {
    let r = route("chat", &["0.0.0.0:80", "192.0.2.1:443"], &[&[20000, 20001], &[20002, 20003]]);
    let text = render(V4, &Tables::default(), &[r]).unwrap();
    assert_eq!(
        text,
        "*filter\n:IPCLUSTER - [0:0]\n\
         -A IPCLUSTER -p tcp -m multiport --dports 20000:20003 -j DROP\n\
         -I INPUT 1 -p tcp -m conntrack --ctstate NEW -m conntrack ! --ctstate DNAT -m addrtype ! --src-type LOCAL -j IPCLUSTER\n\
         COMMIT\n\
         *nat\n:IPCLUSTER - [0:0]\n:IPC-chat - [0:0]\n\
         -A IPCLUSTER -j IPC-chat\n\
         -A IPC-chat -s 0.0.0.0/0.0.0.1 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20000\n\
         -A IPC-chat -s 0.0.0.1/0.0.0.1 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20002\n\
         -A IPC-chat -d 192.0.2.1/32 -s 0.0.0.0/0.0.0.1 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20001\n\
         -A IPC-chat -d 192.0.2.1/32 -s 0.0.0.1/0.0.0.1 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20003\n\
         -I PREROUTING 1 -m addrtype --dst-type LOCAL -j IPCLUSTER\n\
         -I OUTPUT 1 -m addrtype --dst-type LOCAL -j IPCLUSTER\n\
         COMMIT\n"
    );
}

/// Outbound traffic (to non-local addresses) is never redirected: every path into our nat
/// chains requires a local destination, and no rule of ours sits anywhere else.
#[test]
fn only_locally_destined_traffic_enters_our_chains() {
    let r = route("web", &["0.0.0.0:80"], &[&[20000]]);
    let text = render(V4, &Tables::default(), &[r]).unwrap();
    let nat = text.split("*nat\n").nth(1).unwrap();
    for line in nat.lines().filter(|l| l.starts_with("-I ") || l.starts_with("-A ")) {
        let chain = line.split_whitespace().nth(1).unwrap();
        if chain == "PREROUTING" || chain == "OUTPUT" {
            assert!(line.ends_with("-m addrtype --dst-type LOCAL -j IPCLUSTER"), "{line}");
        } else {
            assert!(
                chain == TOP_CHAIN || chain.starts_with(APP_CHAIN_PREFIX),
                "rule outside our chains: {line}"
            );
        }
    }
    // One band: no source match at all.
    assert!(text.contains("-A IPC-web -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20000\n"));
}

#[test]
fn a_band_without_a_worker_borrows_the_next_ones() {
    let p = |x: u16| Some(vec![x]);
    assert_eq!(with_failover(&[p(1), p(2), p(3), p(4)]).unwrap(), [[1], [2], [3], [4]]);
    assert_eq!(with_failover(&[p(1), None, None, p(4)]).unwrap(), [[1], [4], [4], [4]]);
    assert_eq!(with_failover(&[None, p(2), p(3), None]).unwrap(), [[2], [2], [3], [2]]);
    assert_eq!(with_failover(&[None, None]), None);
}

#[test]
fn removed_apps_chains_are_deleted_and_jumps_not_duplicated() {
    let save = "# Generated\n*filter\n:INPUT ACCEPT [0:0]\n:IPCLUSTER - [0:0]\n\
        -A INPUT -p tcp -m conntrack --ctstate NEW -m conntrack ! --ctstate DNAT -m addrtype ! --src-type LOCAL -j IPCLUSTER\n\
        -A INPUT -j IPC-fake\nCOMMIT\n*nat\n\
        :PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:IPCLUSTER - [0:0]\n:IPC-old - [0:0]\n:OTHER - [0:0]\n\
        -A PREROUTING -m addrtype --dst-type LOCAL -j IPCLUSTER\n-A PREROUTING -j OTHER\n\
        -A OUTPUT -m addrtype --dst-type LOCAL -j IPCLUSTER\n-A IPC-old -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20009\n\
        -A IPCLUSTER -j IPC-old\nCOMMIT\n";
    let ex = Tables::parse(V4, save);
    assert_eq!(ex.nat.hooks, BTreeSet::from(["OUTPUT".to_owned(), "PREROUTING".to_owned()]));
    assert_eq!(ex.filter.hooks, BTreeSet::from(["INPUT".to_owned()]));
    assert_eq!(ex.nat.chains.iter().cloned().collect::<Vec<_>>(), ["IPC-old", "IPCLUSTER"]);
    assert_eq!(ex.nat.rules["IPCLUSTER"], [Rule::parse("-j IPC-old")]);
    assert_eq!(ex.routed_ports(), BTreeSet::from([20009]));
    let r = route("new", &["0.0.0.0:80"], &[&[20000]]);
    let text = render(V4, &ex, std::slice::from_ref(&r)).unwrap();
    assert!(text.contains(":IPC-old - [0:0]\n") && text.contains("-X IPC-old\n"), "{text}");
    assert!(!text.contains("PREROUTING") && !text.contains("OUTPUT") && !text.contains("OTHER"), "{text}");
    assert!(!text.contains("-I INPUT"), "the guard's jump is there already: {text}");
    assert!(!family_up_to_date(V4, &ex, &[r]));
}

#[test]
fn no_apps_installs_nothing() {
    assert!(family_up_to_date(V4, &Tables::default(), &[]));
    assert_eq!(render(V4, &Tables::default(), &[]).unwrap(), "");
    let ours = Tables::parse(V4, "*nat\n:IPCLUSTER - [0:0]\nCOMMIT\n");
    assert!(!family_up_to_date(V4, &ours, &[]), "an empty chain of ours is still reconciled");
    assert_eq!(render(V4, &ours, &[]).unwrap(), "*nat\n:IPCLUSTER - [0:0]\n-X IPCLUSTER\nCOMMIT\n");
}

/// Issue 20: once no app is routed or guarded, nothing of ours stays behind: an empty guard
/// chain and its jump (left in the IPv6 tables by an IPv4-only app, or in both by the last
/// app) are not "up to date", they are removed, jumps first.
#[test]
fn the_last_apps_chains_and_jumps_are_removed() {
    let web = route("web", &["0.0.0.0:80"], &[&[20000], &[20001]]);
    for family in [V4, V6] {
        let before = Tables::after(family, std::slice::from_ref(&web));
        assert!(!before.is_empty());
        assert!(!family_up_to_date(family, &before, &[]), "{family}: {before:?}");
        let text = render(family, &before, &[]).unwrap();
        let jump = family.guard_jump();
        assert!(
            text.starts_with(&format!(
                "*filter\n:IPCLUSTER - [0:0]\n-D INPUT {jump}\n-X IPCLUSTER\nCOMMIT\n"
            )),
            "{text}"
        );
        if family == V4 {
            assert!(
                text.ends_with(
                    "*nat\n:IPC-web - [0:0]\n:IPCLUSTER - [0:0]\n\
                     -D PREROUTING -m addrtype --dst-type LOCAL -j IPCLUSTER\n\
                     -D OUTPUT -m addrtype --dst-type LOCAL -j IPCLUSTER\n\
                     -X IPC-web\n-X IPCLUSTER\nCOMMIT\n"
                ),
                "{text}"
            );
            // Taken back when the other family fails: the chains, rules and jumps as they were.
            let undo = render_undo(family, &before, &[]).unwrap();
            assert!(undo.contains("-A IPC-web ") && undo.contains("-I PREROUTING 1 -m addrtype"), "{undo}");
            assert!(!undo.contains("-X"), "{undo}");
        } else {
            assert!(!text.contains("*nat"), "IPv4-only: nothing of ours in the IPv6 nat table: {text}");
        }
    }
    // A route that guards no port (every worker gone) wants no guard either.
    let unguarded = AppRoute { guarded: vec![], ..web };
    assert_eq!(render(V6, &Tables::default(), std::slice::from_ref(&unguarded)).unwrap(), "");
    assert!(family_up_to_date(V6, &Tables::default(), &[unguarded]));
}

/// Item 10 of issue 12: iptables-save prints `-s` before `-d`; the rules were rewritten every
/// 2 s because the text never matched. This is what iptables-nft 1.8.9 printed for the
/// rendered rules of an app listening on a specific address.
#[test]
fn up_to_date_compares_with_what_iptables_save_prints() {
    let r = route("chat", &["192.0.2.1:443"], &[&[20002], &[20003]]);
    let save = "# Generated by iptables-save v1.8.9 (nf_tables)\n*filter\n:INPUT ACCEPT [0:0]\n\
        :FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:IPCLUSTER - [0:0]\n\
        -A INPUT -p tcp -m conntrack --ctstate NEW -m conntrack ! --ctstate DNAT -m addrtype ! --src-type LOCAL -j IPCLUSTER\n\
        -A IPCLUSTER -p tcp -m multiport --dports 20002:20003 -j DROP\nCOMMIT\n\
        *nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
        :IPC-chat - [0:0]\n:IPCLUSTER - [0:0]\n\
        -A PREROUTING -m addrtype --dst-type LOCAL -j IPCLUSTER\n\
        -A OUTPUT -m addrtype --dst-type LOCAL -j IPCLUSTER\n\
        -A IPC-chat -s 0.0.0.0/0.0.0.1 -d 192.0.2.1/32 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20002\n\
        -A IPC-chat -s 0.0.0.1/0.0.0.1 -d 192.0.2.1/32 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20003\n\
        -A IPCLUSTER -j IPC-chat\nCOMMIT\n";
    let ex = Tables::parse(V4, save);
    assert!(family_up_to_date(V4, &ex, std::slice::from_ref(&r)));
    assert_eq!(render(V4, &ex, std::slice::from_ref(&r)).unwrap(), "");
    assert_eq!(ex.routed_ports(), BTreeSet::from([20002, 20003]));
    // A different port, band order, or guard is a difference.
    for other in [
        route("chat", &["192.0.2.1:443"], &[&[20002], &[20004]]),
        route("chat", &["192.0.2.1:443"], &[&[20003], &[20002]]),
        route("chat", &["192.0.2.2:443"], &[&[20002], &[20003]]),
        AppRoute { guarded: vec![20002, 20003, 20007], ..r.clone() },
    ] {
        assert!(!family_up_to_date(V4, &ex, std::slice::from_ref(&other)), "{other:?}");
    }
}

#[test]
fn only_the_table_that_differs_is_rewritten() {
    let r = route("web", &["0.0.0.0:80"], &[&[20000], &[20001]]);
    let ex = Tables::after(V4, std::slice::from_ref(&r));
    assert!(family_up_to_date(V4, &ex, std::slice::from_ref(&r)));
    // A retired worker's port joins the guard: only the filter changes.
    let more = AppRoute { guarded: vec![20000, 20001, 20005], ..r.clone() };
    let text = render(V4, &ex, std::slice::from_ref(&more)).unwrap();
    assert!(text.starts_with("*filter\n") && !text.contains("*nat"), "{text}");
    assert!(text.contains("--dports 20000:20001,20005 -j DROP"), "{text}");
    // A cutover: only the nat table changes.
    let cut = AppRoute { bands: vec![vec![20001], vec![20000]], ..r.clone() };
    let text = render(V4, &ex, std::slice::from_ref(&cut)).unwrap();
    assert!(text.starts_with("*nat\n") && !text.contains("*filter"), "{text}");
    // Flushed by another tool (`iptables -F` flushes every chain of filter, ours included).
    let flushed = Tables::parse(V4, "*filter\n:INPUT ACCEPT [0:0]\n:IPCLUSTER - [0:0]\nCOMMIT\n");
    let ex2 = Tables { filter: flushed.filter, ..ex.clone() };
    let text = render(V4, &ex2, std::slice::from_ref(&r)).unwrap();
    assert!(text.contains("-I INPUT 1 ") && text.contains("-j DROP") && !text.contains("*nat"), "{text}");
}

#[test]
fn the_guard_batches_ports_into_multiport_rules_of_at_most_15_slots() {
    let slots = |rule: &str| {
        let list = rule.split("--dports ").nth(1).unwrap().split(' ').next().unwrap();
        list.split(',').map(|i| if i.contains(':') { 2 } else { 1 }).sum::<usize>()
    };
    // 2 generations × 1024 workers in one contiguous block: one rule.
    let contiguous: Vec<u16> = (20000..22048).collect();
    let r = AppRoute { guarded: contiguous, ..route("big", &["0.0.0.0:80"], &[&[20000]]) };
    let rules = filter_rules(std::slice::from_ref(&r));
    assert_eq!(rules.len(), 1);
    assert!(rules[0].1.contains("--dports 20000:22047 "), "{rules:?}");
    // Every other port: 1024 singles, 15 a rule.
    let scattered: Vec<u16> = (0..1024).map(|i| 20000 + 2 * i).collect();
    let r = AppRoute { guarded: scattered.clone(), ..r };
    let rules = filter_rules(std::slice::from_ref(&r));
    assert_eq!(rules.len(), 1024usize.div_ceil(15));
    let mut seen = Vec::new();
    for (chain, spec) in &rules {
        assert_eq!(chain, TOP_CHAIN);
        assert!(slots(spec) <= 15, "{spec}");
        seen.extend(
            spec.split("--dports ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .split(',')
                .map(|p| p.parse::<u16>().unwrap()),
        );
    }
    assert_eq!(seen, scattered);
    // Ranges and singles mixed never exceed 15 slots; ports of several apps are merged.
    let a = AppRoute {
        guarded: vec![1, 2, 4, 6, 7, 9, 11, 12, 14, 16, 17, 65535],
        ..route("a", &["0.0.0.0:80"], &[&[1]])
    };
    let b = AppRoute { guarded: vec![3, 65534, 4], ..route("b", &["0.0.0.0:81"], &[&[3]]) };
    let rules = filter_rules(&[a, b]);
    assert!(rules.iter().all(|(_, s)| slots(s) <= 15), "{rules:?}");
    assert_eq!(rules[0].1, "-p tcp -m multiport --dports 1:4,6:7,9,11:12,14,16:17,65534:65535 -j DROP");
}

#[test]
fn foreign_chains_with_our_prefix_are_never_flushed_or_deleted() {
    // IPC-backup was made by another tool: IPCLUSTER does not jump to it.
    let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:IPCLUSTER - [0:0]\n:IPC-web - [0:0]\n\
        :IPC-backup - [0:0]\n:IPC-empty - [0:0]\n\
        -A PREROUTING -m addrtype --dst-type LOCAL -j IPCLUSTER\n-A OUTPUT -m addrtype --dst-type LOCAL -j IPCLUSTER\n\
        -A PREROUTING -p tcp --dport 9 -j IPC-backup\n\
        -A IPC-backup -p tcp -m tcp --dport 9 -j REDIRECT --to-ports 9999\n\
        -A IPC-web -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20000\n-A IPCLUSTER -j IPC-web\nCOMMIT\n";
    let ex = Tables::parse(V4, save);
    assert_eq!(ex.nat.chains, BTreeSet::from(["IPCLUSTER".to_owned(), "IPC-web".to_owned()]));
    assert_eq!(ex.nat.foreign, BTreeMap::from([("IPC-backup".to_owned(), 1), ("IPC-empty".to_owned(), 0)]));
    assert_eq!(ex.routed_ports(), BTreeSet::from([20000]), "another tool's REDIRECT is not a worker");
    // Every app removed: our chains go, the foreign ones are not even named.
    let text = render(V4, &ex, &[]).unwrap();
    assert!(text.contains("-X IPC-web\n"), "{text}");
    assert!(!text.contains("IPC-backup") && !text.contains("IPC-empty"), "{text}");
    // Another app: same.
    let text = render(V4, &ex, &[route("other", &["0.0.0.0:81"], &[&[20001]])]).unwrap();
    assert!(!text.contains("IPC-backup") && !text.contains("IPC-empty"), "{text}");
    // An app named like the foreign chain with rules: refused, with the reason.
    let e = render(V4, &ex, &[route("backup", &["0.0.0.0:81"], &[&[20001]])]).unwrap_err();
    assert_eq!(e, Conflict { family: V4, chain: "IPC-backup".into(), rules: 1 });
    assert!(e.to_string().contains("not ipclusterd's"), "{e}");
    // Like an empty one: taken over (flushing it destroys nothing), e.g. after `iptables -t nat -F`.
    let text = render(V4, &ex, &[route("empty", &["0.0.0.0:81"], &[&[20001]])]).unwrap();
    assert!(text.contains(":IPC-empty - [0:0]\n") && text.contains("-A IPCLUSTER -j IPC-empty\n"), "{text}");
}

/// `iptables -t nat -F` empties every chain, ours included: the app chains are no longer reached
/// from the top chain, but they are empty, so the rules are restored.
#[test]
fn after_a_flush_of_the_whole_table_the_rules_are_restored() {
    let r = route("web", &["0.0.0.0:80"], &[&[20000]]);
    let flushed = Tables::parse(
        V4,
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:IPCLUSTER - [0:0]\n:IPC-web - [0:0]\nCOMMIT\n",
    );
    assert!(!family_up_to_date(V4, &flushed, std::slice::from_ref(&r)));
    let text = render(V4, &flushed, std::slice::from_ref(&r)).unwrap();
    assert!(text.contains("-A IPC-web ") && text.contains("-I PREROUTING 1 "), "{text}");
}

#[test]
fn odd_routes_render_without_panicking() {
    // Fewer ports than listen entries, no bands, a band count that is not a power of two.
    let short =
        AppRoute { bands: vec![vec![20000], vec![]], ..route("a", &["0.0.0.0:80", "0.0.0.0:81"], &[]) };
    let text = render(V4, &Tables::default(), &[short]).unwrap();
    assert_eq!(text.matches("REDIRECT").count(), 1, "{text}");
    let three = route("b", &["0.0.0.0:80"], &[&[1], &[2], &[3]]);
    assert!(render(V4, &Tables::default(), &[three]).is_ok());
    let none = route("c", &["0.0.0.0:80"], &[]);
    assert!(family_up_to_date(V4, &Tables::after(V4, std::slice::from_ref(&none)), &[none]));
}

// IPv6.

use super::Family::V6;

#[test]
fn an_ipv6_client_is_in_the_band_of_the_low_bits_of_its_last_32_bits() {
    let a: Ipv6Addr = "fd00::1:2:0304:0507".parse().unwrap();
    assert_eq!(band_of_v6(a, 4), 3);
    assert_eq!(band_of_v6(a, 256), 7);
    assert_eq!(band_of_v6(a, 1024), 0x107);
    assert_eq!(band_of_v6(a, 1), 0);
    // An IPv4 client of a dual-stack socket shows as ::ffff:a.b.c.d: the same band as a.b.c.d.
    for last in 0..=255u8 {
        let v4 = Ipv4Addr::new(10, 1, 2, last);
        for n in [1, 2, 4, 64, 1024] {
            assert_eq!(band_of_v6(v4.to_ipv6_mapped(), n), band_of(v4, n));
        }
    }
}

#[test]
fn each_family_serves_its_own_entries_and_the_wildcard_both() {
    let on = |f: Family, l: &str| served_by(f, &l.parse().unwrap());
    let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
    assert_eq!(on(V4, "0.0.0.0:80"), Some(None));
    assert_eq!(on(V4, "192.0.2.1:80"), Some(ip("192.0.2.1")));
    assert_eq!(on(V6, "0.0.0.0:80"), None);
    assert_eq!(on(V6, "192.0.2.1:80"), None);
    // [::] is dual-stack: every local address of both families.
    assert_eq!(on(V4, "[::]:80"), Some(None));
    assert_eq!(on(V6, "[::]:80"), Some(None));
    assert_eq!(on(V4, "[2001:db8::1]:80"), None);
    assert_eq!(on(V6, "[2001:db8::1]:80"), Some(ip("2001:db8::1")));
    // An IPv4-mapped address only ever receives IPv4 packets.
    assert_eq!(on(V4, "[::ffff:192.0.2.1]:80"), Some(ip("192.0.2.1")));
    assert_eq!(on(V6, "[::ffff:192.0.2.1]:80"), None);
    let routes =
        [route("a", &["0.0.0.0:80"], &[&[1]]), route("b", &["[::]:81", "[2001:db8::1]:82"], &[&[2, 3]])];
    assert_eq!(
        first_entry(&routes, V6, false).map(|(a, l)| (a.to_string(), l.port())),
        Some(("b".into(), 81))
    );
    assert_eq!(
        first_entry(&routes, V6, true).map(|(a, l)| (a.to_string(), l.port())),
        Some(("b".into(), 82))
    );
    assert_eq!(first_entry(&routes[..1], V6, false), None);
    assert_eq!(first_entry(&routes, V4, true).map(|(_, l)| l.port()), Some(80));
}

#[test]
fn renders_the_ipv6_tables_with_the_band_on_the_low_bits() {
    let r = route(
        "chat",
        &["[::]:80", "[2001:db8::1]:443", "192.0.2.1:8443"],
        &[&[20000, 20001, 20002], &[20003, 20004, 20005]],
    );
    let text = render(V6, &Tables::default(), std::slice::from_ref(&r)).unwrap();
    assert_eq!(
        text,
        "*filter\n:IPCLUSTER - [0:0]\n\
         -A IPCLUSTER -p tcp -m multiport --dports 20000:20005 -j DROP\n\
         -I INPUT 1 ! -i lo -p tcp -m conntrack --ctstate NEW -m conntrack ! --ctstate DNAT -j IPCLUSTER\n\
         COMMIT\n\
         *nat\n:IPCLUSTER - [0:0]\n:IPC-chat - [0:0]\n\
         -A IPCLUSTER -j IPC-chat\n\
         -A IPC-chat -s ::/::1 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20000\n\
         -A IPC-chat -s ::1/::1 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20003\n\
         -A IPC-chat -d 2001:db8::1/128 -s ::/::1 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20001\n\
         -A IPC-chat -d 2001:db8::1/128 -s ::1/::1 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20004\n\
         -I PREROUTING 1 -m addrtype --dst-type LOCAL -j IPCLUSTER\n\
         -I OUTPUT 1 -m addrtype --dst-type LOCAL -j IPCLUSTER\n\
         COMMIT\n"
    );
    // The IPv4 table: [::] as the IPv4 wildcard, the IPv4 entry; not the IPv6 address.
    let v4 = render(V4, &Tables::default(), &[r]).unwrap();
    assert!(
        v4.contains("-A IPC-chat -s 0.0.0.1/0.0.0.1 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20003\n"),
        "{v4}"
    );
    assert!(v4.contains("-A IPC-chat -d 192.0.2.1/32 -s 0.0.0.0/0.0.0.1 -p tcp -m tcp --dport 8443 -j REDIRECT --to-ports 20002\n"), "{v4}");
    assert!(!v4.contains("--dport 443 "), "{v4}");
    assert_eq!(v4.matches("REDIRECT").count(), 4, "{v4}");
    // 1024 bands: the mask is the low ten bits.
    let wide = AppRoute { bands: vec![vec![20000]; 1024], ..route("w", &["[::]:80"], &[]) };
    let text = render(V6, &Tables::default(), &[wide]).unwrap();
    assert!(text.contains("-A IPC-w -s ::3ff/::3ff -p tcp"), "{text}");
    assert_eq!(text.matches("REDIRECT").count(), 1024);
}

/// What ip6tables-nft 1.8.9 printed (ip6tables-save) after the rendered input for these routes
/// was restored in a fresh network namespace: `-s` before `-d`, `! -i lo` first, and masked
/// addresses in its own spelling. It reads as up to date.
#[test]
fn up_to_date_compares_with_what_ip6tables_save_prints() {
    let r = route(
        "chat",
        &["[::]:80", "[2001:db8::1]:443"],
        &[&[20000, 20001], &[20002, 20003], &[20004, 20005], &[20006, 20007]],
    );
    let save = "# Generated by ip6tables-save v1.8.9 (nf_tables) on Mon Nov 30 14:32:51 2026\n*filter\n\
        :INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:IPCLUSTER - [0:0]\n\
        -A INPUT ! -i lo -p tcp -m conntrack --ctstate NEW -m conntrack ! --ctstate DNAT -j IPCLUSTER\n\
        -A IPCLUSTER -p tcp -m multiport --dports 20000:20007 -j DROP\nCOMMIT\n\
        # Completed on Mon Nov 30 14:32:51 2026\n*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n\
        :OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:IPC-chat - [0:0]\n:IPCLUSTER - [0:0]\n\
        -A PREROUTING -m addrtype --dst-type LOCAL -j IPCLUSTER\n\
        -A OUTPUT -m addrtype --dst-type LOCAL -j IPCLUSTER\n\
        -A IPC-chat -s ::/::3 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20000\n\
        -A IPC-chat -s ::1/::3 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20002\n\
        -A IPC-chat -s ::2/::3 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20004\n\
        -A IPC-chat -s ::3/::3 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20006\n\
        -A IPC-chat -s ::/::3 -d 2001:db8::1/128 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20001\n\
        -A IPC-chat -s ::1/::3 -d 2001:db8::1/128 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20003\n\
        -A IPC-chat -s ::2/::3 -d 2001:db8::1/128 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20005\n\
        -A IPC-chat -s ::3/::3 -d 2001:db8::1/128 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20007\n\
        -A IPCLUSTER -j IPC-chat\nCOMMIT\n";
    let ex = Tables::parse(V6, save);
    assert_eq!(ex.filter.hooks, BTreeSet::from(["INPUT".to_owned()]));
    assert!(family_up_to_date(V6, &ex, std::slice::from_ref(&r)));
    assert_eq!(render(V6, &ex, std::slice::from_ref(&r)).unwrap(), "");
    assert_eq!(ex.routed_ports(), (20000..20008).collect());
    // The IPv4 guard's jump is not the IPv6 one (and the other way round).
    assert!(Tables::parse(V4, save).filter.hooks.is_empty());
    for other in [
        route(
            "chat",
            &["[::]:80", "[2001:db8::2]:443"],
            &[&[20000, 20001], &[20002, 20003], &[20004, 20005], &[20006, 20007]],
        ),
        route(
            "chat",
            &["[::]:80", "[2001:db8::1]:443"],
            &[&[20000, 20001], &[20004, 20005], &[20002, 20003], &[20006, 20007]],
        ),
        route("chat", &["[::]:80"], &[&[20000], &[20002], &[20004], &[20006]]),
    ] {
        assert!(!family_up_to_date(V6, &ex, std::slice::from_ref(&other)), "{other:?}");
    }
}

#[test]
fn ipv6_addresses_are_compared_as_networks_in_any_spelling() {
    for (a, b) in [
        ("-s ::2/::3 -j X", "-s 0:0:0:0:0:0:0:2/0:0:0:0:0:0:0:3 -j X"),
        ("-s ::6/::3 -j X", "-s ::2/::3 -j X"),
        ("-s ::5/::ffff:ffff -j X", "-s ::5/::255.255.255.255 -j X"),
        ("-d 2001:db8::1 -j X", "-d 2001:db8::1/128 -j X"),
        ("-d 2001:DB8::1/128 -j X", "-d 2001:db8:0::1/ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff -j X"),
        ("-d 2001:db8::77/64 -j X", "-d 2001:db8::/ffff:ffff:ffff:ffff:: -j X"),
        ("-s ::/0 -j X", "-s 2001:db8::1/:: -j X"),
    ] {
        assert_eq!(Rule::parse(a), Rule::parse(b), "{a} vs {b}");
    }
    for (a, b) in [
        ("-s ::2/::3 -j X", "-s ::1/::3 -j X"),
        ("-s ::2/::3 -j X", "-s ::2/::7 -j X"),
        ("-d 2001:db8::1 -j X", "-d 2001:db8::2 -j X"),
        // The same 32 bits are not the same address.
        ("-d ::c000:201 -j X", "-d 192.0.2.1 -j X"),
        ("-s ::2/::3 -j X", "! -s ::2/::3 -j X"),
        ("! -i lo -j X", "-i lo -j X"),
    ] {
        assert_ne!(Rule::parse(a), Rule::parse(b), "{a} vs {b}");
    }
    // A prefix longer than the address is kept as written (and differs from everything else).
    assert_ne!(Rule::parse("-d ::1/129 -j X"), Rule::parse("-d ::1/128 -j X"));
}

#[test]
fn an_app_has_a_chain_only_in_the_families_it_is_served_by() {
    let v4 = route("four", &["0.0.0.0:80"], &[&[20000]]);
    let v6 = route("six", &["[2001:db8::1]:80"], &[&[20001]]);
    let ipv6 = render(V6, &Tables::default(), &[v4.clone(), v6.clone()]).unwrap();
    assert!(!ipv6.contains("IPC-four") && ipv6.contains("-A IPCLUSTER -j IPC-six\n"), "{ipv6}");
    // Every worker port is guarded in both families: workers listen dual-stack.
    assert!(ipv6.contains("--dports 20000:20001 -j DROP"), "{ipv6}");
    let ipv4 = render(V4, &Tables::default(), &[v4.clone(), v6.clone()]).unwrap();
    assert!(ipv4.contains("-A IPCLUSTER -j IPC-four\n") && !ipv4.contains("IPC-six"), "{ipv4}");
    assert!(ipv4.contains("--dports 20000:20001 -j DROP"), "{ipv4}");
    // An IPv4-only app on a host with nothing of ours in the IPv6 nat table leaves it alone:
    // the guard alone is written there.
    let only4 = render(V6, &Tables::default(), std::slice::from_ref(&v4)).unwrap();
    assert!(!only4.contains("*nat"), "{only4}");
    // Another tool's chain named like an app of the other family does not matter here.
    let foreign = Tables::parse(V6, "*nat\n:IPC-four - [0:0]\n-A IPC-four -j RETURN\nCOMMIT\n");
    assert!(render(V6, &foreign, &[v4.clone(), v6.clone()]).is_ok());
    let e = render(V4, &Tables::parse(V4, "*nat\n:IPC-four - [0:0]\n-A IPC-four -j RETURN\nCOMMIT\n"), &[v4])
        .unwrap_err();
    assert!(e.to_string().starts_with("iptables nat chain IPC-four"), "{e}");
    let e = render(V6, &Tables::parse(V6, "*nat\n:IPC-six - [0:0]\n-A IPC-six -j RETURN\nCOMMIT\n"), &[v6])
        .unwrap_err();
    assert!(e.to_string().starts_with("ip6tables nat chain IPC-six"), "{e}");
}

/// When the other family's transaction fails, the nat table that changed is taken back: the
/// undo input, applied after the change, leaves the kernel as it was before both.
#[test]
fn a_changed_nat_table_can_be_taken_back() {
    let old = route("web", &["[::]:80"], &[&[20000], &[20001]]);
    let before = Tables::after(V6, std::slice::from_ref(&old));
    // A cutover to new ports, and a new app.
    let new =
        [route("web", &["[::]:80"], &[&[20002], &[20003]]), route("api", &["[2001:db8::1]:81"], &[&[20004]])];
    let undo = render_undo(V6, &before, &new).unwrap();
    assert_eq!(
        undo,
        "*nat\n:IPC-api - [0:0]\n:IPC-web - [0:0]\n:IPCLUSTER - [0:0]\n\
         -A IPC-web -p tcp -s ::/::1 -m tcp --dport 80 -j REDIRECT --to-ports 20000\n\
         -A IPC-web -p tcp -s ::1/::1 -m tcp --dport 80 -j REDIRECT --to-ports 20001\n\
         -A IPCLUSTER -j IPC-web\n-X IPC-api\nCOMMIT\n"
    );
    // Nothing of ours before: everything goes, the jumps first.
    let undo = render_undo(V6, &Tables::default(), &new).unwrap();
    assert!(undo.contains("-D PREROUTING -m addrtype --dst-type LOCAL -j IPCLUSTER\n-D OUTPUT"), "{undo}");
    assert!(undo.ends_with("-X IPC-api\n-X IPC-web\n-X IPCLUSTER\nCOMMIT\n"), "{undo}");
    // A nat table that did not change needs no undo (only the guard changed).
    let more = AppRoute { guarded: vec![20000, 20001, 20009], ..old.clone() };
    assert_eq!(render_undo(V6, &before, &[more]), None);
}
