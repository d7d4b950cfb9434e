"""Run the viewer: check every PATH, bind the socket, print the URL, serve until Ctrl-C.

The socket is bound here, before uvicorn starts, so that `--port 0` (a free port chosen by the
system) can be printed as a URL, and a port in use is one clear line (exit status 2), not a
traceback. Only the loopback is bound unless --host says otherwise, and then a warning says that
the data is exposed to whoever can reach that address: the viewer has no login.
"""
from __future__ import annotations

import logging
import socket
import sys

from ..errors import ConfigError
from .config import ViewConfig

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when the host is one); ConfigError naming the
    option when it cannot be bound."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        what = "--port" if e.errno in (98, 13) else "--host"       # EADDRINUSE, EACCES: the port's fault
        raise ConfigError(f"{what}: cannot listen on {host}:{port} ({e.strerror})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"


def serve(cfg: ViewConfig) -> int:
    """`nextdetail view`: open the sources (refusing bad ones before binding), serve, return 0."""
    import uvicorn

    from .app import create_app
    from .sources import open_sources

    sources = open_sources(cfg.paths, cfg.tokenizer)
    if cfg.tokenizer is not None and not any(s.view == "tokens" for s in sources):
        raise ConfigError(f"--tokenizer {cfg.tokenizer}: no PATH is a token store to decode with it")
    for s in sources:
        if hasattr(s.adapter, "warm"):
            s.adapter.warm()
    sock = bind(cfg.host, cfg.port)
    if cfg.exposed:
        log.warning("--host %s: the viewer is reachable from other machines and shows the data of %s to anyone "
                    "who can connect (it has no login); leave --host out to serve 127.0.0.1 only",
                    cfg.host, ", ".join(str(p) for p in cfg.paths))
    # Host headers answered: the loopback names and the --host given (a guard against DNS rebinding).
    port = sock.getsockname()[1]
    hosts = ["127.0.0.1", "localhost", "[::1]", cfg.host] + (["*"] if cfg.host in ("0.0.0.0", "::") else [])
    app = create_app(sources, allowed_hosts=hosts, tokenizer=cfg.tokenizer, per_page=cfg.per_page)
    print(f"serving {len(sources)} path{'s' if len(sources) != 1 else ''} at {url_of(sock, cfg.host)} "
          f"(port {port}; Ctrl-C stops it)", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", server_header=False)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:       # uvicorn re-raises the Ctrl-C it shut down on: the normal way to stop
        pass
    finally:
        sock.close()
    print("stopped", file=sys.stderr)
    return 0
