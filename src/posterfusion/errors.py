"""The one exception type a user should ever see from posterfusion.

Commands catch :class:`PosterFusionError` at the CLI boundary and print its message as a single
line, so every message must name the file and the problem and say what to do.
"""

import errno
import os


class PosterFusionError(Exception):
    """A problem with the user's input or set-up, printed as one line without a traceback."""

    exit_code = 2


class DiskFull(PosterFusionError):
    """The disk filled up during a write; what was committed before stays valid.

    Not the user's mistake in the command line, so it exits 1 like other failed runs.
    """

    exit_code = 1


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error means the disk (or the user's quota) is full, whoever raised it: pyarrow's
    errors carry no errno, only the C library's message."""
    if not isinstance(exc, OSError):
        return False
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or any(
        os.strerror(code) in str(exc) for code in (errno.ENOSPC, errno.EDQUOT)
    )


def user_errors(command):
    """CLI decorator: print a PosterFusionError as one line on stderr and exit with its code (2, or 1
    for a full disk), never a traceback. A full disk met by any writer is one line too (exit 1):
    every writer goes through an atomic write, so nothing half-written is left."""
    import functools

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        import typer

        try:
            return command(*args, **kwargs)
        except PosterFusionError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            where = exc.filename or "output"
            typer.echo(f"error: {where}: disk full; nothing half-written was left there, free space and run again", err=True)
            raise typer.Exit(1) from None

    return wrapper
