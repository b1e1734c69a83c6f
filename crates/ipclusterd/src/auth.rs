//! Who may change things: every mutating method is authorized per call, failing closed.
//!
//! Allowed: a caller with the daemon's own uid (root, on the system bus), or one polkit
//! authorizes for `org.ipcluster1.manage` (dbus/org.ipcluster1.policy; `auth_admin_keep` by
//! default). The polkit subject is the caller's unique bus name, so polkit itself resolves the
//! process and cannot be fooled by a PID that exits and is reused; the call's
//! ALLOW_INTERACTIVE_AUTHORIZATION flag is passed on. Any error while finding out who the caller
//! is, or while asking polkit, means "denied" (the lesson of polkit's CVE-2021-3560).

use std::collections::HashMap;

use zbus::{
    Connection,
    message::{Flags, Header},
    names::BusName,
    wire::OwnedVariant,
};

/// The polkit action guarding every mutating method.
pub const ACTION: &str = "org.ipcluster1.manage";

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// Not allowed (or could not be checked).
    AccessDenied(String),
    /// polkit would allow it after authentication, but the caller did not allow interaction.
    InteractionRequired(String),
}

#[zbus::proxy(
    interface = "org.freedesktop.PolicyKit1.Authority",
    default_service = "org.freedesktop.PolicyKit1",
    default_path = "/org/freedesktop/PolicyKit1/Authority"
)]
trait Authority {
    #[allow(clippy::type_complexity, reason = "the signature is polkit's")]
    fn check_authorization(
        &self,
        subject: &(&str, HashMap<&str, OwnedVariant>),
        action_id: &str,
        details: HashMap<&str, &str>,
        flags: u32,
        cancellation_id: &str,
    ) -> zbus::Result<(bool, bool, HashMap<String, String>)>;
}

/// Authorizes the call behind `hdr` on `conn`; a refusal is logged with its reason.
pub async fn authorize(conn: &Connection, hdr: &Header<'_>) -> Result<(), Denied> {
    let result = check(conn, hdr).await;
    if let Err(Denied::AccessDenied(why) | Denied::InteractionRequired(why)) = &result {
        let method = hdr.member().map(|m| m.to_string()).unwrap_or_default();
        let sender = hdr.sender().map(|s| s.to_string()).unwrap_or_default();
        tracing::warn!("refused {method} from {sender}: {why}");
    }
    result
}

async fn check(conn: &Connection, hdr: &Header<'_>) -> Result<(), Denied> {
    let denied = |why: String| Denied::AccessDenied(format!("not authorized for {ACTION}: {why}"));
    let sender = hdr.sender().ok_or_else(|| denied("the call has no sender".into()))?.to_owned();
    let dbus = zbus::fdo::DBusProxy::new(conn).await.map_err(|e| denied(e.to_string()))?;
    let uid = dbus
        .get_connection_unix_user(BusName::Unique(sender.clone()))
        .await
        .map_err(|e| denied(format!("cannot identify the caller: {e}")))?;
    if uid == rustix::process::geteuid().as_raw() {
        return Ok(());
    }
    let interactive = hdr.primary().flags().contains(Flags::ALLOW_INTERACTIVE_AUTH);
    let authority = AuthorityProxy::new(conn).await.map_err(|e| denied(e.to_string()))?;
    let name = OwnedVariant::from(zbus::wire::Str::from(sender.as_str().to_owned()));
    let subject = ("system-bus-name", HashMap::from([("name", name)]));
    // Flag 1: AllowUserInteraction.
    let flags = u32::from(interactive);
    match authority.check_authorization(&subject, ACTION, HashMap::new(), flags, "").await {
        Ok((true, _, _)) => Ok(()),
        Ok((false, true, _)) if !interactive => Err(Denied::InteractionRequired(format!(
            "{ACTION} needs authentication; call with interactive authorization allowed (e.g. busctl --allow-interactive-authorization=yes, pkexec)"
        ))),
        Ok((false, _, _)) => Err(denied(format!("uid {uid} is not allowed"))),
        Err(e) => Err(denied(format!("cannot ask polkit: {e}"))),
    }
}
