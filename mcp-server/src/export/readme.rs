//! The README an export carries: what is in it and the commands that check it, each in
//! a `sh` block that runs from the export directory and exits non-zero on any failure.

use compliance_agent::audit_export::{
    BUNDLES_DIR, CHECKPOINT_FILE, EXPORT_KEY_FILE, ExportInfo, HOST_KEY_FILE, HOST_REPORT_FILE,
    HOSTS_DIR, INCLUSION_FILE, LOG_KEY_FILE, MANIFEST_FILE, MANIFEST_SIG_FILE, OSCAL_FILE,
};

pub fn text(info: &ExportInfo, export_key_fingerprint: &str, log_vkey: &str) -> String {
    format!(
        r#"# Evidence of site {site}, {from} to {to}

Exported by {by} at {created} from the MSP's central server. OSCAL {oscal} assessment
results are in `{OSCAL_FILE}`; the evidence behind them is here, and none of it has to be
taken on the MSP's word: each bundle is signed on the box that wrote it, every bundle is
proven in the MSP's transparency log, and the files are listed in a signed manifest.

What is here:
- `{HOSTS_DIR}/HOST/{BUNDLES_DIR}/SEQ-ID/bundle.json` and `bundle.sig`: every evidence bundle
  of the site's hosts whose end time is in the period, and one bundle on each side of
  it where there is one, so that the chain shows where the period starts and ends;
  `{INCLUSION_FILE}` beside each is its inclusion proof in the log.
- `{HOSTS_DIR}/HOST/{HOST_KEY_FILE}`: the host's evidence key as enrolled;
  `{HOSTS_DIR}/HOST/{HOST_REPORT_FILE}`: the server's report of the host's chain (gaps,
  what the box pruned from its own store, outcomes per check).
- `{CHECKPOINT_FILE}`: the log's signed checkpoint (tree size {size}) the proofs refer to;
  `{LOG_KEY_FILE}`: the log's key.
- `{MANIFEST_FILE}`: the SHA-256 of every other file, signed (`{MANIFEST_SIG_FILE}`) by the
  server's export key `{EXPORT_KEY_FILE}` ({export_key_fingerprint}).

## The keys to trust

Take the keys from somewhere the MSP does not control alone:
- the log key is `{log_vkey}`; every enrolled box holds it as `log.vkey` beside its
  order key. Copy it from one of the site's boxes and pass it below as `LOG_KEY`.
- each host's key fingerprint is in `{HOSTS_DIR}/HOST/{HOST_REPORT_FILE}`; on the box,
  `compliance-agent evidence verify` prints the fingerprint of the key it signs with.

## 1. The manifest and every file (OpenSSL and coreutils)

```sh
openssl pkeyutl -verify -pubin -inkey {EXPORT_KEY_FILE} -rawin -in {MANIFEST_FILE} -sigfile {MANIFEST_SIG_FILE}
sha256sum --strict --quiet --check {MANIFEST_FILE}
```

## 2. Every bundle's signature by its host's key (OpenSSL)

```sh
for b in {HOSTS_DIR}/*/{BUNDLES_DIR}/*/; do
  h="${{b%%/{BUNDLES_DIR}/*}}"
  openssl pkeyutl -verify -pubin -inkey "$h/{HOST_KEY_FILE}" -rawin -in "$b/bundle.json" -sigfile "$b/bundle.sig" >/dev/null \
    || {{ echo "BAD SIGNATURE: $b"; exit 1; }}
done
echo "every bundle signature verifies"
```

## 3. Chains, log proofs and the OSCAL references (compliance-agent)

`compliance-agent` is the box's own program, built from the same source as the boxes'.
This checks everything above again, and also: each host's bundles form one unbroken hash
chain across the period; every bundle has an inclusion proof in the checkpoint, which
verifies with the log key; and every bundle of the period has its observation in the
OSCAL document, with the bundle's SHA-256. It exits 0 only if nothing is wrong and names
each problem otherwise.

```sh
compliance-agent export verify . --log-key "${{LOG_KEY:-{LOG_KEY_FILE}}}"
```

What the export cannot show by itself: that a host's newest bundles are the newest the
box wrote (the report names the newest seq the server holds). Compare it with the box:
`compliance-agent evidence stats` there shows its chain length.
"#,
        site = info.site_id,
        from = info.from,
        to = info.to,
        by = info.created_by,
        created = info.created_at,
        oscal = info.oscal_version,
        size = info.tree_size,
    )
}
