//! The store conformance suite: each case takes a fresh store of one backend. A new
//! backend runs the same cases by adding one `conformance!` line. PostgreSQL cases
//! start a throwaway cluster (tests/support/postgres.rs) and fail if its binaries are
//! missing.

mod support;

use compliance_agent::evidence::chain::ChainProblem;
use jiff::Timestamp;
use mcp_server::auth::{Caller, Role, Tenants, token_hash};
use mcp_server::store::console::BundleFilter;
use mcp_server::store::incidents::{
    IncidentFilter, IncidentState, Observation, Observed, PlanState, Resolution,
};
use mcp_server::store::postgres::PostgresStore;
use mcp_server::store::sqlite::SqliteStore;
use mcp_server::store::{
    AuditEntry, BundleRecord, EnrollmentToken, Host, Operator, Recorded, Site, Store, StoreError,
};
use support::postgres::TestPostgres;

type TestResult = Result<(), Box<dyn std::error::Error>>;

use mcp_server::store::sbom::{SbomComponent, SbomQuery, SbomRecord};

fn site(id: &str, reseller: Option<&str>) -> Site {
    Site {
        site_id: id.into(),
        reseller_id: reseller.map(str::to_owned),
        runbook_allowlist: vec!["collect_evidence".into()],
        created_at: Timestamp::now(),
    }
}

fn host(site: &str, id: &str) -> Host {
    Host {
        site_id: site.into(),
        host_id: id.into(),
        reseller_id: None,
        evidence_pubkey_pem: "PEM".into(),
        cert_serial: Some("01".into()),
        enrolled_at: Timestamp::now(),
        revoked_at: None,
        scan_interval_sec: 300,
        last_seen: None,
    }
}

fn record(site: &str, host: &str, seq: u64, hash: &str, prev: Option<&str>) -> BundleRecord {
    BundleRecord {
        bundle_id: format!("{site}-{host}-{seq}-{hash}"),
        site_id: site.into(),
        host_id: host.into(),
        seq,
        hash: hash.into(),
        prev_hash: prev.map(str::to_owned),
        check: "backup".into(),
        outcome: "success".into(),
        timestamp_end: Timestamp::now(),
        received_at: Timestamp::now(),
        archive_key: "k".into(),
        order_id: None,
    }
}

fn admin() -> Caller {
    Caller::local("test")
}

fn scoped(tenants: Tenants, role: Role) -> Caller {
    Caller {
        actor: "operator:x".into(),
        role,
        tenants,
        peer: None,
    }
}

/// Tenancy: a reseller operator sees its own sites' hosts only, a host only itself.
pub fn tenants_scope_every_query(store: &dyn Store) -> TestResult {
    store.put_site(&admin(), &site("s1", Some("acme")))?;
    store.put_site(&admin(), &site("s2", Some("other")))?;
    store.add_host(&admin(), &host("s1", "h1"))?;
    store.add_host(&admin(), &host("s2", "h2"))?;
    let acme = scoped(
        Tenants::Reseller {
            reseller_id: "acme".into(),
        },
        Role::ResellerOperator,
    );
    let names: Vec<String> = store.hosts(&acme)?.into_iter().map(|h| h.host_id).collect();
    assert_eq!(names, vec!["h1"], "a reseller sees its own hosts");
    assert!(
        store.host(&acme, "s2", "h2")?.is_none(),
        "and not another's"
    );
    assert!(
        matches!(
            store.revoke_host(&acme, "s2", "h2", Timestamp::now()),
            Err(StoreError::NotFound(_))
        ),
        "cannot revoke another's (and learns nothing)"
    );
    let auditor = scoped(
        Tenants::Sites {
            site_ids: vec!["s1".into()],
        },
        Role::Auditor,
    );
    assert!(
        matches!(
            store.revoke_host(&auditor, "s1", "h1", Timestamp::now()),
            Err(StoreError::Forbidden(_))
        ),
        "auditors change nothing"
    );
    let me = Caller::host("s1", "h1", None);
    assert_eq!(store.hosts(&me)?.len(), 1, "a host sees itself");
    assert!(
        store.pending_orders(&me, "s2", "h2").is_err(),
        "a host cannot list another's orders"
    );
    Ok(())
}

/// Tokens redeem atomically and no more often than created; expiry is enforced.
pub fn tokens_are_bounded(store: &dyn Store) -> TestResult {
    store.put_site(&admin(), &site("s1", None))?;
    let hash = token_hash("mcpe1_secret");
    store.create_enrollment_token(
        &admin(),
        &EnrollmentToken {
            secret_hash: hash,
            token_id: "t1".into(),
            site_id: "s1".into(),
            uses_left: 2,
            expires_at: Timestamp::now() + jiff::SignedDuration::from_hours(1),
            created_by: "t".into(),
            created_at: Timestamp::now(),
        },
    )?;
    store.enroll_host(&hash, Timestamp::now(), &host("s1", "a"))?;
    store.enroll_host(&hash, Timestamp::now(), &host("s1", "b"))?;
    assert!(
        matches!(
            store.enroll_host(&hash, Timestamp::now(), &host("s1", "c")),
            Err(StoreError::Token(_))
        ),
        "two uses only"
    );
    assert!(
        matches!(
            store.enroll_host(&token_hash("other"), Timestamp::now(), &host("s1", "d")),
            Err(StoreError::Token(_))
        ),
        "unknown token"
    );
    let later = Timestamp::now() + jiff::SignedDuration::from_hours(2);
    let h2 = token_hash("mcpe1_second");
    store.create_enrollment_token(
        &admin(),
        &EnrollmentToken {
            secret_hash: h2,
            token_id: "t2".into(),
            site_id: "s1".into(),
            uses_left: 1,
            expires_at: Timestamp::now() + jiff::SignedDuration::from_hours(1),
            created_by: "t".into(),
            created_at: Timestamp::now(),
        },
    )?;
    assert!(
        matches!(
            store.enroll_host(&h2, later, &host("s1", "e")),
            Err(StoreError::Token(_))
        ),
        "expired"
    );
    assert!(
        matches!(
            store.enroll_host(&h2, Timestamp::now(), &host("s1", "a")),
            Err(StoreError::Exists(_))
        ),
        "a host id is not reused"
    );
    assert_eq!(
        store.enrollment_token(&h2)?.map(|t| t.uses_left),
        Some(1),
        "a refused enrollment uses nothing"
    );
    Ok(())
}

/// The chain is checked again inside the store's transaction.
pub fn record_bundle_enforces_the_chain(store: &dyn Store) -> TestResult {
    store.put_site(&admin(), &site("s1", None))?;
    store.add_host(&admin(), &host("s1", "h1"))?;
    let me = Caller::host("s1", "h1", None);
    assert_eq!(
        store.record_bundle(&me, &record("s1", "h1", 1, "a", None), None, None)?,
        Recorded::Stored
    );
    assert_eq!(
        store.record_bundle(&me, &record("s1", "h1", 1, "a", None), None, None)?,
        Recorded::Duplicate
    );
    assert!(matches!(
        store.record_bundle(&me, &record("s1", "h1", 1, "b", None), None, None),
        Err(StoreError::Chain(ChainProblem::Fork { .. }))
    ));
    assert!(matches!(
        store.record_bundle(&me, &record("s1", "h1", 2, "c", Some("zz")), None, None),
        Err(StoreError::Chain(ChainProblem::PrevMismatch { .. }))
    ));
    assert_eq!(
        store.record_bundle(&me, &record("s1", "h1", 3, "d", Some("c2")), None, None)?,
        Recorded::Stored,
        "a gap"
    );
    assert!(
        matches!(
            store.record_bundle(&me, &record("s1", "h1", 2, "c", Some("a")), None, None),
            Err(StoreError::Chain(ChainProblem::NextMismatch { .. }))
        ),
        "seq 3 names another predecessor"
    );
    assert_eq!(store.seqs(&me, "s1", "h1")?, vec![1, 3]);
    assert!(
        store
            .record_bundle(
                &Caller::host("s1", "h2", None),
                &record("s1", "h1", 4, "e", Some("d")),
                None,
                None
            )
            .is_err(),
        "another host cannot record here"
    );
    Ok(())
}

/// Concurrent deliveries answer as some serial order would: many threads deliver valid
/// chains mixed with forks, wrong predecessors and duplicates for several hosts at
/// once (on SQLite through the group commit, on PostgreSQL through the pool). Whatever
/// the interleaving, every bundle answered `stored` is in the index with its hash, no
/// refused one is, each seq holds one hash, stored neighbours link, and each stored
/// row was answered `stored` exactly once.
pub fn concurrent_deliveries_match_a_serial_order(store: &dyn Store) -> TestResult {
    use rand::{Rng as _, SeedableRng as _, seq::SliceRandom as _};
    const HOSTS: usize = 4;
    const CHAIN: u64 = 8;
    const THREADS: usize = 8;
    store.put_site(&admin(), &site("s1", None))?;
    for round in 0..6u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(round);
        let mut deliveries = Vec::new();
        for h in 0..HOSTS {
            let host_id = format!("r{round}h{h}");
            store.add_host(&admin(), &host("s1", &host_id))?;
            let mut prev: Option<String> = None;
            for seq in 1..=CHAIN {
                let hash = format!("{host_id}-{seq}");
                deliveries.push(record("s1", &host_id, seq, &hash, prev.as_deref()));
                match rng.gen_range(0..4) {
                    0 => deliveries.push(record(
                        "s1",
                        &host_id,
                        seq,
                        &format!("{hash}-fork"),
                        prev.as_deref(),
                    )),
                    1 => deliveries.push(record("s1", &host_id, seq, &hash, prev.as_deref())),
                    2 => deliveries.push(record(
                        "s1",
                        &host_id,
                        seq,
                        &format!("{hash}-bad"),
                        Some("nowhere"),
                    )),
                    _ => {}
                }
                prev = Some(hash);
            }
        }
        deliveries.shuffle(&mut rng);
        let mut lanes: Vec<Vec<BundleRecord>> = vec![Vec::new(); THREADS];
        for (i, d) in deliveries.into_iter().enumerate() {
            lanes[i % THREADS].push(d);
        }
        let writers = lanes
            .into_iter()
            .map(|lane| {
                Box::new(move || {
                    lane.into_iter()
                        .map(|rec| {
                            let me = Caller::host("s1", &rec.host_id, None);
                            let answer = store.record_bundle(&me, &rec, None, None);
                            (rec, answer)
                        })
                        .collect::<Vec<_>>()
                }) as Box<dyn FnOnce() -> _ + Send>
            })
            .collect();
        let answers: Vec<(BundleRecord, Result<Recorded, StoreError>)> =
            race(writers).into_iter().flatten().collect();
        for h in 0..HOSTS {
            let host_id = format!("r{round}h{h}");
            let me = Caller::host("s1", &host_id, None);
            let mine: Vec<_> = answers
                .iter()
                .filter(|(r, _)| r.host_id == host_id)
                .collect();
            let seqs = store.seqs(&me, "s1", &host_id)?;
            let mut stored_hashes = std::collections::BTreeMap::new();
            for seq in &seqs {
                let link = store
                    .neighbours(&me, "s1", &host_id, *seq)?
                    .same_seq
                    .ok_or("a listed seq has a link")?;
                stored_hashes.insert(*seq, link);
            }
            for (rec, answer) in &mine {
                let held = stored_hashes.get(&rec.seq).map(|l| l.hash.as_str());
                match answer {
                    Ok(_) => assert_eq!(
                        held,
                        Some(rec.hash.as_str()),
                        "round {round}: {} answered {answer:?} is in the index",
                        rec.bundle_id
                    ),
                    Err(e) => assert_ne!(
                        held,
                        Some(rec.hash.as_str()),
                        "round {round}: {} refused ({e}) is not in the index, unless an identical delivery was stored",
                        rec.bundle_id
                    ),
                }
            }
            for (seq, link) in &stored_hashes {
                let stored_answers = mine
                    .iter()
                    .filter(|(r, a)| {
                        r.seq == *seq && r.hash == link.hash && matches!(a, Ok(Recorded::Stored))
                    })
                    .count();
                assert_eq!(
                    stored_answers, 1,
                    "round {round}: {host_id} seq {seq} was answered stored once"
                );
                if let Some(next) = stored_hashes.get(&(seq + 1)) {
                    assert_eq!(
                        next.prev_hash.as_deref(),
                        Some(link.hash.as_str()),
                        "round {round}: {host_id} seq {} links to seq {seq}",
                        seq + 1
                    );
                }
            }
        }
    }
    Ok(())
}

/// The audit log appends and never changes; operators authenticate by hash.
pub fn audit_is_append_only_and_operators_authenticate(store: &dyn Store) -> TestResult {
    let id = store.append_audit(&AuditEntry {
        id: 0,
        at: Timestamp::now(),
        actor: "cli:t".into(),
        peer: None,
        action: "x".into(),
        target: "s1".into(),
        outcome: "ok".into(),
        detail: String::new(),
    })?;
    assert!(id > 0, "an id is assigned");
    assert_eq!(store.audit(&admin(), 10)?.len(), 1);
    let token = token_hash("mcpo1_t");
    store.create_operator(
        &admin(),
        &Operator {
            name: "ann".into(),
            role: Role::Auditor,
            tenants: Tenants::Sites {
                site_ids: vec!["s1".into()],
            },
            token_hash: token,
            created_at: Timestamp::now(),
            disabled: false,
        },
    )?;
    assert_eq!(
        store.operator_by_token(&token)?.map(|o| o.role),
        Some(Role::Auditor)
    );
    assert!(store.operator_by_token(&token_hash("wrong"))?.is_none());
    assert!(
        store
            .create_operator(
                &scoped(Tenants::All, Role::SiteOperator),
                &Operator {
                    name: "bob".into(),
                    role: Role::Admin,
                    tenants: Tenants::All,
                    token_hash: token_hash("b"),
                    created_at: Timestamp::now(),
                    disabled: false
                }
            )
            .is_err(),
        "only admins make operators"
    );
    Ok(())
}

/// Evidence queries: one host's bundles by check, outcome and time, newest first, in
/// pages; every combination of filters over a generated chain answers exactly what a
/// plain filter over the records would, and the caller's scope holds.
pub fn evidence_query_filters_pages_and_scopes(store: &dyn Store) -> TestResult {
    use mcp_server::store::evidence_query::{EvidenceFilter, MAX_EVIDENCE_PAGE};
    store.put_site(&admin(), &site("s1", Some("acme")))?;
    store.put_site(&admin(), &site("s2", Some("other")))?;
    store.add_host(&admin(), &host("s1", "h1"))?;
    store.add_host(&admin(), &host("s2", "h2"))?;
    let base = Timestamp::from_second(1_800_000_000)?;
    let checks = ["backup", "firewall", "patching"];
    let outcomes = ["success", "failed", "alert"];
    let mut all = Vec::new();
    for seq in 1..=40u64 {
        let prev = (seq > 1).then(|| format!("h{}", seq - 1));
        let mut r = record("s1", "h1", seq, &format!("h{seq}"), prev.as_deref());
        r.check = checks[(seq * 7 % 3) as usize].into();
        r.outcome = outcomes[(seq * 5 % 3) as usize].into();
        // Time order differs from seq order, so time filters are not seq filters.
        r.timestamp_end = base + jiff::SignedDuration::from_mins((seq * 17 % 40) as i64);
        store.record_bundle(&admin(), &r, None, None)?;
        all.push(r);
    }
    // Another host's bundle never shows up.
    store.record_bundle(&admin(), &record("s2", "h2", 1, "x1", None), None, None)?;
    let at = |m: i64| Some(base + jiff::SignedDuration::from_mins(m));
    let mut cases = 0;
    for check in [None, Some("backup"), Some("firewall")] {
        for outcome in [None, Some("failed"), Some("success")] {
            for (since, until) in [
                (None, None),
                (at(10), None),
                (None, at(25)),
                (at(5), at(30)),
            ] {
                for before_seq in [None, Some(30), Some(1)] {
                    for limit in [1, 3, 50] {
                        let filter = EvidenceFilter {
                            site_id: "s1".into(),
                            host_id: "h1".into(),
                            check: check.map(str::to_owned),
                            outcome: outcome.map(str::to_owned),
                            since,
                            until,
                            before_seq,
                            limit,
                        };
                        let want: Vec<u64> = all
                            .iter()
                            .rev()
                            .filter(|r| check.is_none_or(|c| r.check == c))
                            .filter(|r| outcome.is_none_or(|o| r.outcome == o))
                            .filter(|r| since.is_none_or(|t| r.timestamp_end >= t))
                            .filter(|r| until.is_none_or(|t| r.timestamp_end < t))
                            .filter(|r| before_seq.is_none_or(|b| r.seq < b))
                            .take(limit as usize)
                            .map(|r| r.seq)
                            .collect();
                        let got: Vec<u64> = store
                            .evidence(&admin(), &filter)?
                            .iter()
                            .map(|r| r.seq)
                            .collect();
                        assert_eq!(got, want, "{filter:?}");
                        cases += 1;
                    }
                }
            }
        }
    }
    assert_eq!(cases, 324, "every combination ran");
    let page = |caller: &Caller, site: &str, host: &str, limit: u32| {
        store.evidence(
            caller,
            &EvidenceFilter {
                site_id: site.into(),
                host_id: host.into(),
                check: None,
                outcome: None,
                since: None,
                until: None,
                before_seq: None,
                limit,
            },
        )
    };
    let full = page(&admin(), "s1", "h1", 50)?;
    let (newest, last) = (full.first().ok_or("rows")?, all.last().ok_or("records")?);
    assert_eq!(
        (
            &newest.bundle_id,
            &newest.hash,
            &newest.check,
            &newest.outcome,
            newest.timestamp_end
        ),
        (
            &last.bundle_id,
            &last.hash,
            &last.check,
            &last.outcome,
            last.timestamp_end
        ),
        "whole records come back, newest first"
    );
    let acme = scoped(
        Tenants::Reseller {
            reseller_id: "acme".into(),
        },
        Role::ResellerOperator,
    );
    assert_eq!(page(&acme, "s1", "h1", 5)?.len(), 5, "its own host");
    assert!(
        matches!(page(&acme, "s2", "h2", 5), Err(StoreError::NotFound(_))),
        "another reseller's host is not found"
    );
    assert!(
        matches!(
            page(&admin(), "s1", "nope", 5),
            Err(StoreError::NotFound(_))
        ),
        "nor is a host that does not exist"
    );
    assert!(
        matches!(
            page(&Caller::host("s1", "h1", None), "s1", "h1", 5),
            Ok(ref r) if r.len() == 5
        ),
        "a host sees its own"
    );
    for limit in [0, MAX_EVIDENCE_PAGE + 1] {
        assert!(
            page(&admin(), "s1", "h1", limit).is_err(),
            "limit {limit} refused, not truncated"
        );
    }
    Ok(())
}

fn observation(site: &str, host: &str, bundle: &str, severity: &str) -> Observation {
    Observation {
        site_id: site.into(),
        host_id: host.into(),
        cause: "check:backup".into(),
        check: Some("backup".into()),
        severity: severity.into(),
        hipaa_controls: vec!["164.308(a)(7)(ii)(A)".into()],
        summary: format!("backup failed ({bundle})"),
        recommended: Some(
            serde_json::json!({ "runbook": "run_backup", "params": { "unit": "restic.service" } }),
        ),
        bundle_id: Some(bundle.into()),
        at: Timestamp::now(),
        kind: "evidence".into(),
        detail: bundle.into(),
    }
}

fn resolution(by: &str) -> Resolution {
    Resolution {
        at: Timestamp::now(),
        by: by.into(),
        reason: "compliant again".into(),
        bundle_id: None,
    }
}

/// Incidents: one open per host and cause whatever repeats, the highest severity kept,
/// a bundle applied once, every query scoped by tenants, each claim handed out once,
/// and an ended incident never reopened (new evidence opens a new one).
pub fn incidents_are_one_per_cause_scoped_and_claimed_once(store: &dyn Store) -> TestResult {
    store.put_site(&admin(), &site("s1", Some("acme")))?;
    store.put_site(&admin(), &site("s2", Some("other")))?;
    store.add_host(&admin(), &host("s1", "h1"))?;
    store.add_host(&admin(), &host("s2", "h2"))?;
    let box1 = Caller::host("s1", "h1", None);
    let first = store.observe(&box1, &observation("s1", "h1", "b1", "medium"), "inc-1")?;
    assert_eq!(
        first,
        Observed::Opened("inc-1".into()),
        "the first failure opens"
    );
    assert_eq!(
        store.observe(&box1, &observation("s1", "h1", "b1", "medium"), "inc-x")?,
        Observed::AlreadyApplied,
        "the same bundle again changes nothing"
    );
    assert_eq!(
        store.observe(&box1, &observation("s1", "h1", "b2", "critical"), "inc-y")?,
        Observed::Updated("inc-1".into()),
        "a later failure updates the open incident"
    );
    store.observe(&box1, &observation("s1", "h1", "b3", "low"), "inc-z")?;
    let mut firewall = observation("s1", "h1", "b1", "low");
    firewall.cause = "check:firewall".into();
    assert_eq!(
        store.observe(&box1, &firewall, "inc-f")?,
        Observed::Opened("inc-f".into()),
        "a bundle on one cause's timeline still counts for another cause"
    );
    store.resolve_incident(
        &box1,
        "s1",
        "h1",
        "check:firewall",
        &resolution("host:s1/h1"),
    )?;
    let inc = store
        .incident(&admin(), "inc-1")?
        .ok_or("incident stored")?;
    assert_eq!(inc.severity, "critical", "the highest severity is kept");
    assert_eq!(inc.event_count, 3, "three bundles on the timeline");
    assert_eq!(
        inc.plan_state,
        PlanState::Wanted,
        "a new incident wants a plan"
    );
    assert_eq!(
        store
            .incidents(&admin(), &IncidentFilter::default())?
            .iter()
            .filter(|i| i.cause == "check:backup")
            .count(),
        1,
        "one incident per host and cause"
    );
    let events = store.incident_events(&admin(), "inc-1")?;
    assert_eq!(
        events
            .iter()
            .filter_map(|e| e.bundle_id.as_deref())
            .collect::<Vec<_>>(),
        vec!["b1", "b2", "b3"],
        "the timeline in order"
    );

    // Tenancy: the other reseller and the other box learn nothing and change nothing.
    let other = scoped(
        Tenants::Reseller {
            reseller_id: "other".into(),
        },
        Role::ResellerOperator,
    );
    let acme = scoped(
        Tenants::Reseller {
            reseller_id: "acme".into(),
        },
        Role::ResellerOperator,
    );
    assert_eq!(
        store.incidents(&acme, &IncidentFilter::default())?.len(),
        2,
        "acme sees its own"
    );
    assert!(
        store
            .incidents(&other, &IncidentFilter::default())?
            .is_empty(),
        "other sees none"
    );
    assert!(store.incident(&other, "inc-1")?.is_none(), "nor by id");
    assert!(
        matches!(
            store.incident_events(&other, "inc-1"),
            Err(StoreError::NotFound(_))
        ),
        "nor its timeline"
    );
    assert!(
        matches!(
            store.close_incident(&other, "inc-1", &resolution("operator:x")),
            Err(StoreError::NotFound(_))
        ),
        "nor may it close it"
    );
    assert!(store.incident_for_order(&other, "o1")?.is_none());
    let box2 = Caller::host("s2", "h2", None);
    assert!(
        matches!(
            store.observe(&box2, &observation("s1", "h1", "b9", "low"), "inc-9"),
            Err(StoreError::NotFound(_))
        ),
        "a box cannot open incidents of another"
    );
    assert!(
        store
            .claim_incidents(&other, 10, Timestamp::now(), Timestamp::UNIX_EPOCH)?
            .is_empty(),
        "claims are scoped too"
    );

    // Claims: handed out once; a stale claim is taken again.
    let sys = admin();
    let claimed = store.claim_incidents(&sys, 10, Timestamp::now(), Timestamp::UNIX_EPOCH)?;
    assert_eq!(claimed.len(), 1, "the wanted incident is claimed");
    assert!(
        store
            .claim_incidents(&sys, 10, Timestamp::now(), Timestamp::UNIX_EPOCH)?
            .is_empty(),
        "and not handed out twice"
    );
    let later = Timestamp::now().checked_add(jiff::SignedDuration::from_secs(3600))?;
    assert_eq!(
        store
            .claim_incidents(&sys, 10, Timestamp::now(), later)?
            .len(),
        1,
        "a claim older than the stale limit is taken again"
    );
    store.set_incident_plan(
        &sys,
        "inc-1",
        PlanState::Ordered,
        Some(&serde_json::json!({ "runbook": "run_backup" })),
        Some("o1"),
    )?;
    let ordered = store
        .incident_for_order(&acme, "o1")?
        .ok_or("found by its order")?;
    assert_eq!(ordered.plan_state, PlanState::Ordered);
    assert_eq!(
        ordered.plan,
        Some(serde_json::json!({ "runbook": "run_backup" }))
    );
    assert!(
        store
            .claim_incidents(&sys, 10, Timestamp::now(), later)?
            .is_empty(),
        "an ordered incident is not planned again"
    );

    // Resolution records the duration; a resolved incident is not reopened.
    assert_eq!(
        store.resolve_incident(&box1, "s1", "h1", "check:backup", &resolution("host:s1/h1"))?,
        Some("inc-1".into())
    );
    assert_eq!(
        store.resolve_incident(&box1, "s1", "h1", "check:backup", &resolution("host:s1/h1"))?,
        None,
        "nothing open to resolve"
    );
    let resolved = store.incident(&admin(), "inc-1")?.ok_or("still stored")?;
    assert_eq!(resolved.state, IncidentState::Resolved);
    assert!(
        resolved.remediation_sec.is_some() && resolved.resolved_at.is_some(),
        "{resolved:?}"
    );
    assert!(
        matches!(
            store.set_incident_plan(&sys, "inc-1", PlanState::Wanted, None, None),
            Err(StoreError::Exists(_))
        ),
        "an ended incident takes no plan"
    );
    assert_eq!(
        store.observe(&box1, &observation("s1", "h1", "b4", "low"), "inc-2")?,
        Observed::Opened("inc-2".into()),
        "new evidence after the resolution opens a new incident"
    );

    // Operators close with a reason; auditors cannot; an ended incident stays ended.
    let auditor = scoped(
        Tenants::Sites {
            site_ids: vec!["s1".into()],
        },
        Role::Auditor,
    );
    assert!(
        matches!(
            store.close_incident(&auditor, "inc-2", &resolution("operator:a")),
            Err(StoreError::Forbidden(_))
        ),
        "auditors change nothing"
    );
    let closed = store.close_incident(&acme, "inc-2", &resolution("operator:x"))?;
    assert_eq!(closed.state, IncidentState::Closed);
    assert_eq!(closed.resolution.as_deref(), Some("compliant again"));
    assert!(
        matches!(
            store.close_incident(&acme, "inc-2", &resolution("operator:x")),
            Err(StoreError::Exists(_))
        ),
        "closing twice is refused"
    );
    assert_eq!(
        store
            .incidents(
                &admin(),
                &IncidentFilter {
                    state: Some(IncidentState::Open),
                    ..IncidentFilter::default()
                }
            )?
            .len(),
        0,
        "nothing open"
    );

    // The site's executor mode, scoped and written by writers only.
    assert_eq!(
        store.site_executor_mode(&acme, "s1")?,
        None,
        "the default at first"
    );
    store.set_site_executor_mode(&acme, "s1", Some("auto"))?;
    assert_eq!(
        store.site_executor_mode(&admin(), "s1")?.as_deref(),
        Some("auto")
    );
    assert!(
        store
            .set_site_executor_mode(&other, "s1", Some("off"))
            .is_err(),
        "not another reseller's"
    );
    assert!(
        store
            .set_site_executor_mode(&auditor, "s1", Some("off"))
            .is_err(),
        "not an auditor"
    );
    assert!(
        store.site_executor_mode(&other, "s1").is_err(),
        "nor read by another reseller"
    );
    store.set_site_executor_mode(&admin(), "s1", None)?;
    assert_eq!(
        store.site_executor_mode(&admin(), "s1")?,
        None,
        "back to the default"
    );

    // The lowest stored seq (chain-gap detection).
    assert_eq!(store.min_seq(&box1, "s1", "h1")?, None);
    store.record_bundle(&box1, &record("s1", "h1", 5, "h5", Some("h4")), None, None)?;
    store.record_bundle(&box1, &record("s1", "h1", 3, "h3", Some("h2")), None, None)?;
    assert_eq!(store.min_seq(&box1, "s1", "h1")?, Some(3));
    Ok(())
}

macro_rules! conformance {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;
            #[test]
            fn incidents_are_one_per_cause_scoped_and_claimed_once() -> TestResult {
                let (_guard, store) = $make;
                super::incidents_are_one_per_cause_scoped_and_claimed_once(&*store)
            }
            #[test]
            fn tenants_scope_every_query() -> TestResult {
                let (_guard, store) = $make;
                super::tenants_scope_every_query(&*store)
            }
            #[test]
            fn tokens_are_bounded() -> TestResult {
                let (_guard, store) = $make;
                super::tokens_are_bounded(&*store)
            }
            #[test]
            fn record_bundle_enforces_the_chain() -> TestResult {
                let (_guard, store) = $make;
                super::record_bundle_enforces_the_chain(&*store)
            }
            #[test]
            fn concurrent_deliveries_match_a_serial_order() -> TestResult {
                let (_guard, store) = $make;
                super::concurrent_deliveries_match_a_serial_order(&*store)
            }
            #[test]
            fn audit_is_append_only_and_operators_authenticate() -> TestResult {
                let (_guard, store) = $make;
                super::audit_is_append_only_and_operators_authenticate(&*store)
            }
            #[test]
            fn evidence_query_filters_pages_and_scopes() -> TestResult {
                let (_guard, store) = $make;
                super::evidence_query_filters_pages_and_scopes(&*store)
            }
            #[test]
            fn console_sessions_expire_and_end() -> TestResult {
                let (_guard, store) = $make;
                super::console_sessions_expire_and_end(&*store)
            }
            #[test]
            fn enrollment_tokens_are_listed_and_revoked_within_tenants() -> TestResult {
                let (_guard, store) = $make;
                super::enrollment_tokens_are_listed_and_revoked_within_tenants(&*store)
            }
            #[test]
            fn passwords_are_set_by_their_operator_or_an_admin() -> TestResult {
                let (_guard, store) = $make;
                super::passwords_are_set_by_their_operator_or_an_admin(&*store)
            }
            #[test]
            fn evidence_listing_and_counts_are_scoped_and_filtered() -> TestResult {
                let (_guard, store) = $make;
                super::evidence_listing_and_counts_are_scoped_and_filtered(&*store)
            }
            #[test]
            fn the_latest_sbom_is_kept_indexed_and_scoped() -> TestResult {
                let (_guard, store) = $make;
                super::the_latest_sbom_is_kept_indexed_and_scoped(&*store)
            }
        }
    };
}

fn sbom_record(site: &str, host: &str, seq: u64) -> SbomRecord {
    SbomRecord {
        site_id: site.into(),
        host_id: host.into(),
        bundle_id: format!("sbom-{site}-{host}-{seq}"),
        seq,
        sha256: format!("{seq:064}"),
        components: 0,
        received_at: Timestamp::now(),
        document: format!("{{\"seq\": {seq}}}").into_bytes(),
    }
}

fn component(name: &str, version: Option<&str>) -> SbomComponent {
    SbomComponent {
        name: name.into(),
        version: version.map(str::to_owned),
        store_path: match version {
            Some(v) => format!("/nix/store/{}-{name}-{v}", "a".repeat(32)),
            None => format!("/nix/store/{}-{name}", "b".repeat(32)),
        },
    }
}

/// Invariant: a host's latest SBOM (by seq) replaces the one before it, never the other
/// way round; its components answer package, version and store-path queries; and only
/// hosts among the caller's tenants are answered or shown.
fn the_latest_sbom_is_kept_indexed_and_scoped(store: &dyn Store) -> TestResult {
    let a = admin();
    store.put_site(&a, &site("s1", Some("r1")))?;
    store.put_site(&a, &site("s2", Some("r2")))?;
    for (s, h) in [("s1", "h1"), ("s1", "h2"), ("s2", "h3")] {
        store.add_host(&a, &host(s, h))?;
    }
    let old_ssl = component("openssl", Some("3.0.12"));
    let new_ssl = component("openssl", Some("3.0.13"));
    let glibc = component("glibc", Some("2.40"));
    assert!(store.put_sbom(
        &a,
        &sbom_record("s1", "h1", 5),
        &[old_ssl.clone(), glibc.clone()]
    )?);
    assert!(store.put_sbom(
        &a,
        &sbom_record("s1", "h2", 3),
        std::slice::from_ref(&new_ssl)
    )?);
    assert!(store.put_sbom(
        &a,
        &sbom_record("s2", "h3", 9),
        std::slice::from_ref(&old_ssl)
    )?);
    // h1 upgrades; then the old SBOM arrives late and is kept out.
    assert!(store.put_sbom(
        &a,
        &sbom_record("s1", "h1", 7),
        &[new_ssl.clone(), glibc.clone()]
    )?);
    assert!(!store.put_sbom(
        &a,
        &sbom_record("s1", "h1", 5),
        std::slice::from_ref(&old_ssl)
    )?);
    let latest = store.latest_sbom(&a, "s1", "h1")?.ok_or("h1's sbom")?;
    assert_eq!(
        (latest.seq, latest.document.as_slice()),
        (7, &b"{\"seq\": 7}"[..])
    );

    let hosts = |c: &Caller, q: SbomQuery| -> Result<Vec<String>, Box<dyn std::error::Error>> {
        Ok(store
            .sbom_hosts(c, &q)?
            .into_iter()
            .map(|m| format!("{}/{}", m.site_id, m.host_id))
            .collect())
    };
    let package = |p: &str, v: Option<&str>| SbomQuery {
        package: Some(p.into()),
        version: v.map(str::to_owned),
        store_path: None,
    };
    assert_eq!(
        hosts(&a, package("openssl", None))?,
        ["s1/h1", "s1/h2", "s2/h3"]
    );
    assert_eq!(
        hosts(&a, package("openssl", Some("3.0.12")))?,
        ["s2/h3"],
        "h1 no longer runs 3.0.12"
    );
    assert_eq!(hosts(&a, package("glibc", None))?, ["s1/h1"]);
    let by_path = SbomQuery {
        store_path: Some(new_ssl.store_path.clone()),
        ..SbomQuery::default()
    };
    assert_eq!(hosts(&a, by_path.clone())?, ["s1/h1", "s1/h2"]);

    let r2 = scoped(
        Tenants::Reseller {
            reseller_id: "r2".into(),
        },
        Role::ResellerOperator,
    );
    assert_eq!(hosts(&r2, package("openssl", None))?, ["s2/h3"]);
    assert!(hosts(&r2, by_path)?.is_empty());
    assert!(
        store.latest_sbom(&r2, "s1", "h1").is_err(),
        "another reseller's host is not found"
    );
    let auditor = scoped(
        Tenants::Sites {
            site_ids: vec!["s1".into()],
        },
        Role::Auditor,
    );
    assert_eq!(
        hosts(&auditor, package("openssl", None))?,
        ["s1/h1", "s1/h2"]
    );
    assert!(
        store
            .put_sbom(&auditor, &sbom_record("s1", "h1", 8), &[])
            .is_err(),
        "an auditor writes nothing"
    );
    let box_h2 = scoped(
        Tenants::Host {
            site_id: "s1".into(),
            host_id: "h2".into(),
        },
        Role::Host,
    );
    assert!(
        store
            .put_sbom(&box_h2, &sbom_record("s1", "h1", 8), &[])
            .is_err(),
        "a host cannot write another host's SBOM"
    );
    for bad in [
        SbomQuery::default(),
        SbomQuery {
            package: Some("openssl".into()),
            store_path: Some("/nix/store/x".into()),
            version: None,
        },
        SbomQuery {
            store_path: Some("/etc/passwd".into()),
            ..SbomQuery::default()
        },
    ] {
        assert!(store.sbom_hosts(&a, &bad).is_err(), "{bad:?} is refused");
    }
    Ok(())
}

fn sqlite() -> (tempfile::TempDir, Box<dyn Store>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("mcp.db")).expect("open sqlite");
    (dir, Box::new(store))
}

conformance!(sqlite_backend, sqlite());
conformance!(postgres_backend, postgres());

fn postgres() -> (TestPostgres, Box<dyn Store>) {
    let pg = TestPostgres::start();
    let store = PostgresStore::open(&pg.url).expect("open postgres");
    (pg, Box::new(store))
}

#[test]
fn sqlite_audit_rows_cannot_be_changed_even_by_sql() -> TestResult {
    let (dir, store) = sqlite();
    store.append_audit(&AuditEntry {
        id: 0,
        at: Timestamp::now(),
        actor: "a".into(),
        peer: None,
        action: "x".into(),
        target: "t".into(),
        outcome: "ok".into(),
        detail: String::new(),
    })?;
    drop(store);
    let conn = rusqlite::Connection::open(dir.path().join("mcp.db"))?;
    let err = conn
        .execute("UPDATE audit SET actor = 'forged'", [])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("append-only"), "update refused: {err}");
    let err = conn
        .execute("DELETE FROM audit", [])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("append-only"), "delete refused: {err}");
    Ok(())
}

#[test]
fn sqlite_refuses_an_edited_migration() -> TestResult {
    let (dir, store) = sqlite();
    assert_eq!(
        store.schema_version()?,
        newest(mcp_server::store::sqlite::MIGRATIONS)
    );
    drop(store);
    let conn = rusqlite::Connection::open(dir.path().join("mcp.db"))?;
    conn.execute(
        "UPDATE schema_migrations SET sha256 = 'edited' WHERE version = 1",
        [],
    )?;
    drop(conn);
    let err = SqliteStore::open(&dir.path().join("mcp.db"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("must not be edited"), "{err}");
    Ok(())
}

fn audit_entry() -> AuditEntry {
    AuditEntry {
        id: 0,
        at: Timestamp::now(),
        actor: "a".into(),
        peer: None,
        action: "x".into(),
        target: "t".into(),
        outcome: "ok".into(),
        detail: String::new(),
    }
}

/// The audit log is append-only in the database itself: UPDATE, DELETE and TRUNCATE
/// are refused by trigger even for a client that goes around the store.
#[test]
fn postgres_audit_rows_cannot_be_changed_even_by_sql() -> TestResult {
    let (pg, store) = postgres();
    store.append_audit(&audit_entry())?;
    let mut sql_client = pg.admin();
    for sql in [
        "UPDATE audit SET actor = 'forged'",
        "DELETE FROM audit",
        "TRUNCATE audit",
    ] {
        let err = sql_client
            .batch_execute(sql)
            .err()
            .and_then(|e| e.as_db_error().map(|d| d.message().to_owned()))
            .unwrap_or_default();
        assert!(err.contains("append-only"), "{sql} refused: {err}");
    }
    assert_eq!(store.audit(&admin(), 10)?.len(), 1, "the entry is intact");
    Ok(())
}

/// A database whose applied migration differs from this build's text is refused.
#[test]
fn postgres_refuses_an_edited_migration() -> TestResult {
    let (pg, store) = postgres();
    assert_eq!(
        store.schema_version()?,
        newest(mcp_server::store::postgres::MIGRATIONS)
    );
    drop(store);
    pg.admin()
        .batch_execute("UPDATE schema_migrations SET sha256 = 'edited' WHERE version = 1")?;
    let err = PostgresStore::open(&pg.url)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("must not be edited"), "{err}");
    // And a second open of an intact database migrates nothing twice.
    pg.admin().batch_execute(&format!(
        "UPDATE schema_migrations SET sha256 = '{}' WHERE version = 1",
        hex_sha256(mcp_server::store::postgres::MIGRATIONS[0].2)
    ))?;
    assert_eq!(
        PostgresStore::open(&pg.url)?.schema_version()?,
        newest(mcp_server::store::postgres::MIGRATIONS)
    );
    Ok(())
}

fn hex_sha256(text: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// Runs `writers[i]` on its own thread, all released at once by a barrier.
fn race<T: Send>(writers: Vec<Box<dyn FnOnce() -> T + Send + '_>>) -> Vec<T> {
    let barrier = std::sync::Barrier::new(writers.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = writers
            .into_iter()
            .map(|w| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    w()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("writer thread"))
            .collect()
    })
}

/// Several server processes on one database cannot fork a chain: writers with their
/// own connections race to store different bundles at the same host's next seq, and
/// exactly one wins; the others are refused as a fork by the chain check (not by a
/// bare constraint error), because the check runs under the host's row lock.
#[test]
fn postgres_writers_racing_for_the_next_seq_exactly_one_wins() -> TestResult {
    const WRITERS: usize = 6;
    let pg = TestPostgres::start();
    let setup = PostgresStore::open(&pg.url)?;
    setup.put_site(&admin(), &site("s1", None))?;
    setup.add_host(&admin(), &host("s1", "h1"))?;
    let me = Caller::host("s1", "h1", None);
    setup.record_bundle(&me, &record("s1", "h1", 1, "a", None), None, None)?;
    // One store (its own pool and connections) per writer, as separate processes have.
    let stores: Vec<PostgresStore> = (0..WRITERS)
        .map(|_| PostgresStore::open(&pg.url))
        .collect::<Result<_, _>>()?;
    let mut prev = "a".to_owned();
    for seq in 2..=6u64 {
        let writers = stores
            .iter()
            .enumerate()
            .map(|(i, store)| {
                let (me, prev) = (&me, prev.clone());
                Box::new(move || {
                    let rec = record("s1", "h1", seq, &format!("w{i}-{seq}"), Some(&prev));
                    store.record_bundle(me, &rec, None, None)
                }) as Box<dyn FnOnce() -> _ + Send>
            })
            .collect();
        let results = race(writers);
        let winners: Vec<usize> = (0..WRITERS)
            .filter(|i| matches!(results[*i], Ok(Recorded::Stored)))
            .collect();
        assert_eq!(
            winners.len(),
            1,
            "seq {seq}: exactly one writer wins: {results:?}"
        );
        for (i, r) in results.iter().enumerate() {
            if i != winners[0] {
                assert!(
                    matches!(r, Err(StoreError::Chain(ChainProblem::Fork { .. }))),
                    "seq {seq}: writer {i} is refused as a fork: {r:?}"
                );
            }
        }
        let stored = setup
            .neighbours(&me, "s1", "h1", seq)?
            .same_seq
            .map(|l| l.hash)
            .unwrap_or_default();
        assert_eq!(
            stored,
            format!("w{}-{seq}", winners[0]),
            "the winner is stored"
        );
        prev = stored;
    }
    assert_eq!(setup.seqs(&me, "s1", "h1")?, vec![1, 2, 3, 4, 5, 6]);
    Ok(())
}

/// The race no unique constraint catches: one writer stores seq 2, another at the same
/// moment stores seq 3 naming a predecessor other than that seq 2. Checked apart from
/// the insert, both could pass (each sees the other's seq empty) and the link between 2
/// and 3 would be broken; under the host's row lock the second sees the first and is
/// refused. A fresh host per round, so every round is the same race.
#[test]
fn postgres_neighbouring_seqs_racing_cannot_break_the_link() -> TestResult {
    const ROUNDS: usize = 20;
    let pg = TestPostgres::start();
    let setup = PostgresStore::open(&pg.url)?;
    setup.put_site(&admin(), &site("s1", None))?;
    let (a, b) = (PostgresStore::open(&pg.url)?, PostgresStore::open(&pg.url)?);
    for round in 0..ROUNDS {
        let h = format!("h{round}");
        setup.add_host(&admin(), &host("s1", &h))?;
        let me = Caller::host("s1", &h, None);
        setup.record_bundle(&me, &record("s1", &h, 1, "a", None), None, None)?;
        let (me, a, b, hh) = (&me, &a, &b, &h);
        let results = race(vec![
            Box::new(move || a.record_bundle(me, &record("s1", hh, 2, "b", Some("a")), None, None))
                as Box<dyn FnOnce() -> _ + Send>,
            Box::new(move || b.record_bundle(me, &record("s1", hh, 3, "c", Some("x")), None, None)),
        ]);
        match (&results[0], &results[1]) {
            (Ok(Recorded::Stored), Err(StoreError::Chain(ChainProblem::PrevMismatch { .. })))
            | (Err(StoreError::Chain(ChainProblem::NextMismatch { .. })), Ok(Recorded::Stored)) => {
            }
            other => panic!("round {round}: exactly one of seq 2 and 3 may be stored: {other:?}"),
        }
        assert_eq!(
            setup.seqs(me, "s1", hh)?.len(),
            2,
            "round {round}: one of the two stored"
        );
    }
    Ok(())
}

/// A database that goes down answers "unavailable" (the intake then acknowledges
/// nothing and the agent keeps the bundle), and opening one that is down says where.
#[test]
fn postgres_down_is_unavailable_not_an_answer() -> TestResult {
    let mut pg = TestPostgres::start();
    let store = PostgresStore::open(&pg.url)?;
    store.put_site(&admin(), &site("s1", None))?;
    store.add_host(&admin(), &host("s1", "h1"))?;
    pg.stop_server();
    let me = Caller::host("s1", "h1", None);
    let r = store.record_bundle(&me, &record("s1", "h1", 1, "a", None), None, None);
    assert!(
        matches!(r, Err(StoreError::Unavailable(_))),
        "record while down: {r:?}"
    );
    let err = PostgresStore::open(&pg.url)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("unavailable") && err.contains("mcp-pg-"),
        "opening names the database it cannot reach: {err}"
    );
    pg.start_server();
    assert!(
        store.seqs(&me, "s1", "h1")?.is_empty(),
        "nothing was stored while down"
    );
    assert_eq!(
        store.record_bundle(&me, &record("s1", "h1", 1, "a", None), None, None)?,
        Recorded::Stored,
        "and the store works again once the database is back"
    );
    Ok(())
}

/// Server processes starting at once on an empty database migrate it once: every one
/// opens (none fails on a half-made schema) and the schema is at the latest version.
#[test]
fn postgres_concurrent_starts_migrate_once() -> TestResult {
    let pg = TestPostgres::start();
    let url = pg.url.clone();
    type Opened = Result<Result<u32, StoreError>, StoreError>;
    let opened: Vec<Opened> = race(
        (0..4)
            .map(|_| {
                let url = url.clone();
                Box::new(move || PostgresStore::open(&url).map(|s| s.schema_version()))
                    as Box<dyn FnOnce() -> Opened + Send>
            })
            .collect(),
    );
    let migrations = mcp_server::store::postgres::MIGRATIONS;
    for (i, r) in opened.into_iter().enumerate() {
        assert_eq!(
            r??,
            newest(migrations),
            "process {i} opened a migrated database"
        );
    }
    let rows = pg
        .admin()
        .query_one("SELECT count(*) FROM schema_migrations", &[])?
        .get::<_, i64>(0);
    assert_eq!(rows, migrations.len() as i64, "each migration applied once");
    Ok(())
}

/// Without PostgreSQL's binaries the PostgreSQL tests fail with the install hint; they
/// never pass by skipping.
#[test]
fn missing_postgres_binaries_fail_with_the_install_hint() {
    let empty = tempfile::tempdir().expect("tempdir");
    for explicit in [None, Some(empty.path().join("bin"))] {
        let panicked = std::panic::catch_unwind(|| {
            support::postgres::find_bindir(explicit.clone(), empty.path())
        })
        .err()
        .and_then(|p| p.downcast_ref::<String>().cloned())
        .unwrap_or_default();
        assert!(
            panicked.contains("install Debian's postgresql (tests/run does)"),
            "{explicit:?}: {panicked}"
        );
    }
}

/// Commits are durable whatever the server's default: the store asks for
/// synchronous_commit on its own sessions.
#[test]
fn postgres_sessions_commit_synchronously() -> TestResult {
    let pg = TestPostgres::start();
    pg.admin()
        .batch_execute("ALTER DATABASE mcp SET synchronous_commit = off")?;
    let store = PostgresStore::open(&pg.url)?;
    assert_eq!(store.setting("synchronous_commit")?, "on");
    Ok(())
}

/// The newest migration a backend knows.
fn newest(migrations: &[(u32, &str, &str)]) -> u32 {
    migrations.last().map_or(0, |m| m.0)
}

fn operator(name: &str, role: Role, tenants: Tenants) -> Operator {
    Operator {
        name: name.into(),
        role,
        tenants,
        token_hash: token_hash(&format!("mcpo1_{name}")),
        created_at: Timestamp::now(),
        disabled: false,
    }
}

/// A console session is found by its hash until it expires or is deleted, never by
/// another hash, and expired sessions are purged.
pub fn console_sessions_expire_and_end(store: &dyn Store) -> TestResult {
    store.create_operator(&admin(), &operator("ann", Role::Admin, Tenants::All))?;
    let now = Timestamp::now();
    let hour = jiff::SignedDuration::from_hours(1);
    let (live, old) = (token_hash("mcps1_live"), token_hash("mcps1_old"));
    store.create_console_session(&live, "ann", "csrf-live", now, now + hour)?;
    store.create_console_session(&old, "ann", "csrf-old", now - hour - hour, now - hour)?;
    let found = store
        .console_session(&live, now)?
        .ok_or("the live session is found")?;
    assert_eq!(found.operator.name, "ann", "its operator");
    assert_eq!(found.operator.role, Role::Admin, "with the operator's role");
    assert_eq!(found.csrf_token, "csrf-live", "and its own CSRF token");
    assert!(
        store.console_session(&live, now + hour)?.is_none(),
        "not at its expiry"
    );
    assert!(store.console_session(&old, now)?.is_none(), "not after it");
    assert!(
        store
            .console_session(&token_hash("mcps1_guess"), now)?
            .is_none(),
        "not by another secret"
    );
    assert_eq!(
        store.purge_console_sessions(now)?,
        1,
        "the expired one goes"
    );
    assert!(store.delete_console_session(&live)?, "sign-out ends it");
    assert!(store.console_session(&live, now)?.is_none(), "gone");
    assert!(!store.delete_console_session(&live)?, "once");
    Ok(())
}

fn token(id: &str, site: &str) -> EnrollmentToken {
    EnrollmentToken {
        secret_hash: token_hash(&format!("mcpe1_{id}")),
        token_id: id.into(),
        site_id: site.into(),
        uses_left: 3,
        expires_at: Timestamp::now() + jiff::SignedDuration::from_hours(1),
        created_by: "t".into(),
        created_at: Timestamp::now(),
    }
}

/// Tokens are listed and revoked only within the caller's tenants; a revoked token
/// enrolls nobody; revoking twice says so.
pub fn enrollment_tokens_are_listed_and_revoked_within_tenants(store: &dyn Store) -> TestResult {
    store.put_site(&admin(), &site("s1", Some("acme")))?;
    store.put_site(&admin(), &site("s2", Some("other")))?;
    store.create_enrollment_token(&admin(), &token("t1", "s1"))?;
    store.create_enrollment_token(&admin(), &token("t2", "s2"))?;
    let acme = scoped(
        Tenants::Reseller {
            reseller_id: "acme".into(),
        },
        Role::ResellerOperator,
    );
    let listed: Vec<String> = store
        .enrollment_tokens(&acme)?
        .into_iter()
        .map(|t| t.token_id)
        .collect();
    assert_eq!(
        listed,
        vec!["t1".to_owned()],
        "acme sees its own token only"
    );
    assert_eq!(
        store.enrollment_tokens(&admin())?.len(),
        2,
        "an admin sees both"
    );
    assert!(
        store
            .enrollment_tokens(&Caller::host("s1", "h", None))?
            .is_empty(),
        "a host sees none"
    );
    assert!(
        matches!(
            store.revoke_enrollment_token(&acme, "t2", Timestamp::now()),
            Err(StoreError::NotFound(_))
        ),
        "another reseller's token is not found"
    );
    let auditor = scoped(
        Tenants::Sites {
            site_ids: vec!["s1".into()],
        },
        Role::Auditor,
    );
    assert!(
        matches!(
            store.revoke_enrollment_token(&auditor, "t1", Timestamp::now()),
            Err(StoreError::Forbidden(_))
        ),
        "an auditor changes nothing"
    );
    assert!(
        matches!(
            store.revoke_enrollment_token(&acme, "nope", Timestamp::now()),
            Err(StoreError::NotFound(_))
        ),
        "an unknown token"
    );
    assert!(
        store.revoke_enrollment_token(&acme, "t1", Timestamp::now())?,
        "revoked"
    );
    assert!(
        !store.revoke_enrollment_token(&acme, "t1", Timestamp::now())?,
        "already revoked"
    );
    let t1 = store
        .enrollment_tokens(&acme)?
        .into_iter()
        .next()
        .ok_or("t1 is still listed")?;
    assert!(t1.revoked_at.is_some(), "listed as revoked");
    assert!(
        matches!(
            store.enroll_host(&token_hash("mcpe1_t1"), Timestamp::now(), &host("s1", "a")),
            Err(StoreError::Token(_))
        ),
        "a revoked token enrolls nobody"
    );
    assert!(
        store.host(&admin(), "s1", "a")?.is_none(),
        "and no host was made"
    );
    store.enroll_host(&token_hash("mcpe1_t2"), Timestamp::now(), &host("s2", "b"))?;
    Ok(())
}

/// Only the operator itself or an admin sets a password; sign-in reads it back.
pub fn passwords_are_set_by_their_operator_or_an_admin(store: &dyn Store) -> TestResult {
    let sites = Tenants::Sites {
        site_ids: vec!["s1".into()],
    };
    store.create_operator(
        &admin(),
        &operator("ann", Role::SiteOperator, sites.clone()),
    )?;
    store.create_operator(
        &admin(),
        &operator("bob", Role::SiteOperator, sites.clone()),
    )?;
    let ann = Caller {
        actor: "operator:ann".into(),
        role: Role::SiteOperator,
        tenants: sites.clone(),
        peer: None,
    };
    assert!(store.operator_password("ann")?.is_none(), "no password yet");
    store.set_operator_password(&ann, "ann", "$argon2id$ann1", Timestamp::now())?;
    assert!(
        matches!(
            store.set_operator_password(&ann, "bob", "$argon2id$x", Timestamp::now()),
            Err(StoreError::Forbidden(_))
        ),
        "not someone else's"
    );
    assert!(
        store.operator_password("bob")?.is_none(),
        "bob's stays unset"
    );
    assert!(
        matches!(
            store.set_operator_password(&admin(), "nobody", "$argon2id$x", Timestamp::now()),
            Err(StoreError::NotFound(_))
        ),
        "an unknown operator"
    );
    store.set_operator_password(&admin(), "ann", "$argon2id$ann2", Timestamp::now())?;
    let (op, phc) = store
        .operator_password("ann")?
        .ok_or("ann has a password")?;
    assert_eq!(
        (op.name.as_str(), op.role, phc.as_str()),
        ("ann", Role::SiteOperator, "$argon2id$ann2"),
        "the newest password, with the operator's role"
    );
    Ok(())
}

/// The evidence listing and the counts reach the caller's tenants only, and the filter
/// and limit apply.
pub fn evidence_listing_and_counts_are_scoped_and_filtered(store: &dyn Store) -> TestResult {
    store.put_site(&admin(), &site("s1", Some("acme")))?;
    store.put_site(&admin(), &site("s2", Some("other")))?;
    store.add_host(&admin(), &host("s1", "h1"))?;
    store.add_host(&admin(), &host("s2", "h2"))?;
    let me = Caller::host("s1", "h1", None);
    let mut prev: Option<String> = None;
    for seq in 1..=4u64 {
        let hash = format!("a{seq}");
        let mut r = record("s1", "h1", seq, &hash, prev.as_deref());
        if seq % 2 == 0 {
            r.outcome = "alert".into();
            r.check = "firewall".into();
        }
        store.record_bundle(&me, &r, None, None)?;
        prev = Some(hash);
    }
    store.record_bundle(
        &Caller::host("s2", "h2", None),
        &record("s2", "h2", 1, "b1", None),
        None,
        None,
    )?;
    let acme = scoped(
        Tenants::Reseller {
            reseller_id: "acme".into(),
        },
        Role::ResellerOperator,
    );
    let all = BundleFilter {
        limit: 100,
        ..BundleFilter::default()
    };
    let seen = store.bundles(&acme, &all)?;
    assert_eq!(seen.len(), 4, "acme's four bundles");
    assert!(seen.iter().all(|b| b.site_id == "s1"), "none of other's");
    assert_eq!(
        store.bundles(&admin(), &all)?.len(),
        5,
        "an admin sees all five"
    );
    let other_site = BundleFilter {
        site_id: Some("s2".into()),
        ..all.clone()
    };
    assert!(
        store.bundles(&acme, &other_site)?.is_empty(),
        "a filter naming another reseller's site finds nothing"
    );
    let alerts = BundleFilter {
        check: Some("firewall".into()),
        outcome: Some("alert".into()),
        ..all.clone()
    };
    let seqs: Vec<u64> = store
        .bundles(&acme, &alerts)?
        .iter()
        .map(|b| b.seq)
        .collect();
    assert_eq!(seqs, vec![4, 2], "the alerts, newest first");
    let two = BundleFilter {
        limit: 2,
        ..all.clone()
    };
    assert_eq!(store.bundles(&admin(), &two)?.len(), 2, "the limit applies");
    let counts = store.bundle_counts(&acme)?;
    let total: u64 = counts.iter().map(|c| c.count).sum();
    assert_eq!(total, 4, "counts cover acme's bundles only: {counts:?}");
    assert!(
        counts.iter().any(|c| c.check == "firewall"
            && c.outcome == "alert"
            && c.count == 2
            && c.reseller_id.as_deref() == Some("acme")),
        "grouped by check and outcome: {counts:?}"
    );
    assert_eq!(
        store
            .bundle_counts(&admin())?
            .iter()
            .map(|c| c.count)
            .sum::<u64>(),
        5
    );
    Ok(())
}

// ---- the transparency log (store/tlog.rs) ----

mod log_cases {
    use std::collections::HashMap;

    use compliance_agent::crypto::SigningKey;
    use compliance_agent::tlog::{
        BundleLeaf, Checkpoint, Hash, LogSigner, LogVerifier, leaf_hash, node_hash,
    };
    use mcp_server::store::tlog::LeafLookup;

    use super::*;

    pub fn signer() -> (LogSigner, LogVerifier) {
        let s = LogSigner::new("test.example/log", SigningKey::generate()).expect("signer");
        let v = s.verifier();
        (s, v)
    }

    pub fn sign_with(s: &LogSigner) -> impl Fn(u64, &Hash) -> Result<String, String> + '_ {
        move |size, root| {
            s.sign(&Checkpoint {
                origin: "test.example/log".into(),
                size,
                root: *root,
                extensions: vec![],
            })
            .map_err(|e| e.to_string())
        }
    }

    /// A bundle record with a real SHA-256 hash (the leaf commits to it).
    pub fn bundle(site: &str, host: &str, seq: u64) -> BundleRecord {
        let hash = hex_sha256(&format!("{site}/{host}/{seq}"));
        let prev = (seq > 1).then(|| hex_sha256(&format!("{site}/{host}/{}", seq - 1)));
        BundleRecord {
            bundle_id: format!("{site}-{host}-{seq}"),
            ..record(site, host, seq, &hash, prev.as_deref())
        }
    }

    pub fn leaf_of(r: &BundleRecord) -> Hash {
        let mut sha = [0u8; 32];
        hex::decode_to_slice(&r.hash, &mut sha).expect("hex");
        BundleLeaf {
            site_id: r.site_id.clone(),
            host_id: r.host_id.clone(),
            seq: r.seq,
            bundle_id: r.bundle_id.clone(),
            bundle_sha256: sha,
        }
        .hash()
        .expect("leaf")
    }

    /// RFC 6962 2.1 MTH, written from the definition (memoised on ranges).
    pub fn mth(
        leaves: &[Hash],
        memo: &mut HashMap<(usize, usize), Hash>,
        a: usize,
        b: usize,
    ) -> Hash {
        if let Some(h) = memo.get(&(a, b)) {
            return *h;
        }
        let h = match b - a {
            0 => {
                use sha2::Digest as _;
                sha2::Sha256::digest([]).into()
            }
            1 => leaves[a],
            n => {
                let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
                let l = mth(leaves, memo, a, a + k);
                let r = mth(leaves, memo, a + k, b);
                node_hash(&l, &r)
            }
        };
        memo.insert((a, b), h);
        h
    }

    /// RFC 9162 2.1.3.1 PATH(m, D[a:b]).
    pub fn path(
        leaves: &[Hash],
        memo: &mut HashMap<(usize, usize), Hash>,
        m: usize,
        a: usize,
        b: usize,
    ) -> Vec<Hash> {
        let n = b - a;
        if n == 1 {
            return vec![];
        }
        let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
        if m < k {
            let mut p = path(leaves, memo, m, a, a + k);
            p.push(mth(leaves, memo, a + k, b));
            p
        } else {
            let mut p = path(leaves, memo, m - k, a + k, b);
            p.push(mth(leaves, memo, a, a + k));
            p
        }
    }

    /// RFC 9162 2.1.4.1 SUBPROOF(m, D[a:b], complete).
    pub fn subproof(
        leaves: &[Hash],
        memo: &mut HashMap<(usize, usize), Hash>,
        m: usize,
        a: usize,
        b: usize,
        complete: bool,
    ) -> Vec<Hash> {
        let n = b - a;
        if m == n {
            return if complete {
                vec![]
            } else {
                vec![mth(leaves, memo, a, b)]
            };
        }
        let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
        if m <= k {
            let mut p = subproof(leaves, memo, m, a, a + k, complete);
            p.push(mth(leaves, memo, a + k, b));
            p
        } else {
            let mut p = subproof(leaves, memo, m - k, a + k, b, false);
            p.push(mth(leaves, memo, a, a + k));
            p
        }
    }

    fn hosts(store: &dyn Store) -> TestResult {
        store.put_site(&admin(), &site("s1", Some("acme")))?;
        store.put_site(&admin(), &site("s2", Some("other")))?;
        for (s, h) in [("s1", "h1"), ("s1", "h2"), ("s2", "h3")] {
            store.add_host(&admin(), &host(s, h))?;
        }
        Ok(())
    }

    /// Invariant: every accepted bundle becomes exactly one leaf, in the order it was
    /// accepted, and each checkpoint is a signed head of exactly those leaves.
    pub fn every_bundle_becomes_one_leaf_in_order(store: &dyn Store) -> TestResult {
        hosts(store)?;
        let (s, v) = signer();
        let sign = sign_with(&s);
        assert!(store.log_latest()?.is_none(), "a new log has no checkpoint");
        assert!(
            store.log_sequence(10, Timestamp::now(), &sign)?.is_none(),
            "nothing to sequence"
        );
        let mut accepted = Vec::new();
        let mut checkpoints = Vec::new();
        for round in 0..5u64 {
            for (site_id, host_id) in [("s1", "h1"), ("s2", "h3"), ("s1", "h2")] {
                for i in 1..=3 {
                    let r = bundle(site_id, host_id, round * 3 + i);
                    store.record_bundle(&Caller::host(site_id, host_id, None), &r, None, None)?;
                    // A duplicate delivery is no second leaf.
                    store.record_bundle(&Caller::host(site_id, host_id, None), &r, None, None)?;
                    accepted.push(r);
                }
            }
            while let Some(c) = store.log_sequence(4, Timestamp::now(), &sign)? {
                checkpoints.push(c);
            }
            assert_eq!(store.log_queued()?, 0, "round {round}: nothing left queued");
        }
        let leaves: Vec<Hash> = accepted.iter().map(leaf_of).collect();
        assert_eq!(
            store.log_size()?,
            leaves.len() as u64,
            "one leaf per bundle"
        );
        let mut memo = HashMap::new();
        for c in &checkpoints {
            let note = v.verify(c.note.as_bytes())?;
            assert_eq!(
                (note.size, note.root),
                (c.tree_size, c.root),
                "the note says what the row says"
            );
            assert_eq!(
                c.root,
                mth(&leaves, &mut memo, 0, c.tree_size as usize),
                "checkpoint {} is the head of the accepted bundles in order",
                c.tree_size
            );
            assert_eq!(store.log_checkpoint(c.tree_size)?.as_ref(), Some(c));
        }
        assert_eq!(store.log_latest()?.as_ref(), checkpoints.last());
        assert_eq!(
            store.log_checkpoints(0, u64::MAX)?.len(),
            checkpoints.len(),
            "every checkpoint is kept"
        );
        for (i, r) in accepted.iter().enumerate() {
            match store.log_leaf(&admin(), &r.bundle_id)? {
                LeafLookup::Sequenced(l) => {
                    assert_eq!(l.leaf_index, i as u64, "{} is leaf {i}", r.bundle_id);
                    assert_eq!(l.leaf_hash, leaves[i], "with the leaf hash of its identity");
                    assert_eq!(l.bundle_leaf()?.hash()?, leaves[i]);
                }
                other => panic!("{} is in the log, got {other:?}", r.bundle_id),
            }
        }
        Ok(())
    }

    /// Invariant: a caller learns a leaf, or that one is pending, only for its own
    /// tenants' bundles; for anyone else the bundle does not exist.
    pub fn lookups_are_scoped_by_tenants(store: &dyn Store) -> TestResult {
        hosts(store)?;
        let (s, _) = signer();
        let sign = sign_with(&s);
        let mine = bundle("s1", "h1", 1);
        let theirs = bundle("s2", "h3", 1);
        store.record_bundle(&Caller::host("s1", "h1", None), &mine, None, None)?;
        store.record_bundle(&Caller::host("s2", "h3", None), &theirs, None, None)?;
        let me = Caller::host("s1", "h1", None);
        let neighbour = Caller::host("s1", "h2", None);
        let acme = scoped(
            Tenants::Reseller {
                reseller_id: "acme".into(),
            },
            Role::ResellerOperator,
        );
        assert_eq!(
            store.log_leaf(&me, &mine.bundle_id)?,
            LeafLookup::Pending,
            "accepted, not yet sequenced"
        );
        assert_eq!(
            store.log_leaf(&neighbour, &mine.bundle_id)?,
            LeafLookup::Unknown,
            "pending is not told to others"
        );
        store.log_sequence(100, Timestamp::now(), &sign)?;
        assert!(matches!(
            store.log_leaf(&me, &mine.bundle_id)?,
            LeafLookup::Sequenced(_)
        ));
        assert!(
            matches!(
                store.log_leaf(&acme, &mine.bundle_id)?,
                LeafLookup::Sequenced(_)
            ),
            "its reseller sees it"
        );
        for (who, caller) in [
            ("another host of the site", &neighbour),
            ("another reseller", &acme),
        ] {
            assert_eq!(
                store.log_leaf(caller, &theirs.bundle_id)?,
                LeafLookup::Unknown,
                "{who}: not its bundle"
            );
        }
        assert_eq!(store.log_leaf(&me, "no-such-bundle")?, LeafLookup::Unknown);
        assert_eq!(
            store.log_leaf(&neighbour, &mine.bundle_id)?,
            LeafLookup::Unknown,
            "a host sees only itself"
        );
        assert!(matches!(
            store.log_leaf_by_hash(&me, &leaf_of(&mine))?,
            LeafLookup::Sequenced(_)
        ));
        assert_eq!(
            store.log_leaf_by_hash(&me, &leaf_of(&theirs))?,
            LeafLookup::Unknown,
            "by hash too"
        );
        assert_eq!(store.log_host_leaves(&me, "s1", "h1")?.len(), 1);
        assert!(
            store.log_host_leaves(&acme, "s2", "h3")?.is_empty(),
            "another reseller's host's leaves"
        );
        let _ = leaf_hash(b"");
        Ok(())
    }

    /// Invariant: proofs served from the stored nodes equal the RFC's PATH and SUBPROOF
    /// for every tree size the log signed, and verify against its checkpoints.
    pub fn proofs_from_the_store_are_the_rfc_proofs(store: &dyn Store, n: u64) -> TestResult {
        store.put_site(&admin(), &site("s1", None))?;
        store.add_host(&admin(), &host("s1", "h1"))?;
        let (s, v) = signer();
        let sign = sign_with(&s);
        let me = Caller::host("s1", "h1", None);
        let mut leaves = Vec::new();
        let mut sizes = Vec::new();
        // Batches of 1, 2, 3, ... so the log signs many sizes, odd and even.
        let mut seq = 0;
        let mut batch = 1;
        while seq < n {
            for _ in 0..batch.min(n - seq) {
                seq += 1;
                let r = bundle("s1", "h1", seq);
                store.record_bundle(&me, &r, None, None)?;
                leaves.push(leaf_of(&r));
            }
            while let Some(c) = store.log_sequence(batch as usize, Timestamp::now(), &sign)? {
                sizes.push(c);
            }
            batch = batch % 7 + 1;
        }
        let (log, newest) = mcp_server::tlog::stored_log(store)?;
        assert_eq!(newest.tree_size, n);
        let mut memo = HashMap::new();
        let mut previous: Option<Checkpoint> = None;
        for c in &sizes {
            let size = c.tree_size;
            let cp = v.verify(c.note.as_bytes())?;
            assert_eq!(
                log.root(size)?,
                mth(&leaves, &mut memo, 0, size as usize),
                "root at {size}"
            );
            for index in [0, size / 2, size - 1] {
                let proof = log.inclusion_proof(index, size)?;
                assert_eq!(
                    proof.hashes,
                    path(&leaves, &mut memo, index as usize, 0, size as usize),
                    "PATH({index}, {size})"
                );
                proof.verify(&leaves[index as usize], &cp)?;
            }
            if let Some(old) = &previous {
                let proof = log.consistency_proof(old.size, size)?;
                assert_eq!(
                    proof.hashes,
                    subproof(
                        &leaves,
                        &mut memo,
                        old.size as usize,
                        0,
                        size as usize,
                        true
                    ),
                    "SUBPROOF({}, {size})",
                    old.size
                );
                proof.verify(old, &cp)?;
            }
            previous = Some(cp);
        }
        Ok(())
    }

    /// Invariant: sequencers racing in several processes (stores) on one database, while
    /// bundles keep arriving, build one log: every bundle exactly once, contiguous
    /// indices, and every checkpoint a head of the final tree.
    pub fn racing_sequencers_build_one_log(stores: Vec<Box<dyn Store>>) -> TestResult {
        let first = &stores[0];
        hosts(&**first)?;
        let (s, v) = signer();
        let total = 120u64;
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| -> TestResult {
            let writer = scope.spawn(|| -> Result<(), StoreError> {
                for seq in 1..=total {
                    let r = bundle("s1", "h1", seq);
                    first.record_bundle(&Caller::host("s1", "h1", None), &r, None, None)?;
                }
                done.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            });
            let sequencers: Vec<_> = stores
                .iter()
                .flat_map(|st| [st, st])
                .map(|st| {
                    let (s, done) = (&s, &done);
                    scope.spawn(move || -> Result<(), StoreError> {
                        let sign = sign_with(s);
                        loop {
                            let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                            while st.log_sequence(7, Timestamp::now(), &sign)?.is_some() {}
                            if finished {
                                return Ok(());
                            }
                        }
                    })
                })
                .collect();
            writer.join().map_err(|_| "writer panicked")??;
            for h in sequencers {
                h.join().map_err(|_| "sequencer panicked")??;
            }
            Ok(())
        })?;
        let sign = sign_with(&s);
        while first.log_sequence(100, Timestamp::now(), &sign)?.is_some() {}
        assert_eq!(first.log_size()?, total, "every bundle once");
        let leaves = first.log_host_leaves(&admin(), "s1", "h1")?;
        let mut indices: Vec<u64> = leaves.iter().map(|l| l.leaf_index).collect();
        indices.sort_unstable();
        assert_eq!(
            indices,
            (0..total).collect::<Vec<_>>(),
            "contiguous, no index twice"
        );
        let mut by_index = leaves.clone();
        by_index.sort_by_key(|l| l.leaf_index);
        let hashes: Vec<Hash> = by_index.iter().map(|l| l.leaf_hash).collect();
        let mut memo = HashMap::new();
        for c in first.log_checkpoints(0, u64::MAX)? {
            v.verify(c.note.as_bytes())?;
            assert_eq!(
                c.root,
                mth(&hashes, &mut memo, 0, c.tree_size as usize),
                "checkpoint {} is a head of the one log",
                c.tree_size
            );
        }
        Ok(())
    }
}

macro_rules! log_conformance {
    ($backend:ident, $make:expr, $proof_leaves:expr) => {
        mod $backend {
            use super::*;
            #[test]
            fn every_bundle_becomes_one_leaf_in_order() -> TestResult {
                let (_guard, store) = $make;
                log_cases::every_bundle_becomes_one_leaf_in_order(&*store)
            }
            #[test]
            fn lookups_are_scoped_by_tenants() -> TestResult {
                let (_guard, store) = $make;
                log_cases::lookups_are_scoped_by_tenants(&*store)
            }
            #[test]
            fn proofs_from_the_store_are_the_rfc_proofs() -> TestResult {
                let (_guard, store) = $make;
                log_cases::proofs_from_the_store_are_the_rfc_proofs(&*store, $proof_leaves)
            }
        }
    };
}

log_conformance!(sqlite_log, sqlite(), 600);
log_conformance!(postgres_log, postgres(), 300);

#[test]
fn sqlite_racing_sequencers_build_one_log() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("mcp.db");
    let stores: Vec<Box<dyn Store>> = vec![
        Box::new(SqliteStore::open(&path)?),
        Box::new(SqliteStore::open(&path)?),
    ];
    log_cases::racing_sequencers_build_one_log(stores)
}

#[test]
fn postgres_racing_sequencers_build_one_log() -> TestResult {
    let pg = TestPostgres::start();
    let stores: Vec<Box<dyn Store>> = vec![
        Box::new(PostgresStore::open(&pg.url)?),
        Box::new(PostgresStore::open(&pg.url)?),
    ];
    log_cases::racing_sequencers_build_one_log(stores)
}

/// An insider editing the log's tables by hand is stopped by the database itself.
#[test]
fn sqlite_log_rows_cannot_be_changed_even_by_sql() -> TestResult {
    let (dir, store) = sqlite();
    store.put_site(&admin(), &site("s1", None))?;
    store.add_host(&admin(), &host("s1", "h1"))?;
    store.record_bundle(
        &Caller::host("s1", "h1", None),
        &log_cases::bundle("s1", "h1", 1),
        None,
        None,
    )?;
    let (s, _) = log_cases::signer();
    store.log_sequence(10, Timestamp::now(), &log_cases::sign_with(&s))?;
    drop(store);
    let conn = rusqlite::Connection::open(dir.path().join("mcp.db"))?;
    for sql in [
        "UPDATE tlog_leaves SET bundle_sha256 = 'x'",
        "DELETE FROM tlog_leaves",
        "UPDATE tlog_nodes SET hash = x'00'",
        "DELETE FROM tlog_nodes",
        "DELETE FROM tlog_checkpoints",
    ] {
        let err = conn
            .execute(sql, [])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("append-only"), "{sql} refused: {err}");
    }
    Ok(())
}

#[test]
fn postgres_log_rows_cannot_be_changed_even_by_sql() -> TestResult {
    let (pg, store) = postgres();
    store.put_site(&admin(), &site("s1", None))?;
    store.add_host(&admin(), &host("s1", "h1"))?;
    store.record_bundle(
        &Caller::host("s1", "h1", None),
        &log_cases::bundle("s1", "h1", 1),
        None,
        None,
    )?;
    let (s, _) = log_cases::signer();
    store.log_sequence(10, Timestamp::now(), &log_cases::sign_with(&s))?;
    let mut sql_client = pg.admin();
    for sql in [
        "UPDATE tlog_leaves SET bundle_sha256 = 'x'",
        "DELETE FROM tlog_nodes",
        "TRUNCATE tlog_checkpoints",
    ] {
        let err = sql_client
            .batch_execute(sql)
            .err()
            .and_then(|e| e.as_db_error().map(|d| d.message().to_owned()))
            .unwrap_or_default();
        assert!(err.contains("append-only"), "{sql} refused: {err}");
    }
    Ok(())
}

/// A burst of more concurrent requests than PostgreSQL accepts connections (its
/// default `max_connections` is 100) is served, not refused: the store holds at most
/// `MAX_OPEN` connections and the rest wait for one, so every delivery is stored.
#[test]
fn postgres_burst_beyond_max_connections_waits_instead_of_failing() -> TestResult {
    const CALLERS: usize = 400;
    let pg = TestPostgres::start();
    let store = PostgresStore::open(&pg.url)?;
    store.put_site(&admin(), &site("s1", None))?;
    for i in 0..CALLERS {
        store.add_host(&admin(), &host("s1", &format!("h{i}")))?;
    }
    let writers = (0..CALLERS)
        .map(|i| {
            let store = &store;
            Box::new(move || {
                let h = format!("h{i}");
                let me = Caller::host("s1", &h, None);
                let mut prev: Option<String> = None;
                for seq in 1..=3u64 {
                    let hash = format!("{h}-{seq}");
                    store.record_bundle(
                        &me,
                        &record("s1", &h, seq, &hash, prev.as_deref()),
                        None,
                        None,
                    )?;
                    prev = Some(hash);
                }
                Ok::<_, StoreError>(())
            }) as Box<dyn FnOnce() -> _ + Send>
        })
        .collect();
    let results: Vec<Result<(), StoreError>> = race(writers);
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert!(failed.is_empty(), "every caller is served: {failed:?}");
    let peak: i64 = pg
        .admin()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'mcp'",
            &[],
        )?
        .get(0);
    assert!(
        peak as usize <= mcp_server::store::postgres::MAX_OPEN + 1,
        "the store keeps within its cap: {peak} connections"
    );
    Ok(())
}
