"""The one exception type for bad input: the CLI prints its message as one line and exits 2."""


def one_line(message) -> str:
    """A message (an exception's, a library's multi-line one) as one line, its lines stripped and joined."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


class SAELightningError(Exception):
    """A problem with the user's input. The message says what is wrong and how to fix it, in one line."""


class Interrupted(Exception):
    """The user stopped a run (Ctrl-C, SIGTERM, SIGUSR1) before it had anything to save."""

    def __init__(self, signal_name: str, where: str):
        super().__init__(f"{signal_name} during {where}, before the first training step: nothing was trained, "
                         "nothing to save")
        self.signal_name = signal_name
