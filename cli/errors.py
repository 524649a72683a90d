"""One plain line and a non-zero exit for every error a user can cause."""

from __future__ import annotations

import contextlib
import sys

import typer

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, OSError)


@contextlib.contextmanager
def user_errors():
    """Turn expected failures (bad paths, bad settings) into ``error: ...`` and exit 1."""
    try:
        yield
    except typer.Exit:
        raise
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(1) from None
    except ImportError as e:  # an install that lacks a dependency: say which, and the fix
        missing = getattr(e, "name", None) or str(e)
        print(f"error: the Python package {missing!r} is missing ({e}); sgljax's dependencies "
              "are incomplete: run `bash scripts/setup.sh` (or `pip install -c constraints.txt "
              "-e .` in the checkout)", file=sys.stderr)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise typer.Exit(130) from None
