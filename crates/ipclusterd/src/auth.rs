//! Who may change things: every mutating method is authorized per call, failing closed.
//!
//! Allowed: a caller with the daemon's own uid (root, on the system bus), or one polkit
//! authorizes for the call's [`Action`] (dbus/org.ipcluster1.policy): `org.ipcluster1.manage`
//! to deploy what the app file says, retire, reap, reload and stop (`auth_admin_keep` by
//! default); `org.ipcluster1.override` for a Deploy with options, which run code of the caller's
//! choosing as the app's user (`auth_admin`, never kept). polkit gets the app's name and the
//! override keys as details (`app`, `overrides`), so a rule can grant one app to one group.
//!
//! The polkit subject is the caller's unique bus name, so polkit itself resolves the process and
//! cannot be fooled by a PID that exits and is reused; the call's
//! ALLOW_INTERACTIVE_AUTHORIZATION flag is passed on. Any error while finding out who the caller
//! is, or while asking polkit, means "denied" (the lesson of polkit's CVE-2021-3560). At most
//! [`MAX_PENDING`] questions to polkit are in flight at once: a flood of unauthorized calls waits
//! its turn instead of piling work onto polkit and the daemon.

use std::{collections::HashMap, sync::LazyLock};

use zbus::{
    Connection,
    message::{Flags, Header},
    names::BusName,
    wire::OwnedVariant,
};

/// What a call asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Deploy the app file's config, retire, reap, reload, stop.
    Manage,
    /// Deploy with overrides (command, environment, working directory, workers).
    Override,
}

impl Action {
    /// The polkit action id.
    pub const fn id(self) -> &'static str {
        match self {
            Action::Manage => "org.ipcluster1.manage",
            Action::Override => "org.ipcluster1.override",
        }
    }
}

/// Most polkit questions in flight at once.
pub const MAX_PENDING: usize = 16;
static PENDING: LazyLock<tokio::sync::Semaphore> = LazyLock::new(|| tokio::sync::Semaphore::new(MAX_PENDING));
/// Longest detail value passed to polkit (caller strings are cut, never interpreted).
const MAX_DETAIL: usize = 128;

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

/// Proof that a change was authorized, and for what: only [`authorize`] makes one for a caller
/// (and [`Authorized::daemon`] for the daemon's own requests: its Unix signals). Every command
/// that changes something carries one, so no path reaches the supervisor with a change that
/// skipped authorization; the supervisor's journal lines name the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorized {
    action: Action,
    caller: String,
}

impl Authorized {
    /// What the caller was authorized for.
    pub fn action(&self) -> Action {
        self.action
    }

    /// Who asked: `uid U (:1.N)`, or what the daemon acts on.
    pub fn caller(&self) -> &str {
        &self.caller
    }

    /// The daemon's own request (a Unix signal only root or the service manager can send):
    /// everything is allowed.
    pub fn daemon(what: &str) -> Self {
        Self { action: Action::Override, caller: what.to_owned() }
    }

    /// A caller with every right, for tests that drive the supervisor directly.
    #[cfg(any(test, feature = "testing"))]
    pub fn test() -> Self {
        Self::daemon("a test")
    }

    /// A caller authorized for `action` alone, for tests.
    #[cfg(any(test, feature = "testing"))]
    pub fn test_for(action: Action) -> Self {
        Self { action, caller: format!("a test ({})", action.id()) }
    }
}

/// Authorizes the call behind `hdr` on `conn` for `action`, with `details` for polkit rules; a
/// refusal is logged with its reason.
pub async fn authorize(
    conn: &Connection,
    hdr: &Header<'_>,
    action: Action,
    details: &[(&str, &str)],
) -> Result<Authorized, Denied> {
    let result = check(conn, hdr, action, details).await;
    let sender = hdr.sender().map(|s| s.to_string()).unwrap_or_default();
    match result {
        Ok(uid) => Ok(Authorized { action, caller: format!("uid {uid} ({sender})") }),
        Err(e) => {
            let (Denied::AccessDenied(why) | Denied::InteractionRequired(why)) = &e;
            let method = hdr.member().map(|m| m.to_string()).unwrap_or_default();
            tracing::warn!("refused {method} from {sender}: {why}");
            Err(e)
        }
    }
}

/// The caller's uid when it may do `action`.
async fn check(
    conn: &Connection,
    hdr: &Header<'_>,
    action: Action,
    details: &[(&str, &str)],
) -> Result<u32, Denied> {
    let id = action.id();
    let denied = |why: String| Denied::AccessDenied(format!("not authorized for {id}: {why}"));
    let sender = hdr.sender().ok_or_else(|| denied("the call has no sender".into()))?.to_owned();
    let dbus = zbus::fdo::DBusProxy::new(conn).await.map_err(|e| denied(e.to_string()))?;
    let uid = dbus
        .get_connection_unix_user(BusName::Unique(sender.clone()))
        .await
        .map_err(|e| denied(format!("cannot identify the caller: {e}")))?;
    if uid == rustix::process::geteuid().as_raw() {
        return Ok(uid);
    }
    let interactive = hdr.primary().flags().contains(Flags::ALLOW_INTERACTIVE_AUTH);
    let _permit = PENDING.acquire().await.map_err(|e| denied(e.to_string()))?;
    let authority = AuthorityProxy::new(conn).await.map_err(|e| denied(e.to_string()))?;
    let name = OwnedVariant::from(zbus::wire::Str::from(sender.as_str().to_owned()));
    let subject = ("system-bus-name", HashMap::from([("name", name)]));
    // Flag 1: AllowUserInteraction.
    let flags = u32::from(interactive);
    let cut: Vec<(&str, String)> =
        details.iter().map(|(k, v)| (*k, v.chars().take(MAX_DETAIL).collect())).collect();
    let details: HashMap<&str, &str> = cut.iter().map(|(k, v)| (*k, v.as_str())).collect();
    match authority.check_authorization(&subject, id, details, flags, "").await {
        Ok((true, _, _)) => Ok(uid),
        Ok((false, true, _)) if !interactive => Err(Denied::InteractionRequired(format!(
            "{id} needs authentication; call with interactive authorization allowed (e.g. busctl --allow-interactive-authorization=yes, pkexec)"
        ))),
        Ok((false, _, _)) => Err(denied(format!("uid {uid} is not allowed"))),
        Err(e) => Err(denied(format!("cannot ask polkit: {e}"))),
    }
}
