"""From a webhook's raw fields to a verified ``SubscriptionStatusChanged``: pure, no I/O.

edrone-protocol.md §1 is the reference for every field, version and formula used here."""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from email_validator import EmailNotValidError, validate_email
from pydantic import ValidationError

from bridge import signing
from bridge.config import AppConfig, ProtocolVersion
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

_PHONE = re.compile(r"^\+?[0-9][0-9 ()\-]{3,30}$")
# RFC 5322 dot-atom in ASCII, as email_validator reads an unquoted local part (its DOT_ATOM_TEXT).
_DOT_ATOM = re.compile(r"[a-zA-Z0-9_!#$%&'*+\-/=?^`{|}~]+(?:\.[a-zA-Z0-9_!#$%&'*+\-/=?^`{|}~]+)*\Z")
_EMAIL_MAX_LENGTH = 254
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
    app_id = (body.get("app_id") or query.get("app_id") or "").strip()
    app = apps.get(app_id) if app_id else None
    if app is None and len(apps) == 1:
        app = next(iter(apps.values()))
    return app.version if app is not None else "auto"


def _require(fields: Mapping[str, str], version: str) -> None:
    missing = [name for name in REQUIRED_FIELDS[version] if name not in fields]
    if missing:
        raise _bad(f"missing field(s) for {version}: {', '.join(missing)}", "missing_field")


def _find_app(
    fields: Mapping[str, str], version: str, apps: Mapping[str, AppConfig]
) -> tuple[str, AppConfig]:
    """The app the webhook is for, proven by its signature. Legacy callbacks carry no app_id
    unless the shop's URL adds one, so without it every app that may speak the version is tried."""
    proof_field = "token" if version == "LEGACY_UNSUBSCRIBE" else "signature"
    proof = fields[proof_field]
    app_id = fields.get("app_id", "").strip()
    if app_id:
        app = apps.get(app_id)
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
    except ValueError:
        raise _bad(f"event_date {raw!r} is not a date edrone sends") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def normalise_email(raw: str) -> str:
    address = raw.strip().lower()
    local, _, domain = address.rpartition("@")
    # The common shape, a plain ASCII local part at a plain ASCII domain, is valid exactly when
    # its domain is: that check (most of email_validator's time) is made once per domain.
    if len(address) <= _EMAIL_MAX_LENGTH and _DOT_ATOM.match(local) and _plain_domain(domain):
        return address
    try:
        validate_email(address, check_deliverability=False)
    except EmailNotValidError as exc:
        raise _bad(f"email {raw!r} is not a valid e-mail address: {exc}", "invalid_email") from None
    return address


@functools.lru_cache(maxsize=4096)
def _plain_domain(domain: str) -> bool:
    """email_validator accepts the domain, and it is its own normalised and IDNA form."""
    try:
        info = validate_email(f"a@{domain}", check_deliverability=False)
    except EmailNotValidError:
        return False
    return info.domain == domain and info.ascii_domain == domain


def normalise_phone(raw: str) -> str:
    phone = raw.strip()
    if not _PHONE.match(phone):
        raise _bad(f"phone {raw!r} is not a phone number", "invalid_phone")
    return phone


def _status(raw: str) -> int | None:
    value = raw.strip()
    if value == "":
        return None  # edrone's UNKNOWN: "information not available"
    if value in ("0", "1"):
        return int(value)
    raise _bad(f"subscriber_status must be 0, 1 or empty, got {raw!r}")


def _reason(raw: str | None) -> int | None:
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw.strip())
    except ValueError:
        raise _bad(f"subscription_status_reason must be an integer, got {raw!r}") from None


def _event_id(raw: str) -> str:
    value = raw.strip()
    if not value or len(value) > _MAX_EVENT_ID:
        raise _bad(f"event_id must be 1 to {_MAX_EVENT_ID} characters")
    return value


def _channel_and_address(
    fields: Mapping[str, str], version: str
) -> tuple[str, str, str | None, str | None]:
    """(channel, address, email, phone); the address is the identifier the signature covers."""
    if version == "NATIVE_5":
        # Exactly as signed: the signature chooses the e-mail only for "1" (signing.py), so a
        # trimmed " 1" would read a signed SMS change as a change of the unsigned e-mail.
        type_id = fields["subscription_status_type_id"]
        if type_id == "2":
            if "phone" not in fields:
                raise _bad("missing field(s) for NATIVE_5 SMS: phone", "missing_field")
            phone = normalise_phone(fields["phone"])
            email = fields.get("email", "").strip()
            return "sms", phone, normalise_email(email) if email else None, phone
        if type_id != "1":
            raise _bad(f"subscription_status_type_id must be 1 or 2, got {type_id!r}")
        if "email" not in fields:
            raise _bad("missing field(s) for NATIVE_5 e-mail: email", "missing_field")
    email = normalise_email(fields["email"])
    phone = fields.get("phone", "").strip() or None
    return "email", email, email, phone


def verify_webhook(
    body: Mapping[str, str],
    query: Mapping[str, str],
    apps: Mapping[str, AppConfig],
    received_at: datetime,
) -> tuple[SubscriptionStatusChanged, AppConfig]:
    """Verify a webhook's fields (already rendered as PHP strings) and normalise them.

    Raises :class:`WebhookRejected` with the status to answer: 400 for a malformed or
    missing field, 401 for a signature that matches no secret, 403 for an unknown app."""
    version, fields = choose_fields(body, query, _configured_version(body, query, apps))
    _require(fields, version)
    # Cheap field checks come before the hashing, but the app is proven before any is trusted.
    channel, address, email, phone = _channel_and_address(fields, version)
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
    try:
        message = SubscriptionStatusChanged(
            app_id=app_id,
            channel=channel,  # type: ignore[arg-type]
            address=address,
            email=email,
            phone=phone,
            status=status,  # type: ignore[arg-type]
            reason=reason,
            reason_name=reason_name(channel, reason),
            event_id=event_id,
            event_date=event_date,
            event_date_raw=event_date_raw,
            received_at=received_at,
            protocol=version,
        )
    except ValidationError as exc:  # a limit of the message schema, e.g. an overlong field
        raise _bad(str(exc.errors()[0]["msg"])) from None
    return message, app
