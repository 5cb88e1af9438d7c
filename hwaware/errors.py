"""The one exception type the CLI turns into a single line on stderr and exit status 2."""


class HwawareError(Exception):
    """A user-facing error: bad input, a missing file, an Arch that does not fit its space."""
