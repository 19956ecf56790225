"""User errors at the command line: one line naming the field, exit status 2, no traceback.

    def main(argv=None) -> int:
        with user_errors():                      # a ValueError in here is the user's to fix
            cfg = load_config(Config, args.config, args.overrides)
        ...

    if __name__ == "__main__":
        sys.exit(run_main("megatron_gvpo.train", main))

Config loading, path checks and data loading raise ValueError naming the field or file:line at fault. Inside
`user_errors()` (the start-up of a command) such an error becomes a `UsageError`, which `run_main` prints as
`<prog>: error: <message>` on stderr before exiting with 2, argparse's status for a bad command line. Anything
else, and a ValueError raised later (a crash mid-run is a bug or an infrastructure failure, whose traceback
matters), propagates as usual. `UsageError` is a ValueError, so in-process callers (tests, notebooks) that catch
ValueError still do.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class UsageError(ValueError):
    """A bad config value, path or input row found while a command starts; its message names the field."""


@contextmanager
def user_errors() -> Iterator[None]:
    """ValueErrors raised inside are user errors: re-raised as UsageError with the same message."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(str(e)) from e


def run_main(prog: str, main: Callable[[], int]) -> int:
    """main()'s exit status; a UsageError is printed as one line (`prog: error: ...`, with the rank when the
    command runs as several processes) and gives 2."""
    try:
        return main()
    except UsageError as e:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
        print(f"{prog}: error: {rank}{e}", file=sys.stderr)
        return 2
