-- The outbox of a shop without an event bus: a trigger on the shop's mapped table records each
-- subscription change here, and `edrone-bridge relay` publishes the rows as platform events.
-- The trigger itself is created by the relay at start (the table and columns are per-app
-- configuration, unknown to migrations); this file installs the function it runs.

CREATE TABLE outbox (
    id                     bigserial   PRIMARY KEY,
    app_id                 text        NOT NULL,
    event_id               uuid        NOT NULL DEFAULT gen_random_uuid(),
    email                  text        NOT NULL,
    subscriber_status      smallint    CHECK (subscriber_status IN (0, 1)),   -- NULL: unknown
    -- false: the mapping has no SMS column, and the event says nothing about SMS.
    sms_tracked            boolean     NOT NULL DEFAULT false,
    sms_subscriber_status  smallint    CHECK (sms_subscriber_status IN (0, 1)),
    phone                  text,
    occurred_at            timestamptz NOT NULL DEFAULT clock_timestamp(),
    sent_at                timestamptz,
    -- Set (with sent_at) for a row that is not a valid platform event and was never published.
    error                  text
);

CREATE INDEX outbox_unsent_idx ON outbox (id) WHERE sent_at IS NULL;

-- Arguments (all text, '' for an option not configured), written by the relay:
--   0 app_id, 1 address column, 2 e-mail status column, 3 its subscribed value,
--   4 its unsubscribed value, 5 SMS status column, 6 phone column, 7 SMS subscribed value,
--   8 SMS unsubscribed value.
-- Values are compared as to_jsonb() renders them (true, 1, 'Y'); any other value is unknown.
-- Changes made under the setting edrone_bridge.origin = 'edrone' (the subscription consumer's
-- transactions) are edrone's own and are skipped (DESIGN.md promise 5).
CREATE FUNCTION record_subscription_change() RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    v_new      jsonb := to_jsonb(NEW);
    v_old      jsonb;
    v_email    text := btrim(to_jsonb(NEW) ->> TG_ARGV[1]);
    v_sms      boolean := TG_ARGV[5] <> '';
    v_phone    text;
BEGIN
    IF current_setting('edrone_bridge.origin', true) = 'edrone' THEN
        RETURN NULL;
    END IF;
    IF v_email IS NULL OR v_email = '' THEN
        RETURN NULL;
    END IF;
    IF TG_ARGV[6] <> '' THEN
        v_phone := v_new ->> TG_ARGV[6];
    END IF;
    IF TG_OP = 'UPDATE' THEN
        v_old := to_jsonb(OLD);
        IF (v_old ->> TG_ARGV[1]) IS NOT DISTINCT FROM (v_new ->> TG_ARGV[1])
           AND (v_old ->> TG_ARGV[2]) IS NOT DISTINCT FROM (v_new ->> TG_ARGV[2])
           AND (NOT v_sms OR (v_old ->> TG_ARGV[5]) IS NOT DISTINCT FROM (v_new ->> TG_ARGV[5]))
           AND (TG_ARGV[6] = '' OR (v_old ->> TG_ARGV[6]) IS NOT DISTINCT FROM v_phone) THEN
            RETURN NULL;  -- nothing the bridge maps has changed
        END IF;
    END IF;
    INSERT INTO outbox (app_id, email, subscriber_status, sms_tracked, sms_subscriber_status, phone)
    VALUES (
        TG_ARGV[0],
        v_email,
        CASE v_new ->> TG_ARGV[2] WHEN TG_ARGV[3] THEN 1 WHEN TG_ARGV[4] THEN 0 END,
        v_sms,
        CASE WHEN v_sms THEN
            CASE v_new ->> TG_ARGV[5] WHEN TG_ARGV[7] THEN 1 WHEN TG_ARGV[8] THEN 0 END
        END,
        v_phone
    );
    -- current_schema() is the bridge's schema (search_path fixed above); the relay listens.
    PERFORM pg_notify(current_schema() || '.outbox', '');
    RETURN NULL;
END
$$;
