"""
The PostgreSQL store's schema, made and changed only by numbered migrations
(C{popserv db init|upgrade}): the version reached is kept in
C{popserv_schema_version}, and each migration runs in one transaction with
the version bump, under an advisory lock so two upgrades never interleave.
Nobody edits the schema by hand: a change is a new entry at the end of
L{MIGRATIONS}.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MIGRATIONS", "CURRENT", "schemaVersion", "migrate", "SchemaError"]

#: The advisory lock (one bigint) that serializes migrations.
_MIGRATION_LOCK = 0x706F_7073_6572_7600  # "popserv\0"

#: Migration N (1-based) takes the schema from version N-1 to N.
MIGRATIONS: tuple[str, ...] = (
    # 1: maildrops, messages, body chunks, last logins.
    """
    CREATE TABLE maildrops (
        id bigserial PRIMARY KEY,
        name text NOT NULL UNIQUE
    );
    CREATE TABLE messages (
        id bigserial PRIMARY KEY,
        maildrop bigint NOT NULL REFERENCES maildrops ON DELETE CASCADE,
        uid text NOT NULL,
        size bigint NOT NULL,
        received double precision NOT NULL,
        UNIQUE (maildrop, uid)
    );
    -- The listing: one index-only scan in the order messages are numbered.
    CREATE INDEX messages_listing ON messages (maildrop, received, id) INCLUDE (uid, size);
    -- A delivery writes its chunks before its message row (which it adds at
    -- commit, when its UIDL is checked): the reference is checked at commit.
    CREATE TABLE chunks (
        message bigint NOT NULL
            REFERENCES messages ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
        seq integer NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (message, seq)
    );
    ALTER TABLE chunks ALTER COLUMN data SET STORAGE EXTERNAL;
    CREATE TABLE logins (
        name text PRIMARY KEY,
        last double precision NOT NULL
    );
    """,
    # 2: users (--passdb pgsql:URI; popserv user add|del|list manage them).
    """
    CREATE TABLE users (
        name text PRIMARY KEY,
        -- {SCHEME}secret, or a bare crypt string, as in a passwd-file.
        password text NOT NULL,
        -- Per-user settings; NULL: the server's.
        login_delay integer CHECK (login_delay >= 0),
        expire text CHECK (expire ~ '^([0-9]+|NEVER)$'),
        quota_bytes bigint CHECK (quota_bytes >= 0),
        quota_messages bigint CHECK (quota_messages >= 0),
        nologin boolean NOT NULL DEFAULT false,
        created timestamptz NOT NULL DEFAULT now()
    );
    """,
    # 3: what the nodes share beyond mail: failed logins per client address
    # (the auth penalty) and small random keys (SCRAM's salt key).
    """
    CREATE TABLE auth_failures (
        address text PRIMARY KEY,
        count integer NOT NULL,
        last double precision NOT NULL
    );
    CREATE TABLE shared_keys (
        name text PRIMARY KEY,
        value bytea NOT NULL
    );
    """,
    # 4: a change counter per maildrop, bumped in the transaction of every
    # delivery and removal: a node keeps a maildrop's listing while its
    # counter is unchanged (one small query at login instead of the listing).
    """
    ALTER TABLE maildrops ADD COLUMN changes bigint NOT NULL DEFAULT 0;
    CREATE FUNCTION popserv_maildrops_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'DELETE' THEN
            UPDATE maildrops SET changes = changes + 1
                WHERE id IN (SELECT DISTINCT maildrop FROM old_rows);
        ELSE
            UPDATE maildrops SET changes = changes + 1
                WHERE id IN (SELECT DISTINCT maildrop FROM new_rows);
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER messages_inserted AFTER INSERT ON messages
        REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION popserv_maildrops_changed();
    CREATE TRIGGER messages_updated AFTER UPDATE ON messages
        REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION popserv_maildrops_changed();
    CREATE TRIGGER messages_deleted AFTER DELETE ON messages
        REFERENCING OLD TABLE AS old_rows
        FOR EACH STATEMENT EXECUTE FUNCTION popserv_maildrops_changed();
    """,
    # 5: bodies stored in transfer form (what RETR sends but the final ".":
    # CRLF, byte-stuffed), so that RETR passes them through; the rows stored
    # before are the message as delivered, and are served as before.
    """
    ALTER TABLE messages ADD COLUMN transfer_form boolean NOT NULL DEFAULT false;
    """,
)

#: The version this popserv needs.
CURRENT = len(MIGRATIONS)


class SchemaError(Exception):
    """The database's schema is missing, older or newer than this popserv's."""


def schemaVersion(conn: Any) -> int:
    """The schema version of the database (0: never initialized)."""
    row = conn.execute("SELECT to_regclass('popserv_schema_version') IS NOT NULL").fetchone()
    if not row[0]:
        return 0
    row = conn.execute("SELECT max(version) FROM popserv_schema_version").fetchone()
    return int(row[0] or 0)


def migrate(conn: Any) -> tuple[int, int]:
    """
    Bring the schema to L{CURRENT}, one transaction per migration.

    @return: the version before and after.
    @raise SchemaError: the database is newer than this popserv.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS popserv_schema_version ("
            " version integer PRIMARY KEY,"
            " applied timestamptz NOT NULL DEFAULT now())"
        )
    before = schemaVersion(conn)
    if before > CURRENT:
        raise SchemaError(f"schema version {before} is newer than this popserv's {CURRENT}")
    for version in range(before + 1, CURRENT + 1):
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            if schemaVersion(conn) >= version:  # another upgrade did it meanwhile
                continue
            conn.execute(MIGRATIONS[version - 1])
            conn.execute("INSERT INTO popserv_schema_version (version) VALUES (%s)", (version,))
    return before, schemaVersion(conn)
