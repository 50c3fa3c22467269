//! The S3 archive with Object Lock, against moto's S3 server (tests/support/moto.rs):
//! COMPLIANCE retention of received + archive_retention_days, versions that cannot be
//! deleted or replaced, a start-up refusal of buckets that are not WORM, and no
//! acknowledgement while the archive is down.

mod common;
mod support;

use aws_sdk_s3::types::ObjectLockMode;
use common::*;
use compliance_agent::queue::{Failure, Queue, RetryPolicy, UploadState};
use jiff::{SignedDuration, Timestamp};
use mcp_server::Services;
use mcp_server::archive::s3::S3Archive;
use mcp_server::archive::{Archive, ArchiveError, ArchiveKey};
use mcp_server::auth::Caller;
use mcp_server::config::{Config, S3Settings};
use support::moto::{ACCESS_KEY, Moto, SECRET_KEY};

/// Settings whose secret key is in a file (as LoadCredential gives it).
fn with_secret(moto: &Moto, bucket: &str, dir: &std::path::Path) -> S3Settings {
    let file = dir.join("s3-secret");
    std::fs::write(&file, format!("{SECRET_KEY}\n")).expect("secret file");
    S3Settings {
        secret_access_key_file: Some(file),
        ..moto.settings(bucket)
    }
}

fn s3_server(moto: &Moto, bucket: &str) -> (tempfile::TempDir, TestServer) {
    let secrets = tempfile::tempdir().expect("tempdir");
    let settings = with_secret(moto, bucket, secrets.path());
    let server = TestServer::start_with(|c| c.archive_s3 = Some(settings));
    (secrets, server)
}

fn bundle_id(json: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(json).expect("bundle json")["bundle_id"]
        .as_str()
        .expect("bundle_id")
        .to_owned()
}

/// Versions of one key, oldest last.
fn versions(moto: &Moto, bucket: &str, key: &str) -> Vec<String> {
    moto.block_on(async {
        moto.client
            .list_object_versions()
            .bucket(bucket)
            .prefix(key)
            .send()
            .await
            .expect("list versions")
            .versions()
            .iter()
            .filter(|v| v.key() == Some(key))
            .filter_map(|v| v.version_id().map(str::to_owned))
            .collect()
    })
}

fn read_version(moto: &Moto, bucket: &str, key: &str, version: &str) -> Vec<u8> {
    moto.block_on(async {
        moto.client
            .get_object()
            .bucket(bucket)
            .key(key)
            .version_id(version)
            .send()
            .await
            .expect("get version")
            .body
            .collect()
            .await
            .expect("body")
            .into_bytes()
            .to_vec()
    })
}

/// An accepted bundle is archived under reseller/site/host/seq in COMPLIANCE mode until
/// received + archive_retention_days, and a DELETE of that version is refused by the
/// store itself before then.
#[test]
fn accepted_bundles_are_compliance_locked_for_the_retention_period() -> TestResult {
    let moto = Moto::start();
    moto.bucket("evidence", true, true);
    let (_secrets, server) = s3_server(&moto, "evidence");
    assert_eq!(server.svc().archive.kind(), "s3");
    let b = server.enroll("clinic-1", "frontdesk-01");
    let (json, sig) = b.bundles(1).remove(0);
    let (status, body) = upload(
        &b.client(&server),
        &format!("{}/api/v1/evidence", server.url()),
        &json,
        &sig,
    );
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("stored")),
        "{body}"
    );

    let id = bundle_id(&json);
    let record = server
        .svc()
        .store
        .bundle(&Caller::local("test"), &id)?
        .ok_or("the bundle is in the index")?;
    let key = format!("acme/clinic-1/frontdesk-01/{:020}-{id}", 1);
    assert_eq!(
        record.archive_key, key,
        "the key names reseller/site/host/seq"
    );
    let expected = record.received_at.as_second() + 2190 * 86_400;
    for (file, bytes) in [("bundle.json", &json), ("bundle.sig", &sig)] {
        let object = format!("{key}/{file}");
        let v = versions(&moto, "evidence", &object);
        assert_eq!(v.len(), 1, "{file}: one version");
        // The version's lock as the store reports it (x-amz-object-lock-* on HEAD; moto's
        // GetObjectRetention route does not answer the Rust SDK's request form).
        let head = moto.block_on(async {
            moto.client
                .head_object()
                .bucket("evidence")
                .key(&object)
                .version_id(&v[0])
                .send()
                .await
        })?;
        assert_eq!(
            head.object_lock_mode(),
            Some(&ObjectLockMode::Compliance),
            "{file}: COMPLIANCE mode"
        );
        assert_eq!(
            head.object_lock_retain_until_date().map(|d| d.secs()),
            Some(expected),
            "{file}: retained until received + 2190 days"
        );
        let deleted = moto.block_on(async {
            moto.client
                .delete_object()
                .bucket("evidence")
                .key(&object)
                .version_id(&v[0])
                .send()
                .await
        });
        assert!(
            deleted.is_err(),
            "{file}: deleting the locked version is refused by the store"
        );
        assert_eq!(
            &read_version(&moto, "evidence", &object, &v[0]),
            bytes,
            "{file}: the version is intact"
        );
    }
    Ok(())
}

/// A second upload under an archived key does not replace the archived version: the
/// same bytes are the same bundle again (idempotent), other bytes are refused, and
/// the bucket still holds one version with the first bytes.
#[test]
fn a_second_upload_does_not_replace_the_archived_version() -> TestResult {
    let moto = Moto::start();
    moto.bucket("evidence", true, true);
    let archive = S3Archive::new(&moto.settings("evidence"), ACCESS_KEY, SECRET_KEY)?;
    archive.check()?;
    let key = ArchiveKey {
        reseller_id: None,
        site_id: "clinic-1".into(),
        host_id: "h1".into(),
        seq: 7,
        bundle_id: "b7".into(),
    };
    let until = Timestamp::now() + SignedDuration::from_hours(24);
    archive.put(&key, b"{\"first\":1}", b"sig-1", until)?;
    archive.put(&key, b"{\"first\":1}", b"sig-1", until)?;
    let other = archive.put(&key, b"{\"second\":2}", b"sig-2", until);
    assert!(
        matches!(other, Err(ArchiveError::Conflict { .. })),
        "other bytes under the key are refused: {other:?}"
    );
    let object = archive.object_key(&key, "bundle.json");
    assert_eq!(
        object,
        format!("_direct/clinic-1/h1/{:020}-b7/bundle.json", 7)
    );
    let v = versions(&moto, "evidence", &object);
    assert_eq!(v.len(), 1, "no second version was written: {v:?}");
    let stored = archive.get(&key)?.ok_or("archived")?;
    assert_eq!(
        (stored.json.as_slice(), stored.sig.as_slice()),
        (&b"{\"first\":1}"[..], &b"sig-1"[..]),
        "the first bytes stay"
    );
    assert_eq!(stored.retain_until.as_second(), until.as_second());

    // The store itself refuses a conditional create of an existing key.
    let raced = moto.block_on(async {
        moto.client
            .put_object()
            .bucket("evidence")
            .key(&object)
            .body(b"raced".to_vec().into())
            .if_none_match("*")
            .send()
            .await
    });
    assert!(
        raced.is_err(),
        "If-None-Match: * on an existing key is refused"
    );
    // Even a writer that goes around the archive (a plain PUT, making a new version)
    // cannot remove the archived version: it is still there, byte for byte.
    let _ = moto.block_on(async {
        moto.client
            .put_object()
            .bucket("evidence")
            .key(&object)
            .body(b"forged".to_vec().into())
            .send()
            .await
    });
    assert_eq!(
        read_version(&moto, "evidence", &object, &v[0]),
        b"{\"first\":1}"
    );
    Ok(())
}

fn open_with(moto: &Moto, bucket: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config {
        archive_s3: Some(with_secret(moto, bucket, dir.path())),
        ..test_config(dir.path())
    };
    Services::open(config)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
}

/// The server refuses to start on a bucket that would not keep evidence WORM, and says why.
#[test]
fn a_bucket_without_versioning_or_object_lock_refuses_start() {
    let moto = Moto::start();
    moto.bucket("plain", false, false);
    moto.bucket("versioned", false, true);
    let err = open_with(&moto, "plain");
    assert!(
        err.contains("plain") && err.contains("versioning"),
        "no versioning: {err}"
    );
    let err = open_with(&moto, "versioned");
    assert!(
        err.contains("versioned") && err.contains("Object Lock"),
        "no Object Lock: {err}"
    );
    let err = open_with(&moto, "absent");
    assert!(err.contains("does not exist"), "no bucket: {err}");
    moto.bucket("locked", true, true);
    assert_eq!(
        open_with(&moto, "locked"),
        "",
        "a locked bucket is accepted"
    );
}

/// With the archive down the intake answers an error (503) and acknowledges nothing:
/// the bundle is not in the index and the agent's own delivery keeps it queued.
#[test]
fn archive_down_acknowledges_nothing_and_the_agent_keeps_the_bundle() -> TestResult {
    let mut moto = Moto::start();
    moto.bucket("evidence", true, true);
    let (_secrets, server) = s3_server(&moto, "evidence");
    let b = server.enroll("clinic-1", "frontdesk-01");
    let client = compliance_agent::mcp::McpClient::new(compliance_agent::mcp::ChannelSettings {
        url: server.url(),
        ca_pem: server.ca_pem().into_bytes(),
        client_identity: Some((
            b.cert_pem.clone().ok_or("enrolled")?.into_bytes(),
            b.tls_key_pem.clone().into_bytes(),
        )),
        api_key: None,
        site_id: b.site.clone(),
        host_id: b.host.clone(),
        timeout: std::time::Duration::from_secs(30),
    })?;
    let queue_dir = tempfile::tempdir()?;
    let mut queue = Queue::open(&queue_dir.path().join("queue.db"), RetryPolicy::default())?;
    let evidence = b.dir.path().join("evidence");
    let now = || Timestamp::now().as_second();

    b.bundles(1);
    queue.reconcile(&evidence, now())?;
    let report = compliance_agent::mcp::deliver(
        &client,
        &mut queue,
        compliance_agent::mcp::Selection::AllPending,
    )?;
    assert_eq!(
        report.delivered, 1,
        "delivered while the archive is up: {report:?}"
    );

    moto.stop();
    let (json, sig) = b.bundles(1).remove(0);
    let id = bundle_id(&json);
    let (status, body) = upload(
        &b.client(&server),
        &format!("{}/api/v1/evidence", server.url()),
        &json,
        &sig,
    );
    assert_eq!(status, 503, "archive down: {body}");
    assert!(
        body.to_string().contains("archive"),
        "the answer names the archive: {body}"
    );
    queue.reconcile(&evidence, now())?;
    let report = compliance_agent::mcp::deliver(
        &client,
        &mut queue,
        compliance_agent::mcp::Selection::AllPending,
    )?;
    assert_eq!(report.delivered, 0, "{report:?}");
    assert!(
        report.stopped.is_some(),
        "delivery stops, as for an unreachable MCP: {report:?}"
    );
    assert_eq!(
        queue.state_of(&id)?,
        Some(UploadState::Pending),
        "the bundle stays queued"
    );
    let err = client
        .upload(&evidence_dir_of(&evidence, &id)?, None)
        .err()
        .ok_or("refused")?;
    assert_eq!(
        err.failure(),
        Failure::Unreachable,
        "retried, not parked: {err}"
    );
    assert!(
        server
            .svc()
            .store
            .bundle(&Caller::local("test"), &id)?
            .is_none(),
        "nothing of it is in the index"
    );
    assert_eq!(
        server
            .svc()
            .store
            .seqs(&Caller::local("test"), "clinic-1", "frontdesk-01")?,
        vec![1]
    );
    Ok(())
}

/// The directory the agent stored bundle `id` in.
fn evidence_dir_of(
    evidence: &std::path::Path,
    id: &str,
) -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    for entry in walk(evidence)? {
        if entry.join("bundle.json").is_file()
            && std::fs::read(entry.join("bundle.json")).is_ok_and(|j| bundle_id(&j) == id)
        {
            return Ok(entry);
        }
    }
    Err(format!("bundle {id} not under {}", evidence.display()).into())
}

fn walk(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.push(p.clone());
            out.extend(walk(&p)?);
        }
    }
    Ok(out)
}
