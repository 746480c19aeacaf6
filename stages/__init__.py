"""The pipeline's entry points, one module a stage: `python -m stages.<name>`.

Python imports this package before the stage's module, whose imports (torch) take a second or more: Ctrl-C in that
time ends the stage with one line, `interrupted`, and status 130, as shells expect, rather than a traceback from
inside an import. Nothing is written before the imports finish, so there is nothing to clean up; the stage's own
handling (nanogpt.errors.exit_on_user_error restores Python's) takes over when its main starts.
"""

import os
import signal
import sys
from types import FrameType


def _interrupted_while_starting(signum: int, frame: FrameType | None) -> None:
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(128 + signum)


if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where it is ignored (started with nohup)
    signal.signal(signal.SIGINT, _interrupted_while_starting)
