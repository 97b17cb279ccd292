"""Reading a webhook's fields from a JSON or form body, within a size limit."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

from aiohttp import web

from bridge.signing import php_string
from bridge.webhook import WebhookRejected

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"


def too_large(limit: int) -> WebhookRejected:
    return WebhookRejected(413, "body_too_large", f"the body is over the limit of {limit} bytes")


async def read_fields(request: web.Request, limit: int) -> dict[str, str]:
    """The body's fields as PHP would see them (edrone-protocol.md §1, "Body encoding").

    An empty body gives no fields: the legacy callbacks may come in the query string alone."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    try:
        raw = await request.read()  # bounded by the app's client_max_size
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None
    except web.RequestPayloadError:
        # A gzip body that does not decompress, or broken chunked framing: the caller's mistake.
        raise WebhookRejected(
            400, "malformed_body", "the body does not decode as its headers say"
        ) from None
    if not raw:
        return {}
    content_type = request.content_type
    if content_type == JSON:
        return parse_json(raw)
    if content_type == FORM:
        return parse_form(raw)
    raise WebhookRejected(
        415, "unsupported_content_type", f"expected {JSON} or {FORM}, got {content_type!r}"
    )


def parse_json(raw: bytes) -> dict[str, str]:
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WebhookRejected(400, "malformed_body", f"the body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise WebhookRejected(400, "malformed_body", "the JSON body must be an object")
    fields: dict[str, str] = {}
    for key, value in document.items():
        if isinstance(value, dict | list):
            raise WebhookRejected(400, "invalid_field", f"field {key!r} must be a scalar")
        # edrone may send 1 or "1", null or "": both sign the same (PHP concatenation).
        fields[key] = php_string(value)
        if not is_text(key) or not is_text(fields[key]):
            # A lone \ud800-style escape is valid JSON but no text: it cannot even be hashed.
            raise WebhookRejected(400, "malformed_body", f"field {key!r} is not valid Unicode")
    return fields


def is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_form(raw: bytes) -> dict[str, str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WebhookRejected(400, "malformed_body", "the form body is not UTF-8") from None
    # As PHP's $_POST: a repeated field keeps its last value.
    return dict(parse_qsl(text, keep_blank_values=True))
