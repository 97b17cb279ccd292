"""edrone's status-reason codes (docs/protocol.md §3), which differ per channel."""

from __future__ import annotations

EMAIL_REASONS: dict[int, str] = {
    1: "CUSTOMER_UNSUBSCRIBED",
    2: "HARD_BOUNCED_UNSUBSCRIBED",
    3: "CUSTOMER_SPAM_COMPLAINT_UNSUBSCRIBED",
    4: "AGENT_UNSUBSCRIBED",
    5: "EMAIL_INCORRECT_UNSUBSCRIBED",
    6: "TRACE_UNSUBSCRIBED",
    7: "DATA_IMPORT_UNSUBSCRIBED",
    8: "EXTERNAL_API_UNSUBSCRIBED",
    9: "SPAM_BOUNCED_UNSUBSCRIBED",
    10: "TRACE_SUBSCRIBED",
    11: "AGENT_SUBSCRIBED",
    12: "DATA_IMPORT_SUBSCRIBED",
    13: "TRACE_UNKNOWN",
    14: "ENGAGEMENT_TEST_MESSAGE_UNKNOWN",
    15: "SUBSCRIPTION_CHANGED_EVENT_SUBSCRIBED",
}

SMS_REASONS: dict[int, str] = {
    1: "DATA_IMPORT_SUBSCRIBED",
    2: "DATA_IMPORT_UNSUBSCRIBED",
    3: "DATA_IMPORT_UNKNOWN",
    4: "AGENT_UNSUBSCRIBED",
    5: "AGENT_SUBSCRIBED",
    6: "CUSTOMER_UNSUBSCRIBED",
    7: "LEGACY_SUBSCRIBED",
    8: "CUSTOMER_DELETED_UNSUBSCRIBED",
    9: "CUSTOMER_SELF_RESURRECT",
    10: "TRACE_UPDATE",
    11: "CHAT_UNKNOWN",
    12: "INBOX_UNKNOWN",
}


def reason_name(channel: str, reason: int | None) -> str | None:
    """The documented name of a reason code, or None where edrone's table is not legible."""
    if reason is None:
        return None
    return (EMAIL_REASONS if channel == "email" else SMS_REASONS).get(reason)
