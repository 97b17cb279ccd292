"""The shop's own table as a target of edrone's changes, on a Magento-like and a PrestaShop-like
schema created in the test's database: updated in the ledger's transaction, unknown customers
counted (or created on request), and a mapping that does not fit the table stops the start."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest

from bridge.app_config import AppConfig
from bridge.config import load_settings
from bridge.shop_table import TargetMismatch, resolve_targets
from tests.support.apps import TEST_APP_ID, TEST_SECRET
from tests.support.consumers import apply_burst, make_event, publish, serve_subscriptions
from tests.support.shop_tables import (
    MAGENTO_TARGET,
    PRESTASHOP_TABLE,
    PRESTASHOP_TARGET,
    magento,
    magento_rows,
)


def with_target(make_consumer_settings, **target):
    return make_consumer_settings(apps={TEST_APP_ID: AppConfig(secret=TEST_SECRET, target=target)})


async def consume(broker, pool, settings, events):
    """Publish ``events``, check the mapping as ``serve`` does, handle them all."""
    await publish(broker, settings, events)
    return await apply_burst(broker, pool, settings)


class TestMagento:
    async def test_webhook_updates_the_shop_row(self, broker, db, pool, make_consumer_settings):
        """edrone's unsubscribe and subscribe end in the shop's own column (3 and 1), with its
        change time set, in the same transaction as the ledger."""
        await magento(db)
        settings = with_target(make_consumer_settings, **MAGENTO_TARGET)
        events = [make_event("jan@example.com", status=0), make_event("anna@example.com", status=1)]

        consumer = await consume(broker, pool, settings, events)

        assert await magento_rows(db) == [
            ("jan@example.com", 3, True),
            ("anna@example.com", 1, True),
            ("ewa@example.com", 1, False),
        ]
        assert consumer.counters.applied == 2
        assert await db.fetchval("SELECT count(*) FROM subscribers") == 2

    async def test_unknown_address_is_counted_not_created(
        self, broker, db, pool, make_consumer_settings
    ):
        """An address without a shop row is acked as unknown_customer and no row is created;
        the ledger still records what edrone said and the inbox says applied."""
        await magento(db)
        settings = with_target(make_consumer_settings, **MAGENTO_TARGET)
        stranger = make_event("stranger@example.com", status=1)

        consumer = await consume(broker, pool, settings, [stranger])

        assert consumer.counters.skipped["unknown_customer"] == 1
        assert consumer.counters.applied == 0
        assert await db.fetchval("SELECT count(*) FROM newsletter_subscriber") == 3
        assert (
            await db.fetchval(
                "SELECT status FROM subscribers WHERE address = 'stranger@example.com'"
            )
            == 1
        )
        assert await db.fetchval("SELECT outcome FROM inbox") == "applied"

    async def test_older_and_duplicate_events_leave_the_shop_alone(
        self, broker, db, pool, make_consumer_settings
    ):
        """Only what the ledger takes (newest wins) reaches the shop: a late older event and a
        replay change nothing there."""
        await magento(db)
        settings = with_target(make_consumer_settings, **MAGENTO_TARGET)
        newer = make_event("jan@example.com", status=0, at=timedelta(minutes=5))
        older = make_event("jan@example.com", status=1, at=timedelta(minutes=1))
        await consume(broker, pool, settings, [newer])
        await db.execute("UPDATE newsletter_subscriber SET change_status_at = NULL")

        consumer = await consume(broker, pool, settings, [older, newer])

        assert (consumer.counters.skipped["older"], consumer.counters.skipped["duplicate"]) == (
            1,
            1,
        )
        assert (await magento_rows(db))[0] == ("jan@example.com", 3, False)

    async def test_unknown_status_is_written_only_when_mapped(
        self, broker, db, pool, make_consumer_settings
    ):
        """edrone's UNKNOWN leaves the shop's value unless `unknown` is mapped (Magento's 2)."""
        await magento(db)
        plain = with_target(make_consumer_settings, **MAGENTO_TARGET)
        await consume(broker, pool, plain, [make_event("jan@example.com", status=None)])
        assert (await magento_rows(db))[0] == ("jan@example.com", 1, False)

        values = {"subscribed": 1, "unsubscribed": 3, "unknown": 2}
        mapped = with_target(
            make_consumer_settings, **{**MAGENTO_TARGET, "email_status_values": values}
        )
        later = make_event("jan@example.com", status=None, at=timedelta(minutes=1))
        await consume(broker, pool, mapped, [later])
        assert (await magento_rows(db))[0] == ("jan@example.com", 2, True)


class TestPrestaShop:
    async def test_webhook_updates_a_boolean_flag_matching_case_insensitively(
        self, broker, db, pool, make_consumer_settings
    ):
        """A 0/1 mapping on a boolean column, and an address stored as typed in the shop
        (mixed case) found by edrone's lower-cased one."""
        await db.execute(PRESTASHOP_TABLE)
        await db.execute(
            "INSERT INTO ps_customer (id_shop, email, newsletter, date_upd) "
            "VALUES (1, 'Jan.Kowalski@Example.com', false, '2020-01-01')"
        )
        settings = with_target(make_consumer_settings, **PRESTASHOP_TARGET)

        await consume(broker, pool, settings, [make_event("jan.kowalski@example.com", status=1)])

        row = await db.fetchrow(
            "SELECT newsletter, date_upd > '2020-01-01' AS touched FROM ps_customer"
        )
        assert (row["newsletter"], row["touched"]) == (True, True)

    async def test_create_missing_inserts_the_customer(
        self, broker, db, pool, make_consumer_settings
    ):
        """With create_missing = true an unknown address gets a row, with the fixed values
        given for the table's required columns."""
        await db.execute(PRESTASHOP_TABLE)
        settings = with_target(
            make_consumer_settings,
            **PRESTASHOP_TARGET,
            create_missing=True,
            set_values={"id_shop": 7},
        )

        consumer = await consume(broker, pool, settings, [make_event("new@example.com", status=1)])

        rows = await db.fetch("SELECT id_shop, email, newsletter FROM ps_customer")
        assert [tuple(r) for r in rows] == [(7, "new@example.com", True)]
        assert consumer.counters.applied == 1


class TestValidation:
    @pytest.mark.parametrize(
        ("override", "named"),
        [
            ({"email_status_column": "subscriber_stat"}, "'subscriber_stat' does not exist"),
            ({"set_now": ["updated"]}, "set_now.updated: column 'updated' does not exist"),
            ({"table": "newsletter"}, "target.table: no table 'newsletter'"),
            (
                {"email_status_values": {"subscribed": "yes", "unsubscribed": 3}},
                "subscribed: 'yes' does not fit column 'subscriber_status' (integer)",
            ),
            ({"set_now": ["subscriber_email"]}, "'subscriber_email' is character varying(150)"),
            (
                {"create_missing": True, "address_column": "subscriber_email"},
                None,  # every required column of Magento's table has a default: fits
            ),
        ],
    )
    async def test_a_mismatch_stops_the_start_naming_the_column(
        self, broker, db, make_consumer_settings, override, named
    ):
        """serve() checks each app's mapping against the live table before consuming; a
        mismatch raises with a message that names the option and the column."""
        await magento(db)
        settings = with_target(make_consumer_settings, **{**MAGENTO_TARGET, **override})
        task = asyncio.create_task(
            serve_subscriptions(settings, asyncio.Event(), expose_metrics=False)
        )
        if named is None:
            await asyncio.sleep(1.0)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return
        with pytest.raises(TargetMismatch) as raised:
            await asyncio.wait_for(task, 15)
        assert named in str(raised.value)
        assert f"apps.{TEST_APP_ID}.target" in str(raised.value)

    async def test_create_missing_needs_every_required_column(
        self, db, pool, make_consumer_settings
    ):
        """create_missing on a table with a NOT NULL column left unmapped names that column."""
        await db.execute(PRESTASHOP_TABLE)
        settings = with_target(make_consumer_settings, **PRESTASHOP_TARGET, create_missing=True)
        with pytest.raises(TargetMismatch, match="create_missing: column 'id_shop' is NOT NULL"):
            await resolve_targets(pool, settings.apps)


def readme_target_examples() -> list[str]:
    readme = (Path(__file__).resolve().parents[2] / "docs" / "shop-tables.md").read_text()
    blocks = [part.split("```", 1)[0] for part in readme.split("```toml\n")[1:]]
    return [block for block in blocks if ".target]" in block]


def load_example(block: str, tmp_path: Path) -> dict[str, AppConfig]:
    app_id = block.split("[apps.", 1)[1].split(".target]", 1)[0]
    path = tmp_path / f"{app_id}.toml"
    body = block.replace('"public.ps_customer"', '"ps_customer"')
    path.write_text(f'[apps.{app_id}]\nsecret = "s"\n{body}')
    return load_settings(path).apps


async def test_readme_examples_fit_their_tables(db, pool, tmp_path):
    """docs/shop-tables.md's Magento and PrestaShop target examples load and pass the start's check
    against the tables these tests create (PrestaShop's in the test's schema, not public)."""
    blocks = readme_target_examples()
    assert len(blocks) == 2
    await magento(db)
    await db.execute(PRESTASHOP_TABLE)
    for block in blocks:
        apps = load_example(block, tmp_path)
        targets = await resolve_targets(pool, apps)
        assert list(targets) == list(apps)


async def test_shop_row_is_found_by_either_idna_form(broker, db, pool, make_consumer_settings):
    """A shop that stored the xn-- form of a domain (or the Unicode form in capitals) still has
    its row updated by edrone's change of that mailbox (the ledger keeps the Unicode form)."""
    await magento(db)
    await db.execute(
        "INSERT INTO newsletter_subscriber (subscriber_email, subscriber_status) "
        "VALUES ('jan@xn--bcher-kva.de', 1), ('ANNA@BÜCHER.DE', 1)"
    )
    settings = with_target(make_consumer_settings, **MAGENTO_TARGET)
    events = [make_event("jan@bücher.de", status=0), make_event("anna@bücher.de", status=0)]

    consumer = await consume(broker, pool, settings, events)

    assert consumer.counters.applied == 2
    rows = await db.fetch(
        "SELECT subscriber_email, subscriber_status FROM newsletter_subscriber "
        "WHERE subscriber_email IN ('jan@xn--bcher-kva.de', 'ANNA@BÜCHER.DE') "
        "ORDER BY subscriber_id"
    )
    assert [tuple(row) for row in rows] == [("jan@xn--bcher-kva.de", 3), ("ANNA@BÜCHER.DE", 3)]
