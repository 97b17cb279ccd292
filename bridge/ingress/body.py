"""Reading a webhook's fields from a JSON or form body, within a size limit."""

from __future__ import annotations

import asyncio
import json
import re
from urllib.parse import parse_qsl, unquote_plus

from aiohttp import web

from bridge.ingress.webhook import WebhookRejected
from bridge.signing import php_string

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"


def too_large(limit: int) -> WebhookRejected:
    return WebhookRejected(413, "body_too_large", f"the body is over the limit of {limit} bytes")


async def read_fields(request: web.Request, limit: int, timeout_s: float) -> dict[str, str]:
    """The body's fields as PHP would see them (docs/protocol.md §1, "Body encoding"); the
    whole body must arrive within ``timeout_s``, or it is a 408 (a dripping client is cut).

    An empty body gives no fields: the legacy callbacks may come in the query string alone."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    try:
        # A body all here already (a small one comes with its head) has no wait to bound, and
        # a timer armed for none costs one per request.
        async with asyncio.timeout(None if request.content.is_eof() else timeout_s):
            raw = await request.read()  # bounded by the app's client_max_size
    except TimeoutError:
        raise WebhookRejected(
            408, "body_timeout", f"the body did not arrive within {timeout_s:g} s"
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None
    except web.RequestPayloadError:
        # A gzip body that does not decompress, or broken chunked framing: the caller's mistake.
        raise WebhookRejected(
            400, "malformed_body", "the body does not decode as its headers say"
        ) from None
    if not raw:
        return {}
    content_type = media_type(request)
    if content_type == JSON:
        return parse_json(raw)
    if content_type == FORM:
        return parse_form(raw)
    raise WebhookRejected(
        415, "unsupported_content_type", f"expected {JSON} or {FORM}, got {content_type!r}"
    )


def media_type(request: web.Request) -> str:
    """The body's media type; a Content-Type header that does not parse is a 415."""
    try:
        return request.content_type
    except IndexError:
        # CPython's header parser fails on a parameter name that ends in '*' with no value
        # (``application/json; charset*``, python/cpython#151857): no client means such a header.
        raise WebhookRejected(
            415, "unsupported_content_type", "the Content-Type header does not parse"
        ) from None


# edrone's webhook is one flat object; a depth far below Python's recursion limit is enough to
# refuse nesting with a 400 before json.loads would fail on it with a RecursionError (a 500).
MAX_JSON_DEPTH = 32
_BRACKETS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_SURROGATE = re.compile("[\ud800-\udfff]")


def too_deep(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text nests arrays and objects deeper than ``limit``."""
    # Fewer brackets than the limit in all cannot nest deeper: the common case costs two counts.
    if raw.count(b"{") + raw.count(b"[") <= limit:
        return False
    depth = 0
    for token in _BRACKETS.finditer(raw):
        bracket = token.group()
        if bracket in (b"{", b"["):
            depth += 1
            if depth > limit:
                return True
        elif bracket in (b"}", b"]"):
            depth -= 1
    return False


def parse_json(raw: bytes) -> dict[str, str]:
    if too_deep(raw):
        raise WebhookRejected(
            400, "malformed_body", f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels"
        )
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise WebhookRejected(400, "malformed_body", f"the body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise WebhookRejected(400, "malformed_body", "the JSON body must be an object")
    fields: dict[str, str] = {}
    for key, value in document.items():
        if isinstance(value, dict | list):
            raise WebhookRejected(400, "invalid_field", f"field {key!r} must be a scalar")
        if isinstance(value, bool):
            # edrone sends numbers or strings; PHP would sign true as "1", but a status read
            # from a boolean is a value nobody sent.
            raise WebhookRejected(
                400,
                "invalid_field",
                f"field {key!r} must be a string or a number, not {str(value).lower()}",
            )
        # edrone may send 1 or "1", null or "": both sign the same (PHP concatenation).
        fields[key] = php_string(value)
    # A lone \ud800-style escape is valid JSON but no text: it cannot even be hashed. One
    # search over everything; the field is named only when there is one to name.
    if _SURROGATE.search("".join(fields) + "".join(fields.values())):
        key = next(k for k, v in fields.items() if _SURROGATE.search(k + v))
        raise WebhookRejected(400, "malformed_body", f"field {key!r} is not valid Unicode")
    return fields


def parse_form(raw: bytes | str, where: str = "the form body") -> dict[str, str]:
    """Form fields (or a query string) as PHP's ``$_POST`` reads them: a repeated field keeps its
    last value. A percent-escape that is no UTF-8 (``%FF``) is a 400 naming the field, not a
    replacement character that then fails the signature as a 401."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise WebhookRejected(400, "malformed_body", f"{where} is not UTF-8") from None
    try:
        return dict(parse_qsl(text, keep_blank_values=True, errors="strict"))
    except UnicodeDecodeError:
        name = _undecodable_field(text)
        raise WebhookRejected(
            400, "malformed_body", f"field {name!r} in {where} is not valid UTF-8"
        ) from None


def _undecodable_field(text: str) -> str:
    for pair in text.split("&"):
        try:
            parse_qsl(pair, keep_blank_values=True, errors="strict")
        except UnicodeDecodeError:
            return unquote_plus(pair.partition("=")[0], errors="replace")
    return "?"
