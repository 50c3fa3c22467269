//! The log leaf of an evidence bundle: its identity and the SHA-256 of its bundle.json, in one stable text encoding.
//!
//! The encoding (docs/tlog.md) is six lines, each ending in a newline:
//!
//! ```text
//! compliance-appliance/evidence-leaf/v1
//! <site_id>
//! <host_id>
//! <seq, decimal, no leading zeros>
//! <bundle_id>
//! <SHA-256 of bundle.json, 64 lowercase hex digits>
//! ```
//!
//! Each field is 1 to 255 printable ASCII characters other than space, so no
//! field can contain the separator and the encoding is injective: two
//! different identities never share leaf data. An auditor rebuilds it with
//! `printf` and `sha256sum`.

use super::{Hash, leaf_hash};

/// First line of every leaf: names the format and its version.
pub const LEAF_MAGIC: &str = "compliance-appliance/evidence-leaf/v1";

/// Longest identity field, in bytes.
const MAX_FIELD: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeafError {
    #[error("leaf field {field} is empty")]
    EmptyField { field: &'static str },
    #[error("leaf field {field} is {len} bytes, more than {MAX_FIELD}")]
    FieldTooLong { field: &'static str, len: usize },
    #[error(
        "leaf field {field} holds {found:?}; fields are printable ASCII without spaces (letters, digits, '.', '_', '-', ...)"
    )]
    BadCharacter { field: &'static str, found: char },
    #[error("seq is 0; bundle sequence numbers start at 1")]
    ZeroSeq,
    #[error("leaf data is malformed: {0}")]
    Malformed(String),
}

/// What the log records of one evidence bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleLeaf {
    pub site_id: String,
    pub host_id: String,
    pub seq: u64,
    pub bundle_id: String,
    /// SHA-256 of the bundle's bundle.json bytes (what the box signed).
    pub bundle_sha256: Hash,
}

fn check_field(field: &'static str, value: &str) -> Result<(), LeafError> {
    if value.is_empty() {
        return Err(LeafError::EmptyField { field });
    }
    if value.len() > MAX_FIELD {
        return Err(LeafError::FieldTooLong {
            field,
            len: value.len(),
        });
    }
    if let Some(found) = value.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(LeafError::BadCharacter { field, found });
    }
    Ok(())
}

impl BundleLeaf {
    /// The leaf data: the six-line encoding above.
    pub fn encode(&self) -> Result<Vec<u8>, LeafError> {
        check_field("site_id", &self.site_id)?;
        check_field("host_id", &self.host_id)?;
        check_field("bundle_id", &self.bundle_id)?;
        if self.seq == 0 {
            return Err(LeafError::ZeroSeq);
        }
        Ok(format!(
            "{LEAF_MAGIC}\n{}\n{}\n{}\n{}\n{}\n",
            self.site_id,
            self.host_id,
            self.seq,
            self.bundle_id,
            hex::encode(self.bundle_sha256)
        )
        .into_bytes())
    }

    /// The RFC 6962 leaf hash of [`encode`](Self::encode).
    pub fn hash(&self) -> Result<Hash, LeafError> {
        Ok(leaf_hash(&self.encode()?))
    }

    /// Parses leaf data; accepts exactly what [`encode`](Self::encode) writes.
    pub fn parse(data: &[u8]) -> Result<Self, LeafError> {
        let text = std::str::from_utf8(data)
            .map_err(|_| LeafError::Malformed("not UTF-8 (leaf data is ASCII)".into()))?;
        let body = text
            .strip_suffix('\n')
            .ok_or_else(|| LeafError::Malformed("does not end with a newline".into()))?;
        let lines: Vec<&str> = body.split('\n').collect();
        let [magic, site_id, host_id, seq, bundle_id, hash] = lines[..] else {
            return Err(LeafError::Malformed(format!(
                "{} lines where a leaf has 6",
                lines.len()
            )));
        };
        if magic != LEAF_MAGIC {
            return Err(LeafError::Malformed(format!(
                "first line is {magic:?}, not {LEAF_MAGIC:?}"
            )));
        }
        if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) || (seq.starts_with('0')) {
            return Err(LeafError::Malformed(format!(
                "seq {seq:?} is not a decimal number without leading zeros"
            )));
        }
        let seq: u64 = seq
            .parse()
            .map_err(|_| LeafError::Malformed(format!("seq {seq:?} does not fit 64 bits")))?;
        if hash.len() != 64 || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(LeafError::Malformed(format!(
                "bundle hash {hash:?} is not 64 lowercase hex digits"
            )));
        }
        let mut bundle_sha256 = [0u8; 32];
        hex::decode_to_slice(hash, &mut bundle_sha256)
            .map_err(|e| LeafError::Malformed(format!("bundle hash: {e}")))?;
        let leaf = BundleLeaf {
            site_id: site_id.into(),
            host_id: host_id.into(),
            seq,
            bundle_id: bundle_id.into(),
            bundle_sha256,
        };
        // The same field rules as encoding, so parse and encode agree exactly.
        leaf.encode()?;
        Ok(leaf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Change = dyn Fn(&mut BundleLeaf);

    fn sample() -> BundleLeaf {
        BundleLeaf {
            site_id: "clinic-1".into(),
            host_id: "frontdesk-01".into(),
            seq: 42,
            bundle_id: "0b9d6c1e-3f57-4a52-9d2e-7d1f7a8e5c11".into(),
            bundle_sha256: [0xab; 32],
        }
    }

    /// Invariant: the leaf data is the documented text, so auditors can rebuild it by hand.
    #[test]
    fn encoding_is_the_documented_text() -> Result<(), LeafError> {
        let data = sample().encode()?;
        let expected = format!(
            "compliance-appliance/evidence-leaf/v1\nclinic-1\nfrontdesk-01\n42\n0b9d6c1e-3f57-4a52-9d2e-7d1f7a8e5c11\n{}\n",
            "ab".repeat(32)
        );
        assert_eq!(
            String::from_utf8_lossy(&data),
            expected,
            "the leaf data is exactly the encoding docs/tlog.md gives auditors"
        );
        assert_eq!(BundleLeaf::parse(&data)?, sample(), "parse inverts encode");
        Ok(())
    }

    /// Invariant: no field value can smuggle a separator or make two identities share leaf data.
    #[test]
    fn fields_that_could_break_the_encoding_are_refused() -> Result<(), LeafError> {
        let cases: [(&str, Box<Change>); 5] = [
            (
                "newline in site_id",
                Box::new(|l| l.site_id = "a\nb".into()),
            ),
            ("space in host_id", Box::new(|l| l.host_id = "a b".into())),
            ("empty bundle_id", Box::new(|l| l.bundle_id = String::new())),
            ("seq 0", Box::new(|l| l.seq = 0)),
            (
                "overlong site_id",
                Box::new(|l| l.site_id = "x".repeat(256)),
            ),
        ];
        for (what, change) in cases {
            let mut leaf = sample();
            change(&mut leaf);
            assert!(leaf.encode().is_err(), "{what} must be refused");
        }
        Ok(())
    }

    /// Invariant: only the canonical encoding parses.
    #[test]
    fn malformed_leaf_data_is_refused_with_a_reason() -> Result<(), LeafError> {
        let good = String::from_utf8_lossy(&sample().encode()?).into_owned();
        let cases = [
            ("no final newline", good.trim_end().to_owned()),
            ("extra line", format!("{good}x\n")),
            ("other magic", good.replace("/v1", "/v2")),
            ("leading zero seq", good.replace("\n42\n", "\n042\n")),
            (
                "upper-case hash",
                good.replace(&"ab".repeat(32), &"AB".repeat(32)),
            ),
            (
                "short hash",
                good.replace(&"ab".repeat(32), &"ab".repeat(31)),
            ),
        ];
        for (what, data) in cases {
            let err = BundleLeaf::parse(data.as_bytes());
            assert!(err.is_err(), "{what}: parse must fail, got {err:?}");
        }
        Ok(())
    }

    fn field() -> impl Strategy<Value = String> {
        "[!-~]{1,40}"
    }

    proptest! {
        /// Invariant: every valid leaf round-trips, and distinct leaves have distinct data.
        #[test]
        fn leaf_round_trips_and_is_injective(
            a in (field(), field(), 1u64.., field(), any::<[u8; 32]>()),
            b in (field(), field(), 1u64.., field(), any::<[u8; 32]>()),
        ) {
            let la = BundleLeaf { site_id: a.0, host_id: a.1, seq: a.2, bundle_id: a.3, bundle_sha256: a.4 };
            let lb = BundleLeaf { site_id: b.0, host_id: b.1, seq: b.2, bundle_id: b.3, bundle_sha256: b.4 };
            let da = la.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let db = lb.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(BundleLeaf::parse(&da).ok(), Some(la.clone()), "round trip");
            prop_assert_eq!(la == lb, da == db, "equal data exactly when equal leaves");
        }

        /// Invariant: the parser never panics, and whatever it accepts re-encodes to the same bytes.
        #[test]
        fn parser_accepts_only_canonical_data(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(leaf) = BundleLeaf::parse(&data) {
                prop_assert_eq!(leaf.encode().ok(), Some(data), "accepted data is canonical");
            }
        }

        /// Invariant: any single changed byte of valid leaf data is refused or parses to another leaf.
        #[test]
        fn changed_byte_never_parses_to_the_same_leaf(pos in 0usize..200, bit in 0u8..8) {
            let leaf = sample();
            let mut data = leaf.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let pos = pos % data.len();
            data[pos] ^= 1 << bit;
            prop_assert_ne!(BundleLeaf::parse(&data).ok(), Some(leaf), "a changed byte changes the leaf");
        }
    }
}
