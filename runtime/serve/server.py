"""Run the app under uvicorn: bind, load in the background, announce, drain on SIGTERM, exit 0.

```
 bind socket ─▶ listen (/health 503) ─▶ load + allocate slots (thread) ─▶ "ready at URL ..." ─▶ serve
 SIGTERM/SIGINT ─▶ draining: /health 503, new requests 503 ─▶ in-flight done (or --drain-timeout: they fail
                   with an error) ─▶ uvicorn closes the connections ─▶ exit 0;  a second signal exits at once
```
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
import threading
import time

import uvicorn

from .app import ServeConfig, Service, create_app

log = logging.getLogger("gptexport.serve")


def _say(message: str) -> None:
    print(f"gptrun serve: {message}", flush=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (port 0: a free one).

    Raises:
        OSError: the address cannot be bound (in use, not local, ...).
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server with our signal handling: drain first, then exit 0 (uvicorn would re-raise the signal)."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service, self.exit_code, self.drain_deadline = service, 0, None

    def handle_exit(self, sig, frame) -> None:
        if self.drain_deadline is not None:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self.drain_deadline = time.monotonic() + self.service.config.drain_timeout
        self.service.begin_drain()

    async def on_tick(self, counter: int) -> bool:
        service = self.service
        if service.state == "failed" and not self.should_exit:
            self.exit_code, self.should_exit = 2, True
        if self.drain_deadline is not None and not self.should_exit:
            if service.idle():
                self.should_exit = True
            elif time.monotonic() > self.drain_deadline and service.scheduler:
                service.scheduler.abort_all("the server is shutting down (drain timeout)")
                self.drain_deadline = time.monotonic() + 5  # their error events go out, then exit
                service.config.drain_timeout = 0
        return await super().on_tick(counter)


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code (0 after a drain, 2 when the artifact fails to load)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    sock = bind(host, port)
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    if not is_loopback(host) and not config.api_key:
        _say(f"warning: listening on {host} without an API key: anyone who can reach port {port} can use the "
             "model (set --api-key, GPTEXPORT_API_KEY or --api-key-file)")
    service = Service(config)
    app = create_app(service)
    uv = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                        timeout_graceful_shutdown=int(config.drain_timeout) + 10, server_header=False)
    server = _Server(uv, service)

    def load() -> None:
        _say(f"loading {config.artifact}; listening on {url} (/health answers 503 until ready)")
        service.load()
        if service.state == "failed":
            print(f"gptrun: error: {service.error}", file=sys.stderr, flush=True)
            return
        if service.head is not None:  # serve/heads_app.py: one forward per request
            _say(f"ready at {url} (model {config.model_name!r}: {service.head.manifest['model'].get('architecture')} "
                 f"{service.head.manifest['dtype']}, {service.kv_note}; {config.max_batch} requests at once, queue "
                 f"{config.max_queue}; {config.threads or 'usable cores'} threads)")
            return
        mib = service.cache.nbytes / 2 ** 20
        how = "allocated" if service.cache.preallocated else "at most, grown on demand"
        model = service.model
        _say(f"ready at {url} (model {config.model_name!r}: {model.manifest['model'].get('architecture')} "
             f"{model.manifest['dtype']}, {service.kv_note}; {service.slots} slots x {service.context} positions, "
             f"KV cache {mib:.1f} MiB {how}; queue {config.max_queue}; "
             f"{config.threads or 'usable cores'} threads)")

    threading.Thread(target=load, name="gptexport-load", daemon=True).start()
    server.run(sockets=[sock])
    if service.scheduler:
        service.scheduler.close()
    if server.exit_code == 0:
        _say("stopped")
    return server.exit_code
