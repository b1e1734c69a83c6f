//! Validation of single values, shared by app files and Deploy overrides. Each check returns
//! what is wrong and what is allowed; the caller adds the file, line and key.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
};

use super::{MAX_ARG_LEN, MAX_ARGS, MAX_ENV, MAX_LISTEN, MAX_WORKERS};
use crate::units::shown;

pub(super) fn check_workers(w: i64) -> Result<u32, String> {
    match u32::try_from(w) {
        Ok(w) if (1..=MAX_WORKERS).contains(&w) && w.is_power_of_two() => Ok(w),
        _ => Err(format!("{w}: must be a power of two (1, 2, 4, …, {MAX_WORKERS})")),
    }
}

pub(super) fn check_command(cmd: &[String]) -> Result<Vec<String>, String> {
    if cmd.is_empty() || cmd[0].is_empty() {
        return Err("must name a program: [\"/usr/bin/prog\", \"arg\", …]".into());
    }
    if cmd.len() > MAX_ARGS {
        return Err(format!("at most {MAX_ARGS} arguments"));
    }
    if let Some(a) = cmd.iter().find(|a| a.len() > MAX_ARG_LEN || a.contains('\0')) {
        return Err(format!(
            "argument {}: arguments must be at most {MAX_ARG_LEN} bytes, without NUL",
            shown(a)
        ));
    }
    Ok(cmd.to_vec())
}

pub(super) fn check_listen(list: &[String]) -> Result<Vec<SocketAddr>, String> {
    if list.is_empty() || list.len() > MAX_LISTEN {
        return Err(format!("needs 1 to {MAX_LISTEN} addresses like \"0.0.0.0:80\" or \"[::]:443\""));
    }
    let mut out: Vec<SocketAddr> = Vec::new();
    for l in list {
        let a: SocketAddr = l.parse().map_err(|_| {
            format!(
                "{} is not \"address:port\" (e.g. \"0.0.0.0:80\", \"192.0.2.1:443\", \"[::]:80\", \"[2001:db8::1]:443\")",
                shown(l)
            )
        })?;
        if a.port() == 0 {
            return Err(format!("{}: port must be 1..=65535", shown(l)));
        }
        // A wildcard of either family takes the port for every address ([::] serves IPv4 too),
        // and an IPv4-mapped address ([::ffff:192.0.2.1]) is the IPv4 address it maps.
        let (ip, port) = (a.ip().to_canonical(), a.port());
        if let Some(prev) = out.iter().find(|p| {
            let p_ip = p.ip().to_canonical();
            p.port() == port && (p_ip == ip || p_ip.is_unspecified() || ip.is_unspecified())
        }) {
            return Err(format!("{} overlaps {prev}", shown(l)));
        }
        out.push(a);
    }
    Ok(out)
}

pub(super) fn check_workdir(d: &str) -> Result<PathBuf, String> {
    if !d.starts_with('/') || d.contains('\0') || d.len() > MAX_ARG_LEN {
        return Err(format!("{}: must be an absolute path", shown(d)));
    }
    Ok(PathBuf::from(d))
}

pub(super) fn check_user(u: &str) -> Result<String, String> {
    let ok = !u.is_empty()
        && u.len() <= 32
        && u.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && u.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok {
        Ok(u.to_owned())
    } else {
        Err(format!("{} is not a user name ([a-z_][a-z0-9_-]*, ≤ 32)", shown(u)))
    }
}

/// Variables ipclusterd sets itself; an app may not override them.
fn reserved(k: &str) -> bool {
    k.starts_with("IPCLUSTER_")
        || k.starts_with("WATCHDOG_")
        || k.starts_with("LISTEN_")
        || matches!(k, "PORT" | "NOTIFY_SOCKET" | "INVOCATION_ID")
}

pub(super) fn check_environment(env: &BTreeMap<String, String>) -> Result<(), String> {
    if env.len() > MAX_ENV {
        return Err(format!("at most {MAX_ENV} entries"));
    }
    let mut seen = HashSet::new();
    for (k, v) in env {
        let valid = k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && k.len() <= 128;
        if !valid {
            return Err(format!("{} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)", shown(k)));
        }
        if reserved(k) {
            return Err(format!("{k} is set by ipclusterd and cannot be overridden"));
        }
        if v.contains('\0') || v.len() > MAX_ARG_LEN {
            return Err(format!("{k}: value must be at most {MAX_ARG_LEN} bytes, without NUL"));
        }
        seen.insert(k);
    }
    Ok(())
}
