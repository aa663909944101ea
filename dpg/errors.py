"""One exception type for bad input: the CLI prints its message as one line and exits 2."""


class DPGError(ValueError):
    """Bad input or a failed check. The message names the key, the value and the fix."""
