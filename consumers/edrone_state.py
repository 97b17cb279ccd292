"""What edrone is known to hold for a customer, and whether a shop change would tell it
anything new: from the ledger of edrone's webhooks and from the forwarder's last traces."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from schemas.platform_event import CustomerSubscriptionChanged

SEND = "send"
OLDER = "older"  # a newer change of this customer was already sent or came from edrone
ECHO = "echo"  # the shop mirrors a status the bridge applied from edrone (promise 5)
NOOP = "noop"  # edrone already holds exactly these statuses

# Clocks of the shop and of the bridge's database differ a little; an echo may seem to
# happen slightly before the change it mirrors.
_CLOCK_SKEW = timedelta(seconds=5)

_KNOWN_SQL = """
SELECT i.n,
       e.status AS email_status, e.ordered_at AS email_date, e.updated_at AS email_applied_at,
       s.status AS sms_status, s.ordered_at AS sms_date, s.updated_at AS sms_applied_at,
       t.subscriber_status AS sent_status, t.sms_subscriber_status AS sent_sms_status,
       t.sms_sent, t.phone AS sent_phone, t.occurred_at AS sent_occurred_at
FROM unnest($1::int[], $2::text[], $3::text[], $4::text[]) AS i(n, app_id, email, phone)
LEFT JOIN subscribers e ON e.app_id = i.app_id AND e.channel = 'email' AND e.address = i.email
LEFT JOIN subscribers s ON s.app_id = i.app_id AND s.channel = 'sms' AND s.address = i.phone
LEFT JOIN trace_state t ON t.app_id = i.app_id AND t.email = i.email
"""

_RECORD_SQL = """
INSERT INTO trace_state AS t (app_id, email, subscriber_status, sms_subscriber_status, sms_sent,
                              phone, event_id, occurred_at, edrone_event_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::smallint[], $4::smallint[], $5::boolean[],
                     $6::text[], $7::text[], $8::timestamptz[], $9::text[])
ON CONFLICT (app_id, email) DO UPDATE
SET subscriber_status = excluded.subscriber_status,
    sms_subscriber_status = CASE WHEN excluded.sms_sent THEN excluded.sms_subscriber_status
                                 ELSE t.sms_subscriber_status END,
    sms_sent = t.sms_sent OR excluded.sms_sent,
    phone = COALESCE(excluded.phone, t.phone),
    event_id = excluded.event_id, occurred_at = excluded.occurred_at,
    edrone_event_id = excluded.edrone_event_id, sent_at = now()
WHERE excluded.occurred_at >= t.occurred_at
"""


@dataclass(frozen=True)
class Known:
    """edrone's side of one customer, as far as the bridge knows it."""

    email_status: int | None = None
    # When edrone changed it: its event_date, no later than its receipt plus the clock skew.
    email_date: datetime | None = None
    email_applied_at: datetime | None = None  # when the bridge applied it
    sms_status: int | None = None
    sms_date: datetime | None = None
    sms_applied_at: datetime | None = None
    sent_status: int | None = None
    sent_sms_status: int | None = None
    sms_sent: bool = False
    sent_phone: str | None = None
    sent_occurred_at: datetime | None = None


Target = tuple[str, CustomerSubscriptionChanged]  # (app_id, event)


async def load_known(conn: asyncpg.Connection, targets: Sequence[Target]) -> list[Known]:
    """The known state of each target's customer, in the targets' order."""
    rows = await conn.fetch(
        _KNOWN_SQL,
        list(range(len(targets))),
        [app_id for app_id, _ in targets],
        [event.email for _, event in targets],
        [event.phone for _, event in targets],
    )
    known = [Known()] * len(targets)
    for row in rows:
        values = dict(row)
        # Popped first: in `a[i] = b` Python evaluates b before i.
        index = values.pop("n")
        known[index] = Known(**{k: v for k, v in values.items() if v is not None})
    return known


async def record_sent(
    conn: asyncpg.Connection, sent: Iterable[tuple[str, CustomerSubscriptionChanged, str | None]]
) -> None:
    """Remember what edrone now holds, after its 2xx; a later, older event does not overwrite."""
    rows = sorted(sent, key=lambda item: (item[0], item[1].email))
    if not rows:
        return
    await conn.execute(
        _RECORD_SQL,
        [app_id for app_id, _, _ in rows],
        [event.email for _, event, _ in rows],
        [event.subscriber_status for _, event, _ in rows],
        [event.sms_subscriber_status for _, event, _ in rows],
        [event.sms_subscriber_status is not None for _, event, _ in rows],
        [event.phone for _, event, _ in rows],
        [event.event_id for _, event, _ in rows],
        [event.occurred_at for _, event, _ in rows],
        [edrone_id for _, _, edrone_id in rows],
    )


def decide(event: CustomerSubscriptionChanged, known: Known, echo_window: timedelta) -> str:
    """SEND, or why not: OLDER, ECHO or NOOP."""
    newest_known = max(
        (d for d in (known.email_date, known.sent_occurred_at) if d is not None), default=None
    )
    if newest_known is not None and event.occurred_at < newest_known:
        return OLDER
    if _is_echo(event, known, echo_window):
        return ECHO
    if _edrone_holds(event, known):
        return NOOP
    return SEND


def _is_echo(event: CustomerSubscriptionChanged, known: Known, window: timedelta) -> bool:
    if known.email_applied_at is None or known.email_status != event.subscriber_status:
        return False
    if event.sms_subscriber_status is not None and known.sms_status != event.sms_subscriber_status:
        return False
    applied = known.email_applied_at
    return applied - _CLOCK_SKEW <= event.occurred_at <= applied + window


def _edrone_holds(event: CustomerSubscriptionChanged, known: Known) -> bool:
    """Every status in the event equals the newest one edrone is known to hold."""
    email = _newest(
        (known.email_date, known.email_status), (known.sent_occurred_at, known.sent_status)
    )
    if email is None or email[1] != event.subscriber_status:
        return False
    if event.sms_subscriber_status is None:
        return True
    sent_sms = (
        (known.sent_occurred_at, known.sent_sms_status)
        if known.sms_sent and known.sent_phone == event.phone
        else (None, None)
    )
    sms = _newest((known.sms_date, known.sms_status), sent_sms)
    return sms is not None and sms[1] == event.sms_subscriber_status


def _newest(
    *candidates: tuple[datetime | None, int | None],
) -> tuple[datetime, int | None] | None:
    dated = [(when, status) for when, status in candidates if when is not None]
    return max(dated, key=lambda c: c[0]) if dated else None
