//! LUKS headers read by the agent itself: the LUKS2 binary header, its checksum and JSON metadata; LUKS1 for reporting.

use std::io::Read;
use std::path::Path;

use serde::Serialize;
use sha2::{Digest, Sha256};

const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// A LUKS2 binary header is 4 KiB; the JSON area follows.
const BINARY_HEADER: usize = 4096;
/// cryptsetup allows metadata areas up to 4 MiB.
const MAX_HEADER: u64 = 4 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LuksHeader {
    pub version: u16,
    pub uuid: String,
    pub label: String,
    /// The data segment's cipher, e.g. aes-xts-plain64.
    pub cipher: String,
    /// The volume key size in bits (512 for AES-256-XTS).
    pub key_bits: u32,
    pub keyslots: usize,
    /// LUKS2: the header checksum matched.
    pub checksum_ok: bool,
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Parses a LUKS header from the start of a device or header file. For
/// LUKS2, `bytes` must hold the whole metadata area (hdr_size bytes).
pub fn parse(bytes: &[u8]) -> Result<LuksHeader, String> {
    if bytes.len() < 512 || &bytes[..6] != MAGIC {
        return Err("no LUKS header (magic missing)".into());
    }
    match be_u16(bytes, 6) {
        1 => {
            // LUKS1: cipher name and mode, key bytes at fixed offsets.
            let cipher = format!("{}-{}", c_string(&bytes[8..40]), c_string(&bytes[40..72]));
            Ok(LuksHeader {
                version: 1,
                uuid: c_string(&bytes[168..208]),
                label: String::new(),
                cipher,
                key_bits: be_u32(bytes, 108).saturating_mul(8),
                keyslots: 8,
                checksum_ok: true,
            })
        }
        2 => parse_luks2(bytes),
        v => Err(format!("unknown LUKS version {v}")),
    }
}

fn parse_luks2(bytes: &[u8]) -> Result<LuksHeader, String> {
    if bytes.len() < BINARY_HEADER {
        return Err(format!("LUKS2 header truncated: {} bytes", bytes.len()));
    }
    let hdr_size = be_u64(bytes, 8);
    if hdr_size < BINARY_HEADER as u64 || hdr_size > MAX_HEADER {
        return Err(format!("LUKS2 header size {hdr_size} is out of range"));
    }
    let hdr_size = hdr_size as usize;
    if bytes.len() < hdr_size {
        return Err(format!(
            "LUKS2 metadata truncated: {} of {hdr_size} bytes",
            bytes.len()
        ));
    }
    let checksum_alg = c_string(&bytes[72..104]);
    let checksum_ok = if checksum_alg == "sha256" {
        let mut h = Sha256::new();
        h.update(&bytes[..448]);
        h.update([0u8; 64]);
        h.update(&bytes[512..hdr_size]);
        h.finalize().as_slice() == &bytes[448..480]
    } else {
        return Err(format!(
            "LUKS2 checksum algorithm {checksum_alg:?} is not supported"
        ));
    };
    if !checksum_ok {
        return Err("LUKS2 header checksum does not match (corrupt or tampered header)".into());
    }
    let json_area = &bytes[BINARY_HEADER..hdr_size];
    let end = json_area
        .iter()
        .position(|&c| c == 0)
        .unwrap_or(json_area.len());
    let meta: serde_json::Value = serde_json::from_slice(&json_area[..end])
        .map_err(|e| format!("LUKS2 JSON metadata is invalid: {e}"))?;
    let segment = meta
        .get("segments")
        .and_then(|s| s.as_object())
        .and_then(|s| {
            s.values()
                .find(|v| v.get("type").and_then(|t| t.as_str()) == Some("crypt"))
        })
        .ok_or("LUKS2 metadata has no crypt segment")?;
    let cipher = segment
        .get("encryption")
        .and_then(|e| e.as_str())
        .ok_or("the crypt segment names no cipher")?
        .to_owned();
    let keyslots = meta.get("keyslots").and_then(|k| k.as_object());
    let key_bits = keyslots
        .into_iter()
        .flat_map(|k| k.values())
        .filter_map(|slot| slot.get("key_size").and_then(|s| s.as_u64()))
        .min()
        .map_or(0, |bytes| (bytes * 8) as u32);
    Ok(LuksHeader {
        version: 2,
        uuid: c_string(&bytes[168..208]),
        label: c_string(&bytes[24..72]),
        cipher,
        key_bits,
        keyslots: keyslots.map_or(0, |k| k.len()),
        checksum_ok,
    })
}

/// Reads and parses the LUKS header at the start of `path` (a device or a header backup).
pub fn read(path: &Path) -> Result<LuksHeader, String> {
    let mut file =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut head = vec![0u8; BINARY_HEADER];
    let n = read_up_to(&mut file, &mut head)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    head.truncate(n);
    if head.len() >= 16 && &head[..6] == MAGIC && be_u16(&head, 6) == 2 {
        let hdr_size = be_u64(&head, 8).min(MAX_HEADER) as usize;
        if hdr_size > head.len() {
            let mut rest = vec![0u8; hdr_size - head.len()];
            let m = read_up_to(&mut file, &mut rest)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            rest.truncate(m);
            head.extend_from_slice(&rest);
        }
    }
    parse(&head)
}

fn read_up_to(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused() {
        assert!(parse(b"").is_err());
        assert!(parse(&[0u8; 4096]).expect_err("zeros").contains("magic"));
        let mut fake = vec![0u8; 4096];
        fake[..6].copy_from_slice(MAGIC);
        fake[7] = 2;
        fake[8..16].copy_from_slice(&(16384u64).to_be_bytes());
        assert!(parse(&fake).expect_err("truncated").contains("truncated"));
        fake[8..16].copy_from_slice(&(u64::MAX).to_be_bytes());
        assert!(parse(&fake).expect_err("huge").contains("out of range"));
        fake[7] = 9;
        assert!(parse(&fake).expect_err("version").contains("version 9"));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(mut bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..6000), v in 0u8..3) {
            if bytes.len() > 8 {
                bytes[..6].copy_from_slice(MAGIC);
                bytes[6] = 0;
                bytes[7] = v;
            }
            let _ = parse(&bytes);
        }
    }
}
