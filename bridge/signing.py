"""edrone's webhook signatures (docs/protocol.md §1), compared in constant time."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from typing import Any


def php_string(value: Any) -> str:
    """A JSON value as PHP's string concatenation would render it before hashing."""
    if value is None or value is False:
        return ""
    if value is True:
        return "1"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _hex(*parts: str) -> str:
    return hashlib.sha256("".join(parts).encode("utf-8")).hexdigest()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("ascii")).decode("ascii")


def native5_signature(fields: Mapping[str, str], secret: str, app_id: str) -> str:
    """``base64(hex(sha256(address . status . reason . event_date . event_id . secret . app_id)))``
    where the address is the e-mail for type 1 and the phone otherwise."""
    is_email = fields.get("subscription_status_type_id", "1") == "1"
    address = fields.get("email", "") if is_email else fields.get("phone", "")
    return _b64(
        _hex(
            address,
            fields.get("subscriber_status", ""),
            fields.get("subscription_status_reason", ""),
            fields.get("event_date", ""),
            fields.get("event_id", ""),
            secret,
            app_id,
        )
    )


def native4_signature(fields: Mapping[str, str], secret: str, app_id: str) -> str:
    """NATIVE_5's formula with the e-mail always chosen (the consistent reading of NATIVE_4)."""
    return native5_signature({**fields, "subscription_status_type_id": "1"}, secret, app_id)


def legacy_update_signature(fields: Mapping[str, str], secret: str, app_id: str) -> str:
    """The Magento 1 update callback: no reason field in the hash."""
    return _b64(
        _hex(
            fields.get("email", ""),
            fields.get("subscriber_status", ""),
            fields.get("event_date", ""),
            fields.get("event_id", ""),
            secret,
            app_id,
        )
    )


def legacy_unsubscribe_token(fields: Mapping[str, str], secret: str, app_id: str) -> str:
    """The Magento 1 unsubscribe callback: plain hex, and the app_id before the secret."""
    return _hex(fields.get("email", ""), app_id, secret)


SIGNERS = {
    "NATIVE_5": native5_signature,
    "NATIVE_4": native4_signature,
    "LEGACY_UPDATE": legacy_update_signature,
    "LEGACY_UNSUBSCRIBE": legacy_unsubscribe_token,
}


def sign(version: str, fields: Mapping[str, str], secret: str, app_id: str) -> str:
    """The signature (or, for the unsubscribe callback, the token) edrone sends for ``fields``."""
    return SIGNERS[version](fields, secret, app_id)


def matches(
    version: str, fields: Mapping[str, str], provided: str, secrets: Iterable[str], app_id: str
) -> bool:
    """True when ``provided`` is the signature under any of ``secrets`` (current, then previous).

    Every candidate is compared, in constant time, so the answer's timing tells nothing."""
    given = provided.encode("utf-8")
    found = False
    for secret in secrets:
        expected = sign(version, fields, secret, app_id).encode("ascii")
        found |= hmac.compare_digest(expected, given)
    return found
