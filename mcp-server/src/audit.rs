//! The append-only log of operator actions, host refusals and enrollments: HIPAA
//! activity-review evidence (164.308(a)(1)(ii)(D)) that operators can list.

use jiff::Timestamp;

use crate::auth::Caller;
use crate::store::{AuditEntry, Store};

/// Appends one entry for `caller`; a failure to write is logged, never hidden.
pub fn record(
    store: &dyn Store,
    caller: &Caller,
    action: &str,
    target: &str,
    refused: Option<&str>,
) {
    let (outcome, detail) = match refused {
        None => ("ok", String::new()),
        Some(reason) => ("refused", reason.to_owned()),
    };
    let entry = AuditEntry {
        id: 0,
        at: Timestamp::now(),
        actor: caller.actor.clone(),
        peer: caller.peer.clone(),
        action: action.into(),
        target: target.into(),
        outcome: outcome.into(),
        detail,
    };
    if let Err(e) = store.append_audit(&entry) {
        tracing::error!(error = %e, action, target, "cannot append to the audit log");
    }
}

/// An audit entry for a call from someone not yet identified (no certificate, a bad token).
pub fn record_anonymous(
    store: &dyn Store,
    peer: Option<String>,
    action: &str,
    target: &str,
    reason: &str,
) {
    let caller = Caller {
        actor: "anonymous".into(),
        role: crate::auth::Role::Auditor,
        tenants: crate::auth::Tenants::Sites { site_ids: vec![] },
        peer,
    };
    record(store, &caller, action, target, Some(reason));
}

/// The refusal reason of a result, for [`record`].
pub fn refusal<T, E: std::fmt::Display>(result: &Result<T, E>) -> Option<String> {
    result.as_ref().err().map(|e| e.to_string())
}
