//! MCP orders: DSSE envelopes signed with the MCP's pinned Ed25519 key, the checks an order must pass, and the runbooks it may run.
//!
//! An order runs only if every check passes; otherwise a signed `mcp_order`
//! bundle with outcome `rejected` or `expired` says why, and nothing runs.
//! Either way the bundle is queued for the order's result endpoint.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::Config;
use crate::crypto::{SigningKey, VerifyingKey, sha256_hex};
use crate::evidence::{ActionTaken, Check, Draft, EvidenceStore, Outcome};
use crate::mcp::{ListedOrder, McpClient};
use crate::queue::{Claim, NewUpload, Queue, order_route};

/// DSSE payloadType of an order.
pub const ORDER_PAYLOAD_TYPE: &str = "application/vnd.compliance-agent.order+json";
/// The runbook that records the box's current state.
pub use crate::runbook_ids::COLLECT_EVIDENCE;
/// Shortest lifetime an order may have (the platform spec's `ttl >= 60`).
pub const MIN_TTL_SEC: u64 = 60;
/// Longest lifetime: bounds how long nonces must be remembered.
pub const MAX_TTL_SEC: u64 = 7 * 86_400;
/// Largest envelope the agent parses.
pub const MAX_ENVELOPE_BYTES: usize = 64 * 1024;

/// A DSSE envelope (github.com/secure-systems-lab/dsse, protocol v1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Base64 of the payload bytes.
    pub payload: String,
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeSignature {
    /// A hint only: it is not signed, and verification ignores it.
    #[serde(default)]
    pub keyid: String,
    /// Base64 of the raw 64-byte Ed25519 signature over PAE(payloadType, payload).
    pub sig: String,
}

/// Why an envelope is not acceptable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("the envelope is larger than {MAX_ENVELOPE_BYTES} bytes")]
    TooLarge,
    #[error("the envelope is not DSSE JSON ({0})")]
    Json(String),
    #[error("payloadType is {found:?}, expected {expected:?}")]
    PayloadType { found: String, expected: String },
    #[error("the payload is not base64")]
    PayloadEncoding,
    #[error("the envelope has no signature")]
    Unsigned,
    #[error("no signature verifies with the pinned key {fingerprint}")]
    BadSignature { fingerprint: String },
}

/// DSSE's pre-authentication encoding: what is actually signed.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Standard or URL-safe base64, padded or not, as DSSE allows.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
}

impl Envelope {
    /// Signs `payload` with `key`.
    pub fn sign(payload_type: &str, payload: &[u8], key: &SigningKey) -> Self {
        let sig = key.sign(&pae(payload_type, payload));
        Self {
            payload: STANDARD.encode(payload),
            payload_type: payload_type.to_owned(),
            signatures: vec![EnvelopeSignature {
                keyid: key.verifying_key().fingerprint(),
                sig: STANDARD.encode(sig),
            }],
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge);
        }
        serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Json(e.to_string()))
    }

    /// The payload bytes, without checking anything (for describing a refused order).
    pub fn unverified_payload(&self) -> Option<Vec<u8>> {
        decode_base64(&self.payload)
    }

    /// The payload, if its type is `payload_type` and a signature verifies with `key`.
    pub fn verify(&self, payload_type: &str, key: &VerifyingKey) -> Result<Vec<u8>, EnvelopeError> {
        if self.payload_type != payload_type {
            return Err(EnvelopeError::PayloadType {
                found: self.payload_type.clone(),
                expected: payload_type.to_owned(),
            });
        }
        let payload = decode_base64(&self.payload).ok_or(EnvelopeError::PayloadEncoding)?;
        if self.signatures.is_empty() {
            return Err(EnvelopeError::Unsigned);
        }
        let message = pae(&self.payload_type, &payload);
        let verified = self
            .signatures
            .iter()
            .any(|s| decode_base64(&s.sig).is_some_and(|sig| key.verify(&message, &sig).is_ok()));
        if verified {
            Ok(payload)
        } else {
            Err(EnvelopeError::BadSignature {
                fingerprint: key.fingerprint(),
            })
        }
    }
}

/// The signed payload of an order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Order {
    pub order_id: String,
    pub site_id: String,
    pub host_id: String,
    pub runbook_id: String,
    #[serde(default = "empty_object")]
    pub params: Value,
    pub nonce: String,
    pub issued_at: Timestamp,
    /// Seconds from issued_at during which the order may run.
    pub ttl: u64,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// An id that may appear in a URL path: 1-64 of `[A-Za-z0-9._-]`, starting with a letter or digit.
pub fn valid_order_id(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && id.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl Order {
    /// Parses and checks the shape of a payload (not its signature, addressee or time).
    pub fn parse(payload: &[u8]) -> Result<Self, String> {
        let order: Order =
            serde_json::from_slice(payload).map_err(|e| format!("not an order ({e})"))?;
        if !valid_order_id(&order.order_id) {
            return Err(format!(
                "order_id {:?} must be 1-64 letters, digits, '.', '_' or '-'",
                truncate(&order.order_id)
            ));
        }
        if order.runbook_id.is_empty()
            || order.runbook_id.len() > 64
            || !order
                .runbook_id
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(format!(
                "runbook_id {:?} must be 1-64 of a-z, 0-9 and '_'",
                truncate(&order.runbook_id)
            ));
        }
        if !(16..=128).contains(&order.nonce.len())
            || !order.nonce.chars().all(|c| c.is_ascii_graphic())
        {
            return Err("nonce must be 16-128 printable ASCII characters".into());
        }
        if !(MIN_TTL_SEC..=MAX_TTL_SEC).contains(&order.ttl) {
            return Err(format!(
                "ttl {} is out of range; orders live {MIN_TTL_SEC} to {MAX_TTL_SEC} seconds",
                order.ttl
            ));
        }
        if !order.params.is_object() {
            return Err("params must be a JSON object".into());
        }
        Ok(order)
    }

    /// When the order stops being valid.
    pub fn expires_at(&self) -> Timestamp {
        self.issued_at
            .checked_add(SignedDuration::from_secs(self.ttl as i64))
            .unwrap_or(Timestamp::MAX)
    }

    /// Signs this order into an envelope (the MCP side; tests and the reference server).
    pub fn sign(&self, key: &SigningKey) -> Envelope {
        // Serialising a struct of strings, numbers and a JSON value cannot fail.
        let payload = serde_json::to_vec(self).unwrap_or_default();
        Envelope::sign(ORDER_PAYLOAD_TYPE, &payload, key)
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// The parameters of `collect_evidence`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CollectEvidenceParams {
    /// Which checks the MCP is interested in (recorded; all current state is collected).
    #[serde(default)]
    checks: Vec<String>,
    /// Free text from the MSP, kept in the bundle.
    #[serde(default)]
    note: Option<String>,
}

/// Checks `params` against the runbook's schema.
pub fn check_params(runbook_id: &str, params: &Value) -> Result<(), String> {
    match runbook_id {
        COLLECT_EVIDENCE => {
            let p: CollectEvidenceParams = serde_json::from_value(params.clone())
                .map_err(|e| format!("params do not match {runbook_id}: {e}"))?;
            for name in &p.checks {
                match Check::parse(name) {
                    Some(c) if c.agent_only().is_some() => {
                        return Err(format!(
                            "params do not match {runbook_id}: {:?} is not one of the baseline checks",
                            truncate(name)
                        ));
                    }
                    None => {
                        return Err(format!(
                            "params do not match {runbook_id}: {:?} is not one of the baseline checks",
                            truncate(name)
                        ));
                    }
                    Some(_) => {}
                }
            }
            if p.note.as_ref().is_some_and(|n| n.len() > 1024) {
                return Err(format!(
                    "params do not match {runbook_id}: note is longer than 1024 bytes"
                ));
            }
            Ok(())
        }
        other => crate::heal::Runbook::parse(other, params)
            .map(|_| ())
            .map_err(|e| format!("params do not match {other}: {e}")),
    }
}

/// What a runbook did.
struct RunbookResult {
    outcome: Outcome,
    post_state: Value,
    actions: Vec<ActionTaken>,
    error: Option<String>,
}

/// Runs an accepted order's runbook.
fn dispatch(order: &Order, ctx: &mut OrderContext<'_>) -> RunbookResult {
    match order.runbook_id.as_str() {
        COLLECT_EVIDENCE => collect_evidence(order, ctx),
        other => {
            let runbook = match crate::heal::Runbook::parse(other, &order.params) {
                Ok(r) => r,
                Err(e) => {
                    return RunbookResult {
                        outcome: Outcome::Failed,
                        post_state: json!({}),
                        actions: Vec::new(),
                        error: Some(e),
                    };
                }
            };
            // The healing engine's runbooks are async (D-Bus); orders are handled off the async threads.
            let run = crate::runtime()
                .map(|rt| rt.block_on(crate::heal::run_order(ctx.config, &runbook, ctx.now)));
            match run {
                Ok(r) => RunbookResult {
                    outcome: r.outcome,
                    post_state: r.post_state,
                    actions: r.actions,
                    error: r.error,
                },
                Err(e) => RunbookResult {
                    outcome: Outcome::Failed,
                    post_state: json!({}),
                    actions: Vec::new(),
                    error: Some(format!("cannot start the async runtime: {e}")),
                },
            }
        }
    }
}

fn read_proc(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Records the box's current state: the evidence chain, the upload queue, the kernel.
fn collect_evidence(order: &Order, ctx: &mut OrderContext<'_>) -> RunbookResult {
    let started = std::time::Instant::now();
    let params: CollectEvidenceParams =
        serde_json::from_value(order.params.clone()).unwrap_or_default();
    let head = ctx.store.head();
    let queue = ctx.queue.stats(ctx.now.as_second());
    let mut error = None;
    let evidence_head = match head {
        Ok((seq, hash)) => json!({ "seq": seq, "hash": hash }),
        Err(e) => {
            error = Some(format!("evidence head: {e}"));
            Value::Null
        }
    };
    let upload_queue = match queue {
        Ok(stats) => serde_json::to_value(stats).unwrap_or(Value::Null),
        Err(e) => {
            error.get_or_insert(format!("upload queue: {e}"));
            Value::Null
        }
    };
    RunbookResult {
        outcome: if error.is_none() {
            Outcome::Success
        } else {
            Outcome::Failed
        },
        post_state: json!({
            "requested_checks": params.checks,
            "note": params.note,
            "evidence_head": evidence_head,
            "upload_queue": upload_queue,
            "policy_version": ctx.config.policy_version,
            "kernel": read_proc("/proc/sys/kernel/osrelease"),
            "uptime_sec": read_proc("/proc/uptime")
                .and_then(|u| u.split_whitespace().next().and_then(|s| s.parse::<f64>().ok())),
        }),
        actions: vec![ActionTaken {
            step: 1,
            action: COLLECT_EVIDENCE.into(),
            command: None,
            exit_code: None,
            duration_sec: Some(started.elapsed().as_secs_f64()),
            result: Some(if error.is_none() {
                "recorded".into()
            } else {
                "incomplete".into()
            }),
        }],
        error,
    }
}

/// What processing an order needs.
pub struct OrderContext<'a> {
    pub config: &'a Config,
    pub order_key: &'a VerifyingKey,
    pub queue: &'a mut Queue,
    pub store: &'a EvidenceStore,
    pub now: Timestamp,
}

/// What became of one listed order.
#[derive(Clone, Debug, Serialize)]
pub struct Processed {
    pub order_id: String,
    pub outcome: Outcome,
    pub runbook_id: Option<String>,
    /// Why it was refused (or why the runbook failed).
    pub reason: Option<String>,
    pub bundle_id: Option<String>,
    /// The order was already answered earlier; nothing new was written.
    pub already_answered: bool,
}

/// A refusal: its outcome and reason.
struct Refusal {
    outcome: Outcome,
    reason: String,
}

fn rejected(reason: impl Into<String>) -> Refusal {
    Refusal {
        outcome: Outcome::Rejected,
        reason: reason.into(),
    }
}

/// Checks a listed order; on success returns the verified order.
fn check(listed: &ListedOrder, ctx: &OrderContext<'_>) -> Result<Order, Refusal> {
    let envelope =
        Envelope::parse(listed.envelope.get().as_bytes()).map_err(|e| rejected(e.to_string()))?;
    let payload = envelope
        .verify(ORDER_PAYLOAD_TYPE, ctx.order_key)
        .map_err(|e| match e {
            EnvelopeError::BadSignature { .. } => rejected(format!(
                "{e} (mcp_order_pubkey_file); the order was not signed by this MCP's order key or was changed after signing"
            )),
            other => rejected(other.to_string()),
        })?;
    let order = Order::parse(&payload).map_err(|e| rejected(format!("payload: {e}")))?;
    if order.order_id != listed.order_id {
        return Err(rejected(format!(
            "the listing names order {:?} but the signed order_id is {:?}",
            truncate(&listed.order_id),
            order.order_id
        )));
    }
    if order.site_id != ctx.config.site_id {
        return Err(rejected(format!(
            "addressed to site {:?}, this box is site {:?}",
            truncate(&order.site_id),
            ctx.config.site_id
        )));
    }
    if order.host_id != ctx.config.host_id {
        return Err(rejected(format!(
            "addressed to host {:?}, this box is host {:?}",
            truncate(&order.host_id),
            ctx.config.host_id
        )));
    }
    let skew = SignedDuration::from_secs(ctx.config.order_max_clock_skew_sec as i64);
    let ahead = order.issued_at.duration_since(ctx.now);
    if ahead > skew {
        return Err(rejected(format!(
            "issued_at {} is {} s in the future; at most {} s of clock skew is allowed (order_max_clock_skew_sec)",
            order.issued_at,
            ahead.as_secs(),
            skew.as_secs()
        )));
    }
    if order.expires_at() <= ctx.now {
        return Err(Refusal {
            outcome: Outcome::Expired,
            reason: format!(
                "expired at {} (issued_at {} + ttl {} s); now is {}",
                order.expires_at(),
                order.issued_at,
                order.ttl,
                ctx.now
            ),
        });
    }
    if !ctx
        .config
        .order_runbook_allowlist
        .contains(&order.runbook_id)
    {
        return Err(rejected(format!(
            "runbook {:?} is not on this box's allowlist ({}; order_runbook_allowlist)",
            order.runbook_id,
            ctx.config.order_runbook_allowlist.join(", ")
        )));
    }
    check_params(&order.runbook_id, &order.params).map_err(rejected)?;
    Ok(order)
}

/// The claimed fields of an order that failed its checks, for the refusal bundle.
fn describe_refused(listed: &ListedOrder) -> (Value, Option<String>) {
    let raw = listed.envelope.get().as_bytes();
    let claimed = Envelope::parse(raw)
        .ok()
        .and_then(|e| e.unverified_payload())
        .and_then(|p| Order::parse(&p).ok());
    let runbook = claimed.as_ref().map(|o| o.runbook_id.clone());
    (
        json!({
            "listed_order_id": truncate(&listed.order_id),
            "envelope_sha256": sha256_hex(raw),
            "envelope_bytes": raw.len(),
            "claimed_order_unverified": claimed,
        }),
        runbook,
    )
}

/// Processes one listed order: checks it, runs it if every check passes,
/// writes the signed outcome bundle and queues it for the result endpoint.
pub fn process(listed: &ListedOrder, ctx: &mut OrderContext<'_>) -> crate::Result<Processed> {
    process_budgeted(listed, ctx, &mut RefusalBudget::unlimited())
}

/// Most refusal bundles one poll writes; beyond it refusals are summarised in one bundle.
pub const MAX_REFUSAL_BUNDLES_PER_POLL: u64 = 10;
/// Most refusal bundles written per UTC day; beyond it refusals wait or are summarised.
pub const MAX_REFUSAL_BUNDLES_PER_DAY: u64 = 200;

/// How many refusal bundles a poll may still write, and what it refused beyond that.
struct RefusalBudget {
    left: u64,
    written: u64,
    /// Refusals not recorded one by one: (listed id, reason).
    over: Vec<(String, String)>,
}

impl RefusalBudget {
    fn unlimited() -> Self {
        Self {
            left: u64::MAX,
            written: 0,
            over: Vec::new(),
        }
    }

    fn take(&mut self) -> bool {
        if self.left == 0 {
            return false;
        }
        self.left -= 1;
        self.written += 1;
        true
    }
}

fn listing_sha256(listed: &ListedOrder) -> String {
    let mut bytes = listed.order_id.as_bytes().to_vec();
    bytes.push(0);
    bytes.extend_from_slice(listed.envelope.get().as_bytes());
    sha256_hex(&bytes)
}

fn process_budgeted(
    listed: &ListedOrder,
    ctx: &mut OrderContext<'_>,
    budget: &mut RefusalBudget,
) -> crate::Result<Processed> {
    let route_id = valid_order_id(&listed.order_id).then(|| listed.order_id.clone());
    if let Some(id) = &route_id
        && let Some(record) = ctx.queue.order(id)?
    {
        if record.done {
            // Answered before; its bundle is queued or delivered already.
            return Ok(Processed {
                order_id: id.clone(),
                outcome: record
                    .outcome
                    .as_deref()
                    .and_then(Outcome::parse)
                    .unwrap_or(Outcome::Rejected),
                runbook_id: None,
                reason: None,
                bundle_id: record.bundle_id,
                already_answered: true,
            });
        }
        // Claimed but never finished: the agent stopped while the runbook ran.
        // It must not run twice; say so.
        let reason = "the agent stopped while this order ran; it is not run again".to_owned();
        let mut draft = Draft::new(Check::McpOrder, Outcome::Failed);
        draft.order_id = Some(id.clone());
        draft.error = Some(reason.clone());
        draft.pre_state = describe_refused(listed).0;
        return finish(ctx, id, draft, Some(reason), None);
    }
    let started = Timestamp::now();
    match check(listed, ctx) {
        Err(refusal) => {
            let listing = listing_sha256(listed);
            if route_id.is_none()
                && let Some(bundle_id) = ctx.queue.refused_listing(&listing)?
            {
                // Refused before: its evidence exists (or was summarised); nothing new.
                return Ok(Processed {
                    order_id: truncate(&listed.order_id),
                    outcome: refusal.outcome,
                    runbook_id: None,
                    reason: Some(format!("{} (refused before)", refusal.reason)),
                    bundle_id,
                    already_answered: true,
                });
            }
            if !budget.take() {
                // Over the limit: an answerable order waits for a later poll;
                // one with no id to answer under is remembered and summarised.
                if route_id.is_none() {
                    ctx.queue.note_refused_listing(
                        &listing,
                        &truncate(&listed.order_id),
                        None,
                        ctx.now.as_second(),
                    )?;
                }
                budget
                    .over
                    .push((truncate(&listed.order_id), refusal.reason.clone()));
                return Ok(Processed {
                    order_id: truncate(&listed.order_id),
                    outcome: refusal.outcome,
                    runbook_id: None,
                    reason: Some(format!(
                        "{} (over the limit of refusal evidence; summarised)",
                        refusal.reason
                    )),
                    bundle_id: None,
                    already_answered: false,
                });
            }
            let (pre_state, runbook) = describe_refused(listed);
            tracing::warn!(order = %truncate(&listed.order_id), reason = %refusal.reason, "refused an MCP order");
            let mut draft = Draft::new(Check::McpOrder, refusal.outcome);
            draft.timestamp_start = started;
            draft.order_id = route_id.clone();
            draft.runbook_id = runbook.clone();
            draft.error = Some(refusal.reason.clone());
            draft.pre_state = pre_state;
            draft.post_state = json!({ "ran": false });
            match &route_id {
                Some(id) => finish(ctx, id, draft, Some(refusal.reason), runbook),
                None => {
                    // No id to report under: the refusal goes out as plain evidence.
                    let stored = ctx.store.store(draft)?;
                    ctx.queue.note_refused_listing(
                        &listing,
                        &truncate(&listed.order_id),
                        Some(&stored.bundle_id),
                        ctx.now.as_second(),
                    )?;
                    ctx.queue.enqueue(
                        &[NewUpload {
                            bundle_id: stored.bundle_id.clone(),
                            seq: stored.seq,
                            dir: stored.dir.clone(),
                            order_id: None,
                        }],
                        ctx.now.as_second(),
                    )?;
                    Ok(Processed {
                        order_id: truncate(&listed.order_id),
                        outcome: refusal.outcome,
                        runbook_id: runbook,
                        reason: Some(refusal.reason),
                        bundle_id: Some(stored.bundle_id),
                        already_answered: false,
                    })
                }
            }
        }
        Ok(order) => {
            let expires =
                order.expires_at().as_second() + ctx.config.order_max_clock_skew_sec as i64;
            let claim = ctx.queue.claim_order(
                &order.order_id,
                &order.nonce,
                expires,
                ctx.now.as_second(),
            )?;
            let order_state = json!({
                "order": order,
                "envelope_sha256": sha256_hex(listed.envelope.get().as_bytes()),
                "order_key_fingerprint": ctx.order_key.fingerprint(),
            });
            if let Claim::Replay {
                first_order_id,
                seen_at,
            } = claim
            {
                let reason = format!(
                    "nonce already used by order {first_order_id} (seen at {}); a replayed order never runs",
                    Timestamp::from_second(seen_at).unwrap_or(Timestamp::UNIX_EPOCH)
                );
                let mut draft = Draft::new(Check::McpOrder, Outcome::Rejected);
                draft.timestamp_start = started;
                draft.order_id = Some(order.order_id.clone());
                draft.runbook_id = Some(order.runbook_id.clone());
                draft.error = Some(reason.clone());
                draft.pre_state = order_state;
                draft.post_state = json!({ "ran": false });
                let id = order.order_id.clone();
                return finish(ctx, &id, draft, Some(reason), Some(order.runbook_id));
            }
            tracing::info!(order = %order.order_id, runbook = %order.runbook_id, "running an MCP order");
            let result = dispatch(&order, ctx);
            let mut draft = Draft::new(Check::McpOrder, result.outcome);
            draft.timestamp_start = started;
            draft.order_id = Some(order.order_id.clone());
            draft.runbook_id = Some(order.runbook_id.clone());
            draft.error = result.error.clone();
            draft.pre_state = order_state;
            draft.post_state = result.post_state;
            draft.action_taken = result.actions;
            let id = order.order_id.clone();
            finish(ctx, &id, draft, result.error, Some(order.runbook_id))
        }
    }
}

/// Most orders handled in one poll; the rest wait for the next.
pub const MAX_ORDERS_PER_POLL: usize = 100;

/// Fetches the pending orders and processes each (the results are queued, not sent).
///
/// Refusal evidence is limited: at most MAX_REFUSAL_BUNDLES_PER_POLL bundles
/// per poll and MAX_REFUSAL_BUNDLES_PER_DAY per UTC day; refusals beyond that
/// are summarised in one bundle per poll (while the day's limit allows), so a
/// stream of junk listings cannot grow the store without bound.
pub fn poll(client: &McpClient, ctx: &mut OrderContext<'_>) -> crate::Result<Vec<Processed>> {
    let listed = client.orders()?;
    if listed.len() > MAX_ORDERS_PER_POLL {
        tracing::warn!(
            listed = listed.len(),
            "more orders than one poll handles; the rest wait for the next poll"
        );
    }
    let now = ctx.now.as_second();
    let today = ctx.queue.refusal_bundles_today(now)?;
    let day_left = MAX_REFUSAL_BUNDLES_PER_DAY.saturating_sub(today);
    let mut budget = RefusalBudget {
        // One unit of the day's allowance stays for the summary.
        left: MAX_REFUSAL_BUNDLES_PER_POLL.min(day_left.saturating_sub(1)),
        written: 0,
        over: Vec::new(),
    };
    let processed = listed
        .iter()
        .take(MAX_ORDERS_PER_POLL)
        .map(|l| process_budgeted(l, ctx, &mut budget))
        .collect::<crate::Result<Vec<_>>>()?;
    let mut written = budget.written;
    if !budget.over.is_empty() && day_left > written {
        let mut draft = Draft::new(Check::McpOrder, Outcome::Rejected);
        draft.error = Some(format!(
            "{} order listing(s) refused beyond the limit of refusal evidence ({MAX_REFUSAL_BUNDLES_PER_POLL} bundles per poll, {MAX_REFUSAL_BUNDLES_PER_DAY} per day); summarised here",
            budget.over.len()
        ));
        draft.pre_state = json!({
            "refused": budget.over.len(),
            "sample": budget.over.iter().take(20).map(|(id, reason)| json!({ "listed_order_id": id, "reason": reason })).collect::<Vec<_>>(),
        });
        draft.post_state = json!({ "ran": false });
        let stored = ctx.store.store(draft)?;
        ctx.queue.enqueue(
            &[NewUpload {
                bundle_id: stored.bundle_id,
                seq: stored.seq,
                dir: stored.dir,
                order_id: None,
            }],
            now,
        )?;
        written += 1;
    } else if !budget.over.is_empty() {
        tracing::warn!(
            refused = budget.over.len(),
            "order listings refused after the day's limit of refusal evidence; not recorded"
        );
    }
    if written > 0 {
        ctx.queue.count_refusal_bundles(written, now)?;
    }
    Ok(processed)
}

/// Stores the outcome bundle and records the order as answered (which queues the bundle).
fn finish(
    ctx: &mut OrderContext<'_>,
    order_id: &str,
    draft: Draft,
    reason: Option<String>,
    runbook_id: Option<String>,
) -> crate::Result<Processed> {
    let outcome = draft.outcome;
    let stored = ctx.store.store(draft)?;
    ctx.queue.finish_order(
        order_id,
        outcome.as_str(),
        &NewUpload {
            bundle_id: stored.bundle_id.clone(),
            seq: stored.seq,
            dir: stored.dir.clone(),
            order_id: order_route(Check::McpOrder, Some(order_id.to_owned())),
        },
        ctx.now.as_second(),
    )?;
    Ok(Processed {
        order_id: order_id.to_owned(),
        outcome,
        runbook_id,
        reason,
        bundle_id: Some(stored.bundle_id),
        already_answered: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn order() -> Order {
        Order {
            order_id: "ord-1".into(),
            site_id: "clinic-1".into(),
            host_id: "frontdesk-01".into(),
            runbook_id: COLLECT_EVIDENCE.into(),
            params: json!({ "checks": ["backup"] }),
            nonce: "0123456789abcdef0123".into(),
            issued_at: Timestamp::UNIX_EPOCH,
            ttl: 600,
        }
    }

    #[test]
    fn pae_matches_the_dsse_spec() {
        // The example of the DSSE protocol description.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ".to_vec());
    }

    #[test]
    fn envelope_round_trip_and_refusals() {
        let key = SigningKey::from_seed(&[3; 32]);
        let envelope = order().sign(&key);
        let text = serde_json::to_vec(&envelope).expect("encode");
        let parsed = Envelope::parse(&text).expect("parse");
        let payload = parsed
            .verify(ORDER_PAYLOAD_TYPE, &key.verifying_key())
            .expect("verifies");
        assert_eq!(Order::parse(&payload).expect("order"), order());

        let other = SigningKey::from_seed(&[4; 32]).verifying_key();
        assert!(matches!(
            parsed.verify(ORDER_PAYLOAD_TYPE, &other),
            Err(EnvelopeError::BadSignature { .. })
        ));
        assert!(matches!(
            parsed.verify("application/json", &key.verifying_key()),
            Err(EnvelopeError::PayloadType { .. })
        ));
        let mut unsigned = parsed.clone();
        unsigned.signatures.clear();
        assert_eq!(
            unsigned.verify(ORDER_PAYLOAD_TYPE, &key.verifying_key()),
            Err(EnvelopeError::Unsigned)
        );
        // URL-safe, unpadded base64 is accepted too.
        let mut url_safe = parsed.clone();
        url_safe.payload = URL_SAFE_NO_PAD.encode(&payload);
        assert!(
            url_safe
                .verify(ORDER_PAYLOAD_TYPE, &key.verifying_key())
                .is_ok()
        );
    }

    #[test]
    fn order_shape_is_checked() {
        let mut o = order();
        o.ttl = 59;
        let bad = serde_json::to_vec(&o).expect("encode");
        assert!(
            Order::parse(&bad)
                .expect_err("short ttl")
                .contains("ttl 59")
        );
        let mut o = order();
        o.order_id = "../../etc".into();
        let bad = serde_json::to_vec(&o).expect("encode");
        assert!(Order::parse(&bad).expect_err("bad id").contains("order_id"));
        let mut o = order();
        o.nonce = "short".into();
        let bad = serde_json::to_vec(&o).expect("encode");
        assert!(Order::parse(&bad).expect_err("nonce").contains("nonce"));
        assert!(Order::parse(b"{\"order_id\":1}").is_err());
    }

    #[test]
    fn collect_evidence_params() {
        assert!(check_params(COLLECT_EVIDENCE, &json!({})).is_ok());
        assert!(
            check_params(
                COLLECT_EVIDENCE,
                &json!({ "checks": ["backup", "firewall"], "note": "audit" })
            )
            .is_ok()
        );
        let err = check_params(COLLECT_EVIDENCE, &json!({ "rm": "-rf /" })).expect_err("unknown");
        assert!(err.contains("unknown field"), "{err}");
        let err = check_params(COLLECT_EVIDENCE, &json!({ "checks": ["mcp_order"] }))
            .expect_err("not a baseline check");
        assert!(err.contains("baseline checks"), "{err}");
        assert!(check_params("reboot", &json!({})).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Any bytes: the parsers answer, never panic.
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let key = SigningKey::from_seed(&[9; 32]).verifying_key();
            if let Ok(e) = Envelope::parse(&bytes) {
                let _ = e.verify(ORDER_PAYLOAD_TYPE, &key);
            }
            let _ = Order::parse(&bytes);
        }

        /// JSON-shaped envelopes with arbitrary fields never verify and never panic.
        #[test]
        fn arbitrary_envelopes_do_not_verify(
            payload in ".{0,200}",
            payload_type in ".{0,60}",
            sigs in proptest::collection::vec((".{0,20}", ".{0,120}"), 0..4),
        ) {
            let key = SigningKey::from_seed(&[9; 32]).verifying_key();
            let value = json!({
                "payload": payload,
                "payloadType": payload_type,
                "signatures": sigs.iter().map(|(k, s)| json!({"keyid": k, "sig": s})).collect::<Vec<_>>(),
            });
            let bytes = serde_json::to_vec(&value).expect("encode");
            let envelope = Envelope::parse(&bytes).expect("well-formed DSSE JSON parses");
            prop_assert!(envelope.verify(ORDER_PAYLOAD_TYPE, &key).is_err());
        }

        /// A changed byte anywhere in a signed envelope: it no longer parses, or
        /// no longer verifies, or the change was in the unsigned keyid hint and
        /// the payload is exactly the signed one.
        #[test]
        fn a_changed_byte_never_yields_another_order(index in any::<prop::sample::Index>(), bit in 0u8..8) {
            let key = SigningKey::from_seed(&[3; 32]);
            let mut bytes = serde_json::to_vec(&order().sign(&key)).expect("encode");
            let i = index.index(bytes.len());
            bytes[i] ^= 1 << bit;
            if let Ok(envelope) = Envelope::parse(&bytes)
                && let Ok(payload) = envelope.verify(ORDER_PAYLOAD_TYPE, &key.verifying_key())
            {
                prop_assert_eq!(Order::parse(&payload).expect("signed payload"), order());
            }
        }

        /// Orders round-trip through sign, parse and verify for any valid field values.
        #[test]
        fn valid_orders_round_trip(
            id in "[a-z0-9][a-z0-9._-]{0,40}",
            nonce in "[!-~]{16,64}",
            ttl in MIN_TTL_SEC..=MAX_TTL_SEC,
            secs in 0i64..4_000_000_000,
        ) {
            let key = SigningKey::from_seed(&[5; 32]);
            let o = Order {
                order_id: id,
                nonce,
                ttl,
                issued_at: Timestamp::from_second(secs).expect("in range"),
                ..order()
            };
            let bytes = serde_json::to_vec(&o.sign(&key)).expect("encode");
            let payload = Envelope::parse(&bytes)
                .expect("parse")
                .verify(ORDER_PAYLOAD_TYPE, &key.verifying_key())
                .expect("verify");
            prop_assert_eq!(Order::parse(&payload).expect("order"), o);
        }
    }
}
