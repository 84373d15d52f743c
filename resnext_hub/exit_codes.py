"""Exit statuses of every command: the one place they are defined."""

OK = 0
SOME_FAILED = 1  # the run finished, but some inputs (or the whole job) failed
USAGE = 2  # bad options, inputs or environment: nothing (more) was done
WEIGHTS_UNAVAILABLE = 3  # the weights could not be fetched, or a checkpoint could not be read or does not fit
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
TERMINATED = 143  # SIGTERM (128 + SIGTERM), where a command stops on it as on Ctrl-C (distributed.sigterm_as_exit)
