-- The ledger of what edrone said about each subscriber, and the inbox that makes applying
-- edrone's webhooks idempotent (DESIGN.md promises 2 and 3).
-- Runs with search_path set to the bridge's schema (edrone_bridge unless configured otherwise).

CREATE TABLE subscribers (
    app_id      text        NOT NULL,
    channel     text        NOT NULL CHECK (channel IN ('email', 'sms')),
    address     text        NOT NULL,
    status      smallint    CHECK (status IN (0, 1)),   -- NULL: edrone's UNKNOWN
    reason      integer,
    event_id    text        NOT NULL,
    event_date  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, channel, address)
);

-- One row per event ever received; the primary key absorbs redeliveries and edrone's retries.
CREATE TABLE inbox (
    app_id          text        NOT NULL,
    event_id        text        NOT NULL,
    channel         text        NOT NULL,
    address         text        NOT NULL,
    status          smallint,
    reason          integer,
    event_date      timestamptz NOT NULL,
    event_date_raw  text        NOT NULL,
    protocol        text        NOT NULL,
    received_at     timestamptz NOT NULL,
    processed_at    timestamptz NOT NULL DEFAULT now(),
    -- applied | older (a newer status was already stored) | filtered (the app's sync filter)
    outcome         text        NOT NULL CHECK (outcome IN ('applied', 'older', 'filtered')),
    PRIMARY KEY (app_id, event_id)
);

CREATE INDEX inbox_subscriber_idx ON inbox (app_id, channel, address, event_date);
CREATE INDEX inbox_processed_at_idx ON inbox (processed_at);
