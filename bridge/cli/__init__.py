"""The ``edrone-bridge`` command line, the top layer: the one place that wires processes
together (``main`` parses; the modules beside it add their subcommands)."""
