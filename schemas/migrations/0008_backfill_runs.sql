-- The runs of `edrone-bridge backfill`: which source it reads, how far it got, and what it did
-- with the rows. A run's position moves only after the broker confirmed every row of a page
-- (bridge/ops/backfill.py), so a run stopped anywhere is resumed from its last position with
-- its own run_id: the rows published again have the same message ids, which the forwarder's
-- inbox takes for duplicates.

CREATE TABLE backfill_runs (
    run_id       text        PRIMARY KEY,
    app_id       text        NOT NULL,
    -- 'table:<schema>.<table>' or 'file:<absolute path>': a run resumes only on its source.
    source       text        NOT NULL,
    -- What the source was when the run started (a file's size and modification time): a
    -- changed file is not resumed, for its positions mean other rows.
    source_version text      NOT NULL DEFAULT '',
    -- Where the next page starts: the last primary key read (a JSON array of its columns as
    -- text), or the records of a file read; NULL before the first page.
    position     jsonb,
    rows_read    bigint      NOT NULL DEFAULT 0,
    queued       bigint      NOT NULL DEFAULT 0,
    skipped      bigint      NOT NULL DEFAULT 0,
    invalid      bigint      NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    -- finished (read to the end) | restarted (given up for a new run by --restart)
    outcome      text        CHECK (outcome IN ('finished', 'restarted'))
);

-- The one unfinished run of a source, which the next backfill of it resumes.
CREATE UNIQUE INDEX backfill_runs_unfinished_idx ON backfill_runs (app_id, source)
    WHERE finished_at IS NULL;
