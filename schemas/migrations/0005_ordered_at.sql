-- Newest wins by when a change counts as made: its stated date, but no later than its receipt
-- plus the allowed clock skew (max_clock_skew_s), so that a date in the future cannot freeze an
-- address for ever. event_date keeps the date as edrone stated it.
ALTER TABLE subscribers ADD COLUMN ordered_at timestamptz;
-- A row applied before this migration was received about when it was applied (updated_at):
-- an address already frozen by a future date is thawed with the default skew of 5 minutes.
UPDATE subscribers SET ordered_at = LEAST(event_date, updated_at + interval '5 minutes');
ALTER TABLE subscribers ALTER COLUMN ordered_at SET NOT NULL;

-- NULL for events received before this migration.
ALTER TABLE inbox ADD COLUMN ordered_at timestamptz;
