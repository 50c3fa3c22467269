//! Signed checkpoints: the C2SP tlog-checkpoint note text signed as a C2SP signed note with an Ed25519 log key.
//!
//! ```text
//! <origin>
//! <tree size>
//! <base64 root hash>
//!
//! — <key name> base64(key ID || Ed25519 signature over the three lines)
//! ```
//!
//! The key ID is SHA-256(key name || 0x0A || 0x01 || public key)[:4]. A verifier
//! knows one log key (name and public key, e.g. from its `vkey` string
//! `<name>+<key ID hex>+base64(0x01 || public key)`), ignores signatures by
//! other keys as the spec requires, and refuses the whole note when the log
//! key's own signature does not verify.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

use super::Hash;
use crate::crypto::{SigningKey, VerifyingKey};

/// Signature type byte of Ed25519 in C2SP signed-note.
const ED25519_TYPE: u8 = 0x01;
/// Largest note accepted: a checkpoint is ~100 bytes, 16 signatures ~2 kB.
pub const MAX_NOTE_BYTES: usize = 64 * 1024;
/// Most signature lines accepted (the spec asks for at least 16).
pub const MAX_SIGNATURES: usize = 64;
/// Em dash and space, which start every signature line.
const SIG_PREFIX: &str = "\u{2014} ";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("malformed checkpoint: {0}")]
    Malformed(String),
    #[error("invalid log key name {name:?}: {reason}")]
    BadKeyName { name: String, reason: &'static str },
    #[error("invalid verifier key: {0}")]
    BadVerifierKey(String),
    #[error(
        "the checkpoint is not signed by the log key {name} ({key_id}); it carries signatures by: {found}"
    )]
    OtherKey {
        name: String,
        key_id: String,
        found: String,
    },
    #[error(
        "the signature by the log key {name} ({key_id}) does not verify: the checkpoint was altered or forged"
    )]
    BadSignature { name: String, key_id: String },
    #[error("the checkpoint is of log {found:?}, not of {expected:?}")]
    WrongOrigin { expected: String, found: String },
    #[error("the checkpoint's tree size {size} is beyond the log, which has {log_size} leaves")]
    SizeBeyondLog { size: u64, log_size: u64 },
    #[error("the checkpoint's root hash is not the log's root at size {size}")]
    RootMismatch { size: u64 },
    #[error("cannot read the log: {0}")]
    Log(String),
}

fn malformed(msg: impl Into<String>) -> CheckpointError {
    CheckpointError::Malformed(msg.into())
}

/// A tree head: what a checkpoint says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's identity, e.g. `msp.example/compliance-log`.
    pub origin: String,
    pub size: u64,
    pub root: Hash,
    /// Optional extension lines (opaque; our log writes none).
    pub extensions: Vec<String>,
}

impl Checkpoint {
    /// The note text: origin, size, base64 root, extensions, each ending in a newline.
    pub fn body(&self) -> Result<String, CheckpointError> {
        check_origin(&self.origin)?;
        let mut text = format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            STANDARD.encode(self.root)
        );
        for ext in &self.extensions {
            if ext.is_empty() || ext.chars().any(char::is_control) {
                return Err(malformed(
                    "an extension line is empty or holds a control character",
                ));
            }
            text.push_str(ext);
            text.push('\n');
        }
        Ok(text)
    }

    /// Parses note text (without signatures).
    pub fn parse_body(text: &str) -> Result<Self, CheckpointError> {
        let body = text
            .strip_suffix('\n')
            .ok_or_else(|| malformed("the note text does not end with a newline"))?;
        let mut lines = body.split('\n');
        let origin = lines.next().unwrap_or_default();
        check_origin(origin)?;
        let size = lines.next().ok_or_else(|| malformed("no tree size line"))?;
        if size.is_empty()
            || !size.bytes().all(|b| b.is_ascii_digit())
            || (size.len() > 1 && size.starts_with('0'))
        {
            return Err(malformed(format!(
                "tree size {size:?} is not a decimal number without leading zeros"
            )));
        }
        let size: u64 = size
            .parse()
            .map_err(|_| malformed(format!("tree size {size:?} does not fit 64 bits")))?;
        let root = lines.next().ok_or_else(|| malformed("no root hash line"))?;
        let root_bytes = STANDARD
            .decode(root)
            .map_err(|e| malformed(format!("root hash {root:?} is not base64: {e}")))?;
        let root: Hash = root_bytes.as_slice().try_into().map_err(|_| {
            malformed(format!(
                "root hash is {} bytes, not 32 (SHA-256)",
                root_bytes.len()
            ))
        })?;
        let extensions: Vec<String> = lines.map(str::to_owned).collect();
        if extensions.iter().any(String::is_empty) {
            return Err(malformed("an extension line is empty"));
        }
        Ok(Self {
            origin: origin.to_owned(),
            size,
            root,
            extensions,
        })
    }
}

fn check_origin(origin: &str) -> Result<(), CheckpointError> {
    if origin.is_empty() {
        return Err(malformed("the origin line is empty"));
    }
    if origin.chars().any(char::is_control) {
        return Err(malformed("the origin line holds a control character"));
    }
    Ok(())
}

fn check_key_name(name: &str) -> Result<(), CheckpointError> {
    let bad = |reason| {
        Err(CheckpointError::BadKeyName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("it holds a space or control character");
    }
    if name.contains('+') {
        return bad("it holds '+'");
    }
    Ok(())
}

/// The C2SP key ID of an Ed25519 key: SHA-256(name || 0x0A || 0x01 || key)[:4].
fn key_id(name: &str, key: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', ED25519_TYPE]);
    h.update(key.to_bytes());
    let digest = h.finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

/// The log's signing side: key name (by convention the origin) and Ed25519 key.
pub struct LogSigner {
    name: String,
    key: SigningKey,
    id: [u8; 4],
}

impl LogSigner {
    pub fn new(name: &str, key: SigningKey) -> Result<Self, CheckpointError> {
        check_key_name(name)?;
        let id = key_id(name, &key.verifying_key());
        Ok(Self {
            name: name.to_owned(),
            key,
            id,
        })
    }

    pub fn verifier(&self) -> LogVerifier {
        LogVerifier {
            name: self.name.clone(),
            origin: self.name.clone(),
            key: self.key.verifying_key(),
            id: self.id,
        }
    }

    /// The signed note of `checkpoint`.
    pub fn sign(&self, checkpoint: &Checkpoint) -> Result<String, CheckpointError> {
        self.sign_note(&checkpoint.body()?)
    }

    /// Signs any note text (non-empty, ending in a newline, no control characters but newline).
    pub fn sign_note(&self, text: &str) -> Result<String, CheckpointError> {
        if !text.ends_with('\n') || text.chars().any(|c| c.is_ascii_control() && c != '\n') {
            return Err(malformed(
                "note text must end with a newline and hold no other control characters",
            ));
        }
        let sig = self.key.sign(text.as_bytes());
        let mut blob = Vec::with_capacity(4 + sig.len());
        blob.extend_from_slice(&self.id);
        blob.extend_from_slice(&sig);
        Ok(format!(
            "{text}\n{SIG_PREFIX}{} {}\n",
            self.name,
            STANDARD.encode(blob)
        ))
    }
}

/// What a box or an auditor knows of the log: its key name, public key and origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogVerifier {
    name: String,
    origin: String,
    key: VerifyingKey,
    id: [u8; 4],
}

/// One signature line of a note.
struct SignatureLine<'a> {
    name: &'a str,
    id: [u8; 4],
    signature: Vec<u8>,
}

impl LogVerifier {
    /// A verifier of key `name`, expecting checkpoints whose origin is also `name`.
    pub fn new(name: &str, key: VerifyingKey) -> Result<Self, CheckpointError> {
        check_key_name(name)?;
        Ok(Self {
            name: name.to_owned(),
            origin: name.to_owned(),
            id: key_id(name, &key),
            key,
        })
    }

    /// Expect `origin` instead of the key name on the origin line.
    pub fn with_origin(mut self, origin: &str) -> Result<Self, CheckpointError> {
        check_origin(origin)?;
        self.origin = origin.to_owned();
        Ok(self)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The key as a C2SP verifier key string: `<name>+<key ID hex>+base64(0x01 || public key)`.
    pub fn to_vkey(&self) -> String {
        let mut blob = vec![ED25519_TYPE];
        blob.extend_from_slice(&self.key.to_bytes());
        format!(
            "{}+{}+{}",
            self.name,
            hex::encode(self.id),
            STANDARD.encode(blob)
        )
    }

    /// Parses a verifier key string; its key ID must match the name and key.
    pub fn from_vkey(vkey: &str) -> Result<Self, CheckpointError> {
        let bad = |m: &str| CheckpointError::BadVerifierKey(m.to_owned());
        let mut parts = vkey.trim_end_matches('\n').splitn(3, '+');
        let (Some(name), Some(id_hex), Some(key_b64)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected <name>+<key ID hex>+<base64 key>"));
        };
        check_key_name(name)?;
        let blob = STANDARD
            .decode(key_b64)
            .map_err(|e| CheckpointError::BadVerifierKey(format!("key is not base64: {e}")))?;
        let Some((&ED25519_TYPE, key)) = blob.split_first() else {
            return Err(bad("not an Ed25519 (type 0x01) key"));
        };
        let key: [u8; 32] = key
            .try_into()
            .map_err(|_| bad("an Ed25519 public key is 32 bytes"))?;
        let key = VerifyingKey::from_bytes(&key).map_err(CheckpointError::BadVerifierKey)?;
        let verifier = Self::new(name, key)?;
        if hex::encode(verifier.id) != id_hex {
            return Err(bad("the key ID does not match the name and key"));
        }
        Ok(verifier)
    }

    /// Verifies a signed checkpoint note and returns what it says. Refuses a
    /// malformed note, a note without a signature by this key ([`CheckpointError::OtherKey`]),
    /// a bad signature by this key, and a checkpoint of another origin.
    pub fn verify(&self, note: &[u8]) -> Result<Checkpoint, CheckpointError> {
        let text = self.verify_note(note)?;
        let checkpoint = Checkpoint::parse_body(text)?;
        if checkpoint.origin != self.origin {
            return Err(CheckpointError::WrongOrigin {
                expected: self.origin.clone(),
                found: checkpoint.origin,
            });
        }
        Ok(checkpoint)
    }

    /// Verifies any C2SP signed note by this key and returns its text.
    pub fn verify_note<'a>(&self, note: &'a [u8]) -> Result<&'a str, CheckpointError> {
        if note.len() > MAX_NOTE_BYTES {
            return Err(malformed(format!(
                "the note is {} bytes, more than {MAX_NOTE_BYTES}",
                note.len()
            )));
        }
        let note = std::str::from_utf8(note).map_err(|_| malformed("the note is not UTF-8"))?;
        if note.chars().any(|c| c.is_ascii_control() && c != '\n') {
            return Err(malformed(
                "the note holds an ASCII control character other than newline",
            ));
        }
        // The text ends at the last blank line; the signatures follow it.
        let split = note
            .rfind("\n\n")
            .ok_or_else(|| malformed("no blank line before the signatures"))?;
        let (text, signatures) = (&note[..split + 1], &note[split + 2..]);
        let lines = parse_signatures(signatures)?;
        let mut verified = false;
        for line in &lines {
            if line.name != self.name || line.id != self.id {
                continue;
            }
            if self.key.verify(text.as_bytes(), &line.signature).is_err() {
                return Err(CheckpointError::BadSignature {
                    name: self.name.clone(),
                    key_id: hex::encode(self.id),
                });
            }
            verified = true;
        }
        if !verified {
            let found: Vec<String> = lines
                .iter()
                .map(|l| format!("{} ({})", l.name, hex::encode(l.id)))
                .collect();
            return Err(CheckpointError::OtherKey {
                name: self.name.clone(),
                key_id: hex::encode(self.id),
                found: found.join(", "),
            });
        }
        Ok(text)
    }
}

fn parse_signatures(block: &str) -> Result<Vec<SignatureLine<'_>>, CheckpointError> {
    let body = block
        .strip_suffix('\n')
        .ok_or_else(|| malformed("the signature lines do not end with a newline"))?;
    if body.is_empty() {
        return Err(malformed("no signature lines"));
    }
    let mut out = Vec::new();
    for (i, line) in body.split('\n').enumerate() {
        if i >= MAX_SIGNATURES {
            return Err(malformed(format!(
                "more than {MAX_SIGNATURES} signature lines"
            )));
        }
        let rest = line.strip_prefix(SIG_PREFIX).ok_or_else(|| {
            malformed(format!(
                "signature line {} does not start with an em dash and a space",
                i + 1
            ))
        })?;
        let (name, b64) = rest.split_once(' ').ok_or_else(|| {
            malformed(format!(
                "signature line {} has no space between key name and signature",
                i + 1
            ))
        })?;
        if check_key_name(name).is_err() {
            return Err(malformed(format!(
                "signature line {} has an invalid key name {name:?}",
                i + 1
            )));
        }
        let blob = STANDARD
            .decode(b64)
            .map_err(|e| malformed(format!("signature line {} is not base64: {e}", i + 1)))?;
        if blob.len() < 5 {
            return Err(malformed(format!(
                "signature line {} is {} bytes, shorter than a key ID and a signature",
                i + 1,
                blob.len()
            )));
        }
        let id = [blob[0], blob[1], blob[2], blob[3]];
        out.push(SignatureLine {
            name,
            id,
            signature: blob[4..].to_vec(),
        });
    }
    Ok(out)
}

impl<S: super::HashStore> super::Log<S> {
    /// The checkpoint of the log at `size`.
    pub fn checkpoint(&self, origin: &str, size: u64) -> Result<Checkpoint, super::TreeError> {
        Ok(Checkpoint {
            origin: origin.to_owned(),
            size,
            root: self.root(size)?,
            extensions: Vec::new(),
        })
    }

    /// Checks a (verified) checkpoint against this log: its size is within the
    /// log and its root is the log's root at that size.
    pub fn check_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
        let log_size = self
            .size()
            .map_err(|e| CheckpointError::Log(e.to_string()))?;
        if checkpoint.size > log_size {
            return Err(CheckpointError::SizeBeyondLog {
                size: checkpoint.size,
                log_size,
            });
        }
        let root = self
            .root(checkpoint.size)
            .map_err(|e| CheckpointError::Log(e.to_string()))?;
        if root != checkpoint.root {
            return Err(CheckpointError::RootMismatch {
                size: checkpoint.size,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tlog::{Log, MemoryStore, leaf_hash};
    use proptest::prelude::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const ORIGIN: &str = "msp.example/compliance-log";

    fn signer(seed: u8, name: &str) -> Result<LogSigner, CheckpointError> {
        LogSigner::new(name, SigningKey::from_seed(&[seed; 32]))
    }

    fn checkpoint(size: u64) -> Checkpoint {
        Checkpoint {
            origin: ORIGIN.into(),
            size,
            root: [size as u8; 32],
            extensions: Vec::new(),
        }
    }

    /// The example of golang.org/x/mod/sumdb/note (an independent implementation of
    /// signed notes): its key, text and signature.
    const GO_SKEY_SEED_B64: &str = "AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const GO_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const GO_TEXT: &str = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n";
    const GO_SIG: &str = "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=";

    /// Invariant: our notes are byte-for-byte those of the Go reference (key ID, encoding, signature).
    #[test]
    fn interoperates_with_the_go_sumdb_note_example() -> TestResult {
        let blob = STANDARD.decode(GO_SKEY_SEED_B64)?;
        let seed: [u8; 32] = blob[1..].try_into()?;
        assert_eq!(
            blob[0], ED25519_TYPE,
            "the Go private key is of type Ed25519"
        );
        let signer = LogSigner::new("PeterNeumann", SigningKey::from_seed(&seed))?;
        assert_eq!(
            signer.verifier().to_vkey(),
            GO_VKEY,
            "same verifier key string"
        );
        let expected = format!("{GO_TEXT}\n\u{2014} PeterNeumann {GO_SIG}\n");
        assert_eq!(signer.sign_note(GO_TEXT)?, expected, "same signed note");
        let verifier = LogVerifier::from_vkey(GO_VKEY)?;
        assert_eq!(
            verifier.verify_note(expected.as_bytes())?,
            GO_TEXT,
            "the Go note verifies"
        );
        Ok(())
    }

    /// Invariant: the C2SP signed-note specification's own example verifies.
    #[test]
    fn verifies_the_c2sp_specification_example() -> TestResult {
        let verifier = LogVerifier::from_vkey(
            "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k",
        )?;
        let note = "This is an example message.\n\n\u{2014} example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n";
        assert_eq!(
            verifier.verify_note(note.as_bytes())?,
            "This is an example message.\n",
            "the spec example verifies"
        );
        Ok(())
    }

    /// Invariant: a signed checkpoint verifies and says what was signed, in the C2SP layout.
    #[test]
    fn sign_and_verify_round_trip() -> TestResult {
        let signer = signer(1, ORIGIN)?;
        let mut log = Log::new(MemoryStore::new());
        log.append_many(&(0..5u8).map(|i| leaf_hash(&[i])).collect::<Vec<_>>())?;
        let cp = log.checkpoint(ORIGIN, 5)?;
        let note = signer.sign(&cp)?;
        let lines: Vec<&str> = note.split('\n').collect();
        assert_eq!(lines[0], ORIGIN, "origin line first");
        assert_eq!(lines[1], "5", "tree size second");
        assert_eq!(lines[2], STANDARD.encode(cp.root), "base64 root third");
        assert_eq!(lines[3], "", "blank line before the signatures");
        assert!(
            lines[4].starts_with(&format!("\u{2014} {ORIGIN} ")),
            "signature line: {}",
            lines[4]
        );
        let verifier = LogVerifier::from_vkey(&signer.verifier().to_vkey())?;
        let got = verifier.verify(note.as_bytes())?;
        assert_eq!(got, cp, "the verified checkpoint is the signed one");
        log.check_checkpoint(&got)?;
        Ok(())
    }

    /// Invariant: every way a checkpoint can be wrong is refused with its own error.
    #[test]
    fn every_refusal_is_named() -> TestResult {
        let ours = signer(1, ORIGIN)?;
        let verifier = ours.verifier();
        let note = ours.sign(&checkpoint(3))?;

        // Bad signature: the text changed after signing.
        let altered = note.replacen("\n3\n", "\n4\n", 1);
        assert!(
            matches!(
                verifier.verify(altered.as_bytes()),
                Err(CheckpointError::BadSignature { .. })
            ),
            "an altered checkpoint is a bad signature"
        );
        // Another key under the same name (the key ID differs), and another name.
        for other in [signer(2, ORIGIN)?, signer(1, "other.example/log")?] {
            let foreign = other.sign(&checkpoint(3))?;
            let err = verifier.verify(foreign.as_bytes());
            assert!(
                matches!(&err, Err(CheckpointError::OtherKey { found, .. }) if !found.is_empty()),
                "a checkpoint by another key is refused, naming the keys it has: {err:?}"
            );
        }
        // Our signature and an unknown one: the unknown one is ignored.
        let foreign = signer(2, "witness.example/w1")?.sign(&checkpoint(3))?;
        let (_, foreign_sig) = foreign.rsplit_once("\n\n").ok_or("no signature block")?;
        let cosigned = format!("{note}{foreign_sig}");
        assert_eq!(
            verifier.verify(cosigned.as_bytes())?,
            checkpoint(3),
            "unknown signatures are ignored"
        );
        // Another origin signed by our key.
        let mut elsewhere = checkpoint(3);
        elsewhere.origin = "msp.example/another-log".into();
        assert!(
            matches!(
                verifier.verify(ours.sign(&elsewhere)?.as_bytes()),
                Err(CheckpointError::WrongOrigin { .. })
            ),
            "a checkpoint of another log is refused"
        );
        // Malformed notes.
        let body_sig = note.split_once("\n\n").ok_or("no blank line")?.1;
        let malformed_notes = [
            (
                "no signatures",
                note.split_once("\n\n").ok_or("x")?.0.to_owned() + "\n\n",
            ),
            ("no blank line", note.replacen("\n\n", "\n", 1)),
            (
                "not UTF-8",
                String::from_utf8_lossy(&[0xff, b'\n', b'\n'])
                    .into_owned()
                    .replace('\u{fffd}', "\u{1}"),
            ),
            (
                "control character",
                note.replacen(ORIGIN, "msp.example/\tlog", 1),
            ),
            (
                "signature line without em dash",
                note.replacen('\u{2014}', "-", 1),
            ),
            (
                "signature not base64",
                note.replacen(body_sig, &format!("\u{2014} {ORIGIN} !!!!\n"), 1),
            ),
            (
                "leading zero size",
                ours.sign_note(&format!("{ORIGIN}\n03\n{}\n", STANDARD.encode([3u8; 32])))?,
            ),
            (
                "short root",
                ours.sign_note(&format!("{ORIGIN}\n3\n{}\n", STANDARD.encode([3u8; 31])))?,
            ),
            (
                "missing root line",
                ours.sign_note(&format!("{ORIGIN}\n3\n"))?,
            ),
            ("oversized", format!("{note}{}", "x".repeat(MAX_NOTE_BYTES))),
        ];
        for (what, bad) in malformed_notes {
            let err = verifier.verify(bad.as_bytes());
            assert!(
                matches!(err, Err(CheckpointError::Malformed(_))),
                "{what}: expected a malformed-checkpoint error, got {err:?}"
            );
        }
        // Against the log: beyond its size, and a root it never had.
        let mut log = Log::new(MemoryStore::new());
        log.append_many(&[leaf_hash(b"a"), leaf_hash(b"b")])?;
        assert!(
            matches!(
                log.check_checkpoint(&checkpoint(3)),
                Err(CheckpointError::SizeBeyondLog {
                    size: 3,
                    log_size: 2
                })
            ),
            "a checkpoint beyond the log is refused"
        );
        assert!(
            matches!(
                log.check_checkpoint(&checkpoint(2)),
                Err(CheckpointError::RootMismatch { size: 2 })
            ),
            "a checkpoint with another root is refused"
        );
        // Key names and verifier keys.
        assert!(
            LogSigner::new("a b", SigningKey::from_seed(&[1; 32])).is_err(),
            "space in a key name"
        );
        assert!(
            LogSigner::new("a+b", SigningKey::from_seed(&[1; 32])).is_err(),
            "plus in a key name"
        );
        let vkey = verifier.to_vkey();
        let wrong_id = format!("{ORIGIN}+00000000+{}", vkey.rsplit('+').next().ok_or("x")?);
        assert!(
            LogVerifier::from_vkey(&wrong_id).is_err(),
            "a vkey whose ID does not match"
        );
        Ok(())
    }

    proptest! {
        /// Invariant: the note parser never panics on arbitrary input, and never accepts it as ours.
        #[test]
        fn arbitrary_notes_are_refused(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let verifier = signer(1, ORIGIN).map_err(|e| TestCaseError::fail(e.to_string()))?.verifier();
            prop_assert!(verifier.verify(&data).is_err(), "random bytes are never a checkpoint by our key");
        }

        /// Invariant: any changed byte of a signed checkpoint makes it fail to verify.
        #[test]
        fn any_changed_byte_is_refused(size in 0u64..1_000_000, root in any::<[u8; 32]>(), pos in any::<usize>(), xor in 1u8..=255) {
            let ours = signer(1, ORIGIN).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let cp = Checkpoint { origin: ORIGIN.into(), size, root, extensions: Vec::new() };
            let mut note = ours.sign(&cp).map_err(|e| TestCaseError::fail(e.to_string()))?.into_bytes();
            prop_assert_eq!(ours.verifier().verify(&note).ok(), Some(cp), "the untouched note verifies");
            let pos = pos % note.len();
            note[pos] ^= xor;
            prop_assert!(ours.verifier().verify(&note).is_err(), "byte {} changed must be refused", pos);
        }

        /// Invariant: a checkpoint body round-trips through its text.
        #[test]
        fn checkpoint_body_round_trips(origin in "[!-~]{1,60}", size in any::<u64>(), root in any::<[u8; 32]>()) {
            let cp = Checkpoint { origin, size, root, extensions: Vec::new() };
            let text = cp.body().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(Checkpoint::parse_body(&text).ok(), Some(cp), "round trip");
        }
    }
}
