-- 0004: the console's server-side sessions (shared by every server process on
-- this database), operator passwords (argon2id PHC strings) and revocation of
-- enrollment tokens: the same tables and meaning as migrations/sqlite/0004_console.sql.
-- Released migrations are never edited; changes go into a new file.

CREATE TABLE console_sessions (
    session_hash BYTEA PRIMARY KEY,
    operator TEXT NOT NULL REFERENCES operators(name),
    csrf_token TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX console_sessions_by_expiry ON console_sessions (expires_at);

CREATE TABLE operator_passwords (
    name TEXT PRIMARY KEY REFERENCES operators(name),
    phc TEXT NOT NULL,
    set_at BIGINT NOT NULL
);

ALTER TABLE enrollment_tokens ADD COLUMN revoked_at BIGINT;
