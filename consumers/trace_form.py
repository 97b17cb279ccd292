"""The trace API's form for one shop change (edrone-protocol.md §2): field names and values."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from bridge.config import AppConfig
from schemas.platform_event import CustomerSubscriptionChanged


def bridge_version() -> str:
    try:
        return version("edrone-bridge")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "0"


def status_value(status: int | None) -> str:
    """1 subscribed, 0 unsubscribed, empty for unknown."""
    return "" if status is None else str(status)


def trace_form(
    event: CustomerSubscriptionChanged,
    app_id: str,
    app: AppConfig,
    *,
    platform: str,
    platform_version: str,
    version: str,
) -> dict[str, str]:
    """The form fields, as plain strings: the HTTP client encodes each value exactly once (a
    known edrone module encoded twice)."""
    form = {
        "app_id": app_id,
        "action_type": "subscribe",
        # Without sender_type=server a subscription change does not take effect.
        "sender_type": "server",
        "email": event.email,
        "subscriber_status": status_value(event.subscriber_status),
    }
    if event.sms_subscriber_status is not None or event.phone:
        if event.phone:
            form["phone"] = event.phone
        if event.sms_subscriber_status is not None:
            form["sms_subscriber_status"] = status_value(event.sms_subscriber_status)
    if event.first_name:
        form["first_name"] = event.first_name
    if event.last_name:
        form["last_name"] = event.last_name
    tags = event.customer_tags if event.customer_tags is not None else list(app.customer_tags)
    if tags:
        form["customer_tags"] = "|".join(tags)
    form["event_utc_date"] = event.occurred_at.strftime("%Y-%m-%d %H:%M:%S")
    form["version"] = version
    form["platform"] = platform
    form["platform_version"] = platform_version
    return form
