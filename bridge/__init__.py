"""edrone-bridge: two-way subscription-status sync between edrone and a shop platform,
over RabbitMQ and PostgreSQL."""

from importlib.metadata import PackageNotFoundError, version


def bridge_version() -> str:
    """The installed distribution's version: ``--version`` and the traces' ``version`` field."""
    try:
        return version("edrone-bridge")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "0"
