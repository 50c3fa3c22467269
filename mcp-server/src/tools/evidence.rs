//! Read-only evidence tools: list a host's bundles by filter, show one bundle with its
//! verification, verify a host's chain. Verification re-reads the archived bytes and
//! applies the agent crate's rules as intake does: the signature by the host's enrolled
//! key, the hash the index holds, and the seq/prev_hash link to the stored neighbours.

use compliance_agent::crypto::{SIGNATURE_LEN, VerifyingKey, sha256_hex};
use compliance_agent::evidence::Bundle;
use compliance_agent::evidence::chain::{StoredLink, check_link};
use rmcp::model::{CallToolResult, JsonObject};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, tool, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{McpTools, ToolError, caller_json, split_host, tenant_json};
use crate::archive::ArchiveKey;
use crate::auth::Caller;
use crate::services::Services;
use crate::store::evidence_query::{EvidenceFilter, MAX_EVIDENCE_PAGE};
use crate::store::{BundleRecord, Host};

/// Problems listed in one chain report; more are counted, not listed.
const MAX_PROBLEMS_LISTED: usize = 50;
/// The most bundles one `verify_chain` call reads (the rest: call again with `from_seq`).
const MAX_VERIFY: u64 = 20_000;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListEvidenceArgs {
    /// The host as SITE/HOST.
    pub host: String,
    /// Only this check (e.g. backup, patching, firewall, mcp_order).
    #[serde(default)]
    pub check: Option<String>,
    /// Only this outcome (success, failed, alert, deferred, rejected, ...).
    #[serde(default)]
    pub outcome: Option<String>,
    /// Only bundles that ended at or after this RFC 3339 time.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub since: Option<jiff::Timestamp>,
    /// Only bundles that ended before this RFC 3339 time.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub until: Option<jiff::Timestamp>,
    /// Only bundles with a lower seq (the next page: the last seq of the previous one).
    #[serde(default)]
    pub before_seq: Option<u64>,
    /// At most this many, newest first (default 50, at most 500).
    #[serde(default)]
    pub limit: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ShowBundleArgs {
    /// The bundle's id.
    pub bundle_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyChainArgs {
    /// The host as SITE/HOST.
    pub host: String,
    /// Start at this seq (default: the first stored).
    #[serde(default)]
    pub from_seq: Option<u64>,
    /// Read at most this many bundles (default and maximum 20000); the answer says where to go on.
    #[serde(default)]
    pub max_bundles: Option<u64>,
}

/// What re-checking one stored bundle found.
#[derive(Clone, Debug, Serialize)]
pub struct Verification {
    /// `valid`, `invalid` or `missing` (not in the archive).
    pub signature: &'static str,
    /// The archived bundle.json hashes to what the index holds.
    pub hash_matches_index: bool,
    /// `linked`, `first` (seq 1), `gap` (the predecessor is not stored) or `broken`.
    pub chain_previous: &'static str,
    /// `linked`, `none_stored` or `broken`.
    pub chain_next: &'static str,
    pub problems: Vec<String>,
    pub ok: bool,
}

fn record_summary(r: &BundleRecord) -> Value {
    json!({
        "bundle_id": r.bundle_id, "seq": r.seq, "check": r.check, "outcome": r.outcome,
        "timestamp_end": r.timestamp_end, "received_at": r.received_at,
        "hash": r.hash, "order_id": r.order_id,
    })
}

fn visible_host(
    svc: &Services,
    caller: &Caller,
    tool: &'static str,
    host: &str,
) -> Result<Host, ToolError> {
    let (site_id, host_id) = split_host(tool, host)?;
    svc.store
        .host(caller, &site_id, &host_id)?
        .ok_or_else(|| ToolError::NotFound(format!("not found among your tenants: host {host}")))
}

/// Reads the archived bytes of `record` and checks them; `previous` and `next` are the
/// stored links around it (None: not stored). Returns the bytes when archived.
fn verify_record(
    svc: &Services,
    host: &Host,
    key: Option<&VerifyingKey>,
    record: &BundleRecord,
    previous: Option<&StoredLink>,
    next: Option<&StoredLink>,
) -> Result<(Verification, Option<Vec<u8>>), ToolError> {
    let mut problems = Vec::new();
    let archive_key = ArchiveKey::of(host, record);
    let archived = svc
        .archive
        .get(&archive_key)
        .map_err(|e| ToolError::Archive(e.to_string()))?;
    let name = format!("{}/{}", host.site_id, host.host_id);
    let (signature, hash_ok, json) = match archived {
        None => {
            problems.push(format!(
                "seq {}: bundle {} is indexed but missing from the archive ({})",
                record.seq, record.bundle_id, record.archive_key
            ));
            ("missing", false, None)
        }
        Some(a) => {
            let hash_ok = sha256_hex(&a.json) == record.hash;
            if !hash_ok {
                problems.push(format!(
                    "seq {}: the archived bundle.json does not hash to the indexed {}",
                    record.seq, record.hash
                ));
            }
            let signed = a.sig.len() == SIGNATURE_LEN
                && key.is_some_and(|k| k.verify(&a.json, &a.sig).is_ok());
            if !signed {
                problems.push(format!(
                    "seq {}: bundle.sig does not verify with the enrolled key of {name}",
                    record.seq
                ));
            }
            match serde_json::from_slice::<Bundle>(&a.json) {
                Ok(b) => {
                    if (b.bundle_id.as_str(), b.seq, b.prev_hash.as_deref())
                        != (
                            record.bundle_id.as_str(),
                            record.seq,
                            record.prev_hash.as_deref(),
                        )
                        || (b.site_id.as_str(), b.host_id.as_str())
                            != (host.site_id.as_str(), host.host_id.as_str())
                    {
                        problems.push(format!(
                            "seq {}: bundle.json's id, seq, prev_hash or host differ from the index",
                            record.seq
                        ));
                    }
                    if let Some(k) = key
                        && b.signing_key_fingerprint != k.fingerprint()
                    {
                        problems.push(format!(
                            "seq {}: the bundle names signing key {}, the enrolled key is {}",
                            record.seq,
                            b.signing_key_fingerprint,
                            k.fingerprint()
                        ));
                    }
                }
                Err(e) => problems.push(format!(
                    "seq {}: the archived bundle.json is not an evidence bundle: {e}",
                    record.seq
                )),
            }
            (
                if signed { "valid" } else { "invalid" },
                hash_ok,
                Some(a.json),
            )
        }
    };
    let link = check_link(
        record.seq,
        record.prev_hash.as_deref(),
        &record.hash,
        previous,
        None,
        next,
    );
    if let Err(p) = &link {
        problems.push(format!("seq {}: {p}", record.seq));
    }
    let broken_prev = matches!(
        &link,
        Err(
            compliance_agent::evidence::chain::ChainProblem::PrevMismatch { .. }
                | compliance_agent::evidence::chain::ChainProblem::MissingPrevHash(_)
                | compliance_agent::evidence::chain::ChainProblem::FirstWithPrevHash
        )
    );
    let broken_next = matches!(
        &link,
        Err(compliance_agent::evidence::chain::ChainProblem::NextMismatch { .. })
    );
    let chain_previous = match (record.seq, previous) {
        _ if broken_prev => "broken",
        (1, _) => "first",
        (_, None) => "gap",
        _ => "linked",
    };
    let chain_next = match next {
        _ if broken_next => "broken",
        None => "none_stored",
        Some(_) => "linked",
    };
    let ok = problems.is_empty();
    Ok((
        Verification {
            signature,
            hash_matches_index: hash_ok,
            chain_previous,
            chain_next,
            problems,
            ok,
        },
        json,
    ))
}

fn enrolled_key(host: &Host) -> Option<VerifyingKey> {
    VerifyingKey::from_spki_pem(&host.evidence_pubkey_pem).ok()
}

pub(super) fn list_evidence(
    svc: &Services,
    caller: &Caller,
    args: ListEvidenceArgs,
) -> Result<Value, ToolError> {
    let host = visible_host(svc, caller, "list_evidence", &args.host)?;
    let limit = args.limit.unwrap_or(50);
    if !(1..=MAX_EVIDENCE_PAGE).contains(&limit) {
        return Err(ToolError::Arguments {
            tool: "list_evidence",
            reason: format!("limit {limit} is out of range: 1 to {MAX_EVIDENCE_PAGE}"),
        });
    }
    if let Some(check) = &args.check
        && compliance_agent::evidence::Check::parse(check).is_none()
    {
        return Err(ToolError::Arguments {
            tool: "list_evidence",
            reason: format!("unknown check {check:?}"),
        });
    }
    if let Some(outcome) = &args.outcome
        && compliance_agent::evidence::Outcome::parse(outcome).is_none()
    {
        return Err(ToolError::Arguments {
            tool: "list_evidence",
            reason: format!("unknown outcome {outcome:?}"),
        });
    }
    let records = svc.store.evidence(
        caller,
        &EvidenceFilter {
            site_id: host.site_id.clone(),
            host_id: host.host_id.clone(),
            check: args.check,
            outcome: args.outcome,
            since: args.since,
            until: args.until,
            before_seq: args.before_seq,
            limit,
        },
    )?;
    let next_before_seq = (records.len() == limit as usize)
        .then(|| records.last().map(|r| r.seq))
        .flatten();
    Ok(json!({
        "caller": caller_json(caller),
        "host": args.host,
        "tenant": tenant_json(host.reseller_id.as_deref(), &host.site_id),
        "count": records.len(),
        "bundles": records.iter().map(record_summary).collect::<Vec<_>>(),
        "next_before_seq": next_before_seq,
    }))
}

/// A stored bundle with what re-checking it found, and its archived bytes.
pub(super) struct VerifiedBundle {
    pub record: BundleRecord,
    pub host: Host,
    pub verification: Verification,
    pub json: Option<Vec<u8>>,
}

impl VerifiedBundle {
    /// The answer about it, without bundle.json itself.
    pub fn summary(&self, caller: &Caller) -> Value {
        json!({
            "caller": caller_json(caller),
            "host": format!("{}/{}", self.record.site_id, self.record.host_id),
            "tenant": tenant_json(self.host.reseller_id.as_deref(), &self.host.site_id),
            "record": record_summary(&self.record),
            "verification": self.verification,
        })
    }
}

/// Finds a bundle among the caller's tenants and verifies it against the archive.
pub(super) fn verified_bundle(
    svc: &Services,
    caller: &Caller,
    tool: &'static str,
    bundle_id: &str,
) -> Result<VerifiedBundle, ToolError> {
    let not_found =
        || ToolError::NotFound(format!("not found among your tenants: bundle {bundle_id}"));
    if !crate::valid_id(bundle_id) {
        return Err(ToolError::Arguments {
            tool,
            reason: format!("{bundle_id:?} is not a bundle id"),
        });
    }
    let record = svc.store.bundle(caller, bundle_id)?.ok_or_else(not_found)?;
    let host = svc
        .store
        .host(caller, &record.site_id, &record.host_id)?
        .ok_or_else(not_found)?;
    let n = svc
        .store
        .neighbours(caller, &record.site_id, &record.host_id, record.seq)?;
    let key = enrolled_key(&host);
    let (verification, json) = verify_record(
        svc,
        &host,
        key.as_ref(),
        &record,
        n.previous.as_ref(),
        n.next.as_ref(),
    )?;
    Ok(VerifiedBundle {
        record,
        host,
        verification,
        json,
    })
}

pub(super) fn show_bundle(
    svc: &Services,
    caller: &Caller,
    args: ShowBundleArgs,
) -> Result<Value, ToolError> {
    let found = verified_bundle(svc, caller, "show_bundle", &args.bundle_id)?;
    let mut answer = found.summary(caller);
    answer["bundle"] = found
        .json
        .as_deref()
        .and_then(|j| serde_json::from_slice(j).ok())
        .unwrap_or(Value::Null);
    Ok(answer)
}

pub(super) fn verify_chain(
    svc: &Services,
    caller: &Caller,
    args: VerifyChainArgs,
) -> Result<Value, ToolError> {
    let host = visible_host(svc, caller, "verify_chain", &args.host)?;
    let max = args.max_bundles.unwrap_or(MAX_VERIFY);
    if !(1..=MAX_VERIFY).contains(&max) {
        return Err(ToolError::Arguments {
            tool: "verify_chain",
            reason: format!("max_bundles {max} is out of range: 1 to {MAX_VERIFY}"),
        });
    }
    let from = args.from_seq.unwrap_or(1);
    // Pages newest first down to `from`, then checked in seq order.
    let mut records = Vec::new();
    let mut before = None;
    loop {
        let page = svc.store.evidence(
            caller,
            &EvidenceFilter {
                site_id: host.site_id.clone(),
                host_id: host.host_id.clone(),
                check: None,
                outcome: None,
                since: None,
                until: None,
                before_seq: before,
                limit: MAX_EVIDENCE_PAGE,
            },
        )?;
        let full = page.len() == MAX_EVIDENCE_PAGE as usize;
        before = page.last().map(|r| r.seq);
        let reached = page.last().is_none_or(|r| r.seq <= from);
        records.extend(page.into_iter().filter(|r| r.seq >= from));
        if !full || reached {
            break;
        }
    }
    records.reverse();
    let total = records.len() as u64;
    let complete = total <= max;
    records.truncate(max as usize);
    let key = enrolled_key(&host);
    let mut problems = Vec::new();
    let mut problem_count = 0usize;
    let (mut valid, mut previous): (u64, Option<StoredLink>) = (0, None);
    if let Some(first) = records.first()
        && first.seq > 1
    {
        // The link into the first bundle checked, when its predecessor is stored.
        previous = svc
            .store
            .neighbours(caller, &host.site_id, &host.host_id, first.seq)?
            .previous;
    }
    let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
    for record in &records {
        let prev = previous.as_ref().filter(|p| p.seq + 1 == record.seq);
        let (v, _) = verify_record(svc, &host, key.as_ref(), record, prev, None)?;
        if v.ok {
            valid += 1;
        }
        problem_count += v.problems.len();
        for p in v.problems {
            if problems.len() < MAX_PROBLEMS_LISTED {
                problems.push(p);
            }
        }
        previous = Some(record.link());
    }
    let (contiguous_through, gaps) = crate::fleet::chain_shape(&seqs);
    let mut gaps: Vec<(u64, u64)> = gaps;
    if let Some(first) = seqs.first()
        && *first > from
    {
        gaps.insert(0, (from, first - 1));
    }
    let next_from_seq = (!complete).then(|| seqs.last().map(|s| s + 1)).flatten();
    Ok(json!({
        "caller": caller_json(caller),
        "host": args.host,
        "tenant": tenant_json(host.reseller_id.as_deref(), &host.site_id),
        "enrolled_key_fingerprint": key.as_ref().map(VerifyingKey::fingerprint),
        "checked": records.len(),
        "valid": valid,
        "first_seq": seqs.first(),
        "last_seq": seqs.last(),
        "contiguous_through": contiguous_through,
        "gaps": gaps,
        "problems": problems,
        "problem_count": problem_count,
        "complete": complete,
        "next_from_seq": next_from_seq,
        "ok": problem_count == 0 && gaps.is_empty() && !records.is_empty(),
    }))
}

#[tool_router(router = evidence_tools, vis = "pub(super)")]
impl McpTools {
    /// A host's evidence bundles, newest first, filtered by check, outcome and time,
    /// in pages (pass `next_before_seq` back as `before_seq`).
    #[tool(
        input_schema = super::schema::<ListEvidenceArgs>(),
        annotations(
            title = "List evidence",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn list_evidence(
        &self,
        ctx: RequestContext<RoleServer>,
        args: JsonObject,
    ) -> Result<CallToolResult, ErrorData> {
        self.run("list_evidence", &ctx, args, list_evidence).await
    }

    /// One bundle: its bundle.json and its verification, re-read from the archive now:
    /// the signature by the host's enrolled key, the hash the index holds, and the link
    /// to the stored bundles before and after it.
    #[tool(
        input_schema = super::schema::<ShowBundleArgs>(),
        annotations(
            title = "Show a bundle",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn show_bundle(
        &self,
        ctx: RequestContext<RoleServer>,
        args: JsonObject,
    ) -> Result<CallToolResult, ErrorData> {
        self.run("show_bundle", &ctx, args, show_bundle).await
    }

    /// Verifies a host's chain from the archive: every signature, every hash, every
    /// seq/prev_hash link, and the gaps. `ok` is true only when all hold.
    #[tool(
        input_schema = super::schema::<VerifyChainArgs>(),
        annotations(
            title = "Verify a host's chain",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn verify_chain(
        &self,
        ctx: RequestContext<RoleServer>,
        args: JsonObject,
    ) -> Result<CallToolResult, ErrorData> {
        self.run("verify_chain", &ctx, args, verify_chain).await
    }
}
