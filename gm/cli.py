"""Shared command-line plumbing: logging set-up and turning user errors into one-line exits."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from gm.errors import UserError

EXIT_USER_ERROR = 2


def setup_logging(rank: int = 0) -> None:
    """INFO on rank 0, warnings only elsewhere; MindSpore's own chatter off."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    os.environ.setdefault("GLOG_v", "3")


def run_cli(main: Callable[[], None]) -> None:
    """Run ``main``; a UserError (bad flag, config or file) ends with one line and exit code 2.

    Set ``GM_DEBUG=1`` to see the full traceback instead.
    """
    try:
        main()
        from gm.parallel import exit_after_mpirun_job

        exit_after_mpirun_job()
    except UserError as err:
        if os.environ.get("GM_DEBUG"):
            raise
        logging.getLogger("gm").error("%s", err)
        sys.exit(EXIT_USER_ERROR)
