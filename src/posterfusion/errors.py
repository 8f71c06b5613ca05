"""The one exception type a user should ever see from posterfusion.

Commands catch :class:`PosterFusionError` at the CLI boundary and print its message as a single
line, so every message must name the file and the problem and say what to do.
"""


class PosterFusionError(Exception):
    """A problem with the user's input or set-up, printed as one line without a traceback."""

    exit_code = 2


class DiskFull(PosterFusionError):
    """The disk filled up during a write; what was committed before stays valid.

    Not the user's mistake in the command line, so it exits 1 like other failed runs.
    """

    exit_code = 1


def user_errors(command):
    """CLI decorator: print a PosterFusionError as one line on stderr and exit with its code (2, or 1
    for a full disk), never a traceback."""
    import functools

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        import typer

        try:
            return command(*args, **kwargs)
        except PosterFusionError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper
