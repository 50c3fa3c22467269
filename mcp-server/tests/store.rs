//! The store conformance suite: each case takes a fresh store of one backend. A new
//! backend runs the same cases by adding one `conformance!` line.

use compliance_agent::evidence::chain::ChainProblem;
use jiff::Timestamp;
use mcp_server::auth::{Caller, Role, Tenants, token_hash};
use mcp_server::store::sqlite::SqliteStore;
use mcp_server::store::{
    AuditEntry, BundleRecord, EnrollmentToken, Host, Operator, Recorded, Site, Store, StoreError,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

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

macro_rules! conformance {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;
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
            fn audit_is_append_only_and_operators_authenticate() -> TestResult {
                let (_guard, store) = $make;
                super::audit_is_append_only_and_operators_authenticate(&*store)
            }
        }
    };
}

fn sqlite() -> (tempfile::TempDir, Box<dyn Store>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("mcp.db")).expect("open sqlite");
    (dir, Box::new(store))
}

conformance!(sqlite_backend, sqlite());

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
    assert_eq!(store.schema_version()?, 1);
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
