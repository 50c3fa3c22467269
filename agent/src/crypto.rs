//! Ed25519 signing keys in the PEM forms stock OpenSSL reads, signatures and SHA-256.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::Signer as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use sha2::{Digest, Sha256};

/// Length of a raw Ed25519 signature, as stored in `bundle.sig`.
pub const SIGNATURE_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("cannot read key file {path}: {source}")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not an Ed25519 private key in PKCS#8 PEM form ({reason}); create one with `compliance-agent keygen --out DIR` or `openssl genpkey -algorithm ed25519`"
    )]
    BadPrivateKey { path: PathBuf, reason: String },
    #[error(
        "{path} is not an Ed25519 public key in SPKI PEM form ({reason}); export one with `openssl pkey -in signing.key -pubout`"
    )]
    BadPublicKey { path: PathBuf, reason: String },
    #[error("{path} already exists; refusing to overwrite a signing key (move it away first)")]
    KeyExists { path: PathBuf },
    #[error("cannot write key file {path}: {source}")]
    WriteKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode key: {0}")]
    Encode(String),
    #[error("signature is {len} bytes, expected {SIGNATURE_LEN}")]
    SignatureLength { len: usize },
    #[error("signature does not verify")]
    BadSignature,
}

pub type Result<T> = std::result::Result<T, CryptoError>;

/// The object identifier of Ed25519 keys (RFC 8410).
pub const ED25519_OID: &str = "1.3.101.112";

/// Says in words what is wrong with a key file that did not parse: empty, not
/// PEM, or a key of another algorithm (named with its OID and Ed25519's).
fn pem_problem(pem: &str, expected_label: &str) -> Option<String> {
    use base64::Engine as _;
    if pem.trim().is_empty() {
        return Some("the file is empty".into());
    }
    let Some(begin) = pem.find("-----BEGIN ") else {
        return Some("no PEM block (-----BEGIN ...-----) in the file".into());
    };
    let label_end = pem[begin + 11..].find("-----")?;
    let label = &pem[begin + 11..begin + 11 + label_end];
    if label != expected_label {
        return Some(format!(
            "it holds a PEM block labelled {label:?}, expected {expected_label:?} with an Ed25519 key (OID {ED25519_OID})"
        ));
    }
    let body: String = pem[begin + 16 + label_end..]
        .lines()
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .ok()?;
    const KNOWN: &[(&[u8], &str, &str)] = &[
        (
            &[
                0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
            ],
            "RSA",
            "1.2.840.113549.1.1.1",
        ),
        (
            &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01],
            "EC",
            "1.2.840.10045.2.1",
        ),
        (&[0x06, 0x03, 0x2b, 0x65, 0x71], "Ed448", "1.3.101.113"),
        (&[0x06, 0x03, 0x2b, 0x65, 0x6e], "X25519", "1.3.101.110"),
        (&[0x06, 0x03, 0x2b, 0x65, 0x6f], "X448", "1.3.101.111"),
    ];
    KNOWN
        .iter()
        .find(|(oid, _, _)| der.windows(oid.len()).any(|w| w == *oid))
        .map(|(_, name, oid)| {
            format!(
                "it is an {name} key (OID {oid}); only Ed25519 keys (OID {ED25519_OID}) are used"
            )
        })
}

/// SHA-256 of `data` as lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// An Ed25519 private key that signs evidence (or, on the MCP side, orders).
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material, only which key this is.
        f.debug_struct("SigningKey")
            .field("fingerprint", &self.verifying_key().fingerprint())
            .finish()
    }
}

impl SigningKey {
    /// A new random key from the operating system's generator.
    pub fn generate() -> Self {
        Self {
            key: ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// A key from a 32-byte seed (tests and benchmarks that need determinism).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self {
            key: ed25519_dalek::SigningKey::from_bytes(seed),
        }
    }

    pub fn from_pkcs8_pem(pem: &str) -> std::result::Result<Self, String> {
        ed25519_dalek::SigningKey::from_pkcs8_pem(pem)
            .map(|key| Self { key })
            .map_err(|e| e.to_string())
    }

    /// Loads a PKCS#8 PEM private key file. A key that others may read or
    /// write is still used (refusing would stop all evidence) but said loudly.
    pub fn load(path: &Path) -> Result<Self> {
        let pem = fs::read_to_string(path).map_err(|source| CryptoError::ReadKey {
            path: path.to_owned(),
            source,
        })?;
        let key = Self::from_pkcs8_pem(&pem).map_err(|reason| CryptoError::BadPrivateKey {
            path: path.to_owned(),
            reason: pem_problem(&pem, "PRIVATE KEY").unwrap_or(reason),
        })?;
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            let message = format!(
                "signing key {} has mode {:04o}: others can read or change it and so forge evidence; run `chmod 600 {}`",
                path.display(),
                meta.permissions().mode() & 0o7777,
                path.display()
            );
            tracing::warn!("{message}");
            eprintln!("compliance-agent: warning: {message}");
        }
        Ok(key)
    }

    pub fn to_pkcs8_pem(&self) -> Result<String> {
        // PKCS#8 v1 (seed only, RFC 8410): the form `openssl genpkey` writes and every
        // OpenSSL 3 release reads; v2 with the public key is refused by some.
        let bytes = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: self.key.to_bytes(),
            public_key: None,
        };
        bytes
            .to_pkcs8_pem(LineEnding::LF)
            .map(|z| z.to_string())
            .map_err(|e| CryptoError::Encode(e.to_string()))
    }

    /// Writes the private key (mode 0600, never overwriting) and its public key beside it.
    pub fn write_pair(&self, private_path: &Path, public_path: &Path) -> Result<()> {
        for path in [private_path, public_path] {
            if path.exists() {
                return Err(CryptoError::KeyExists {
                    path: path.to_owned(),
                });
            }
        }
        let pem = self.to_pkcs8_pem()?;
        write_new(private_path, pem.as_bytes(), 0o600)?;
        let public = self.verifying_key().to_spki_pem()?;
        write_new(public_path, public.as_bytes(), 0o644)
    }

    pub fn sign(&self, data: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.key.sign(data).to_bytes()
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey {
            key: self.key.verifying_key(),
        }
    }
}

/// Creates `path` exclusively with `mode`, writes `data` and syncs it.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let err = |source| CryptoError::WriteKey {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    // The umask may have narrowed the mode; a public key should stay readable.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(err)?;
    file.write_all(data).map_err(err)?;
    file.sync_all().map_err(err)
}

/// An Ed25519 public key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyingKey {
    key: ed25519_dalek::VerifyingKey,
}

impl VerifyingKey {
    pub fn from_spki_pem(pem: &str) -> std::result::Result<Self, String> {
        ed25519_dalek::VerifyingKey::from_public_key_pem(pem)
            .map(|key| Self { key })
            .map_err(|e| e.to_string())
    }

    /// Loads an SPKI PEM public key file.
    pub fn load(path: &Path) -> Result<Self> {
        let pem = fs::read_to_string(path).map_err(|source| CryptoError::ReadKey {
            path: path.to_owned(),
            source,
        })?;
        Self::from_spki_pem(&pem).map_err(|reason| CryptoError::BadPublicKey {
            path: path.to_owned(),
            reason: pem_problem(&pem, "PUBLIC KEY").unwrap_or(reason),
        })
    }

    pub fn from_bytes(bytes: &[u8; 32]) -> std::result::Result<Self, String> {
        ed25519_dalek::VerifyingKey::from_bytes(bytes)
            .map(|key| Self { key })
            .map_err(|e| e.to_string())
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn to_spki_pem(&self) -> Result<String> {
        self.key
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| CryptoError::Encode(e.to_string()))
    }

    /// `SHA256:` and the hex SHA-256 of the key's SPKI DER encoding, so that
    /// `openssl pkey -pubin -in signing.pub.pem -outform DER | sha256sum` reproduces it.
    pub fn fingerprint(&self) -> String {
        match self.key.to_public_key_der() {
            Ok(der) => format!("SHA256:{}", sha256_hex(der.as_bytes())),
            // Encoding a valid 32-byte key cannot fail; keep a stable answer anyway.
            Err(_) => format!("raw:{}", hex::encode(self.key.to_bytes())),
        }
    }

    /// Verifies a raw signature over `data` (strict RFC 8032 checks).
    pub fn verify(&self, data: &[u8], signature: &[u8]) -> Result<()> {
        let sig = parse_signature(signature)?;
        self.key
            .verify_strict(data, &sig)
            .map_err(|_| CryptoError::BadSignature)
    }

    /// Verifies many signatures by this key at once; on failure the caller
    /// checks them one by one to find which.
    pub fn verify_batch(&self, items: &[(&[u8], [u8; SIGNATURE_LEN])]) -> Result<()> {
        let messages: Vec<&[u8]> = items.iter().map(|(m, _)| *m).collect();
        let signatures: Vec<ed25519_dalek::Signature> = items
            .iter()
            .map(|(_, s)| ed25519_dalek::Signature::from_bytes(s))
            .collect();
        let keys = vec![self.key; items.len()];
        ed25519_dalek::verify_batch(&messages, &signatures, &keys)
            .map_err(|_| CryptoError::BadSignature)
    }
}

fn parse_signature(signature: &[u8]) -> Result<ed25519_dalek::Signature> {
    let bytes: [u8; SIGNATURE_LEN] =
        signature
            .try_into()
            .map_err(|_| CryptoError::SignatureLength {
                len: signature.len(),
            })?;
    Ok(ed25519_dalek::Signature::from_bytes(&bytes))
}

/// Reads a file and verifies its detached raw signature file.
pub fn verify_file(key: &VerifyingKey, data_path: &Path, sig_path: &Path) -> std::io::Result<bool> {
    let data = fs::read(data_path)?;
    let sig = fs::read(sig_path)?;
    Ok(key.verify(&data, &sig).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_problems_are_named() {
        assert_eq!(
            pem_problem("", "PRIVATE KEY").as_deref(),
            Some("the file is empty")
        );
        assert!(pem_problem("hello", "PRIVATE KEY").is_some_and(|m| m.contains("no PEM block")));
        // `openssl genpkey -algorithm ed448`
        let ed448 = "-----BEGIN PRIVATE KEY-----\nMEcCAQAwBQYDK2VxBDsEOQ2fJ0b6rFS5Q4LJTtJZp5mY3oC8BtH+1lY5s1C6v0oG\nzR8qgE1bJ2rN7jdRk9w2y8P0cXQbqL3uEW0=\n-----END PRIVATE KEY-----\n";
        let message = pem_problem(ed448, "PRIVATE KEY").unwrap_or_default();
        assert!(
            message.contains("Ed448") && message.contains(ED25519_OID),
            "{message}"
        );
        let rsa = "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----\n";
        assert!(pem_problem(rsa, "PRIVATE KEY").is_some_and(|m| m.contains("RSA PRIVATE KEY")));
    }

    #[test]
    fn pem_round_trip_and_signatures() {
        let key = SigningKey::generate();
        let pem = key.to_pkcs8_pem().expect("encode private key");
        assert!(
            pem.starts_with("-----BEGIN PRIVATE KEY-----"),
            "PKCS#8 header, got {pem}"
        );
        let again = SigningKey::from_pkcs8_pem(&pem).expect("decode private key");
        let public = key.verifying_key();
        assert_eq!(
            again.verifying_key(),
            public,
            "same key after PEM round trip"
        );
        let spki = public.to_spki_pem().expect("encode public key");
        assert!(
            spki.starts_with("-----BEGIN PUBLIC KEY-----"),
            "SPKI header, got {spki}"
        );
        assert_eq!(VerifyingKey::from_spki_pem(&spki).expect("decode"), public);

        let sig = key.sign(b"bundle");
        public
            .verify(b"bundle", &sig)
            .expect("own signature verifies");
        assert!(
            public.verify(b"bundlf", &sig).is_err(),
            "changed data must fail"
        );
        assert!(matches!(
            public.verify(b"bundle", &sig[..63]),
            Err(CryptoError::SignatureLength { len: 63 })
        ));
        let other = SigningKey::generate().verifying_key();
        assert!(
            other.verify(b"bundle", &sig).is_err(),
            "another key must fail"
        );
        assert_ne!(other.fingerprint(), public.fingerprint());
    }

    #[test]
    fn batch_verification_finds_a_bad_signature() {
        let key = SigningKey::from_seed(&[7; 32]);
        let msgs: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 100]).collect();
        let mut items: Vec<(&[u8], [u8; 64])> =
            msgs.iter().map(|m| (m.as_slice(), key.sign(m))).collect();
        key.verifying_key().verify_batch(&items).expect("all good");
        items[4].1[0] ^= 1;
        assert!(
            key.verifying_key().verify_batch(&items).is_err(),
            "one bad signature fails the batch"
        );
    }

    #[test]
    fn sha256_known_answer() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn garbage_key_files_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.pem");
        fs::write(&path, "not a key").expect("write");
        let err = SigningKey::load(&path).expect_err("garbage must not load");
        assert!(
            err.to_string().contains("keygen"),
            "message says how to fix: {err}"
        );
        assert!(VerifyingKey::load(&path).is_err());
    }
}
