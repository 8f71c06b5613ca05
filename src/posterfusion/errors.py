"""The one exception type a user should ever see from posterfusion.

Commands catch :class:`PosterFusionError` at the CLI boundary and print its message as a single
line, so every message must name the file and the problem and say what to do.
"""


class PosterFusionError(Exception):
    """A problem with the user's input or set-up, printed as one line without a traceback."""
