"""``python -m bridge``: the same as the ``edrone-bridge`` command."""

from bridge.cli.main import main

raise SystemExit(main())
