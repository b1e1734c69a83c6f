//! One iptables rule in a canonical form: what it matches and where it jumps, independent of
//! the order its options are written in.
//!
//! `iptables-save` does not print a rule the way it was given: generic matches come out in its
//! own order (`-s` before `-d`, whatever the input said), and `-p tcp` may gain an implicit
//! `-m tcp`. Comparing text therefore says "different" for identical rules. [`Rule`] groups the
//! tokens of a rule spec by what they belong to (a generic match, a match extension, the target)
//! and sorts each group, so two specs that differ only in order compare equal, and specs whose
//! tokens differ never do.
//!
//! Sorting the match extensions is sound for the stateless matches ipclusterd writes and
//! compares (`addrtype`, `tcp`, `conntrack`, `multiport`): a rule matches when all of them do,
//! in any order.
//!
//! The same form serves `iptables` and `ip6tables`: their rule syntax is one, only the addresses
//! differ. A canonical rule prints back as a spec either program accepts ([`Rule`]'s `Display`),
//! which is how a change is undone (see `render_undo`).

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

/// One option: `[!] --flag value…`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Opt {
    negated: bool,
    flag: String,
    values: Vec<String>,
}

/// A match extension (`-m name` and its options) or the target (`-j NAME` and its options).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Ext {
    name: String,
    options: Vec<Opt>,
}

/// A rule spec (what follows `-A CHAIN`), canonical.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    /// `-s`, `-d`, `-p`, `-i`, `-o`, `-f`, and options that belong to no extension; sorted.
    generic: Vec<Opt>,
    /// Match extensions, each with its options sorted; sorted.
    matches: Vec<Ext>,
    /// `-j` or `-g` with the target's options, sorted.
    target: Option<Ext>,
}

/// Flags of the generic (built-in) matches, by every name iptables accepts, and their short form.
const GENERIC: [(&str, &str); 12] = [
    ("-s", "-s"),
    ("--source", "-s"),
    ("-d", "-d"),
    ("--destination", "-d"),
    ("-p", "-p"),
    ("--protocol", "-p"),
    ("-i", "-i"),
    ("--in-interface", "-i"),
    ("-o", "-o"),
    ("--out-interface", "-o"),
    ("-f", "-f"),
    ("--fragment", "-f"),
];

fn short(flag: &str) -> &str {
    match flag {
        "--match" => "-m",
        "--jump" => "-j",
        "--goto" => "-g",
        "--src" => "-s",
        "--dst" => "-d",
        other => GENERIC.iter().find(|(long, _)| *long == other).map_or(other, |(_, s)| s),
    }
}

/// Splits a rule spec into tokens as a shell would for iptables-save output: whitespace
/// separates, double quotes group (with `\"` and `\\` escapes). Each token says whether it was
/// quoted (a quoted token is always a value, even if it starts with `-`). Never fails: an
/// unterminated quote runs to the end.
fn tokens(spec: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut chars = spec.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return out;
        }
        let (mut tok, mut quoted, mut in_quote) = (String::new(), false, false);
        while let Some(c) = chars.next_if(|c| in_quote || !c.is_whitespace()) {
            match c {
                '"' => {
                    in_quote = !in_quote;
                    quoted = true;
                }
                '\\' if in_quote => tok.extend(chars.next()),
                c => tok.push(c),
            }
        }
        out.push((tok, quoted));
    }
}

/// An address with an optional prefix length or mask as `network/mask`, so that `192.0.2.1`,
/// `192.0.2.1/32` and `192.0.2.1/255.255.255.255` are one value, and so are `fd00::1`,
/// `fd00::1/128` and `fd00:0:0:0:0:0:0:1/ffff:…:ffff`. The mask may be non-contiguous (a band's
/// `::2/::3`), and the network is the address masked, as iptables stores it (`-s ::6/::3` is
/// saved as `::2/::3`). IPv6 values are written as Rust writes them, which reads back what
/// ip6tables-save prints in its own spelling (`::5/::255.255.255.255` is `::5/::ffff:ffff`).
/// Anything else unchanged.
fn address(value: &str) -> String {
    let (ip, mask) = value.split_once('/').map_or((value, None), |(i, m)| (i, Some(m)));
    if let Ok(ip) = ip.parse::<Ipv4Addr>() {
        let mask = match mask.map(|m| (m.parse::<u32>(), m.parse::<Ipv4Addr>())) {
            None => u32::MAX,
            Some((Ok(len), _)) if len <= 32 => u32::MAX.checked_shl(32 - len).unwrap_or(0),
            Some((_, Ok(m))) => u32::from(m),
            Some(_) => return value.to_owned(),
        };
        return format!("{}/{}", Ipv4Addr::from(u32::from(ip) & mask), Ipv4Addr::from(mask));
    }
    if let Ok(ip) = ip.parse::<Ipv6Addr>() {
        let mask = match mask.map(|m| (m.parse::<u32>(), m.parse::<Ipv6Addr>())) {
            None => u128::MAX,
            Some((Ok(len), _)) if len <= 128 => u128::MAX.checked_shl(128 - len).unwrap_or(0),
            Some((_, Ok(m))) => u128::from(m),
            Some(_) => return value.to_owned(),
        };
        return format!("{}/{}", Ipv6Addr::from(u128::from(ip) & mask), Ipv6Addr::from(mask));
    }
    value.to_owned()
}

/// A value as a shell-like word iptables-restore reads back as the same token: quoted when it
/// is empty, holds whitespace or a quote, or would read as a flag or a negation.
fn word(v: &str) -> String {
    let plain = !v.is_empty()
        && v != "!"
        && !v.starts_with('-')
        && !v.chars().any(|c| c.is_whitespace() || c == '"' || c == '\\');
    if plain { v.to_owned() } else { format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")) }
}

impl fmt::Display for Opt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if self.negated {
            parts.push("!".into());
        }
        if !self.flag.is_empty() {
            parts.push(self.flag.clone());
        }
        parts.extend(self.values.iter().map(|v| word(v)));
        f.write_str(&parts.join(" "))
    }
}

/// The canonical rule as a spec (without `-A CHAIN`): the generic options, then each match
/// extension with its options, then the target with its own. It parses back to the same
/// [`Rule`], and iptables and ip6tables accept it for every rule ipclusterd writes.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self.generic.iter().map(ToString::to_string).collect();
        for m in &self.matches {
            parts.push(format!("-m {}", word(&m.name)));
            parts.extend(m.options.iter().map(ToString::to_string));
        }
        if let Some(t) = &self.target {
            // The name holds the flag: `-j REDIRECT`.
            let (flag, name) = t.name.split_once(' ').unwrap_or((&t.name, ""));
            parts.push(format!("{flag} {}", word(name)));
            parts.extend(t.options.iter().map(ToString::to_string));
        }
        f.write_str(&parts.join(" "))
    }
}

impl Rule {
    /// Parses a rule spec (without `-A CHAIN`). Never fails: what it cannot make sense of it
    /// keeps, in order, so it still compares unequal to anything else.
    pub fn parse(spec: &str) -> Rule {
        let mut rule = Rule { generic: Vec::new(), matches: Vec::new(), target: None };
        // Where options go: the generic list, the last match extension, or the target.
        #[derive(Clone, Copy)]
        enum Into {
            Generic,
            Match,
            Target,
        }
        let mut into = Into::Generic;
        let mut negated = false;
        let mut toks = tokens(spec).into_iter().peekable();
        while let Some((tok, quoted)) = toks.next() {
            if tok == "!" && !quoted {
                negated = true;
                continue;
            }
            let is_flag = !quoted && tok.starts_with('-') && tok.len() > 1;
            let mut values = Vec::new();
            if is_flag {
                while let Some((v, _)) =
                    toks.next_if(|(t, q)| *q || !((t.starts_with('-') && t.len() > 1) || t == "!"))
                {
                    values.push(v);
                }
            }
            let flag = if is_flag { short(&tok).to_owned() } else { String::new() };
            if !is_flag {
                values.push(tok);
            }
            let opt = |flag: String, values: Vec<String>| Opt { negated, flag, values };
            match flag.as_str() {
                "-m" if values.len() == 1 && !negated => {
                    rule.matches.push(Ext { name: values.remove(0), options: Vec::new() });
                    into = Into::Match;
                }
                "-j" | "-g" if values.len() == 1 && !negated && rule.target.is_none() => {
                    rule.target = Some(Ext { name: format!("{flag} {}", values[0]), options: Vec::new() });
                    into = Into::Target;
                }
                // A second target (iptables refuses one): kept among the first's options, where
                // it prints after the first and so reads back there, not as the target.
                "-j" | "-g" if values.len() == 1 && !negated => {
                    if let Some(t) = rule.target.as_mut() {
                        t.options.push(opt(flag, values));
                    }
                }
                f if GENERIC.iter().any(|(_, s)| *s == f) => {
                    if f == "-s" || f == "-d" {
                        values = values.iter().map(|v| address(v)).collect();
                    }
                    rule.generic.push(opt(flag, values));
                }
                _ => {
                    let o = opt(flag, values);
                    match (into, rule.matches.last_mut(), rule.target.as_mut()) {
                        (Into::Match, Some(m), _) => m.options.push(o),
                        (Into::Target, _, Some(t)) => t.options.push(o),
                        _ => rule.generic.push(o),
                    }
                }
            }
            negated = false;
        }
        rule.generic.sort();
        for m in &mut rule.matches {
            m.options.sort();
        }
        rule.matches.sort();
        if let Some(t) = &mut rule.target {
            t.options.sort();
        }
        rule
    }

    /// The chain this rule jumps or goes to (`-j X`, `-g X`), if any.
    pub fn jumps_to(&self) -> Option<&str> {
        let name = &self.target.as_ref()?.name;
        name.strip_prefix("-j ").or_else(|| name.strip_prefix("-g "))
    }

    /// The set a rule matches the source against (`-m set --match-set NAME src`), if any.
    pub fn match_set(&self) -> Option<&str> {
        let m = self.matches.iter().find(|m| m.name == "set")?;
        let o = m.options.iter().find(|o| o.flag == "--match-set" && !o.negated)?;
        o.values.first().map(String::as_str)
    }

    /// The set a `-j SET` rule adds to or deletes from, if this is such a rule.
    pub fn set_target(&self) -> Option<&str> {
        let t = self.target.as_ref().filter(|t| t.name == "-j SET")?;
        let o = t.options.iter().find(|o| (o.flag == "--add-set" || o.flag == "--del-set") && !o.negated)?;
        o.values.first().map(String::as_str)
    }

    /// The port of `-j REDIRECT --to-ports P` (a single port), if this is such a rule.
    pub fn redirect_port(&self) -> Option<u16> {
        let t = self.target.as_ref().filter(|t| t.name == "-j REDIRECT")?;
        let o = t.options.iter().find(|o| o.flag == "--to-ports" && !o.negated)?;
        match o.values.as_slice() {
            [p] => p.parse().ok(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_of_options_does_not_matter() {
        let ours =
            "-d 192.0.2.1/32 -s 0.0.0.1/0.0.0.3 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20003";
        let saved =
            "-s 0.0.0.1/0.0.0.3 -d 192.0.2.1/32 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20003";
        assert_eq!(Rule::parse(ours), Rule::parse(saved));
        let long = "--protocol tcp --destination 192.0.2.1 --source 0.0.0.1/0.0.0.3 --match tcp --dport 443 --jump REDIRECT --to-ports 20003";
        assert_eq!(Rule::parse(long), Rule::parse(saved));
        let a = "-p tcp -m conntrack --ctstate NEW -m conntrack ! --ctstate DNAT -m addrtype ! --src-type LOCAL -j IPCLUSTER";
        let b = "-m addrtype ! --src-type LOCAL -m conntrack ! --ctstate DNAT -p tcp -m conntrack --ctstate NEW -j IPCLUSTER";
        assert_eq!(Rule::parse(a), Rule::parse(b));
    }

    #[test]
    fn different_rules_stay_different() {
        let base = "-s 0.0.0.1/0.0.0.3 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20003";
        for other in [
            "-s 0.0.0.2/0.0.0.3 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20003",
            "-s 0.0.0.1/0.0.0.3 -p tcp -m tcp --dport 444 -j REDIRECT --to-ports 20003",
            "-s 0.0.0.1/0.0.0.3 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20004",
            "! -s 0.0.0.1/0.0.0.3 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 20003",
            "-s 0.0.0.1/0.0.0.3 -p tcp -m tcp ! --dport 443 -j REDIRECT --to-ports 20003",
            "-s 0.0.0.1/0.0.0.3 -p udp -m udp --dport 443 -j REDIRECT --to-ports 20003",
            "-s 0.0.0.1/0.0.0.3 -p tcp -m tcp --dport 443 -j DNAT --to-destination 1.2.3.4",
            "-s 0.0.0.1/0.0.0.3 -p tcp -m tcp --dport 443 -g REDIRECT --to-ports 20003",
            "-s 0.0.0.1/0.0.0.3 -p tcp -m tcp --dport 443",
        ] {
            assert_ne!(Rule::parse(base), Rule::parse(other), "{other}");
        }
        // Conntrack states are two matches: NEW and not DNAT is not "not NEW and DNAT".
        assert_ne!(
            Rule::parse("-m conntrack --ctstate NEW -m conntrack ! --ctstate DNAT -j X"),
            Rule::parse("-m conntrack ! --ctstate NEW -m conntrack --ctstate DNAT -j X")
        );
    }

    #[test]
    fn addresses_are_compared_as_networks() {
        assert_eq!(Rule::parse("-d 192.0.2.1 -j X"), Rule::parse("-d 192.0.2.1/32 -j X"));
        assert_eq!(Rule::parse("-d 10.1.2.3/8 -j X"), Rule::parse("-d 10.0.0.0/255.0.0.0 -j X"));
        assert_eq!(Rule::parse("-s 0.0.0.0/0 -j X"), Rule::parse("-s 1.2.3.4/0.0.0.0 -j X"));
        assert_ne!(Rule::parse("-d 192.0.2.1 -j X"), Rule::parse("-d 192.0.2.2 -j X"));
        assert_eq!(Rule::parse("-d host.example -j X"), Rule::parse("-d host.example -j X"));
    }

    #[test]
    fn quotes_group_and_are_values() {
        let r = Rule::parse(r#"-m comment --comment "a \"b\" -c" -j ACCEPT"#);
        assert_eq!(r.matches[0].options[0].values, [r#"a "b" -c"#]);
        assert_ne!(
            Rule::parse(r#"-m comment --comment "x y" -j A"#),
            Rule::parse("-m comment --comment x y -j A")
        );
        // Unterminated: kept, no panic.
        let _ = Rule::parse("-m comment --comment \"open");
    }

    #[test]
    fn targets_and_redirect_ports() {
        let r = Rule::parse("-p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20001");
        assert_eq!((r.jumps_to(), r.redirect_port()), (Some("REDIRECT"), Some(20001)));
        assert_eq!(Rule::parse("-j IPC-web").jumps_to(), Some("IPC-web"));
        assert_eq!(Rule::parse("-g IPC-web").jumps_to(), Some("IPC-web"));
        assert_eq!(Rule::parse("-j REDIRECT --to-ports 20001-20002").redirect_port(), None);
        assert_eq!(Rule::parse("-p tcp --dport 80").jumps_to(), None);
    }
}
