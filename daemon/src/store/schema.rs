//! Versioned migrations, applied in order at start. `PRAGMA user_version` holds the number
//! of migrations applied; a migration is never edited once released, only added.

/// Each entry is one migration; index + 1 is the version it brings the file to.
pub const MIGRATIONS: &[&str] = &[
    // 1: the dispatch slice.
    r#"
    CREATE TABLE calls (
        id          TEXT PRIMARY KEY,
        request_id  TEXT NOT NULL UNIQUE,
        status      TEXT NOT NULL,
        tel         TEXT NOT NULL,
        kiosk_id    TEXT,
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL,
        view        TEXT NOT NULL,   -- public CallView JSON: what state topics and get answers show
        body        TEXT NOT NULL    -- the whole call, for restart
    ) STRICT;
    CREATE INDEX calls_live ON calls(status)
        WHERE status NOT IN ('completed', 'cancelled', 'failed');
    CREATE INDEX calls_updated ON calls(updated_at);

    CREATE TABLE assignments (
        call_id          TEXT PRIMARY KEY REFERENCES calls(id) ON DELETE CASCADE,
        state            TEXT NOT NULL,  -- pending, offered, assigned, picked_up, done, cancelled, failed
        courier_id       TEXT,
        offer_expires_at INTEGER,
        grace_until      INTEGER,
        deadline_at      INTEGER NOT NULL,
        declined         TEXT NOT NULL,  -- JSON array of courier ids
        updated_at       INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX assignments_courier ON assignments(courier_id)
        WHERE state IN ('offered', 'assigned', 'picked_up');

    CREATE TABLE couriers (
        id          TEXT PRIMARY KEY,
        online      INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL,
        body        TEXT NOT NULL
    ) STRICT;

    CREATE TABLE events (
        id          INTEGER PRIMARY KEY,
        call_id     TEXT,
        courier_id  TEXT,
        kind        TEXT NOT NULL,
        at          INTEGER NOT NULL,  -- when it happened (device time for courier actions)
        recorded_at INTEGER NOT NULL,
        correlation TEXT,
        data        TEXT NOT NULL
    ) STRICT;
    CREATE INDEX events_call ON events(call_id);

    CREATE TABLE outbox (
        id          INTEGER PRIMARY KEY,
        topic       TEXT NOT NULL,
        payload     BLOB NOT NULL,
        retain      INTEGER NOT NULL,
        expiry_s    INTEGER,
        created_at  INTEGER NOT NULL,
        sent_at     INTEGER
    ) STRICT;
    CREATE INDEX outbox_unsent ON outbox(id) WHERE sent_at IS NULL;

    CREATE TABLE requests (
        request_id  TEXT PRIMARY KEY,
        call_id     TEXT NOT NULL,
        created_at  INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE courier_replies (
        courier_id  TEXT NOT NULL,
        reply_id    TEXT NOT NULL,
        call_id     TEXT NOT NULL,
        action      TEXT NOT NULL,
        recorded_at INTEGER NOT NULL,
        PRIMARY KEY (courier_id, reply_id)
    ) STRICT;
    "#,
    // 2: customer notification deliveries to sinks other than MQTT (the HTTP webhook).
    // A row is written in the same transaction as the notification's outbox row; `seq`
    // is that order, which is also the order per call the sink must keep.
    r#"
    CREATE TABLE deliveries (
        seq             INTEGER PRIMARY KEY,
        id              TEXT NOT NULL,     -- notification id: the receiver's dedup key
        call_id         TEXT NOT NULL,
        sink            TEXT NOT NULL,     -- 'webhook'
        payload         BLOB NOT NULL,     -- notification JSON, sent as is
        state           TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,  -- unix ms; survives restarts
        last_error      TEXT,
        created_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL,
        redrives        INTEGER NOT NULL DEFAULT 0,  -- operator re-drives of a dead row
        UNIQUE (sink, id)
    ) STRICT;
    CREATE INDEX deliveries_pending ON deliveries(sink, seq) WHERE state = 'pending';
    CREATE INDEX deliveries_state ON deliveries(state, updated_at);
    "#,
    // 3: what the retention prune looks a finished call's rows up by. Without these it read
    // the whole of `courier_replies` and `deliveries` once for every call it deleted, in
    // the writer's transaction.
    r#"
    CREATE INDEX courier_replies_call ON courier_replies(call_id);
    CREATE INDEX deliveries_call ON deliveries(call_id);
    "#,
    // 4: a call's request id is found through `calls.request_id` (unique). The `requests`
    // table repeated it: a row and a leaf of its key index, at a random place, written
    // with every call.
    r#"
    DROP TABLE requests;
    "#,
];
