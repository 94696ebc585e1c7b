"""The one exception type for bad input, shared by every part (it imports nothing).

Its message is a single sentence for the user; the CLI prints it and exits with code 1.
"""


class StreamspecError(Exception):
    """A user-facing error: one clear sentence, no traceback."""
