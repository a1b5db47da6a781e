"""The Router's own HTTP listener, beside Serve's proxy: every Router replica of a node binds the
same port with SO_REUSEPORT, and the kernel spreads connections over them.

Serve's path is client -> proxy -> Router -> replica; each request and each streamed message costs
the proxy about as much CPU as the Router (bench/serve.py's CPU by role), and one proxy runs per
node. A client of this port skips that hop: the Router's FastAPI app answers it in the Router's
process, with the same endpoints, auth, errors and metrics.
"""
from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

logger = logging.getLogger(__name__)


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def start(app, host: str, port: int) -> asyncio.Task:
    """Serve `app` on host:port from the running event loop (the Router's) until the task is cancelled."""
    try:
        sock = _listening_socket(host, port)
    except OSError as e:
        raise RuntimeError(f"direct_port: cannot listen on {host}:{port} ({e}); another program holds it "
                           f"without SO_REUSEPORT, or the host is not this node's") from e
    config = uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning", timeout_keep_alive=30,
                            loop="none")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # the replica's signals stay Ray's (older uvicorn)
    logger.info("Router listening on %s:%d (SO_REUSEPORT)", host, port)
    return asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
