"""Starting the server: uvicorn on a socket bound here (so port 0 gives an ephemeral port that is printed), and with
--grpc-port the gRPC server beside it (serve/grpc_service.py); stopping gracefully on SIGTERM or Ctrl-C: no new
connections or calls, in-flight requests finish within the grace period. Before it listens, the model fills one
text through every graph a request runs (warm_up): ONNX Runtime's first run of a session sets up what later runs
reuse (on CUDA: cuBLAS and cuDNN handles, kernels, the memory arena; docs/benchmarks.md, "GPU"), and a model that
cannot fill on this device is refused at start instead of failing every request."""

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.requests import FillRequest
from maria_onnx.runtime.rounds import run_requests

from .app import create_app
from .connections import bounded_protocol
from .core import Server, ServeSettings

# After the grace period the requests still running are answered 503; uvicorn and gRPC wait this much longer for
# those answers to go out before they cancel what is left.
ANSWER_SECONDS = 10.0


class GracefulServer(uvicorn.Server):
    """uvicorn's server, except that after a graceful stop on SIGTERM / SIGINT the process exits 0 instead of
    re-raising the signal, and that when the stop outlasts grace_s, on_grace_over answers what is still running
    (uvicorn itself would cancel the requests' tasks: plain-text 500s and a traceback each)."""

    def __init__(self, config: uvicorn.Config, grace_s: float, on_grace_over: Callable[[], None]):
        super().__init__(config)
        self.grace_s, self.on_grace_over = grace_s, on_grace_over

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        late = asyncio.get_running_loop().call_later(self.grace_s, self.on_grace_over)
        try:
            await super().shutdown(sockets)
        finally:
            late.cancel()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(
    infiller: Infiller,
    settings: ServeSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    grace_s: float = 30.0,
    grpc_port: int | None = None,
) -> None:
    """Serves HTTP, and gRPC where grpc_port is given, until SIGTERM / SIGINT; prints the addresses it listens on."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    warm_ms = warm_up(infiller, settings.max_batch_size)
    listener = bound(host, port, "--port")
    listener.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    if grpc_port:  # refused here with the reason, before gRPC would log its own lines
        bound(host, grpc_port, "--grpc-port").close()
    app = create_app(infiller, settings)
    config = uvicorn.Config(
        app,
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=grace_s + ANSWER_SECONDS,  # type: ignore[arg-type]  # a float, as asyncio takes
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]  # likewise, for loop.call_later
        http=bounded_protocol(open_connections(settings.max_connections), settings.head_timeout_s),
    )
    shown = f"[{host}]" if listener.family == socket.AF_INET6 else host
    announced = (
        f"maria serve: model '{settings.model_name}' on {infiller.device} (warmed up in {warm_ms:.0f} ms), "
        f"listening on http://{shown}:{listener.getsockname()[1]}"
    )
    core = app.state.server
    try:
        web = GracefulServer(config, grace_s, core.answer_the_rest)
        asyncio.run(serve_all(web, listener, core, announced, shown, grpc_port, grace_s))
    finally:
        core.close()  # the decode worker stops between steps; no model call is left running at exit


def open_connections(wanted: int) -> int:
    """max_connections, within what this process may open: its file limit less room for the model's own files,
    the gRPC port and the logs. Past the limit, accept() fails with a traceback for every connection."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # no resource module (Windows)
        return wanted
    room = max(16, limit - 128) if limit != resource.RLIM_INFINITY else wanted
    if wanted > room:
        logging.getLogger("maria.serve").warning(
            "--max-connections %d is over what the file limit (ulimit -n %d) leaves; holding %d", wanted, limit, room
        )
    return min(wanted, room)


WARM_UP_TEXT = "a [MASK] b"
WARM_UP_SPANS = "a [MASK:1-2] b"  # span candidates: the AR's LM head too, where the bundle has it


def warm_up(infiller: Infiller, slots: int) -> float:
    """Fills a short text (with span candidates where the bundle has the AR's LM head) in an engine of the
    server's slots; returns the milliseconds it took. ValueError, naming the device, where the model cannot."""
    began = time.perf_counter()
    text = WARM_UP_SPANS if infiller.manifest.has_baseline_heads else WARM_UP_TEXT
    try:
        run_requests(infiller, infiller.new_decoder(slots), [FillRequest([infiller.prepare(text)])])
    except Exception as error:  # an ONNX Runtime failure (device memory, a kernel): one line, not a traceback
        raise ValueError(
            f"the model could not fill a text on {infiller.device} before serving "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); check the "
            "bundle and device, or try a smaller --max-batch-size"
        ) from None
    return 1000 * (time.perf_counter() - began)


def bound(host: str, port: int, option: str) -> socket.socket:
    """A socket bound to host:port; ValueError naming the reason and the option to change where it cannot be."""
    bound_socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    bound_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        bound_socket.bind((host, port))
    except OSError as error:
        bound_socket.close()
        raise ValueError(
            f"cannot listen on {host}:{port} ({error.strerror}); choose another {option} or --host"
        ) from None
    return bound_socket


async def serve_all(
    web: GracefulServer,
    listener: socket.socket,
    server: Server,
    announced: str,
    host: str,
    grpc_port: int | None,
    grace_s: float,
) -> None:
    """uvicorn on listener and, given a port, the gRPC server beside it on the same event loop; both stop
    gracefully on the one signal."""
    if grpc_port is None:
        print(announced, file=sys.stderr, flush=True)
        await web.serve(sockets=[listener])
        return
    from .grpc_service import grpc_server

    stopping = asyncio.Event()
    endpoint = grpc_server(server, stopping)
    try:
        bound = endpoint.add_insecure_port(f"{host}:{grpc_port}")
    except RuntimeError:
        raise ValueError(
            f"cannot listen on {host}:{grpc_port} for gRPC; choose another --grpc-port or --host"
        ) from None
    await endpoint.start()
    print(f"{announced}, gRPC on {host}:{bound}", file=sys.stderr, flush=True)
    stopped = asyncio.ensure_future(stop_with(web, endpoint, stopping, grace_s))
    await web.serve(sockets=[listener])
    web.should_exit = True
    await stopped


async def stop_with(web: GracefulServer, endpoint: Any, stopping: asyncio.Event, grace_s: float) -> None:
    """Stops the gRPC server when uvicorn is told to exit: no new calls, those in flight get grace_s to finish,
    streams end once their requests are answered."""
    while not web.should_exit:
        await asyncio.sleep(0.05)
    stopping.set()
    await endpoint.stop(grace_s + ANSWER_SECONDS)  # the core answers what is left at grace_s (GracefulServer)
