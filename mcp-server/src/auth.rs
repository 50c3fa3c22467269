//! Who is calling: operator roles and tenant scopes in one typed `Caller`, and the random, hashed API tokens.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, every tenant.
    Admin,
    /// Operates the sites of one reseller.
    ResellerOperator,
    /// Operates named sites.
    SiteOperator,
    /// Reads evidence, fleet state and the audit log of named sites; changes nothing.
    Auditor,
    /// A box, identified by its client certificate: acts only for itself.
    Host,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::ResellerOperator => "reseller_operator",
            Role::SiteOperator => "site_operator",
            Role::Auditor => "auditor",
            Role::Host => "host",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        [
            Role::Admin,
            Role::ResellerOperator,
            Role::SiteOperator,
            Role::Auditor,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// Which tenants a caller's queries reach; the store filters every query by it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Tenants {
    All,
    Reseller { reseller_id: String },
    Sites { site_ids: Vec<String> },
    Host { site_id: String, host_id: String },
}

/// The authorization of one request, decided once and passed to every store query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Who, as the audit log names them: `operator:NAME`, `host:SITE/HOST`, `cli:USER`.
    pub actor: String,
    pub role: Role,
    pub tenants: Tenants,
    /// The peer address, when the call came over the network.
    pub peer: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing operator token: send Authorization: Bearer <token>")]
    MissingToken,
    #[error("the operator token is not valid")]
    BadToken,
    #[error("role {role} may not {action}")]
    Forbidden { role: &'static str, action: String },
    #[error("{0}")]
    Invalid(String),
}

impl Caller {
    /// The server's own command line, on the machine that holds its database.
    pub fn local(user: &str) -> Self {
        Self {
            actor: format!("cli:{user}"),
            role: Role::Admin,
            tenants: Tenants::All,
            peer: None,
        }
    }

    /// A box acting for itself.
    pub fn host(site_id: &str, host_id: &str, peer: Option<String>) -> Self {
        Self {
            actor: format!("host:{site_id}/{host_id}"),
            role: Role::Host,
            tenants: Tenants::Host {
                site_id: site_id.into(),
                host_id: host_id.into(),
            },
            peer,
        }
    }

    /// Whether this caller may see a host (or, with `host` None, a site) of that reseller.
    pub fn sees(&self, reseller_id: Option<&str>, site_id: &str, host_id: Option<&str>) -> bool {
        match &self.tenants {
            Tenants::All => true,
            Tenants::Reseller { reseller_id: r } => reseller_id == Some(r.as_str()),
            Tenants::Sites { site_ids } => site_ids.iter().any(|s| s == site_id),
            Tenants::Host {
                site_id: s,
                host_id: h,
            } => s == site_id && host_id.is_none_or(|id| id == h),
        }
    }

    /// Refuses callers whose role only reads.
    pub fn require_write(&self, action: &str) -> Result<(), AuthError> {
        match self.role {
            Role::Admin | Role::ResellerOperator | Role::SiteOperator => Ok(()),
            Role::Auditor | Role::Host => Err(AuthError::Forbidden {
                role: self.role.as_str(),
                action: action.into(),
            }),
        }
    }

    /// Refuses callers that are not admins.
    pub fn require_admin(&self, action: &str) -> Result<(), AuthError> {
        if self.role == Role::Admin {
            Ok(())
        } else {
            Err(AuthError::Forbidden {
                role: self.role.as_str(),
                action: action.into(),
            })
        }
    }
}

/// Prefix of operator tokens, so a leaked one is recognisable in a scan.
pub const OPERATOR_TOKEN_PREFIX: &str = "mcpo1_";

/// A new random token (256 bits) with `prefix`; only its hash is stored.
pub fn new_token(prefix: &str) -> String {
    use base64::Engine as _;
    let secret: [u8; 32] = rand::random();
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    )
}

/// SHA-256 of a token: what the database holds. A random 256-bit token needs
/// no slow hash; lookups are by this value.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Constant-time equality of two token hashes.
pub fn hashes_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// The scope a new operator gets from its role and the tenants named for it.
pub fn tenants_for(
    role: Role,
    reseller_id: Option<&str>,
    site_ids: &[String],
) -> Result<Tenants, AuthError> {
    match role {
        Role::Admin => {
            if reseller_id.is_some() || !site_ids.is_empty() {
                return Err(AuthError::Invalid(
                    "an admin reaches every tenant; drop --reseller and --site".into(),
                ));
            }
            Ok(Tenants::All)
        }
        Role::ResellerOperator => match reseller_id {
            Some(r) if site_ids.is_empty() => Ok(Tenants::Reseller {
                reseller_id: r.into(),
            }),
            Some(_) => Err(AuthError::Invalid(
                "a reseller operator is scoped by --reseller alone; drop --site".into(),
            )),
            None => Err(AuthError::Invalid(
                "a reseller operator needs --reseller R".into(),
            )),
        },
        Role::SiteOperator | Role::Auditor => {
            if site_ids.is_empty() || reseller_id.is_some() {
                return Err(AuthError::Invalid(format!(
                    "a {} is scoped by one or more --site S (and no --reseller)",
                    role.as_str()
                )));
            }
            Ok(Tenants::Sites {
                site_ids: site_ids.to_vec(),
            })
        }
        Role::Host => Err(AuthError::Invalid(
            "hosts enroll with a token; they are not operators".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_reach_only_their_tenants() {
        let reseller = Caller {
            actor: "operator:r".into(),
            role: Role::ResellerOperator,
            tenants: Tenants::Reseller {
                reseller_id: "acme".into(),
            },
            peer: None,
        };
        assert!(
            reseller.sees(Some("acme"), "clinic-1", None),
            "own reseller"
        );
        assert!(
            !reseller.sees(Some("other"), "clinic-1", None),
            "other reseller"
        );
        assert!(
            !reseller.sees(None, "direct-1", None),
            "a direct site is the MSP's"
        );
        let host = Caller::host("clinic-1", "a", None);
        assert!(host.sees(None, "clinic-1", Some("a")), "itself");
        assert!(!host.sees(None, "clinic-1", Some("b")), "not its neighbour");
        assert!(
            host.require_write("create orders").is_err(),
            "hosts only report"
        );
    }

    #[test]
    fn tokens_are_random_and_compared_by_hash() {
        let a = new_token(OPERATOR_TOKEN_PREFIX);
        let b = new_token(OPERATOR_TOKEN_PREFIX);
        assert_ne!(a, b, "random");
        assert!(a.starts_with(OPERATOR_TOKEN_PREFIX) && a.len() > 40, "{a}");
        assert!(hashes_equal(&token_hash(&a), &token_hash(&a)), "same");
        assert!(!hashes_equal(&token_hash(&a), &token_hash(&b)), "different");
        assert!(!hashes_equal(&token_hash(&a), &[0u8; 3]), "length differs");
    }

    #[test]
    fn operator_scopes_need_their_tenants() {
        assert!(tenants_for(Role::ResellerOperator, None, &[]).is_err());
        assert!(tenants_for(Role::Auditor, None, &[]).is_err());
        assert_eq!(
            tenants_for(Role::SiteOperator, None, &["s".into()]).ok(),
            Some(Tenants::Sites {
                site_ids: vec!["s".into()]
            })
        );
    }
}
