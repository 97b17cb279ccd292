"""The trace API's form for one shop change (docs/protocol.md §2): field names and values."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridge.app_config import AppConfig

if TYPE_CHECKING:
    from consumers.trace_plan import TraceCall


def status_value(status: int | None) -> str:
    """1 subscribed, 0 unsubscribed, empty for unknown."""
    return "" if status is None else str(status)


def trace_form(
    call: TraceCall,
    app: AppConfig,
    *,
    platform: str,
    platform_version: str,
    version: str,
) -> dict[str, str]:
    """The form fields, as plain strings: the HTTP client encodes each value exactly once (a
    known edrone module encoded twice). A status is sent only where edrone is to be told it
    (an empty one would set edrone's UNKNOWN)."""
    form = {
        "app_id": call.app_id,
        "action_type": "subscribe",
        # Without sender_type=server a subscription change does not take effect.
        "sender_type": "server",
        "email": call.email,
    }
    if call.email_known:
        form["subscriber_status"] = status_value(call.email_status)
    if call.phone:
        form["phone"] = call.phone
    if call.sms_known:
        form["sms_subscriber_status"] = status_value(call.sms_status)
    event = call.event
    if event is not None and event.first_name:
        form["first_name"] = event.first_name
    if event is not None and event.last_name:
        form["last_name"] = event.last_name
    tags = event.customer_tags if event is not None else None
    if tags is None:
        tags = list(app.customer_tags)
    if tags:
        form["customer_tags"] = "|".join(tags)
    form["event_utc_date"] = call.occurred_at.strftime("%Y-%m-%d %H:%M:%S")
    form["version"] = version
    form["platform"] = platform
    form["platform_version"] = platform_version
    return form
