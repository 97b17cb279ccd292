"""Typed keys of the ingress application's state."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web

from bridge.config import Settings
from bridge.ingress.bundler import Bundler
from bridge.metrics import Metrics


@dataclass
class IngressState:
    """What changes while the app runs (app state itself is frozen once it starts)."""

    bundler: Bundler | None = None
    draining: bool = False
    # Set once the process is asked to stop: a start still connecting gives up at once.
    stopping: asyncio.Event | None = None


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
STATE = web.AppKey("state", IngressState)
