//! Antivirus health: ClamAV's units, the signature database's age (from its headers), and a live EICAR test through clamd.

use std::fs;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Assessment, Context, Severity, age_secs};
use crate::baseline::AvHealth;

/// The 512-byte header of a ClamAV .cvd/.cld database.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CvdHeader {
    pub build_time: String,
    pub version: u64,
    pub signatures: u64,
    pub functionality_level: u64,
    pub builder: String,
    /// Build time in seconds since the epoch.
    pub build_epoch: i64,
}

pub const CVD_HEADER_LEN: usize = 512;

/// Parses `ClamAV-VDB:<time>:<version>:<sigs>:<flevel>:<md5>:<dsig>:<builder>:<stime>`.
pub fn parse_cvd_header(bytes: &[u8]) -> Result<CvdHeader, String> {
    if bytes.len() < CVD_HEADER_LEN {
        return Err(format!(
            "header is {} bytes, a CVD header is {CVD_HEADER_LEN}",
            bytes.len()
        ));
    }
    let text = std::str::from_utf8(&bytes[..CVD_HEADER_LEN])
        .map_err(|_| "header is not text".to_owned())?
        .trim_end_matches([' ', '\0']);
    let fields: Vec<&str> = text.split(':').collect();
    if fields.first() != Some(&"ClamAV-VDB") {
        return Err("no ClamAV-VDB magic".into());
    }
    if fields.len() < 9 {
        return Err(format!("{} header fields, expected 9", fields.len()));
    }
    let num = |i: usize, what: &str| -> Result<u64, String> {
        fields[i]
            .trim()
            .parse()
            .map_err(|_| format!("{what} {:?} is not a number", fields[i]))
    };
    let build_epoch = fields[8]
        .trim()
        .parse::<i64>()
        .map_err(|_| format!("build time {:?} is not a number", fields[8]))?;
    Ok(CvdHeader {
        build_time: fields[1].to_owned(),
        version: num(2, "version")?,
        signatures: num(3, "signature count")?,
        functionality_level: num(4, "functionality level")?,
        builder: fields[7].to_owned(),
        build_epoch,
    })
}

/// A database file: its name, its header when it has one, and when it was built.
#[derive(Clone, Debug, Serialize)]
pub struct Database {
    pub file: String,
    pub header: Option<CvdHeader>,
    pub built: Option<jiff::Timestamp>,
    pub error: Option<String>,
}

const DB_EXTENSIONS: &[&str] = &[
    "cvd", "cld", "cud", "hdb", "hsb", "ndb", "ldb", "mdb", "msb", "ndu", "ldu", "cdb", "yara",
    "yar", "ign2", "fp", "sfp",
];

/// Every signature database in `dir`: .cvd/.cld by their header's build time,
/// plain signature files by their modification time.
pub fn read_databases(dir: &Path) -> std::io::Result<Vec<Database>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(ext) = path.extension().and_then(|e| e.to_str()) else {
            continue;
        };
        if !DB_EXTENSIONS.contains(&ext) {
            continue;
        }
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        if matches!(ext, "cvd" | "cld" | "cud") {
            let mut header = vec![0u8; CVD_HEADER_LEN];
            let parsed = fs::File::open(&path)
                .and_then(|mut f| {
                    use std::io::Read;
                    let n = f.read(&mut header)?;
                    header.truncate(n);
                    Ok(())
                })
                .map_err(|e| e.to_string())
                .and_then(|()| parse_cvd_header(&header));
            match parsed {
                Ok(h) => {
                    let built = jiff::Timestamp::from_second(h.build_epoch).ok();
                    out.push(Database {
                        file,
                        header: Some(h),
                        built,
                        error: None,
                    });
                }
                Err(e) => out.push(Database {
                    file,
                    header: None,
                    built: None,
                    error: Some(e),
                }),
            }
        } else {
            let built = fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| jiff::Timestamp::try_from(t).ok());
            out.push(Database {
                file,
                header: None,
                built,
                error: None,
            });
        }
    }
    out.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(out)
}

/// The EICAR test file, assembled at run time so that this binary itself
/// carries no signature a scanner would flag.
pub fn eicar() -> Vec<u8> {
    let parts = [
        "X5O!P%@AP[4\\PZX54(P^)7CC)7}$",
        "EICAR-STANDARD-ANTIVIRUS-",
        "TEST-FILE!$H+H*",
    ];
    parts.concat().into_bytes()
}

/// Sends one clamd command (z-form, NUL-terminated) and reads the NUL-terminated reply.
async fn clamd_request(
    socket: &Path,
    command: &str,
    stream: Option<&[u8]>,
) -> Result<String, String> {
    let talk = async {
        let mut conn = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| format!("cannot connect to clamd at {}: {e}", socket.display()))?;
        let mut msg = format!("z{command}").into_bytes();
        msg.push(0);
        if let Some(data) = stream {
            for chunk in data.chunks(8192) {
                msg.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
                msg.extend_from_slice(chunk);
            }
            msg.extend_from_slice(&0u32.to_be_bytes());
        }
        conn.write_all(&msg)
            .await
            .map_err(|e| format!("clamd {command}: {e}"))?;
        let mut reply = Vec::new();
        // A reply is one short line; more than 4 KiB is not clamd.
        let mut limited = (&mut conn).take(4096);
        limited
            .read_to_end(&mut reply)
            .await
            .map_err(|e| format!("clamd {command}: {e}"))?;
        let text = String::from_utf8_lossy(&reply)
            .trim_end_matches(['\0', '\n'])
            .to_owned();
        Ok::<String, String>(text)
    };
    match tokio::time::timeout(Duration::from_secs(10), talk).await {
        Ok(r) => r,
        Err(_) => Err(format!("clamd did not answer {command} within 10 s")),
    }
}

pub async fn check(ctx: &Context<'_>, spec: &AvHealth, mut a: Assessment) -> Assessment {
    for unit in &spec.units {
        a.require_active(ctx, unit, Severity::High).await;
    }
    let socket = ctx.path(&spec.clamd_socket);
    match clamd_request(&socket, "VERSION", None).await {
        Ok(v) => a.fact("clamd_version", v),
        Err(e) => a.drift(Severity::High, e),
    }

    match read_databases(&ctx.path(&spec.database_dir)) {
        Ok(dbs) => {
            for db in dbs.iter().filter(|d| d.error.is_some()) {
                a.error(format!(
                    "signature database {}: {}",
                    db.file,
                    db.error.as_deref().unwrap_or("unreadable")
                ));
            }
            let newest = dbs.iter().filter_map(|d| d.built).max();
            match newest {
                None => {
                    a.drift(
                        Severity::Critical,
                        format!("no signature database in {}", spec.database_dir.display()),
                    );
                    a.recommend("refresh_av_signatures", json!({}));
                }
                Some(t) => {
                    let hours = age_secs(ctx.now, t) / 3600;
                    a.fact("newest_signatures", t);
                    a.fact("signature_age_hours", hours);
                    if hours as u64 > spec.max_signature_age_hours {
                        a.drift(
                            Severity::High,
                            format!(
                                "the newest signatures are {hours} h old (limit {} h)",
                                spec.max_signature_age_hours
                            ),
                        );
                        a.recommend("refresh_av_signatures", json!({}));
                    }
                }
            }
            a.fact("databases", dbs);
        }
        Err(e) => a.error(format!("cannot read {}: {e}", spec.database_dir.display())),
    }

    if spec.eicar_test {
        match clamd_request(&socket, "INSTREAM", Some(&eicar())).await {
            Ok(reply) if reply.ends_with("FOUND") => {
                a.fact("eicar_test", json!({ "detected": true, "reply": reply }))
            }
            Ok(reply) => {
                a.fact("eicar_test", json!({ "detected": false, "reply": reply }));
                a.drift(
                    Severity::Critical,
                    format!("clamd did not detect the EICAR test file (it answered {reply:?})"),
                );
                a.recommend("refresh_av_signatures", json!({}));
            }
            Err(e) => {
                a.fact("eicar_test", json!({ "detected": false, "error": e }));
                a.drift(
                    Severity::Critical,
                    format!("the EICAR test could not run: {e}"),
                );
            }
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(text: &str) -> Vec<u8> {
        let mut h = text.as_bytes().to_vec();
        h.resize(CVD_HEADER_LEN, b' ');
        h
    }

    #[test]
    fn parses_a_cvd_header() {
        let h = parse_cvd_header(&header(
            "ClamAV-VDB:29 Nov 2026 07-10 +0000:27840:2078316:90:0123456789abcdef0123456789abcdef:sig:raynman:1795936200",
        ))
        .expect("valid header");
        assert_eq!(h.version, 27840);
        assert_eq!(h.signatures, 2_078_316);
        assert_eq!(h.build_epoch, 1_795_936_200);
    }

    #[test]
    fn truncated_or_foreign_headers_are_errors() {
        assert!(
            parse_cvd_header(b"ClamAV-VDB:1")
                .expect_err("short")
                .contains("512")
        );
        assert!(
            parse_cvd_header(&header("GIF89a"))
                .expect_err("magic")
                .contains("magic")
        );
        assert!(
            parse_cvd_header(&header("ClamAV-VDB:a:b:c"))
                .expect_err("fields")
                .contains("fields")
        );
        let e = parse_cvd_header(&header("ClamAV-VDB:t:x:1:1:m:d:b:1")).expect_err("version");
        assert!(e.contains("version"), "{e}");
    }

    #[test]
    fn eicar_is_the_standard_68_bytes() {
        let e = eicar();
        assert_eq!(e.len(), 68);
        assert_eq!(
            crate::crypto::sha256_hex(&e),
            "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f"
        );
    }

    proptest::proptest! {
        #[test]
        fn cvd_parser_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..700)) {
            let _ = parse_cvd_header(&bytes);
        }
    }
}
