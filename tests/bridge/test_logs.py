"""Logs carry no whole e-mail address or phone number, wherever they appear."""

from __future__ import annotations

import io
import json

import structlog

from bridge.config import Settings
from bridge.logs import configure_logging, mask_email, mask_phone


def test_masking():
    """E-mails keep their first letter and domain; phones their last three digits."""
    assert mask_email("jan.kowalski@example.com") == "j***@example.com"
    assert mask_email("refused 'zażółć@example.pl': bad") == "refused 'z***@example.pl': bad"
    assert mask_phone("+48 500 100 200") == "+** *** *** 200"


def test_configured_logs_mask_personal_data():
    """Through the configured pipeline, e-mail in any value and phones by key are masked."""
    stream = io.StringIO()
    configure_logging(Settings(log_format="json"), stream=stream)
    try:
        structlog.get_logger("bridge.test").info(
            "webhook_rejected",
            detail="email 'jan@example.com' is not valid",
            phone="+48500100200",
            address="ola@example.com",
        )
    finally:
        structlog.reset_defaults()
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert line["detail"] == "email 'j***@example.com' is not valid"
    assert line["phone"] == "+********200"
    assert line["address"] == "o***@example.com"
    assert "jan@example.com" not in stream.getvalue()


def test_malformed_requests_do_not_flood_the_logs():
    """A client's malformed request (aiohttp's protocol errors) is not logged; a real server
    error still is."""
    import logging

    from aiohttp.http_exceptions import LineTooLong

    stream = io.StringIO()
    configure_logging(Settings(log_format="json"), stream=stream)
    server_log = logging.getLogger("aiohttp.server")
    try:
        try:
            raise LineTooLong("x" * 10, "8190")
        except LineTooLong:
            server_log.exception("Error handling request")
        try:
            raise RuntimeError("a bug")
        except RuntimeError:
            server_log.exception("Error handling request")
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in stream.getvalue().strip().splitlines()]
    assert len(lines) == 1
    assert "a bug" in json.dumps(lines[0])
