//! What the console needs from the database beyond the API's calls: server-side
//! sessions, operator passwords, the enrollment tokens and their revocation, and a
//! filtered evidence listing. Scoped by the `Caller` like every other query.

use jiff::Timestamp;
use serde::Serialize;

use super::{BundleRecord, Operator, Result};
use crate::auth::Caller;

/// A signed-in browser: the operator it acts for and its CSRF token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleSession {
    pub operator: Operator,
    /// The synchronizer token every form of this session carries.
    pub csrf_token: String,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
}

/// An enrollment token as the console lists it (never its secret or hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TokenListing {
    pub token_id: String,
    pub site_id: String,
    pub reseller_id: Option<String>,
    pub uses_left: u32,
    pub expires_at: Timestamp,
    pub created_by: String,
    pub created_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

/// Which bundles an evidence listing shows; `None` matches anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BundleFilter {
    pub site_id: Option<String>,
    pub host_id: Option<String>,
    pub check: Option<String>,
    pub outcome: Option<String>,
    /// At most this many, newest received first.
    pub limit: u32,
}

pub trait ConsoleStore {
    /// Stores a new session for `operator` under the hash of its cookie value.
    fn create_console_session(
        &self,
        session_hash: &[u8; 32],
        operator: &str,
        csrf_token: &str,
        created_at: Timestamp,
        expires_at: Timestamp,
    ) -> Result<()>;
    /// The session with this hash if it has not expired at `now` and its operator
    /// exists and is not disabled (the cookie itself authorizes the lookup).
    fn console_session(
        &self,
        session_hash: &[u8; 32],
        now: Timestamp,
    ) -> Result<Option<ConsoleSession>>;
    /// Ends a session (sign-out); false when there was none.
    fn delete_console_session(&self, session_hash: &[u8; 32]) -> Result<bool>;
    /// Deletes the sessions expired at `now`; returns how many.
    fn purge_console_sessions(&self, now: Timestamp) -> Result<u64>;

    /// Sets (or replaces) `name`'s password as an argon2id PHC string. The operator
    /// itself or an admin may.
    fn set_operator_password(
        &self,
        caller: &Caller,
        name: &str,
        phc: &str,
        at: Timestamp,
    ) -> Result<()>;
    /// For sign-in: the operator named so (not disabled) and its PHC string, if it has a
    /// password (the password itself authorizes what follows).
    fn operator_password(&self, name: &str) -> Result<Option<(Operator, String)>>;

    /// The enrollment tokens of the caller's tenants, newest first.
    fn enrollment_tokens(&self, caller: &Caller) -> Result<Vec<TokenListing>>;
    /// Revokes a token: no box can enroll with it from now on. False when it was
    /// already revoked; NotFound outside the caller's tenants.
    fn revoke_enrollment_token(
        &self,
        caller: &Caller,
        token_id: &str,
        at: Timestamp,
    ) -> Result<bool>;

    /// Bundles of the caller's tenants matching `filter`, newest received first.
    fn bundles(&self, caller: &Caller, filter: &BundleFilter) -> Result<Vec<BundleRecord>>;
    /// How many bundles the index holds per host, check and outcome, in the caller's tenants.
    fn bundle_counts(&self, caller: &Caller) -> Result<Vec<BundleCount>>;
}

/// One group of [`ConsoleStore::bundle_counts`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BundleCount {
    pub reseller_id: Option<String>,
    pub site_id: String,
    pub host_id: String,
    pub check: String,
    pub outcome: String,
    pub count: u64,
}

/// Whether `caller` may set `name`'s password: itself, or an admin.
pub fn may_set_password(caller: &Caller, name: &str) -> bool {
    caller.role == crate::auth::Role::Admin || caller.actor == format!("operator:{name}")
}
