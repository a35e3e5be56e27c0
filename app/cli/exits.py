"""The CLI's exit statuses (the README's table says the same) and its one-line error."""

from __future__ import annotations

OK = 0  # done; a followed run ended `success`
FAILED = 1  # anything else that went wrong (said in one line)
USAGE = 2  # bad arguments; `threadgate dev`: a port in use, a stack already running
UNREACHABLE = 3  # no pod answered (refused, timed out)
REFUSED = 4  # the server refused the request (4xx), or the thread has no run to attach to
SERVER_ERROR = 5  # the server failed (5xx, or 503 from every pod)
RUN_ERROR = 6  # the run ended `error`
RUN_STOPPED = 7  # the run was `cancelled` or `interrupted`
EXIT = {
    OK: "success",
    FAILED: "other failure",
    USAGE: "usage",
    UNREACHABLE: "no pod answered",
    REFUSED: "request refused (4xx) or no run",
    SERVER_ERROR: "server error (5xx)",
    RUN_ERROR: "run ended in error",
    RUN_STOPPED: "run cancelled or interrupted",
}


class CliError(Exception):
    """A failure to report in one line, with its exit status."""

    def __init__(self, message: str, status: int = FAILED) -> None:
        super().__init__(message)
        self.status = status
