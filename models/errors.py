"""The one exception type for user mistakes and bad input."""


class StreamspecError(Exception):
    """Bad input, told in one clear sentence.

    The CLI prints the message and exits 1 without a traceback, so the message must
    stand on its own: say what is wrong and, where it helps, what to do instead.
    """
