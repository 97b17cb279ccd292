"""The ``EDRONE_BRIDGE_`` variables by name: every one the settings read, the ones found in an
environment that none of them reads (a misspelt ``EDRONE_BRIDGE_AMQP_PREFX`` would otherwise be
ignored, and the bridge would use the default queue names on a shared broker), and the checks
of the service URLs, which must be right before anything connects."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

from pydantic import BaseModel
from yarl import URL

ENV_PREFIX = "EDRONE_BRIDGE_"
CONFIG_FILE_VARIABLE = f"{ENV_PREFIX}CONFIG"
# Read by the project's own tools, never by the bridge: the tests' and benchmarks' service URLs
# and knobs, and the Compose file's image tag.
TOOL_PREFIXES = (f"{ENV_PREFIX}TEST_", f"{ENV_PREFIX}BENCH_", f"{ENV_PREFIX}MODEL_")
TOOL_VARIABLES = frozenset({f"{ENV_PREFIX}IMAGE_TAG"})

AMQP_EXAMPLE = "amqp://guest:guest@localhost:5672/"
DATABASE_EXAMPLE = "postgresql://postgres@localhost:5432/postgres"


def variable_of(key: str) -> str:
    """A settings key's variable: ``traces.batch_size`` → ``EDRONE_BRIDGE_TRACES__BATCH_SIZE``."""
    return ENV_PREFIX + "__".join(part.upper() for part in key.split("."))


def known_variables(settings: type[BaseModel]) -> set[str]:
    """Every variable the settings read: each field, and each field of a nested group."""
    names = {CONFIG_FILE_VARIABLE}
    for name, info in settings.model_fields.items():
        names.add(variable_of(name))
        nested = getattr(info.annotation, "model_fields", None)
        if name != "apps" and nested:
            names.update(variable_of(f"{name}.{sub}") for sub in nested)
    return names


def unknown_variables(environ: Mapping[str, str], known: Iterable[str]) -> list[str]:
    """One line per ``EDRONE_BRIDGE_`` variable of ``environ`` that nothing reads, with the
    nearest known name where one is close."""
    known = sorted(known)
    problems = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known:
            continue
        if name in TOOL_VARIABLES or name.startswith(TOOL_PREFIXES):
            continue
        nearest = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean {nearest[0]}?" if nearest else ""
        problems.append(f"{name}: not a setting of the bridge{hint}")
    return problems


def check_url(value: str, schemes: tuple[str, ...], example: str, *, host: bool = True) -> str:
    """``value`` if it is a URL of one of ``schemes`` (with a host, if ``host``); else a
    ValueError that shows an example (and never the password of what was given)."""
    try:
        url = URL(value)
    except (TypeError, ValueError):
        url = None
    if url is None or url.scheme not in schemes or (host and not url.host):
        raise ValueError(f"expected a URL like {example}, got {shown_url(value)!r}")
    return value


def shown_url(value: str) -> str:
    """``value`` with any password in it replaced by ``***``."""
    head, at, tail = value.rpartition("@")
    if not at:
        return value
    scheme, sep, login = head.rpartition("://")
    user = login.split(":", 1)[0]
    return f"{scheme}{sep}{user}{':***' if ':' in login else ''}@{tail}"
