//! `cargo xtask dbus-xml`: regenerates dbus/org.ipcluster1.Manager.xml from the live daemon's
//! introspection (in a sandbox). A test fails when the shipped file and the daemon disagree.

use std::fs;

use anyhow::{Context, Result};
use ipcluster_sandbox::Sandbox;

const IFACE: &str = "<interface name=\"org.ipcluster1.Manager\">";

pub fn run() -> Result<()> {
    crate::demo::build()?;
    let sb = Sandbox::boot()?;
    sb.install()?;
    sb.check(["systemctl", "start", "ipclusterd"])?;
    let live = sb.check(["busctl", "introspect", "--xml-interface", "org.ipcluster1", "/org/ipcluster1"])?;
    sb.teardown()?;
    let path = crate::root().join("dbus/org.ipcluster1.Manager.xml");
    let shipped = fs::read_to_string(&path)?;
    let slice = |xml: &str| -> Result<(usize, usize)> {
        let start = xml.find(IFACE).context("no Manager interface")?;
        let end = xml[start..].find("</interface>").context("unterminated interface")?
            + start
            + "</interface>".len();
        Ok((start, end))
    };
    let (ls, le) = slice(&live)?;
    let (ss, se) = slice(&shipped)?;
    let updated = format!("{}{}{}", &shipped[..ss], &live[ls..le], &shipped[se..]);
    fs::write(&path, updated)?;
    eprintln!("updated {}", path.display());
    Ok(())
}
