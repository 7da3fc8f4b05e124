"""The one exception type for bad input: the CLI prints its message as one line and exits 2."""


class SAELightningError(Exception):
    """A problem with the user's input. The message says what is wrong and how to fix it, in one line."""
