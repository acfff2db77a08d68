"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class FedUnlearnError(Exception):
    """A problem with the user's input: the message names the problem and the fix."""
