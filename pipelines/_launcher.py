"""`python -m pipelines._launcher MODULE ARGS...`: torchrun (or accelerate launch) run in this process, quiet about a
worker's failure.

When a rank fails, torchrun logs the failure and the signals it sends the other ranks, then prints its own Python
traceback of ChildFailedError with a table of failed ranks (~40 lines after the worker's one-line error), and
accelerate launch re-raises it. The worker has already reported its error to the launching process (a file in
VIDEOR1_ERROR_DIR, `pipelines.launch.report_worker_error`), which prints it as one line with its hint. So here the
ChildFailedError becomes an exit code and the elastic agent's log records below CRITICAL are dropped. With --debug
(VIDEOR1_DEBUG=1) nothing is hidden.
"""

from __future__ import annotations

import logging
import os
import runpy
import signal
import sys


class _DropElastic(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("torch.distributed") and record.levelno < logging.CRITICAL)


def main() -> None:
    from pipelines.launch import PARENT_PID_ENV, die_with_parent

    die_with_parent(int(os.environ.get(PARENT_PID_ENV) or 0))
    module, args = sys.argv[1], sys.argv[2:]
    sys.argv = [module, *args]
    if os.environ.get("VIDEOR1_DEBUG") == "1":
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    drop = _DropElastic()
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
    for logger in loggers:  # torch's stderr handlers sit on "torch" and "torch.distributed"
        for handler in logger.handlers:
            handler.addFilter(drop)
    try:
        if module == "torch.distributed.run":
            torch.distributed.run.main(args)
        else:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except ChildFailedError as e:
        _rank, failure = e.get_first_failure()
        code = failure.exitcode
        sys.exit(code if code > 0 else 128 + (-code or signal.SIGTERM))

if __name__ == "__main__":
    main()
