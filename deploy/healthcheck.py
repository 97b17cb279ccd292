#!/usr/bin/env python3
"""A container healthcheck for the bridge's images: exit 0 when ``GET /healthz`` on the given
local port answers 2xx, else 1 with one line saying why. Standard library only."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 3.0


def main(argv: list[str]) -> int:
    # The ingress's port by default; the consumers' metrics port (and fake-edrone's) by argument.
    port = argv[1] if len(argv) > 1 else os.environ.get("EDRONE_BRIDGE_HTTP_PORT", "8080")
    path = argv[2] if len(argv) > 2 else "/healthz"
    url = f"http://127.0.0.1:{int(port)}{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if not 200 <= status < 300:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
