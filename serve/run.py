"""Starting the server: uvicorn on a socket bound here (so port 0 gives an ephemeral port that is printed),
stopping gracefully on SIGTERM or Ctrl-C: no new connections, in-flight requests finish within the grace period."""

import logging
import socket
import sys

import uvicorn

from .app import ServeSettings, create_app


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
    bound = listener.getsockname()[1]
    config = uvicorn.Config(create_app(infiller, settings), log_config=None, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=grace_s)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"maria serve: model '{settings.model_name}' on {infiller.device}, listening on http://{shown}:{bound}",
          file=sys.stderr, flush=True)
    uvicorn.Server(config).run(sockets=[listener])
