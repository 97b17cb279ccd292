"""The outbox trigger on each app's own table: it records the shop's subscription changes in
``outbox`` and NOTIFYs the relay (the trigger function itself is migration 0003)."""

from __future__ import annotations

from collections.abc import Mapping

import asyncpg
import structlog

from bridge.config import Settings
from bridge.shop_table import ShopTarget, quote_ident

log = structlog.get_logger(__name__)


def notify_channel(settings: Settings) -> str:
    """The channel the trigger's NOTIFY goes to (``current_schema() || '.outbox'``)."""
    return f"{settings.database_schema}.outbox"


def trigger_name(settings: Settings, app_id: str) -> str:
    return f"{settings.database_schema}_outbox_{app_id}"[:63]


async def install_triggers(
    conn: asyncpg.Connection, settings: Settings, targets: Mapping[str, ShopTarget]
) -> None:
    """Create (or replace) the outbox trigger on each app's mapped table."""
    function = f"{quote_ident(settings.database_schema)}.record_subscription_change"
    for app_id, target in targets.items():
        mapping = target.mapping
        email, sms = target.values["email"], target.values.get("sms", {})
        arguments = [
            app_id,
            mapping.address_column,
            mapping.email_status_column,
            email[1],
            email[0],
            mapping.sms_status_column or "",
            mapping.phone_column or "",
            sms.get(1, ""),
            sms.get(0, ""),
        ]
        # Literals quoted by the server itself, whatever its string settings.
        literals = [await conn.fetchval("SELECT quote_literal($1::text)", a) for a in arguments]
        await conn.execute(
            f"CREATE OR REPLACE TRIGGER {quote_ident(trigger_name(settings, app_id))} "
            f"AFTER INSERT OR UPDATE ON {target.table_sql} FOR EACH ROW "
            f"EXECUTE FUNCTION {function}({', '.join(literals)})"
        )
        log.info("outbox_trigger_installed", app_id=app_id, table=target.table_sql)
