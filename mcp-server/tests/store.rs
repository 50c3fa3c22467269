//! The store conformance suite: each case takes a fresh store of one backend. A new
//! backend runs the same cases by adding one `conformance!` line. PostgreSQL cases
//! start a throwaway cluster (tests/support/postgres.rs) and fail if its binaries are
//! missing.

mod support;

use compliance_agent::evidence::chain::ChainProblem;
use jiff::Timestamp;
use mcp_server::auth::{Caller, Role, Tenants, token_hash};
use mcp_server::store::postgres::PostgresStore;
use mcp_server::store::sqlite::SqliteStore;
use mcp_server::store::{
    AuditEntry, BundleRecord, EnrollmentToken, Host, Operator, Recorded, Site, Store, StoreError,
};
use support::postgres::TestPostgres;

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
    assert_eq!(store.schema_version()?, latest_sqlite_migration());
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
    assert_eq!(store.schema_version()?, latest_postgres_migration());
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
        latest_postgres_migration()
    );
    Ok(())
}

fn latest_sqlite_migration() -> u32 {
    mcp_server::store::sqlite::MIGRATIONS
        .last()
        .map_or(0, |m| m.0)
}

fn latest_postgres_migration() -> u32 {
    mcp_server::store::postgres::MIGRATIONS
        .last()
        .map_or(0, |m| m.0)
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
    for (i, r) in opened.into_iter().enumerate() {
        assert_eq!(
            r??,
            latest_postgres_migration(),
            "process {i} opened a migrated database"
        );
    }
    let rows = pg
        .admin()
        .query_one("SELECT count(*) FROM schema_migrations", &[])?
        .get::<_, i64>(0);
    assert_eq!(
        rows as usize,
        mcp_server::store::postgres::MIGRATIONS.len(),
        "each migration applied once"
    );
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
