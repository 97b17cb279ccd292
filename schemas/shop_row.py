"""``ShopRow``: one row of the shop's statuses as ``backfill`` and ``reconcile`` read it (from the
app's mapped table or a file), queued for the trace forwarder's background lane.

A row is not a change: it tells what the shop held when it was read (``observed_at``), and, when
the table or file keeps one, when that status was set (``changed_at``). The forwarder reads it
with the same rule as a shop change, under the backfill guards (consumers/shop_rows.py)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from schemas.fields import Email, Phone, PlainText, as_utc
from schemas.platform_event import Status

# The message type on the background lane (``<prefix>.traces.backfill``).
SHOP_ROW_TYPE = "bridge.shop_row"

RowSource = Literal["backfill", "reconcile"]

# uuid5 names of rows: the same row read again by the same run is the same message.
_ROW_NAMESPACE = uuid.UUID("5d0c64c8-8f8a-4f57-9f55-2b8f3d6f1e4a")

UtcDate = Annotated[datetime, AfterValidator(as_utc)]


class ShopRow(BaseModel):
    """What the shop holds for one customer, as read at ``observed_at``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    event_id: PlainText = Field(min_length=1, max_length=255)
    app_id: PlainText = Field(min_length=1, max_length=255)
    email: Email
    subscriber_status: Status
    phone: Phone | None = None
    # None says nothing of SMS (the mapping or file has no SMS status), as on a shop change.
    sms_subscriber_status: Status = None
    # When the shop set this status, by its own clock; None when nothing keeps it.
    changed_at: UtcDate | None = None
    # When it was read, by the database's clock: the shop held this status then.
    observed_at: UtcDate
    source: RowSource = "backfill"
    run_id: PlainText | None = Field(default=None, max_length=255)


def row_event_id(
    run_id: str,
    app_id: str,
    email: str,
    subscriber_status: int | None,
    phone: str | None,
    sms_subscriber_status: int | None,
    changed_at: datetime | None,
) -> str:
    """The row's id within its run: reading the same row again (a resumed run) gives the same
    id, which the forwarder's inbox takes for a duplicate; a row changed since is a new one."""
    name = "|".join(
        str(part)
        for part in (
            run_id,
            app_id,
            email,
            subscriber_status,
            phone,
            sms_subscriber_status,
            changed_at.isoformat() if changed_at else "",
        )
    )
    return str(uuid.uuid5(_ROW_NAMESPACE, name))
