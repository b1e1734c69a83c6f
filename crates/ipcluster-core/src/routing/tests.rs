//! Tests of rule rendering, parsing what iptables-save prints, and ownership.

use super::*;

fn route(app: &str, listen: &[&str], bands: &[&[u16]]) -> AppRoute {
    AppRoute {
        app: AppName::new(app).unwrap(),
        listen: listen.iter().map(|l| l.parse().unwrap()).collect(),
        bands: bands.iter().map(|b| b.to_vec()).collect(),
        guarded: bands.iter().flat_map(|b| b.iter().copied()).collect(),
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
    let text = render(&Existing::default(), &[r]).unwrap();
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
    let text = render(&Existing::default(), &[r]).unwrap();
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
    let ex = parse_existing(save);
    assert_eq!(ex.nat.hooks, BTreeSet::from(["OUTPUT".to_owned(), "PREROUTING".to_owned()]));
    assert_eq!(ex.filter.hooks, BTreeSet::from(["INPUT".to_owned()]));
    assert_eq!(ex.nat.chains.iter().cloned().collect::<Vec<_>>(), ["IPC-old", "IPCLUSTER"]);
    assert_eq!(ex.nat.rules["IPCLUSTER"], [Rule::parse("-j IPC-old")]);
    assert_eq!(ex.routed_ports(), BTreeSet::from([20009]));
    let r = route("new", &["0.0.0.0:80"], &[&[20000]]);
    let text = render(&ex, std::slice::from_ref(&r)).unwrap();
    assert!(text.contains(":IPC-old - [0:0]\n") && text.contains("-X IPC-old\n"), "{text}");
    assert!(!text.contains("PREROUTING") && !text.contains("OUTPUT") && !text.contains("OTHER"), "{text}");
    assert!(!text.contains("-I INPUT"), "the guard's jump is there already: {text}");
    assert!(!up_to_date(&ex, &[r]));
}

#[test]
fn no_apps_installs_nothing() {
    assert!(up_to_date(&Existing::default(), &[]));
    assert_eq!(render(&Existing::default(), &[]).unwrap(), "");
    let ours = parse_existing("*nat\n:IPCLUSTER - [0:0]\nCOMMIT\n");
    assert!(!up_to_date(&ours, &[]), "an empty chain of ours is still reconciled");
    let after = parse_existing(&render(&ours, &[]).unwrap());
    assert!(up_to_date(&after, &[]), "and then it is up to date");
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
    let ex = parse_existing(save);
    assert!(up_to_date(&ex, std::slice::from_ref(&r)));
    assert_eq!(render(&ex, std::slice::from_ref(&r)).unwrap(), "");
    assert_eq!(ex.routed_ports(), BTreeSet::from([20002, 20003]));
    // A different port, band order, or guard is a difference.
    for other in [
        route("chat", &["192.0.2.1:443"], &[&[20002], &[20004]]),
        route("chat", &["192.0.2.1:443"], &[&[20003], &[20002]]),
        route("chat", &["192.0.2.2:443"], &[&[20002], &[20003]]),
        AppRoute { guarded: vec![20002, 20003, 20007], ..r.clone() },
    ] {
        assert!(!up_to_date(&ex, std::slice::from_ref(&other)), "{other:?}");
    }
}

#[test]
fn only_the_table_that_differs_is_rewritten() {
    let r = route("web", &["0.0.0.0:80"], &[&[20000], &[20001]]);
    let ex = Existing::after(std::slice::from_ref(&r));
    assert!(up_to_date(&ex, std::slice::from_ref(&r)));
    // A retired worker's port joins the guard: only the filter changes.
    let more = AppRoute { guarded: vec![20000, 20001, 20005], ..r.clone() };
    let text = render(&ex, std::slice::from_ref(&more)).unwrap();
    assert!(text.starts_with("*filter\n") && !text.contains("*nat"), "{text}");
    assert!(text.contains("--dports 20000:20001,20005 -j DROP"), "{text}");
    // A cutover: only the nat table changes.
    let cut = AppRoute { bands: vec![vec![20001], vec![20000]], ..r.clone() };
    let text = render(&ex, std::slice::from_ref(&cut)).unwrap();
    assert!(text.starts_with("*nat\n") && !text.contains("*filter"), "{text}");
    // Flushed by another tool (`iptables -F` flushes every chain of filter, ours included).
    let flushed = parse_existing("*filter\n:INPUT ACCEPT [0:0]\n:IPCLUSTER - [0:0]\nCOMMIT\n");
    let ex2 = Existing { filter: flushed.filter, ..ex.clone() };
    let text = render(&ex2, std::slice::from_ref(&r)).unwrap();
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
    let ex = parse_existing(save);
    assert_eq!(ex.nat.chains, BTreeSet::from(["IPCLUSTER".to_owned(), "IPC-web".to_owned()]));
    assert_eq!(ex.nat.foreign, BTreeMap::from([("IPC-backup".to_owned(), 1), ("IPC-empty".to_owned(), 0)]));
    assert_eq!(ex.routed_ports(), BTreeSet::from([20000]), "another tool's REDIRECT is not a worker");
    // Every app removed: our chains go, the foreign ones are not even named.
    let text = render(&ex, &[]).unwrap();
    assert!(text.contains("-X IPC-web\n"), "{text}");
    assert!(!text.contains("IPC-backup") && !text.contains("IPC-empty"), "{text}");
    // Another app: same.
    let text = render(&ex, &[route("other", &["0.0.0.0:81"], &[&[20001]])]).unwrap();
    assert!(!text.contains("IPC-backup") && !text.contains("IPC-empty"), "{text}");
    // An app named like the foreign chain with rules: refused, with the reason.
    let e = render(&ex, &[route("backup", &["0.0.0.0:81"], &[&[20001]])]).unwrap_err();
    assert_eq!(e, Conflict { chain: "IPC-backup".into(), rules: 1 });
    assert!(e.to_string().contains("not ipclusterd's"), "{e}");
    // Like an empty one: taken over (flushing it destroys nothing), e.g. after `iptables -t nat -F`.
    let text = render(&ex, &[route("empty", &["0.0.0.0:81"], &[&[20001]])]).unwrap();
    assert!(text.contains(":IPC-empty - [0:0]\n") && text.contains("-A IPCLUSTER -j IPC-empty\n"), "{text}");
}

/// `iptables -t nat -F` empties every chain, ours included: the app chains are no longer reached
/// from the top chain, but they are empty, so the rules are restored.
#[test]
fn after_a_flush_of_the_whole_table_the_rules_are_restored() {
    let r = route("web", &["0.0.0.0:80"], &[&[20000]]);
    let flushed = parse_existing(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:IPCLUSTER - [0:0]\n:IPC-web - [0:0]\nCOMMIT\n",
    );
    assert!(!up_to_date(&flushed, std::slice::from_ref(&r)));
    let text = render(&flushed, std::slice::from_ref(&r)).unwrap();
    assert!(text.contains("-A IPC-web ") && text.contains("-I PREROUTING 1 "), "{text}");
}

#[test]
fn odd_routes_render_without_panicking() {
    // Fewer ports than listen entries, no bands, a band count that is not a power of two.
    let short =
        AppRoute { bands: vec![vec![20000], vec![]], ..route("a", &["0.0.0.0:80", "0.0.0.0:81"], &[]) };
    let text = render(&Existing::default(), &[short]).unwrap();
    assert_eq!(text.matches("REDIRECT").count(), 1, "{text}");
    let three = route("b", &["0.0.0.0:80"], &[&[1], &[2], &[3]]);
    assert!(render(&Existing::default(), &[three]).is_ok());
    let none = route("c", &["0.0.0.0:80"], &[]);
    assert!(up_to_date(&Existing::after(std::slice::from_ref(&none)), &[none]));
}
