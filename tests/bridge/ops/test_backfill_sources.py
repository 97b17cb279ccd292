"""What backfill reads: a Magento-like table read as the outbox trigger reads it, page after page
by its primary key; CSV and JSON-lines files streamed; and every kind of bad row counted and
reported where it is, never sent."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime

import pytest

from bridge.app_config import TargetMapping
from bridge.db import create_pool
from bridge.ops.backfill import Reader
from bridge.ops.backfill_file import FileSource, format_of
from bridge.ops.backfill_source import SourceError
from bridge.ops.backfill_table import TableSource, primary_key
from bridge.shop_table import TargetMismatch, resolve_target
from tests.support.apps import TEST_APP_ID
from tests.support.shop_tables import MAGENTO_TABLE, MAGENTO_TARGET

MAGENTO_DATED = {**MAGENTO_TARGET, "changed_at_column": "change_status_at"}
MTIME = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


@pytest.fixture
async def pool(db, settings):
    value = await create_pool(settings, command_timeout_s=10.0)
    yield value
    await asyncio.wait_for(value.close(), 10)


async def table_source(db, pool, page_size=2, **mapping):
    target = await resolve_target(db, TEST_APP_ID, TargetMapping(**{**MAGENTO_DATED, **mapping}))
    return TableSource(pool, target, await primary_key(db, target), page_size)


async def collect(source, position=None):
    return [page async for page in source.pages(position)]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    os.utime(path, (MTIME.timestamp(), MTIME.timestamp()))
    return path


async def checked(pool, source):
    """Every page through the reader: (rows, invalid) over the whole source."""
    reader = Reader(pool, TEST_APP_ID, "run-1", "PL")
    rows, invalid = [], []
    for page in await collect(source):
        result = await reader.check(page)
        rows += result.rows
        invalid += result.invalid
    return rows, invalid


class TestTable:
    async def test_rows_are_read_as_the_trigger_reads_them(self, db, pool):
        """Configured values map to 1 and 0, any other value (Magento's 2, "not activated")
        is unknown; the e-mail is trimmed; change_status_at is the row's changed_at (a
        timestamp read in the session's zone, as the bridge's own writes set it)."""
        await db.execute(MAGENTO_TABLE)
        await db.execute(
            "INSERT INTO newsletter_subscriber (subscriber_email, subscriber_status,"
            " change_status_at) VALUES ('  Jan@Example.com ', 1, '2025-05-01 10:00:00'),"
            " ('anna@example.com', 3, NULL), ('ewa@example.com', 2, NULL)"
        )
        before = await db.fetchval("SELECT now()")
        source = await table_source(db, pool, page_size=10)
        [page] = await collect(source)
        fields = [c.fields for c in page.candidates]
        assert [(f["email"], f["subscriber_status"]) for f in fields] == [
            ("Jan@Example.com", 1),
            ("anna@example.com", 0),
            ("ewa@example.com", None),
        ]
        assert fields[0]["changed_at"] == datetime(2025, 5, 1, 10, tzinfo=UTC)
        assert fields[1]["changed_at"] is None
        observed = {c.observed_at for c in page.candidates}
        assert len(observed) == 1 and observed.pop() >= before  # the database's clock
        assert page.position == ["3"] and len(page.rows) == 3

    async def test_pages_follow_the_primary_key_and_resume_after_a_position(self, db, pool):
        await db.execute(MAGENTO_TABLE)
        await db.execute(
            "INSERT INTO newsletter_subscriber (subscriber_email, subscriber_status)"
            " SELECT 'c' || n || '@example.com', 1 FROM generate_series(1, 5) AS n"
        )
        source = await table_source(db, pool, page_size=2)
        pages = await collect(source)
        assert [p.position for p in pages] == [["2"], ["4"], ["5"]]
        emails = [c.fields["email"] for p in pages for c in p.candidates]
        assert emails == [f"c{n}@example.com" for n in range(1, 6)]
        rest = await collect(source, ["2"])
        assert [c.fields["email"] for p in rest for c in p.candidates] == [
            "c3@example.com",
            "c4@example.com",
            "c5@example.com",
        ]

    async def test_a_composite_key_pages_by_all_its_columns(self, db, pool):
        await db.execute(
            "CREATE TABLE subs (store int, email text, status int, PRIMARY KEY (store, email))"
        )
        await db.execute(
            "INSERT INTO subs VALUES (2, 'a@example.com', 1), (1, 'b@example.com', 0),"
            " (1, 'a@example.com', 1)"
        )
        source = await table_source(
            db,
            pool,
            table="subs",
            address_column="email",
            email_status_column="status",
            email_status_values={"subscribed": 1, "unsubscribed": 0},
            set_now=[],
            changed_at_column=None,
        )
        pages = await collect(source)
        assert [p.position for p in pages] == [["1", "b@example.com"], ["2", "a@example.com"]]
        assert [c.where for p in pages for c in p.candidates] == [
            "store=1, email=a@example.com",
            "store=1, email=b@example.com",
            "store=2, email=a@example.com",
        ]

    async def test_rows_without_an_email_are_invalid(self, db, pool):
        await db.execute(MAGENTO_TABLE)
        await db.execute(
            "INSERT INTO newsletter_subscriber (subscriber_email, subscriber_status)"
            " VALUES (NULL, 1), ('  ', 1), ('not-an-address', 1), ('ok@example.com', 1)"
        )
        rows, invalid = await checked(pool, await table_source(db, pool))
        assert [r.email for r in rows] == ["ok@example.com"]
        assert [i.where for i in invalid] == [
            "subscriber_id=1",
            "subscriber_id=2",
            "subscriber_id=3",
        ]
        assert invalid[0].reason == "no e-mail address in the row"
        assert invalid[2].reason.startswith("email:")
        assert "not-an-address" not in invalid[2].reason  # reasons never quote the value

    async def test_a_table_without_a_primary_key_is_refused(self, db, pool):
        await db.execute("CREATE TABLE loose (email text, status int)")
        mapping = TargetMapping(table="loose", address_column="email", email_status_column="status")
        target = await resolve_target(db, TEST_APP_ID, mapping)
        with pytest.raises(SourceError, match="has no primary key"):
            await primary_key(db, target)

    async def test_changed_at_column_must_be_a_date(self, db):
        await db.execute(MAGENTO_TABLE)
        mapping = TargetMapping(**{**MAGENTO_TARGET, "changed_at_column": "subscriber_email"})
        with pytest.raises(TargetMismatch, match=r"changed_at_column: .* not a date/time type"):
            await resolve_target(db, TEST_APP_ID, mapping)
        missing = TargetMapping(**{**MAGENTO_TARGET, "changed_at_column": "nope"})
        with pytest.raises(TargetMismatch, match="column 'nope' does not exist"):
            await resolve_target(db, TEST_APP_ID, missing)


CSV = """\
email,subscriber_status,phone,sms_subscriber_status,changed_at
jan@example.com,1,+48500100200,0,2025-05-01T10:00:00Z
anna@example.com,unsubscribed,,,
ewa@example.com,,,,

ola@example.com,Subscribed,,,2025-05-02 08:00:00
"""


class TestFiles:
    async def test_csv_rows(self, tmp_path, pool):
        """Statuses as 1/0/empty or words, an SMS status with its phone, a date with or
        without its offset (UTC); blank lines are no rows; observed at the file's mtime."""
        source = FileSource(write(tmp_path, "export.csv", CSV), "csv", 2)
        rows, invalid = await checked(pool, source)
        assert invalid == []
        assert [(r.email, r.subscriber_status, r.sms_subscriber_status) for r in rows] == [
            ("jan@example.com", 1, 0),
            ("anna@example.com", 0, None),
            ("ewa@example.com", None, None),
            ("ola@example.com", 1, None),
        ]
        assert rows[0].phone == "+48500100200"
        assert rows[0].changed_at == datetime(2025, 5, 1, 10, tzinfo=UTC)
        assert rows[3].changed_at == datetime(2025, 5, 2, 8, tzinfo=UTC)
        assert {r.observed_at for r in rows} == {MTIME}
        assert await source.total() == 5

    async def test_semicolons_and_a_byte_order_mark(self, tmp_path, pool):
        """As a spreadsheet in Polish writes it."""
        path = tmp_path / "export.csv"
        path.write_bytes("\ufeffEmail;Subscriber_Status\njan@example.com;0\n".encode())
        rows, invalid = await checked(pool, FileSource(path, "csv", 10))
        assert [(r.email, r.subscriber_status) for r in rows] == [("jan@example.com", 0)]
        assert invalid == []

    async def test_jsonl_rows(self, tmp_path, pool):
        text = (
            '{"email": "jan@example.com", "subscriber_status": 1, "phone": "500100200",'
            ' "sms_subscriber_status": "subscribed"}\n'
            "\n"
            '{"email": "anna@example.com", "subscriber_status": null,'
            ' "changed_at": "2025-05-01T12:00:00+02:00"}\n'
        )
        given = datetime(2026, 1, 1, tzinfo=UTC)
        source = FileSource(write(tmp_path, "export.jsonl", text), "jsonl", 10, given)
        rows, invalid = await checked(pool, source)
        assert invalid == []
        assert [(r.email, r.subscriber_status, r.sms_subscriber_status) for r in rows] == [
            ("jan@example.com", 1, 1),
            ("anna@example.com", None, None),
        ]
        assert rows[0].phone == "+48500100200"  # read in the configured region
        assert rows[1].changed_at == datetime(2025, 5, 1, 10, tzinfo=UTC)
        assert {r.observed_at for r in rows} == {given}

    async def test_bad_rows_are_reported_by_line_and_the_rest_read(self, tmp_path, pool):
        text = (
            "email,subscriber_status,changed_at\n"
            "no-at-sign,1,\n"
            "jan@example.com,yes,\n"
            "anna@example.com,1,yesterday\n"
            "ewa@example.com,1\n"
            ",1,\n"
            "ola@example.com,0,\n"
        )
        rows, invalid = await checked(pool, FileSource(write(tmp_path, "x.csv", text), "csv", 2))
        assert [r.email for r in rows] == ["ola@example.com"]
        assert [(i.where, i.reason.split(":")[0]) for i in invalid] == [
            ("line 2", "email"),
            ("line 3", "subscriber_status 'yes' is not 1, 0, subscribed, unsubscribed or empty"),
            ("line 4", "changed_at"),
            ("line 5", "2 fields where the header names 3"),
            ("line 6", "no e-mail address"),
        ]

    async def test_bad_json_lines_are_reported(self, tmp_path, pool):
        text = (
            '{"email": "jan@example.com"\n'
            "[1, 2]\n"
            '{"email": "anna@example.com"}\n'
            '{"email": "ewa@example.com", "subscriber_status": 2}\n'
            '{"email": "ola@example.com", "subscriber_status": "0"}\n'
        )
        rows, invalid = await checked(
            pool, FileSource(write(tmp_path, "x.jsonl", text), "jsonl", 2)
        )
        assert [r.email for r in rows] == ["ola@example.com"]
        assert [(i.where, i.reason) for i in invalid] == [
            ("line 1", "not JSON: Expecting ',' delimiter at column 28"),
            ("line 2", "not a JSON object"),
            ("line 3", "no subscriber_status field"),
            ("line 4", "subscriber_status 2 is not 1, 0, subscribed, unsubscribed or empty"),
        ]

    async def test_a_resumed_file_starts_after_its_position(self, tmp_path):
        source = FileSource(write(tmp_path, "export.csv", CSV), "csv", 2)
        pages = await collect(source)
        assert [p.position for p in pages] == [2, 4, 5]
        rest = await collect(source, 4)
        assert [c.fields["email"] for p in rest for c in p.candidates] == ["ola@example.com"]

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("mail,subscriber_status\nx@example.com,1\n", "the header has no email field"),
            ("email,status\nx@example.com,1\n", "has no subscriber_status field"),
            ("", "the file is empty"),
        ],
    )
    def test_a_header_without_the_required_fields_is_refused(self, tmp_path, text, message):
        with pytest.raises(SourceError, match=message):
            FileSource(write(tmp_path, "x.csv", text), "csv", 10)

    def test_the_format_comes_from_the_name(self, tmp_path):
        assert format_of(tmp_path / "a.CSV") == "csv"
        assert format_of(tmp_path / "a.ndjson") == "jsonl"
        with pytest.raises(SourceError, match="give --format"):
            format_of(tmp_path / "a.txt")
