"""Starting the server: uvicorn on a socket bound here (so port 0 gives an ephemeral port that is printed),
stopping gracefully on SIGTERM or Ctrl-C: no new connections, in-flight requests finish within the grace period."""

import contextlib
import logging
import signal
import socket
import sys

import uvicorn

from .app import ServeSettings, create_app


class GracefulServer(uvicorn.Server):
    """uvicorn's server, except that after a graceful stop on SIGTERM / SIGINT the process exits 0 instead of
    re-raising the signal."""

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(infiller, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
          grace_s: float = 30.0) -> None:
    """Serves until SIGTERM / SIGINT; prints the address it listens on."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        raise ValueError(f"cannot listen on {host}:{port} ({error.strerror}); choose another --port or --host") \
            from None
    listener.listen(2048)                  # connections wait in the backlog until uvicorn accepts them
    bound = listener.getsockname()[1]
    config = uvicorn.Config(create_app(infiller, settings), log_config=None, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=grace_s)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"maria serve: model '{settings.model_name}' on {infiller.device}, listening on http://{shown}:{bound}",
          file=sys.stderr, flush=True)
    GracefulServer(config).run(sockets=[listener])
