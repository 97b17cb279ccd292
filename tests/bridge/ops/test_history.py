"""``history`` of a phone: asked for in any typed form, it shows the address the bridge keeps
(E.164); a row stored before phones were normalised is found by the form it was stored in."""

from __future__ import annotations

from bridge.ops.history import addresses_of, apps_of, read_history
from tests.support.apps import TEST_APP_ID
from tests.support.cli import run_cli_async

E164 = "+48500100200"
_LINE_SQL = """
INSERT INTO sync_history (app_id, channel, address, seq, origin, kind, event_id, status,
                          decision, why)
VALUES ($1, 'sms', $2, $3, 'shop', 'shop_change', $4, 1, 'wins', 'newer than the winner')
"""


def test_a_phone_is_asked_for_in_e164():
    """Any typed form of a phone reads as its E.164 form, national ones in the region."""
    assert addresses_of("48 500 100 200") == ("sms", E164)
    assert addresses_of(" 500-100-200 ") == ("sms", E164)
    assert addresses_of("030 123456", "DE") == ("sms", "+4930123456")
    assert addresses_of("Jan@Example.COM") == ("email", "jan@example.com")


async def test_history_of_a_typed_phone(db, settings):
    """``history 48 500 100 200`` shows the E.164 address's lines, and a line stored in that
    typed form before phones were normalised; the CLI finds the app by either."""
    await db.execute(
        "INSERT INTO sync_state (app_id, channel, address) VALUES ($1, 'sms', $2)",
        TEST_APP_ID,
        E164,
    )
    await db.execute(_LINE_SQL, TEST_APP_ID, E164, 2, "shop-new")
    await db.execute(_LINE_SQL, TEST_APP_ID, "48 500 100 200", 1, "shop-old")

    history = await read_history(db, TEST_APP_ID, "48 500 100 200")
    assert [line.event_id for line in history.lines] == ["shop-old", "shop-new"]
    found = await read_history(db, TEST_APP_ID, "+48 500 100 200")
    assert [line.event_id for line in found.lines] == ["shop-new"]
    assert await apps_of(db, "500 100 200") == [TEST_APP_ID]

    code, stdout, stderr = await run_cli_async(
        "history",
        "500 100 200",
        EDRONE_BRIDGE_DATABASE_URL=settings.database_url.get_secret_value(),
        EDRONE_BRIDGE_DATABASE_SCHEMA=settings.database_schema,
        EDRONE_BRIDGE_APPS=f"{TEST_APP_ID}:secret",
    )
    assert code == 0, stderr
    assert "shop-new" in stdout
