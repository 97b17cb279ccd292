-- Each app's rate limit at edrone, shared by every forwarder process of the schema: replicas of
-- `consume traces`, and the background lane in a process of its own (consumers/rate_budget.py).
-- A sliding log, as the in-process limiter kept it: a slot is one request, held from its start
-- until its answer and for a window after, so that no window of arrivals at edrone holds more
-- than the limit, whatever the delays. One clock for all: the database's.
--
-- UNLOGGED: the slots of the last second are all it holds, not worth a WAL write each. After a
-- crash of PostgreSQL the table is empty, so the first window after may see the calls of the
-- window before it again: at most one window over the limit, once.

CREATE UNLOGGED TABLE rate_slots (
    app_id       text        NOT NULL,
    slot_id      bigint      GENERATED ALWAYS AS IDENTITY,
    background   boolean     NOT NULL,
    -- Until when the slot counts. Taken: its start + the longest a call may take + the window,
    -- so that a process killed with calls in flight frees them by itself; answered: the answer
    -- + the window.
    counts_until timestamptz NOT NULL,
    PRIMARY KEY (app_id, slot_id)
);

-- The most slots live traffic held at once in each recent window, per app: the background
-- leaves its peak (times a headroom) to it.
CREATE UNLOGGED TABLE rate_live_peaks (
    app_id    text    NOT NULL,
    window_no bigint  NOT NULL,
    held      integer NOT NULL,
    PRIMARY KEY (app_id, window_no)
);

-- Takes up to p_wanted slots of p_app's p_calls per window, in one transaction serialised per
-- app. A live caller takes any free slot; a background one only within p_calls - reserve, the
-- reserve being live's peak in the last p_memory windows times p_headroom, never below p_floor.
-- Returns the slots taken, and when they fall short, how long until room may appear: the first
-- answered slot leaving the window (a call in flight leaves no sooner than a window from now),
-- or for the background the next window, where an old live peak is forgotten.
CREATE FUNCTION take_rate_slots(
    p_app text, p_background boolean, p_wanted integer, p_calls integer, p_window_s float8,
    p_hold_s float8, p_floor integer, p_headroom float8, p_memory integer
) RETURNS TABLE (slot_ids bigint[], retry_after_s float8)
LANGUAGE plpgsql AS $$
DECLARE
    v_now    timestamptz := clock_timestamp();
    v_window bigint      := floor(extract(epoch FROM v_now) / p_window_s);
    v_live   integer;
    v_bg     integer;
    v_peak   integer;
    v_room   integer;
    v_ids    bigint[]    := '{}';
    v_next   timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('edrone_bridge.rate_slots:' || p_app, 0));
    DELETE FROM rate_slots AS s WHERE s.app_id = p_app AND s.counts_until <= v_now;
    SELECT count(*) FILTER (WHERE NOT s.background), count(*) FILTER (WHERE s.background)
      INTO v_live, v_bg FROM rate_slots AS s WHERE s.app_id = p_app;
    v_room := p_calls - v_live - v_bg;
    IF p_background THEN
        SELECT coalesce(max(p.held), 0) INTO v_peak FROM rate_live_peaks AS p
         WHERE p.app_id = p_app AND p.window_no > v_window - p_memory;
        v_room := least(v_room,
                        p_calls - least(p_calls, greatest(p_floor, ceil(v_peak * p_headroom)::integer))
                        - v_bg);
    END IF;
    v_room := greatest(0, least(v_room, p_wanted));
    IF v_room > 0 THEN
        WITH taken AS (
            INSERT INTO rate_slots (app_id, background, counts_until)
            SELECT p_app, p_background, v_now + make_interval(secs => p_hold_s + p_window_s)
              FROM generate_series(1, v_room)
            RETURNING rate_slots.slot_id
        )
        SELECT array_agg(t.slot_id) INTO v_ids FROM taken AS t;
        IF NOT p_background THEN
            INSERT INTO rate_live_peaks AS p (app_id, window_no, held)
            VALUES (p_app, v_window, v_live + v_room)
            ON CONFLICT (app_id, window_no) DO UPDATE SET held = greatest(p.held, excluded.held);
            DELETE FROM rate_live_peaks AS p
             WHERE p.app_id = p_app AND p.window_no <= v_window - p_memory;
        END IF;
    END IF;
    IF v_room < p_wanted THEN
        SELECT least(min(s.counts_until), v_now + make_interval(secs => p_window_s))
          INTO v_next FROM rate_slots AS s WHERE s.app_id = p_app;
        IF p_background THEN
            v_next := least(coalesce(v_next, 'infinity'),
                            to_timestamp((v_window + 1) * p_window_s));
        END IF;
        retry_after_s := greatest(0.001, extract(epoch FROM v_next - v_now));
    END IF;
    slot_ids := v_ids;
    RETURN NEXT;
END
$$;

-- The tables as the migration's schema finds them, whichever search_path calls it.
ALTER FUNCTION take_rate_slots(text, boolean, integer, integer, float8, float8, integer, float8,
                               integer) SET search_path FROM CURRENT;
