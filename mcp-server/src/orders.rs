//! Orders: central guardrails (site allowlist, cooldown per host and runbook, a second
//! operator for disruptive runbooks, TTL bounds), DSSE signing with the order key, approval.

use compliance_agent::orders::{Order, check_params};
use jiff::{SignedDuration, Timestamp};
use serde_json::Value;

use crate::auth::Caller;
use crate::services::Services;
use crate::store::{OrderRecord, OrderState, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("no such host {0}")]
    NoSuchHost(String),
    #[error("host {0} is revoked; it gets no orders")]
    Revoked(String),
    #[error(
        "runbook {runbook} is not on site {site}'s allowlist ({allowed}); an admin can add it with `mcp-server sites allow`"
    )]
    NotAllowed {
        runbook: String,
        site: String,
        allowed: String,
    },
    #[error("params do not match runbook {runbook}: {reason}")]
    BadParams { runbook: String, reason: String },
    #[error(
        "cooldown: runbook {runbook} was ordered for {host} at {last}; the next order is allowed from {next}"
    )]
    Cooldown {
        runbook: String,
        host: String,
        last: Timestamp,
        next: Timestamp,
    },
    #[error("ttl {ttl} s is out of bounds: {min} to {max} s")]
    Ttl { ttl: u64, min: u64, max: u64 },
    #[error("no order {0} awaiting approval")]
    NotAwaiting(String),
    #[error("order {0} was created by you; a second operator must approve it")]
    SelfApproval(String),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl OrderError {
    pub fn status(&self) -> u16 {
        match self {
            OrderError::NoSuchHost(_) | OrderError::NotAwaiting(_) => 404,
            OrderError::Auth(_) | OrderError::SelfApproval(_) | OrderError::NotAllowed { .. } => {
                403
            }
            OrderError::Revoked(_) => 409,
            OrderError::Cooldown { .. } => 429,
            OrderError::BadParams { .. } | OrderError::Ttl { .. } => 422,
            OrderError::Store(StoreError::Unavailable(_)) => 503,
            OrderError::Store(StoreError::NotFound(_)) => 404,
            OrderError::Store(StoreError::Forbidden(_)) => 403,
            OrderError::Store(_) => 500,
        }
    }
}

/// What an operator asks for.
#[derive(Clone, Debug)]
pub struct OrderDraft {
    pub site_id: String,
    pub host_id: String,
    pub runbook_id: String,
    pub params: Value,
    pub ttl: Option<u64>,
}

fn sign(svc: &Services, record: &OrderRecord, issued_at: Timestamp) -> Result<String, OrderError> {
    let order = Order {
        order_id: record.order_id.clone(),
        site_id: record.site_id.clone(),
        host_id: record.host_id.clone(),
        runbook_id: record.runbook_id.clone(),
        params: record.params.clone(),
        nonce: hex::encode(rand::random::<[u8; 16]>()),
        issued_at,
        ttl: record.ttl,
    };
    serde_json::to_string(&order.sign(&svc.order_key)).map_err(|e| {
        OrderError::Store(StoreError::Backend(format!(
            "cannot encode the envelope: {e}"
        )))
    })
}

/// Checks the guardrails and stores the order: signed and pending, or (disruptive)
/// awaiting a second operator. Audited either way.
pub fn create(
    svc: &Services,
    caller: &Caller,
    draft: &OrderDraft,
) -> Result<OrderRecord, OrderError> {
    let result = create_inner(svc, caller, draft);
    let refused = crate::audit::refusal(&result);
    let target = match &result {
        Ok(r) => format!("{}/{}/{}", r.site_id, r.host_id, r.order_id),
        Err(_) => format!("{}/{}", draft.site_id, draft.host_id),
    };
    crate::audit::record(
        &*svc.store,
        caller,
        &format!("order.create:{}", draft.runbook_id),
        &target,
        refused.as_deref(),
    );
    result
}

fn create_inner(
    svc: &Services,
    caller: &Caller,
    draft: &OrderDraft,
) -> Result<OrderRecord, OrderError> {
    caller.require_write("create orders")?;
    let name = format!("{}/{}", draft.site_id, draft.host_id);
    let host = svc
        .store
        .host(caller, &draft.site_id, &draft.host_id)?
        .ok_or_else(|| OrderError::NoSuchHost(name.clone()))?;
    if host.revoked_at.is_some() {
        return Err(OrderError::Revoked(name));
    }
    let site = svc
        .store
        .site(caller, &draft.site_id)?
        .ok_or_else(|| OrderError::NoSuchHost(name.clone()))?;
    if !site.runbook_allowlist.contains(&draft.runbook_id) {
        return Err(OrderError::NotAllowed {
            runbook: draft.runbook_id.clone(),
            site: site.site_id,
            allowed: site.runbook_allowlist.join(", "),
        });
    }
    check_params(&draft.runbook_id, &draft.params).map_err(|reason| OrderError::BadParams {
        runbook: draft.runbook_id.clone(),
        reason,
    })?;
    let policy = &svc.config.orders;
    let ttl = draft.ttl.unwrap_or(policy.default_ttl_sec);
    if !(policy.ttl_min_sec..=policy.ttl_max_sec).contains(&ttl) {
        return Err(OrderError::Ttl {
            ttl,
            min: policy.ttl_min_sec,
            max: policy.ttl_max_sec,
        });
    }
    let now = Timestamp::now();
    if let Some(last) =
        svc.store
            .last_order_at(caller, &draft.site_id, &draft.host_id, &draft.runbook_id)?
    {
        let next = last
            .checked_add(SignedDuration::from_secs(policy.cooldown_sec as i64))
            .unwrap_or(Timestamp::MAX);
        if now < next {
            return Err(OrderError::Cooldown {
                runbook: draft.runbook_id.clone(),
                host: name,
                last,
                next,
            });
        }
    }
    let disruptive = policy.disruptive_runbooks.contains(&draft.runbook_id);
    let mut record = OrderRecord {
        order_id: uuid::Uuid::new_v4().to_string(),
        site_id: draft.site_id.clone(),
        host_id: draft.host_id.clone(),
        runbook_id: draft.runbook_id.clone(),
        params: draft.params.clone(),
        ttl,
        state: if disruptive {
            OrderState::AwaitingApproval
        } else {
            OrderState::Pending
        },
        envelope: None,
        created_by: caller.actor.clone(),
        created_at: now,
        approved_by: None,
        result_bundle_id: None,
        result_outcome: None,
        result_error: None,
        answered_at: None,
    };
    if !disruptive {
        record.envelope = Some(sign(svc, &record, now)?);
    }
    svc.store.insert_order(caller, &record)?;
    Ok(record)
}

/// A second operator signs off a disruptive order; it is signed now, with issued_at now.
pub fn approve(svc: &Services, caller: &Caller, order_id: &str) -> Result<OrderRecord, OrderError> {
    let result = approve_inner(svc, caller, order_id);
    let refused = crate::audit::refusal(&result);
    crate::audit::record(
        &*svc.store,
        caller,
        "order.approve",
        order_id,
        refused.as_deref(),
    );
    result
}

fn approve_inner(
    svc: &Services,
    caller: &Caller,
    order_id: &str,
) -> Result<OrderRecord, OrderError> {
    caller.require_write("approve orders")?;
    let record = svc
        .store
        .order(caller, order_id)?
        .filter(|o| o.state == OrderState::AwaitingApproval)
        .ok_or_else(|| OrderError::NotAwaiting(order_id.into()))?;
    if record.created_by == caller.actor {
        return Err(OrderError::SelfApproval(order_id.into()));
    }
    let envelope = sign(svc, &record, Timestamp::now())?;
    svc.store
        .approve_order(caller, order_id, &envelope, &caller.actor)?;
    svc.store
        .order(caller, order_id)?
        .ok_or_else(|| OrderError::NotAwaiting(order_id.into()))
}
