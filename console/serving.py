"""`maria serve`: the settings checked, the model loaded, the server started (serve/run.py)."""

import math
from pathlib import Path

import typer

from .outputs import warnings_shown


def start_server(
    model: Path | None,
    settings: dict,
    host: str = "127.0.0.1",
    port: int = 8000,
    grpc_port: int | None = None,
    device: str = "auto",
    threads: int | None = None,
    grace: float = 30.0,
    decoder: str = "auto",
    speculate: int = 0,
) -> None:
    """Serves the bundle until SIGTERM or SIGINT; settings: ServeSettings' fields. The serve (and, with grpc_port,
    grpc) extra's imports are checked first, with the extra to install named."""
    try:
        from maria_onnx.serve.core import ServeSettings
        from maria_onnx.serve.run import serve as run_serve
    except ImportError as error:
        raise ValueError(
            f"{error.name}: `maria serve` needs the serve extra; pip install 'maria-onnx[serve]'"
        ) from None
    if grpc_port and grpc_port == port:
        raise ValueError(f"--port and --grpc-port are both {port}; HTTP and gRPC each need a port of their own")
    if grpc_port is not None:
        try:
            import maria_onnx.serve.grpc_service  # noqa: F401
        except ImportError as error:
            raise ValueError(
                f"{error.name}: --grpc-port needs the grpc extra; pip install 'maria-onnx[serve,grpc]'"
            ) from None
    from maria_onnx.runtime.device import check_device
    from maria_onnx.runtime.infiller import Infiller
    from maria_onnx.serve.protocol import check_model_name

    check_device(device)
    check_model_name(settings["model_name"])
    if not math.isfinite(grace):
        raise ValueError(f"--grace takes a finite number of seconds, got {grace}")
    served = ServeSettings(**settings)
    with warnings_shown():
        infiller = Infiller(model, device=device, decoder=decoder, threads=threads, speculate=speculate)
    if not served.api_key and not is_loopback(host):
        typer.secho(
            f"warning: --host {host} takes requests from other machines and no --api-key is set: anyone who "
            "reaches the port can use the model; set --api-key or MARIA_API_KEY",
            fg=typer.colors.YELLOW,
            err=True,
        )
    run_serve(infiller, served, host=host, port=port, grace_s=grace, grpc_port=grpc_port)


def is_loopback(host: str) -> bool:
    """A host name or address that only this machine reaches."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
