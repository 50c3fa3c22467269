-- 0004: the console's server-side sessions (shared by every server process on
-- this database), operator passwords (argon2id PHC strings) and revocation of
-- enrollment tokens. Times are Unix microseconds.
-- Released migrations are never edited; changes go into a new file.

CREATE TABLE console_sessions (
    session_hash BLOB PRIMARY KEY,
    operator TEXT NOT NULL REFERENCES operators(name),
    csrf_token TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX console_sessions_by_expiry ON console_sessions (expires_at);

CREATE TABLE operator_passwords (
    name TEXT PRIMARY KEY REFERENCES operators(name),
    phc TEXT NOT NULL,
    set_at INTEGER NOT NULL
);

ALTER TABLE enrollment_tokens ADD COLUMN revoked_at INTEGER;
