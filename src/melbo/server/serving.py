"""Start the web app: every check a user can fail is made before uvicorn starts, as one line."""

from __future__ import annotations

import errno
import ipaddress
import socket
from pathlib import Path
from typing import Callable, Optional

from melbo.errors import MelboError
from melbo.server.security import LOCAL_HOSTS
from melbo.settings import SERVE_HOST, SERVE_PORT

TOKEN_ENV = "MELBO_TOKEN"


def is_local(host: str) -> bool:
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_serve(catalog_path: Optional[str | Path], host: str, port: int, token: Optional[str]) -> None:
    """Refuse what cannot work or would not be safe: a bad port, another host without a token, a busy port."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise MelboError(f"port {port!r} is not a TCP port: use 1..65535 (default {SERVE_PORT})")
    if not isinstance(host, str) or not host.strip():
        raise MelboError(f"host {host!r} is empty: leave --host out to serve on {SERVE_HOST}")
    if token is not None and (not isinstance(token, str) or len(token.strip()) < 8):
        raise MelboError("the token must have at least 8 characters: e.g. --token $(openssl rand -hex 16)")
    if not is_local(host) and token is None:
        raise MelboError(f"serving on {host} lets other machines in: give a token with --token (or ${TOKEN_ENV}), "
                         "e.g. --token $(openssl rand -hex 16)")
    if catalog_path is not None:
        from melbo.records.catalog import check_db_path

        check_db_path(Path(catalog_path))  # the catalogue's own rules, before the port is taken
    _check_port_free(host, port)


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except socket.gaierror:
            raise MelboError(f"host {host!r} is not an address of this machine: leave --host out, or give one of "
                             "its addresses (0.0.0.0 for all)") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise MelboError(f"port {port} on {host} is in use (another melbo serve?): choose another --port") from None
            if exc.errno == errno.EACCES:
                raise MelboError(f"port {port} needs privileges: choose a port above 1023") from None
            raise MelboError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another --host/--port") from None


def serve(catalog_path: Optional[str | Path] = None, *, host: str = SERVE_HOST, port: int = SERVE_PORT,
          token: Optional[str] = None, model_spec: Optional[str] = None, device: str = "cpu",
          dtype: str = "float32", on_ready: Optional[Callable[[str], None]] = None) -> None:
    """Serve the catalogue until interrupted. `on_ready(url)` gets the address to open (with the token)."""
    import uvicorn

    from melbo.server.app import create_app

    check_serve(catalog_path, host, port, token)
    app = create_app(catalog_path, model_spec, token=token, device=device, dtype=dtype)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else shown}:{port}/" + (f"?token={token}" if token else "")
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    if on_ready is not None:
        on_ready(url)
    server.run()
