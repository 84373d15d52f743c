"""Exit statuses of every command (the CLI's subcommands and the maintainer tools)."""

OK = 0
SOME_FAILED = 1  # the run finished, but some inputs failed (or a check found a difference)
USAGE = 2  # bad arguments or unusable input: nothing was done
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
