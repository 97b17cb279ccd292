"""No personal data in logs: ``edrone-bridge run`` at debug level takes webhooks (refused ones
too: an address that is no address, a phone that is no phone, a bad signature, an unknown app)
and shop events (two refused: an address and a phone that are none), and not one line of its
log carries a whole address or phone from those inputs. A refused webhook's line names the
caller's address instead."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from bridge.amqp import declare_trace_topology
from bridge.devtools.fake_edrone import FakeEdrone
from bridge.devtools.simulate import build_webhook
from tests.support.apps import TEST_APP_ID, TEST_SECRET
from tests.support.consumers import publish_platform, shop_event, wait_until
from tests.support.processes import BridgeProcess, bridge_env, free_port, wait_ready
from tests.support.webhooks import FORM

REFUSED_EMAIL = "Jan.Kowalski@nonexistent-domain-zzz"
REFUSED_PHONE = "call-me-48500100200-x"
SIGNED_WRONG = "anna.nowak@example.com"
UNKNOWN_APP = "piotr.wisniewski@example.com"
ACCEPTED_EMAIL = "ewa.zielinska@example.com"
ACCEPTED_PHONE = "+48500600700"
SHOP_EMAIL = "zofia.kaminska@example.com"
SHOP_PHONE = "+48500700800"
SHOP_REFUSED = "marek.lewandowski@@example.com"
SHOP_REFUSED_PHONE = "(0) 511-222-333"  # no valid number: the event is dead-lettered
# What must never be in a log line: each input whole, its local part, the phones' digits.
SECRETS = [
    REFUSED_EMAIL,
    "jan.kowalski",
    "48500100200",
    SIGNED_WRONG,
    UNKNOWN_APP,
    ACCEPTED_EMAIL,
    "ewa.zielinska",
    "48500600700",
    SHOP_EMAIL,
    "48500700800",
    "marek.lewandowski",
    "anna.wojcik",
    "511-222",
    "511222333",
]


def webhooks() -> list[tuple[dict[str, str], int]]:
    """Each webhook and the status it must get."""
    good = build_webhook("NATIVE_5", TEST_APP_ID, TEST_SECRET, email=ACCEPTED_EMAIL, status="0")
    sms = build_webhook(
        "NATIVE_5", TEST_APP_ID, TEST_SECRET, channel="sms", phone=ACCEPTED_PHONE, status="0"
    )
    bad_email = build_webhook("NATIVE_5", TEST_APP_ID, TEST_SECRET, email=REFUSED_EMAIL)
    bad_phone = build_webhook(
        "NATIVE_5", TEST_APP_ID, TEST_SECRET, channel="sms", phone=REFUSED_PHONE
    )
    wrong = build_webhook("NATIVE_5", TEST_APP_ID, "not-the-secret", email=SIGNED_WRONG)
    stranger = build_webhook("NATIVE_5", "someone-else", "s", email=UNKNOWN_APP)
    return [
        (good, 200),
        (sms, 200),
        (bad_email, 400),
        (bad_phone, 400),
        (wrong, 401),
        (stranger, 403),
    ]


async def test_no_log_line_carries_an_address_or_phone(settings, db, amqp_connection, tmp_path):
    port = free_port()
    async with FakeEdrone() as fake:
        process = BridgeProcess(
            tmp_path / "run.log",
            "run",
            env=bridge_env(
                settings,
                EDRONE_BRIDGE_HTTP_PORT=str(port),
                EDRONE_BRIDGE_TRACE_URL=fake.url,
                EDRONE_BRIDGE_LOG_LEVEL="debug",
                EDRONE_BRIDGE_LOG_FORMAT="json",
            ),
        )
        await process.start()
        try:
            base = f"http://127.0.0.1:{port}"
            await wait_ready(base)
            async with aiohttp.ClientSession() as session:
                for fields, expected in webhooks():
                    async with session.post(
                        f"{base}{settings.webhook_path}",
                        data=fields,
                        headers={"Content-Type": FORM},
                    ) as response:
                        assert response.status == expected, await response.text()
            channel = await amqp_connection.channel()
            async with channel:
                await declare_trace_topology(channel, settings)
            await publish_platform(
                amqp_connection,
                settings,
                [
                    shop_event(SHOP_EMAIL, status=1, phone=SHOP_PHONE, sms_subscriber_status=1),
                    shop_event(SHOP_REFUSED, status=1),
                    shop_event(
                        "anna.wojcik@example.com",
                        status=1,
                        phone=SHOP_REFUSED_PHONE,
                        sms_subscriber_status=1,
                    ),
                ],
            )
            await wait_until(lambda: fake.requests, 20)

            async def both_applied() -> bool:
                return await db.fetchval("SELECT count(*) FROM subscribers") == 2

            await wait_until(both_applied, 20)
            await asyncio.sleep(1.0)  # the dead letter's and the batches' lines
        finally:
            assert await process.terminate() == 0

    text = process.log_path.read_text()
    lowered = text.lower()
    leaked = [secret for secret in SECRETS if secret.lower() in lowered]
    assert leaked == [], [
        line for line in text.splitlines() if any(s in line.lower() for s in leaked)
    ][:5]
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    rejected = [e for e in events if e["event"] == "webhook_rejected"]
    assert sorted(e["status"] for e in rejected) == [400, 400, 401, 403]
    assert all(e["caller"] == "127.0.0.1" for e in rejected)
    dead = [e for e in events if e["event"] == "message_dead_lettered"]
    assert len(dead) == 2, dead
