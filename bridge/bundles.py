"""A bundle: several webhooks in one broker message, for the side that writes it (the ingress,
under load) and the side that reads it (the consumer runtime, which hands each webhook on as a
delivery of its own). One broker message and one confirm per bundle instead of per webhook is
what the ingress's CPU per webhook is mostly made of (docs/benchmarks.md).

A bundle's body is its webhooks' messages, each exactly the JSON a message of its own would
carry, one per line (JSON text never holds a raw newline); its content type says it is one."""

from __future__ import annotations

from collections.abc import Sequence

BUNDLE_CONTENT_TYPE = "application/x-ndjson"
# The number of webhooks in a bundle, for a person looking at it (``dlq show``, the management UI).
HEADER_BUNDLED = "x-bundled"


def join(bodies: Sequence[bytes]) -> bytes:
    return b"\n".join(bodies)


def split(body: bytes) -> list[bytes]:
    """The messages of a bundle's body; a blank line (none is ever written) is no message."""
    return [line for line in body.split(b"\n") if line.strip()]


def is_bundle(content_type: str | None) -> bool:
    return content_type == BUNDLE_CONTENT_TYPE
