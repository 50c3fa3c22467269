//! Encryption at rest: every baseline file system and all swap resolve, through mountinfo and sysfs, to dm-crypt on LUKS2 with a strong cipher.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{Assessment, Context, Severity};
use crate::baseline::Encryption;
use crate::luks::{self, LuksHeader};

/// A mount from /proc/self/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mount {
    pub major: u32,
    pub minor: u32,
    pub mount_point: String,
    pub fs_type: String,
    pub source: String,
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < sep + 3 || sep < 5 {
            continue;
        }
        let Some((maj, min)) = fields[2].split_once(':') else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (maj.parse(), min.parse()) else {
            continue;
        };
        out.push(Mount {
            major,
            minor,
            mount_point: unescape(fields[4]),
            fs_type: fields[sep + 1].to_owned(),
            source: unescape(fields[sep + 2]),
        });
    }
    out
}

/// One layer of the block device stack under a file system.
#[derive(Clone, Debug, Serialize)]
pub struct Layer {
    pub device: String,
    /// device-mapper uuid (CRYPT-LUKS2-..., LVM-..., ...) when it is a dm device
    pub dm_uuid: Option<String>,
    pub luks: Option<LuksHeader>,
    pub luks_error: Option<String>,
}

/// What a file system or swap device sits on.
#[derive(Clone, Debug, Serialize)]
pub struct Stack {
    pub target: String,
    pub layers: Vec<Layer>,
}

impl Stack {
    fn crypt(&self) -> Option<&Layer> {
        self.layers.iter().find(|l| {
            l.dm_uuid
                .as_deref()
                .is_some_and(|u| u.starts_with("CRYPT-"))
        })
    }
}

/// Walks from a block device (a sysfs directory) down through its slaves.
fn walk(
    ctx: &Context<'_>,
    spec: &Encryption,
    sys_dev: &Path,
    layers: &mut Vec<Layer>,
    depth: usize,
) {
    if depth > 8 {
        return;
    }
    let Ok(real) = fs::canonicalize(sys_dev) else {
        return;
    };
    let device = real
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dm_uuid = fs::read_to_string(real.join("dm/uuid"))
        .ok()
        .map(|s| s.trim().to_owned());
    let mut layer = Layer {
        device: device.clone(),
        dm_uuid: dm_uuid.clone(),
        luks: None,
        luks_error: None,
    };
    let slaves: Vec<PathBuf> = fs::read_dir(real.join("slaves"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    if dm_uuid
        .as_deref()
        .is_some_and(|u| u.starts_with("CRYPT-LUKS"))
    {
        // The LUKS header sits at the start of the device under the mapping.
        let header = slaves.first().and_then(|s| {
            let name = fs::canonicalize(s)
                .ok()?
                .file_name()?
                .to_string_lossy()
                .into_owned();
            Some(name)
        });
        layer_luks(ctx, spec, &mut layer, header.as_deref());
    }
    layers.push(layer);
    for slave in slaves {
        walk(ctx, spec, &slave, layers, depth + 1);
    }
}

/// Reads the LUKS header of `/dev/<backing>`, or the copy a root unit exported.
fn layer_luks(ctx: &Context<'_>, spec: &Encryption, layer: &mut Layer, backing: Option<&str>) {
    let Some(backing) = backing else {
        layer.luks_error = Some("the crypt mapping has no backing device in sysfs".into());
        return;
    };
    let direct = luks::read(&ctx.path(format!("/dev/{backing}")));
    let result = match (&direct, &spec.luks_header_export_dir) {
        (Err(_), Some(dir)) => {
            // dm uuid: CRYPT-LUKS2-<uuid without dashes>-<name>
            let uuid = layer
                .dm_uuid
                .as_deref()
                .and_then(|u| u.split('-').nth(2))
                .unwrap_or_default();
            fs::read_dir(ctx.path(dir))
                .ok()
                .and_then(|entries| {
                    entries.flatten().map(|e| e.path()).find(|p| {
                        p.file_stem()
                            .is_some_and(|s| s.to_string_lossy().replace('-', "") == uuid)
                    })
                })
                .map(|p| luks::read(&p))
                .unwrap_or(direct)
        }
        _ => direct,
    };
    match result {
        Ok(h) => layer.luks = Some(h),
        Err(e) => layer.luks_error = Some(e),
    }
}

fn stack_for_device(ctx: &Context<'_>, spec: &Encryption, target: &str, sys_dev: &Path) -> Stack {
    let mut layers = Vec::new();
    walk(ctx, spec, sys_dev, &mut layers, 0);
    Stack {
        target: target.to_owned(),
        layers,
    }
}

fn judge(a: &mut Assessment, spec: &Encryption, stack: &Stack) {
    let Some(crypt) = stack.crypt() else {
        a.drift(
            Severity::Critical,
            format!(
                "{} is not encrypted (it sits on {})",
                stack.target,
                stack
                    .layers
                    .iter()
                    .map(|l| l.device.as_str())
                    .collect::<Vec<_>>()
                    .join(" <- ")
            ),
        );
        return;
    };
    let uuid = crypt.dm_uuid.as_deref().unwrap_or_default();
    if uuid.starts_with("CRYPT-PLAIN") {
        // Plain dm-crypt is acceptable only for swap with a random key.
        return;
    }
    match (&crypt.luks, &crypt.luks_error) {
        (Some(h), _) => {
            if h.version != 2 {
                a.drift(
                    Severity::High,
                    format!(
                        "{} is on LUKS{}, the baseline requires LUKS2",
                        stack.target, h.version
                    ),
                );
            }
            if !spec.allowed_ciphers.iter().any(|c| c == &h.cipher) {
                a.drift(
                    Severity::High,
                    format!(
                        "{} uses cipher {}, allowed: {}",
                        stack.target,
                        h.cipher,
                        spec.allowed_ciphers.join(", ")
                    ),
                );
            }
            if h.key_bits < spec.min_key_bits {
                a.drift(
                    Severity::High,
                    format!(
                        "{} uses a {}-bit key, the floor is {}",
                        stack.target, h.key_bits, spec.min_key_bits
                    ),
                );
            }
        }
        (None, Some(e)) => a.error(format!(
            "{}: LUKS header of {}: {e}",
            stack.target, crypt.device
        )),
        (None, None) => a.error(format!("{}: no LUKS header read", stack.target)),
    }
}

pub async fn check(ctx: &Context<'_>, spec: &Encryption, mut a: Assessment) -> Assessment {
    let mountinfo = match fs::read_to_string(ctx.path("/proc/self/mountinfo")) {
        Ok(t) => parse_mountinfo(&t),
        Err(e) => {
            a.error(format!("cannot read /proc/self/mountinfo: {e}"));
            return a;
        }
    };
    let mut stacks = Vec::new();
    for fs_path in &spec.filesystems {
        let want = fs_path.display().to_string();
        // The last mount on a mount point is the one in effect.
        let Some(mount) = mountinfo.iter().rev().find(|m| m.mount_point == want) else {
            a.drift(Severity::High, format!("{want} is not mounted"));
            continue;
        };
        let sys_dev = if mount.major == 0 {
            // Virtual device numbers (btrfs, overlay ...): follow the mount source instead.
            let name = Path::new(&mount.source)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let resolved = fs::canonicalize(ctx.path(&mount.source))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or(name);
            ctx.path(format!("/sys/class/block/{resolved}"))
        } else {
            ctx.path(format!("/sys/dev/block/{}:{}", mount.major, mount.minor))
        };
        if !sys_dev.exists() {
            a.drift(
                Severity::Critical,
                format!(
                    "{want} is on {} ({}), not a block device: not encrypted at rest",
                    mount.source, mount.fs_type
                ),
            );
            continue;
        }
        let stack = stack_for_device(ctx, spec, &want, &sys_dev);
        judge(&mut a, spec, &stack);
        stacks.push(stack);
    }
    if spec.swap {
        match fs::read_to_string(ctx.path("/proc/swaps")) {
            Ok(text) => {
                for line in text.lines().skip(1) {
                    let Some(dev) = line.split_whitespace().next() else {
                        continue;
                    };
                    let dev = unescape(dev);
                    let kind = line.split_whitespace().nth(1).unwrap_or("");
                    if kind == "file" {
                        // A swap file is as safe as the file system it lives on.
                        let host = mountinfo
                            .iter()
                            .filter(|m| dev.starts_with(&m.mount_point))
                            .max_by_key(|m| m.mount_point.len());
                        if let Some(m) = host {
                            let sys_dev =
                                ctx.path(format!("/sys/dev/block/{}:{}", m.major, m.minor));
                            let stack =
                                stack_for_device(ctx, spec, &format!("swap file {dev}"), &sys_dev);
                            judge(&mut a, spec, &stack);
                            stacks.push(stack);
                        }
                        continue;
                    }
                    let name = fs::canonicalize(ctx.path(&dev))
                        .ok()
                        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                        .or_else(|| {
                            Path::new(&dev)
                                .file_name()
                                .map(|n| n.to_string_lossy().into_owned())
                        })
                        .unwrap_or_default();
                    let stack = stack_for_device(
                        ctx,
                        spec,
                        &format!("swap {dev}"),
                        &ctx.path(format!("/sys/class/block/{name}")),
                    );
                    judge(&mut a, spec, &stack);
                    stacks.push(stack);
                }
            }
            Err(e) => a.error(format!("cannot read /proc/swaps: {e}")),
        }
    }
    a.fact("stacks", stacks);
    a.fact("allowed_ciphers", &spec.allowed_ciphers);
    a.fact("min_key_bits", spec.min_key_bits);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/mapper/root rw\n\
                    30 22 0:26 / /home\\040dir rw shared:5 - btrfs /dev/mapper/home rw,subvol=/home\n\
                    garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0].major, m[0].minor, m[0].mount_point.as_str()),
            (254, 0, "/")
        );
        assert_eq!(m[1].mount_point, "/home dir");
        assert_eq!(m[1].fs_type, "btrfs");
    }
}
