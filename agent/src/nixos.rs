//! The running NixOS system: which closure it is, its NAR hash and the revisions it was built from.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::nar;

/// The link NixOS points at the active system.
pub const CURRENT_SYSTEM: &str = "/run/current-system";

/// Names the exact system a bundle speaks of. Every field is null on a
/// machine that is not NixOS (the local default on any Linux box).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemIdentity {
    /// The system's top-level store path (`/run/current-system` resolved).
    pub store_path: Option<String>,
    /// NAR hash of that path, `sha256:<nixbase32>`, as `nix-hash --type sha256 --base32` gives it.
    pub nar_hash: Option<String>,
    /// The flake revision the system was built from (the module writes it into the top level).
    pub flake_revision: Option<String>,
}

/// What the agent learns once about the system it runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunningSystem {
    pub identity: SystemIdentity,
    /// The NixOS release and nixpkgs revision (`nixos-version`).
    pub nixos_revision: Option<String>,
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

impl RunningSystem {
    /// The system behind `/run/current-system`.
    pub fn detect() -> Self {
        Self::detect_at(Path::new(CURRENT_SYSTEM))
    }

    /// The system behind `link`, which must resolve into a Nix store.
    pub fn detect_at(link: &Path) -> Self {
        let Ok(target) = fs::canonicalize(link) else {
            return Self::default();
        };
        let nar_hash = match nar::nar_hash(&target) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(path = %target.display(), error = %e, "cannot compute the NAR hash of the running system");
                None
            }
        };
        Self {
            identity: SystemIdentity {
                store_path: Some(target.display().to_string()),
                nar_hash,
                flake_revision: read_trimmed(&target.join("configuration-revision")),
            },
            nixos_revision: read_trimmed(&target.join("nixos-version")),
        }
    }
}
