-- One sync state per (app_id, channel, address), shared by both directions (DESIGN.md promise
-- 6): the winning change (the newest a person made, on either side), what edrone and what the
-- shop are known to hold, the bridge's traces awaiting edrone's acknowledgement and its writes
-- awaiting the shop's echo, and the history of every change and what the bridge decided.

CREATE TABLE sync_state (
    app_id         text        NOT NULL,
    channel        text        NOT NULL CHECK (channel IN ('email', 'sms')),
    address        text        NOT NULL,
    -- Learning order of this address's changes, for ties at the sources' resolution.
    seq            bigint      NOT NULL DEFAULT 0,
    -- The winner; NULL side: nothing known yet.
    side           text        CHECK (side IN ('edrone', 'shop')),
    status         smallint    CHECK (status IN (0, 1)),
    made_at        timestamptz,
    made_seq       bigint,
    whole_seconds  boolean     NOT NULL DEFAULT false,
    -- The earliest the winner can have been made (a tie at the second over a change known to
    -- the millisecond keeps that change's time): a later challenger must be later than this.
    made_floor     timestamptz,
    event_id       text,
    -- What edrone holds, as far as its webhooks and its answers to traces tell (its clock).
    edrone_known   boolean     NOT NULL DEFAULT false,
    edrone_status  smallint    CHECK (edrone_status IN (0, 1)),
    edrone_at      timestamptz,
    edrone_seq     bigint,
    edrone_whole   boolean     NOT NULL DEFAULT false,
    -- The latest whole second edrone was seen in, and the statuses seen then (bits: 1
    -- unsubscribed, 2 subscribed, 4 unknown): more than one, and edrone's status is unsure.
    edrone_second  timestamptz,
    edrone_seen    smallint    NOT NULL DEFAULT 0,
    -- What the shop holds, as far as its changes and the bridge's writes tell.
    shop_known     boolean     NOT NULL DEFAULT false,
    shop_status    smallint    CHECK (shop_status IN (0, 1)),
    shop_at        timestamptz,
    shop_seq       bigint,
    -- The customer's e-mail, so that a trace about an SMS address can name the customer.
    email          text,
    -- Open traces and awaited writes of this address: only then are they looked up.
    open_traces    integer     NOT NULL DEFAULT 0,
    awaited_writes integer     NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, channel, address)
);

CREATE TABLE sync_traces (
    id               bigserial   PRIMARY KEY,
    app_id           text        NOT NULL,
    channel          text        NOT NULL,
    address          text        NOT NULL,
    status           smallint,
    -- The time of the change the trace delivers (the winner's), and that change's event id.
    made_at          timestamptz NOT NULL,
    change_event_id  text        NOT NULL,
    corrective       boolean     NOT NULL DEFAULT false,
    -- sending | sent | uncertain (open); acknowledged | superseded | lapsed | refused (closed)
    state            text        NOT NULL,
    sent_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    closed_at        timestamptz
);
CREATE INDEX sync_traces_open_idx ON sync_traces (app_id, channel, address, id)
    WHERE state IN ('sending', 'sent', 'uncertain');

CREATE TABLE sync_writes (
    -- The id a shop's resulting change echoes back as caused_by.
    write_id         uuid        PRIMARY KEY,
    app_id           text        NOT NULL,
    channel          text        NOT NULL,
    address          text        NOT NULL,
    status           smallint,
    change_event_id  text        NOT NULL,
    -- 'table' (the mapped table: no echo, the outbox trigger skips it) or 'bus' (an event the
    -- shop applies, whose echo is expected).
    target           text        NOT NULL CHECK (target IN ('table', 'bus')),
    written_at       timestamptz NOT NULL,
    -- expected (an echo will come) | done (none will) | echoed | lapsed
    state            text        NOT NULL,
    closed_at        timestamptz
);
CREATE INDEX sync_writes_expected_idx ON sync_writes (app_id, channel, address, written_at)
    WHERE state = 'expected';

-- What the bridge made of each of edrone's webhooks is kept with it in the inbox (its history
-- line: the learning order per address, the decision, why); the shop's changes and what the
-- bridge did itself are in sync_history.
ALTER TABLE inbox
    ADD COLUMN sync_seq bigint,
    ADD COLUMN sync_decision text,
    ADD COLUMN sync_why text;

-- The shop's changes and the bridge's own actions (traces, writes, corrections), in the order the
-- bridge learned or did them, with what it decided and why.
CREATE TABLE sync_history (
    id          bigserial   PRIMARY KEY,
    app_id      text        NOT NULL,
    channel     text        NOT NULL,
    address     text        NOT NULL,
    seq         bigint      NOT NULL,
    -- edrone | shop (a change from that side) | bridge (what the bridge did: a trace, a write)
    origin      text        NOT NULL,
    kind        text        NOT NULL,
    event_id    text,
    status      smallint,
    reason      integer,
    made_at     timestamptz,
    learned_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    decision    text        NOT NULL,
    why         text        NOT NULL
);
CREATE INDEX sync_history_address_idx ON sync_history (address, app_id, id);

-- The shop's changes already read (platform events and outbox rows): a redelivery is no news.
CREATE TABLE shop_inbox (
    app_id       text        NOT NULL,
    event_id     text        NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, event_id)
);

-- Messages the bridge publishes after its transaction commits (a transactional outbox): edrone's
-- changes for the shop's bus, and requests to bring edrone to the winner.
CREATE TABLE dispatch (
    id           bigserial   PRIMARY KEY,
    exchange     text        NOT NULL,
    routing_key  text        NOT NULL,
    message_id   text        NOT NULL,
    type         text        NOT NULL,
    body         jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    sent_at      timestamptz
);
CREATE INDEX dispatch_unsent_idx ON dispatch (id) WHERE sent_at IS NULL;

-- Superseded by sync_state and sync_traces.
DROP TABLE trace_state;
