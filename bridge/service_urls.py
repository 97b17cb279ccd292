"""The two service URLs as a cluster gives them: ``EDRONE_BRIDGE_AMQP_URL`` as a comma-separated
list of brokers (one URL per node, each with its own login if need be), and
``EDRONE_BRIDGE_DATABASE_URL`` in libpq's multi-host form
(``postgresql://h1:5432,h2:5432/db?target_session_attrs=read-write``), which asyncpg reads
itself. Checked before anything connects, and shown in messages without any password."""

from __future__ import annotations

from urllib.parse import urlsplit

from bridge.variables import AMQP_EXAMPLE, DATABASE_EXAMPLE, check_url, shown_url

DATABASE_PORT = 5432


def amqp_urls(value: str) -> list[str]:
    """The broker URLs of ``value``, in the order given; ValueError for an empty list or a
    URL that is not ``amqp://`` or ``amqps://`` with a host."""
    urls = [part.strip() for part in value.split(",") if part.strip()]
    if not urls:
        raise ValueError(f"expected a URL like {AMQP_EXAMPLE}, got {value!r}")
    for url in urls:
        check_url(url, ("amqp", "amqps"), AMQP_EXAMPLE)
    return urls


def database_hosts(url: str) -> list[tuple[str | None, int]]:
    """Each ``(host, port)`` of a PostgreSQL URL, libpq's multi-host form included; host None
    is the local socket (``postgresql:///db``). ValueError for a URL that is not one."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"expected a URL like {DATABASE_EXAMPLE}, got {shown_url(url)!r}")
    netloc = parts.netloc.rpartition("@")[2]
    hosts: list[tuple[str | None, int]] = []
    for spec in netloc.split(",") if netloc else [""]:
        host, port = _host_port(spec)
        if host is None and netloc:
            raise ValueError(f"expected a URL like {DATABASE_EXAMPLE}, got {shown_url(url)!r}")
        hosts.append((host, port))
    return hosts


def _host_port(spec: str) -> tuple[str | None, int]:
    if spec.startswith("["):  # [::1]:5432
        host, _, rest = spec[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = spec.partition(":")
    if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise ValueError(f"not a port: {port_text!r}")
    return host or None, int(port_text) if port_text else DATABASE_PORT


def database_address(url: str) -> str:
    """``host:port[,host:port…]/database`` of a PostgreSQL URL, for messages (no user, no
    password)."""
    hosts = ",".join(f"{host or 'local socket'}:{port}" for host, port in database_hosts(url))
    return f"{hosts}/{urlsplit(url).path.lstrip('/')}"
