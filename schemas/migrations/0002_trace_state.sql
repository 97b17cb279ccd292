-- What the trace forwarder last told edrone about each customer, so that a shop change that
-- repeats it is acked as a no-op instead of sent again.

CREATE TABLE trace_state (
    app_id                 text        NOT NULL,
    email                  text        NOT NULL,
    subscriber_status      smallint    CHECK (subscriber_status IN (0, 1)),
    -- NULL with sms_sent false: the shop never said; with sms_sent true: edrone's UNKNOWN.
    sms_subscriber_status  smallint    CHECK (sms_subscriber_status IN (0, 1)),
    sms_sent               boolean     NOT NULL DEFAULT false,
    phone                  text,
    event_id               text        NOT NULL,
    occurred_at            timestamptz NOT NULL,
    sent_at                timestamptz NOT NULL DEFAULT now(),
    edrone_event_id        text,
    PRIMARY KEY (app_id, email)
);
