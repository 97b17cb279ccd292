"""From a webhook's raw fields to a verified ``SubscriptionStatusChanged``: pure, no I/O.

docs/protocol.md §1 is the reference for every field, version and formula used here."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import ValidationError

from bridge import signing
from bridge.app_config import AppConfig, ProtocolVersion
from schemas.fields import (
    DATE_FLOOR_CONTEXT,
    DEFAULT_DATE_FLOOR,
    DEFAULT_PHONE_REGION,
    INT4_MAX,
    INT4_MIN,
    control_character,
)
from schemas.fields import normalise_email as canonical_email
from schemas.fields import normalise_phone as canonical_phone
from schemas.reasons import reason_name
from schemas.subscription import SubscriptionStatusChanged

# The fields each version signs (and so must carry), besides the signature or token itself.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "NATIVE_5": (
        "subscription_status_type_id",
        "subscriber_status",
        "subscription_status_reason",
        "event_date",
        "event_id",
        "app_id",
        "signature",
    ),
    "NATIVE_4": (
        "email",
        "subscriber_status",
        "subscription_status_reason",
        "event_date",
        "event_id",
        "app_id",
        "signature",
    ),
    "LEGACY_UPDATE": ("email", "subscriber_status", "event_date", "event_id", "signature"),
    "LEGACY_UNSUBSCRIBE": ("email", "token"),
}
LEGACY_VERSIONS = ("LEGACY_UPDATE", "LEGACY_UNSUBSCRIBE")
# Signed fields that must also carry a value: an empty event_id would be no key for the inbox
# (edrone's retries applied twice), an empty event_date no date to order by.
NON_EMPTY_FIELDS: dict[str, tuple[str, ...]] = {
    "NATIVE_5": ("event_date", "event_id", "app_id"),
    "NATIVE_4": ("event_date", "event_id", "app_id"),
    "LEGACY_UPDATE": ("event_date", "event_id"),
    "LEGACY_UNSUBSCRIBE": (),
}

_INTEGER = re.compile(r"-?[0-9]{1,19}\Z")
_MAX_EVENT_ID = 255


@dataclass(frozen=True)
class WebhookRejected(Exception):
    """A webhook that can never succeed: the HTTP status to answer and the problem, named."""

    status: int
    error: str
    detail: str

    def __str__(self) -> str:
        return f"{self.status} {self.error}: {self.detail}"


def _bad(detail: str, error: str = "invalid_field") -> WebhookRejected:
    return WebhookRejected(400, error, detail)


def detect_version(fields: Mapping[str, str]) -> ProtocolVersion:
    """Which protocol a webhook speaks, read from the fields it carries (for ``version = auto``)."""
    if "subscription_status_type_id" in fields:
        return "NATIVE_5"
    if "token" in fields and "signature" not in fields:
        return "LEGACY_UNSUBSCRIBE"
    if "subscription_status_reason" in fields or "app_id" in fields:
        return "NATIVE_4"
    return "LEGACY_UPDATE"


def choose_fields(
    body: Mapping[str, str], query: Mapping[str, str], configured: str | None
) -> tuple[ProtocolVersion, Mapping[str, str]]:
    """The fields to read and their version. Only the legacy callbacks may use the query
    string (edrone's Magento 1 module read ``$_REQUEST``); body fields win over query ones."""
    merged = {**query, **body} if query else body
    version = detect_version(merged) if configured in (None, "auto") else configured
    if version in LEGACY_VERSIONS:
        return version, merged  # type: ignore[return-value]
    return version, body  # type: ignore[return-value]


def _configured_version(
    body: Mapping[str, str], query: Mapping[str, str], apps: Mapping[str, AppConfig]
) -> str:
    """The version the shop chose in edrone's panel, when the webhook says which app it is for."""
    app_id = body.get("app_id") or query.get("app_id") or ""
    app = apps.get(app_id) if app_id else None
    if app is None and len(apps) == 1:
        app = next(iter(apps.values()))
    return app.version if app is not None else "auto"


def _require(fields: Mapping[str, str], version: str) -> None:
    missing = [name for name in REQUIRED_FIELDS[version] if name not in fields]
    if missing:
        raise _bad(f"missing field(s) for {version}: {', '.join(missing)}", "missing_field")
    empty = [name for name in NON_EMPTY_FIELDS[version] if not fields[name].strip()]
    if empty:
        raise _bad(f"empty field(s) for {version}: {', '.join(empty)}", "missing_field")


def _check_text(fields: Mapping[str, str]) -> None:
    """No field, signed or not, may hold a control character or a lone surrogate: no edrone
    value does, and PostgreSQL cannot store a NUL (the consumer would dead-letter it)."""
    # One search over everything, the field named only when there is something to name.
    if control_character("".join(fields) + "".join(fields.values())) is None:
        return
    for name, value in fields.items():
        problem = control_character(name)
        if problem is not None:
            raise _bad(f"a field name contains a control character ({problem})")
        problem = control_character(value)
        if problem is not None:
            raise _bad(f"field {name!r} contains a control character ({problem})")


def _find_app(
    fields: Mapping[str, str], version: str, apps: Mapping[str, AppConfig]
) -> tuple[str, AppConfig]:
    """The app the webhook is for, proven by its signature. Legacy callbacks carry no app_id
    unless the shop's URL adds one, so without it every app that may speak the version is tried."""
    proof_field = "token" if version == "LEGACY_UNSUBSCRIBE" else "signature"
    proof = fields[proof_field]
    app_id = fields.get("app_id", "")
    if app_id:
        app = apps.get(app_id)
        if app is None and app_id.strip() in apps:
            # Exactly as configured or not at all: " shop1" would sign and store as another app.
            raise _bad(f"app_id {app_id!r} has white space around a configured app id")
        if app is None:
            raise WebhookRejected(403, "unknown_app", f"app_id {app_id!r} is not configured")
        _check_version(app, version, app_id)
        if signing.matches(version, fields, proof, app.secrets(), app_id):
            return app_id, app
        raise WebhookRejected(401, "bad_signature", f"{proof_field} does not match app {app_id!r}")
    candidates = {a: c for a, c in apps.items() if c.version in ("auto", version)}
    if not candidates:
        raise WebhookRejected(403, "unknown_app", f"no configured app accepts {version} webhooks")
    for candidate_id, app in candidates.items():
        if signing.matches(version, fields, proof, app.secrets(), candidate_id):
            return candidate_id, app
    raise WebhookRejected(401, "bad_signature", f"{proof_field} matches no configured app")


def _check_version(app: AppConfig, version: str, app_id: str) -> None:
    if app.version not in ("auto", version):
        raise _bad(
            f"app {app_id!r} is configured for {app.version} but the webhook is {version}",
            "wrong_version",
        )


def parse_event_date(raw: str) -> datetime:
    """edrone's undocumented date format: ``2024-01-15 10:30:00`` or ISO 8601 (``T``, millis,
    ``Z`` or an offset). A date without an offset is UTC, as the docs say."""
    text = raw.strip()
    try:
        parsed = datetime.fromisoformat(text)
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # Overflow: year 1 east of UTC, 9999 west of it
        raise _bad(f"event_date {raw!r} is not a date edrone sends") from None


def normalise_email(raw: str) -> str:
    """The address's one form (``schemas.fields.normalise_email``); 400 when invalid."""
    try:
        return canonical_email(raw)
    except ValueError as exc:
        # Not the address itself: the answer and the log say why, never whose it is.
        raise _bad(f"email: {exc}", "invalid_email") from None


def normalise_phone(raw: str, region: str) -> str:
    """The phone's one form, E.164 (``schemas.fields.normalise_phone``); 400 when invalid."""
    try:
        return canonical_phone(raw, region)
    except ValueError as exc:
        # Why, never the number: the answer and the log line quote no personal data.
        raise _bad(f"phone: {exc}", "invalid_phone") from None


def _side_phone(raw: str, region: str) -> str | None:
    """An e-mail change's phone, in E.164; left out when it is no valid number: the signature
    does not cover it, nothing the change does needs it, and refusing the change for it would
    lose an unsubscribe edrone can only retry unchanged."""
    try:
        return canonical_phone(raw, region) if raw.strip() else None
    except ValueError:
        return None


def _status(raw: str) -> int | None:
    # Exactly as signed: " 1" is no status edrone sends, and reading it as 1 would store a
    # value the signature never said.
    if raw == "":
        return None  # edrone's UNKNOWN: "information not available"
    if raw in ("0", "1"):
        return int(raw)
    raise _bad(f"subscriber_status must be 0, 1 or empty, got {raw!r}")


def _reason(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not _INTEGER.match(raw) or not INT4_MIN <= int(raw) <= INT4_MAX:
        raise _bad(
            f"subscription_status_reason must be an integer from {INT4_MIN} to {INT4_MAX}, "
            f"got {raw[:40]!r}"
        )
    return int(raw)


def _event_id(raw: str) -> str:
    # The inbox's key, exactly as signed: a padded id would be another event than edrone's.
    if not raw or len(raw) > _MAX_EVENT_ID:
        raise _bad(f"event_id must be 1 to {_MAX_EVENT_ID} characters")
    if raw != raw.strip():
        raise _bad(f"event_id {raw!r} has white space around it")
    return raw


def _channel_and_address(
    fields: Mapping[str, str], version: str, phone_region: str
) -> tuple[str, str, str | None, str | None]:
    """(channel, address, email, phone); the address is the identifier the signature covers,
    in its one form (a phone in E.164, read in ``phone_region`` without its country code)."""
    if version == "NATIVE_5":
        # Exactly as signed: the signature chooses the e-mail only for "1" (signing.py), so a
        # trimmed " 1" would read a signed SMS change as a change of the unsigned e-mail.
        type_id = fields["subscription_status_type_id"]
        if type_id == "2":
            if "phone" not in fields:
                raise _bad("missing field(s) for NATIVE_5 SMS: phone", "missing_field")
            phone = normalise_phone(fields["phone"], phone_region)
            email = fields.get("email", "").strip()
            return "sms", phone, normalise_email(email) if email else None, phone
        if type_id != "1":
            raise _bad(f"subscription_status_type_id must be 1 or 2, got {type_id!r}")
        if "email" not in fields:
            raise _bad("missing field(s) for NATIVE_5 e-mail: email", "missing_field")
    email = normalise_email(fields["email"])
    return "email", email, email, _side_phone(fields.get("phone", ""), phone_region)


def verify_webhook(
    body: Mapping[str, str],
    query: Mapping[str, str],
    apps: Mapping[str, AppConfig],
    received_at: datetime,
    *,
    date_floor: datetime = DEFAULT_DATE_FLOOR,
    phone_region: str = DEFAULT_PHONE_REGION,
) -> tuple[SubscriptionStatusChanged, AppConfig]:
    """Verify a webhook's fields (already rendered as PHP strings) and normalise them into the
    message the consumer reads, with the consumer's own rules (``schemas.fields``).

    Raises :class:`WebhookRejected` with the status to answer: 400 for a malformed or
    missing field, 401 for a signature that matches no secret, 403 for an unknown app."""
    version, fields = choose_fields(body, query, _configured_version(body, query, apps))
    _check_text(fields)
    _require(fields, version)
    # Cheap field checks come before the hashing, but the app is proven before any is trusted.
    channel, address, email, phone = _channel_and_address(fields, version, phone_region)
    app_id, app = _find_app(fields, version, apps)
    if version == "LEGACY_UNSUBSCRIBE":
        # The unsubscribe callback has neither an event id nor a date: it happens now.
        status, reason, event_id = 0, None, f"legacy-unsubscribe-{uuid.uuid4()}"
        event_date_raw, event_date = "", received_at
    else:
        status = _status(fields["subscriber_status"])
        reason = _reason(fields.get("subscription_status_reason"))
        event_id = _event_id(fields["event_id"])
        event_date_raw = fields["event_date"]
        event_date = parse_event_date(event_date_raw)
    fields_out = {
        "app_id": app_id,
        "channel": channel,
        "address": address,
        "email": email,
        "phone": phone,
        "status": status,
        "reason": reason,
        "reason_name": reason_name(channel, reason),
        "event_id": event_id,
        "event_date": event_date,
        "event_date_raw": event_date_raw,
        "received_at": received_at,
        "protocol": version,
    }
    try:
        message = SubscriptionStatusChanged.model_validate(
            fields_out, context={DATE_FLOOR_CONTEXT: date_floor}
        )
    except ValidationError as exc:  # a rule of the message schema: an overlong field, say
        error = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in error["loc"])
        raise _bad(f"{_FIELD_NAMES.get(where, where)}: {error['msg']}") from None
    return message, app


# The webhook's own names for the message's fields, to name them in an error.
_FIELD_NAMES = {
    "address": "email or phone",
    "status": "subscriber_status",
    "reason": "subscription_status_reason",
    "event_date": "event_date",
    "event_date_raw": "event_date",
}
