"""Graceful shutdown of `chestct serve`: on SIGTERM (or Ctrl-C) the service stops taking new work, finishes what
it holds, and exits 0.

uvicorn already does the middle part: it closes its listening socket (a new connection is refused), closes idle
keep-alive connections, lets the requests in flight finish for up to `timeout_graceful_shutdown`
(serve.shutdown_grace_s; then it cancels them), and runs the app's shutdown. Two things are added here:

- `/health/ready` answers 503 from the moment the signal arrives (`app.state.draining`), for any request already
  being answered on an open connection, so a load balancer that probes readiness drains the instance;
- the process exits with status 0: uvicorn re-raises the stopping signal once it has shut down, which kills the
  process with that signal's status; a stop that was asked for and went as planned is a normal exit for a
  process supervisor (systemd, Kubernetes, Docker), not a crash.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

import uvicorn

STOPPING_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class DrainingServer(uvicorn.Server):
    """uvicorn's server that marks the app as draining the moment a stopping signal arrives."""

    def __init__(self, config: uvicorn.Config, app) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._app.state.draining = True
        super().handle_exit(sig, frame)


def _exit_normally(sig: int, frame: FrameType | None) -> None:
    sys.exit(0)


def serve_until_stopped(app, **options) -> None:
    """Run uvicorn (`options` are uvicorn.Config's) until a stopping signal, then drain and return normally."""
    server = DrainingServer(uvicorn.Config(app, **options), app)
    # uvicorn restores these handlers after its shutdown and raises the signal again: it then ends here, status 0.
    previous = {stopping: signal.signal(stopping, _exit_normally) for stopping in STOPPING_SIGNALS}
    try:
        server.run()
    finally:
        for stopping, handler in previous.items():
            signal.signal(stopping, handler)
