"""The one exception type that means "the user's input is wrong".

The command line turns it into a single line on stderr and exit code 2; the Python
API lets it propagate so notebooks see a normal exception with the same message.
"""


class MoecacheError(ValueError):
    """Bad input: a malformed trace, an impossible capacity, an unknown policy."""


class TraceError(MoecacheError):
    """A trace file that cannot be read or fails validation."""
