//! The Nix archive (NAR) serialisation of a path, its SHA-256 and Nix's base-32, as `nix-hash --type sha256 --base32` computes them.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sha2::{Digest, Sha256};

const NIXBASE32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Nix's base-32 encoding (a reversed, shortened alphabet; not RFC 4648).
pub fn nixbase32(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return String::new();
    }
    let len = (bytes.len() * 8 - 1) / 5 + 1;
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let low = u16::from(bytes[i]) >> j;
        let high = bytes.get(i + 1).map_or(0, |&x| u16::from(x) << (8 - j));
        out.push(char::from(NIXBASE32[usize::from((low | high) & 0x1f)]));
    }
    out
}

/// Decodes Nix's base-32 (the inverse of [`nixbase32`]); None for a character
/// outside the alphabet, a length that is not a whole number of bytes, or
/// bits set beyond the last byte.
pub fn nixbase32_decode(text: &str) -> Option<Vec<u8>> {
    let len = text.len() * 5 / 8;
    if nixbase32(&vec![0u8; len]).len() != text.len() {
        return None;
    }
    let mut out = vec![0u8; len];
    for (n, c) in text.bytes().rev().enumerate() {
        let digit = NIXBASE32.iter().position(|&a| a == c)? as u16;
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let shifted = digit << j;
        if i < len {
            out[i] |= (shifted & 0xff) as u8;
        } else if shifted & 0xff != 0 {
            return None;
        }
        let carry = (shifted >> 8) as u8;
        if carry != 0 {
            if i + 1 < len {
                out[i + 1] |= carry;
            } else {
                return None;
            }
        }
    }
    Some(out)
}

struct NarWriter<'a> {
    hasher: &'a mut Sha256,
}

impl NarWriter<'_> {
    fn bytes(&mut self, data: &[u8]) {
        self.hasher.update((data.len() as u64).to_le_bytes());
        self.hasher.update(data);
        let pad = (8 - data.len() % 8) % 8;
        self.hasher.update(&[0u8; 8][..pad]);
    }

    fn node(&mut self, path: &Path) -> io::Result<()> {
        let meta = fs::symlink_metadata(path)?;
        self.bytes(b"(");
        self.bytes(b"type");
        let kind = meta.file_type();
        if kind.is_symlink() {
            self.bytes(b"symlink");
            self.bytes(b"target");
            let target = fs::read_link(path)?;
            self.bytes(target.as_os_str().as_encoded_bytes());
        } else if kind.is_file() {
            self.bytes(b"regular");
            if meta.permissions().mode() & 0o100 != 0 {
                self.bytes(b"executable");
                self.bytes(b"");
            }
            self.bytes(b"contents");
            let len = meta.len();
            self.hasher.update(len.to_le_bytes());
            let mut file = fs::File::open(path)?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut seen = 0u64;
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                seen += n as u64;
                self.hasher.update(&buf[..n]);
            }
            if seen != len {
                return Err(io::Error::other(format!(
                    "{} changed while it was hashed",
                    path.display()
                )));
            }
            let pad = ((8 - len % 8) % 8) as usize;
            self.hasher.update(&[0u8; 8][..pad]);
        } else if kind.is_dir() {
            self.bytes(b"directory");
            let mut names: Vec<_> = fs::read_dir(path)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<io::Result<_>>()?;
            names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
            for name in names {
                self.bytes(b"entry");
                self.bytes(b"(");
                self.bytes(b"name");
                self.bytes(name.as_encoded_bytes());
                self.bytes(b"node");
                self.node(&path.join(&name))?;
                self.bytes(b")");
            }
        } else {
            return Err(io::Error::other(format!(
                "{} is neither file, directory nor symlink",
                path.display()
            )));
        }
        self.bytes(b")");
        Ok(())
    }
}

/// The NAR hash of `path` (symlinks are not followed) as `sha256:<nixbase32>`,
/// the form of narHash in Nix's path info.
pub fn nar_hash(path: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut w = NarWriter {
        hasher: &mut hasher,
    };
    w.bytes(b"nix-archive-1");
    w.node(path)?;
    Ok(format!("sha256:{}", nixbase32(&hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nixbase32_known_answers() {
        // The SHA-256 of the empty string, as `nix-hash --type sha256 --to-base32` prints it.
        let empty = Sha256::digest(b"");
        assert_eq!(
            nixbase32(&empty),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(nixbase32(&[]), "");
        assert_eq!(nixbase32(&[0x1f]), "0z");
    }

    /// Invariant: decoding inverts encoding, and what is not Nix base-32 is refused.
    #[test]
    fn nixbase32_decodes_what_it_encodes() {
        for len in [0usize, 1, 2, 5, 20, 32, 64] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let text = nixbase32(&bytes);
            assert_eq!(
                nixbase32_decode(&text),
                Some(bytes),
                "round trip of {len} bytes"
            );
        }
        let empty = Sha256::digest(b"");
        assert_eq!(
            nixbase32_decode("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73").as_deref(),
            Some(&empty[..]),
            "the SHA-256 of nothing"
        );
        assert_eq!(nixbase32_decode("0e"), None, "'e' is not in the alphabet");
        assert_eq!(
            nixbase32_decode("000"),
            None,
            "3 digits are not a whole number of bytes"
        );
        assert_eq!(nixbase32_decode("z0"), None, "bits beyond the last byte");
    }

    #[test]
    fn nar_of_a_single_file_is_stable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("f");
        fs::write(&f, b"hello").expect("write");
        let a = nar_hash(&f).expect("hash");
        assert!(a.starts_with("sha256:") && a.len() == 7 + 52, "{a}");
        fs::write(&f, b"hellp").expect("write");
        assert_ne!(nar_hash(&f).expect("hash"), a, "contents change the hash");
    }
}
