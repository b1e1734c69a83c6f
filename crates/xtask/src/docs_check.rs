//! The reference docs are kept true by these tests: every config key the parser accepts, and
//! every method, signal, property and error name of the bus interface, is documented; the
//! architecture names every source file; no source file grows past 600 lines; the Ansible
//! collection takes every app key, and its rolling playbook passes every one on.

use std::fs;

fn read(path: &str) -> String {
    fs::read_to_string(crate::root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn every_config_key_is_in_the_config_reference() {
    let doc = read("docs/config.md");
    for key in ipcluster_core::config::KEYS.iter().chain(ipcluster_core::config::DAEMON_KEYS.iter()) {
        assert!(doc.contains(&format!("| `{key}` |")), "docs/config.md lacks a row for `{key}`");
    }
}

#[test]
fn every_member_of_the_interface_is_in_the_dbus_reference() {
    let doc = read("docs/dbus.md");
    let xml = read("dbus/org.ipcluster1.Manager.xml");
    let mut members = 0;
    for kind in ["method", "signal", "property"] {
        let tag = format!("<{kind} name=\"");
        for part in xml.split(&tag).skip(1) {
            let name = part.split('"').next().unwrap();
            members += 1;
            let documented = match kind {
                "method" => doc.contains(&format!("### {name}(")),
                "signal" => doc.contains(&format!("`{name}(")),
                _ => doc.contains(&format!("| `{name}` |")),
            };
            assert!(documented, "docs/dbus.md does not document {kind} {name}");
            if kind == "method" {
                let example = format!("org.ipcluster1.Manager {name}");
                assert!(doc.contains(&example), "docs/dbus.md has no busctl example for {name}");
            }
        }
    }
    assert!(members >= 10, "parsed only {members} members from the XML");
}

#[test]
fn every_error_name_is_in_the_dbus_reference() {
    let doc = read("docs/dbus.md");
    for name in ipcluster_bus::ErrorName::ALL {
        assert!(doc.contains(&format!("| `{name}` |")), "docs/dbus.md lacks error {name}");
    }
}

/// Every `.rs` file under `crates/<crate>/src`, as (crate, path below `src/`).
fn source_files() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for krate in fs::read_dir(crate::root().join("crates")).unwrap().flatten() {
        let src = krate.path().join("src");
        let mut stack = vec![src.clone()];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let rel = p.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
                    out.push((krate.file_name().to_string_lossy().into_owned(), rel));
                }
            }
        }
    }
    out.sort();
    assert!(out.len() > 50, "found only {} source files", out.len());
    out
}

/// docs/ARCHITECTURE.md's file tables name every source file: each crate has a `### ` section
/// whose heading names it in backticks, and that section names each of its files by its path
/// below `src/` (`supervisor/api.rs`).
#[test]
fn the_architecture_names_every_source_file() {
    let doc = read("docs/ARCHITECTURE.md");
    let sections: Vec<(&str, &str)> =
        doc.split("\n### ").skip(1).map(|s| s.split_once('\n').unwrap_or((s, ""))).collect();
    let mut missing = Vec::new();
    for (krate, file) in source_files() {
        let named = format!("`{krate}`");
        let mine: Vec<&str> =
            sections.iter().filter(|(h, _)| h.contains(&named)).map(|(_, body)| *body).collect();
        if mine.is_empty() {
            missing.push(format!("a `### ` section naming {named}"));
        } else if !mine.iter().any(|body| body.contains(&format!("`{file}`"))) {
            missing.push(format!("{krate}: `{file}`"));
        }
    }
    missing.dedup();
    assert!(missing.is_empty(), "docs/ARCHITECTURE.md does not name: {missing:#?}");
}

/// No source file grows past 600 lines (tests included): past that a file holds more than one
/// subject, and the next change has to find its place in all of it.
#[test]
fn no_source_file_is_over_600_lines() {
    let over: Vec<String> = source_files()
        .into_iter()
        .filter_map(|(krate, file)| {
            let path = crate::root().join("crates").join(&krate).join("src").join(&file);
            let n = fs::read_to_string(&path).unwrap().lines().count();
            (n > 600).then(|| format!("crates/{krate}/src/{file}: {n} lines"))
        })
        .collect();
    assert!(over.is_empty(), "split these: {over:#?}");
}

/// Every key of an app file is an option of the collection's `app` module and is passed on by
/// the rolling playbook (a key the playbook leaves out is dropped without a word: the host's
/// app file is written without it).
#[test]
fn the_ansible_app_module_and_the_rolling_playbook_take_every_app_key() {
    let module = read("ansible/plugins/modules/app.py");
    let playbook = read("ansible/playbooks/rolling.yml");
    let mut missing = Vec::new();
    for key in ipcluster_core::config::KEYS {
        if !module.contains(&format!("('{key}', dict(")) {
            missing.push(format!("app.py has no option {key}"));
        }
        if !playbook.contains(&format!("{key}: \"{{{{ ipcluster_app.{key} | default(omit) }}}}\"")) {
            missing.push(format!("rolling.yml does not pass {key}"));
        }
    }
    assert!(missing.is_empty(), "{missing:#?}");
}
