//! The reference docs are kept true by these tests: every config key the parser accepts, and
//! every method, signal, property and error name of the bus interface, is documented.

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
