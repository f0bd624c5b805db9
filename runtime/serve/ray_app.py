"""Ray Serve: the `gptrun serve` app (the same ASGI app, the same scheduler) as replicas of one deployment.

```
 client ─▶ Ray Serve HTTP proxy (host:port, one per node) ─▶ replica 1: create_app(Service) ─▶ Scheduler ─▶ ORT
                                                         └─▶ replica 2: create_app(Service) ─▶ Scheduler ─▶ ORT
 each replica: verify every checksum of its own copy of the artifact, refuse a manifest other than the pinned one,
               onnxruntime threads = the CPUs Ray gave it; Ray's health check asks the replica's own state
```

Two ways in, one deployment:
- `gptrun serve DIR --ray [--replicas N] [--ray-address ADDR]`: `run()` starts (or joins) Ray, deploys, prints
  the URL, and on SIGTERM deletes the application (Ray drains each replica) and stops the Ray it started.
- `serve run` / `serve deploy` with a config file whose application has
  `import_path: gptexport.runtime.serve.ray_app:app_builder` (deploy/ray-serve.yaml documents every field).

Needs the `ray` extra (`pip install "gptexport[ray]"`), which the plain runtime and `[serve]` never pull.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import socket
import sys
import threading
from pathlib import Path

from ray import serve

from ..errors import GptexportError
from ..manifest import check_pin, load_manifest, manifest_digest
from .app import ServeConfig, Service, create_app

log = logging.getLogger("gptexport.serve")
APP_NAME = "gptexport"
DEPLOYMENT = "gptexport"
REPLICA_HEADER = "x-gptexport-replica"  # which replica answered (its Ray replica id)
REFUSED = "gptexport replica refused to start"
VERIFY_MODES = ("full", "auto")  # a replica always hashes (full) or trusts the per-node verified cache (auto)
BUILDER_KEYS = {f.name for f in dataclasses.fields(ServeConfig)} - {"api_key", "drain_timeout"} | {"api_key_file"}
_DRAIN_TIMEOUT_S = 30.0


class ReplicaRefused(GptexportError):
    """A replica cannot serve: its artifact is missing, modified or not the deployment's (one line)."""


def _assigned_cpus() -> int:
    """The CPUs Ray reserved for this replica (ray_actor_options.num_cpus), at least 1."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    return max(1, int(cpus))


def _tag(app, replica: str):
    """Wrap the ASGI app so that every HTTP response names the replica that made it."""
    header = (REPLICA_HEADER.encode(), replica.encode())

    async def tagged(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await app(scope, receive, send_tagged)

    return tagged


@serve.deployment(name=DEPLOYMENT, health_check_period_s=5, health_check_timeout_s=30,
                  graceful_shutdown_wait_loop_s=0.5, graceful_shutdown_timeout_s=_DRAIN_TIMEOUT_S)
@serve.ingress()
class GptexportReplica:
    """One replica: a `Service` (model, slots, scheduler) and the `create_app` ASGI app over it.

    Args:
        settings: ServeConfig fields (artifact, model_name, max_batch, ...); `threads` None: the replica's CPUs.
        manifest_sha256: the deployment's artifact: this replica refuses any other manifest.json.
        verify: "full" (hash every file at load) or "auto" (trust this node's verified cache, runtime.manifest).
        api_key_file: read the API key from this file on the replica's node (instead of `settings["api_key"]`).
    """

    def __init__(self, settings: dict, manifest_sha256: str, verify: str = "full", api_key_file: str | None = None):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        self.replica = serve.get_replica_context().replica_id.unique_id
        node = socket.gethostname()
        settings = dict(settings)
        if settings.get("threads") is None:
            settings["threads"] = _assigned_cpus()  # onnxruntime threads = the CPUs Ray reserved for us
        if api_key_file:
            settings["api_key"] = _read_key(api_key_file)
        config = ServeConfig(**settings, manifest_sha256=manifest_sha256, verify=verify)
        self.service = Service(config)
        self.service.load()
        if self.service.state == "failed":
            message = f"{REFUSED} on {node}: {self.service.error}"
            log.error(message)
            raise ReplicaRefused(message)
        log.info("replica %s on %s ready: %s, %d slots x %d positions, %d threads, manifest sha256 %s",
                 self.replica, node, self.service.kv_note, self.service.slots, self.service.context,
                 config.threads, manifest_sha256)

    def __serve_build_asgi_app__(self):
        return _tag(create_app(self.service), self.replica)

    def check_health(self) -> None:
        """Ray's health check: the state /health reports, and a live decode loop."""
        service = self.service
        if service.state != "ready":
            raise RuntimeError(f"replica {self.replica} is {service.state}: {service.error or ''}")
        thread = getattr(service.scheduler, "_thread", None)
        if thread is not None and not thread.is_alive():
            raise RuntimeError(f"replica {self.replica}: the decode loop has stopped")

    def __del__(self):
        # Ray has drained this replica (no request in flight, or graceful_shutdown_timeout_s passed)
        service = getattr(self, "service", None)
        if service is not None and service.scheduler is not None:
            service.begin_drain()
            service.scheduler.abort_all("the replica is shutting down")
            service.scheduler.close()


def _read_key(path) -> str:
    try:
        key = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ReplicaRefused(f"{REFUSED}: cannot read api_key_file {path}: {e}") from None
    if not key:
        raise ReplicaRefused(f"{REFUSED}: api_key_file {path} is empty")
    return key


def deployment_options(max_batch: int, max_queue: int) -> dict:
    """Ray routing limits that keep batching and backpressure in the scheduler.

    A replica takes up to max_batch + max_queue requests (its slots and its own queue); Ray's router sends the
    rest to other replicas, and queues at most max_queue more per proxy before answering 503.
    """
    return {"max_ongoing_requests": max_batch + max_queue, "max_queued_requests": max(max_queue, 1)}


def build(settings: dict, manifest_sha256: str, verify: str = "full", api_key_file: str | None = None, **options):
    """The Ray Serve application: `GptexportReplica` bound to its settings (options: `Deployment.options`)."""
    limits = deployment_options(settings.get("max_batch", 8), settings.get("max_queue", 64))
    deployment = GptexportReplica.options(**{**limits, **options})
    return deployment.bind(settings, manifest_sha256, verify, api_key_file)


def app_builder(args: dict):
    """Ray Serve application builder for `serve run` / `serve deploy` (`import_path: ...ray_app:app_builder`).

    Args:
        args: the config file's `args`: `artifact` (required; the same path on every node), `manifest_sha256`
            (the deployment's pin; default: the digest of `artifact` where the builder runs), `verify`, and any
            of model_name, max_batch, max_queue, context, provider, threads, request_timeout, cors_origins,
            max_body_bytes, api_key_file (see deploy/ray-serve.yaml).
    Raises:
        GptexportError: an unknown or bad argument, named with what is accepted.
    """
    args = dict(args or {})
    verify = args.pop("verify", "full")
    if verify not in VERIFY_MODES:
        raise GptexportError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    pin = args.pop("manifest_sha256", None)
    unknown = sorted(set(args) - BUILDER_KEYS - {"manifest_sha256", "verify"})
    if unknown:
        raise GptexportError(f"unknown gptexport argument(s) {', '.join(map(repr, unknown))}; accepted: "
                             f"{', '.join(sorted(BUILDER_KEYS | {'manifest_sha256', 'verify'}))}")
    if "artifact" not in args:
        raise GptexportError("args.artifact is required: the artifact directory (the same path on every node)")
    artifact = str(args["artifact"])
    pin = check_pin(pin) if pin is not None else manifest_digest(artifact)
    args.setdefault("model_name", Path(artifact).resolve().name)
    api_key_file = args.pop("api_key_file", None)
    return build(args, pin, verify, api_key_file)


# -- gptrun serve --ray ------------------------------------------------------------------------------------------

def _say(message: str) -> None:
    print(f"gptrun serve: {message}", flush=True)


def free_port(host: str) -> int:
    """A port that is free on `host` now (Ray's proxy needs a number, not 0)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _refusal(error: Exception) -> str:
    """The one line that says why the deployment failed (a replica's refusal when there is one)."""
    text = str(error)
    found = re.findall(rf"({re.escape(REFUSED)}[^\n]*)", text)
    if found:
        return found[-1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


class _Stop:
    """SIGTERM/SIGINT: the first asks for a drain; a second one exits at once."""

    def __init__(self):
        self.event, self.count = threading.Event(), 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle)

    def handle(self, sig, frame) -> None:
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt  # a second signal: stop waiting for the drain
        self.event.set()


def run(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, replica_cpus: float = 1,
        address: str | None = None, verify: str = "full", api_key_file: str | None = None) -> int:
    """`gptrun serve --ray`: deploy `config` as `replicas` Ray Serve replicas behind Ray's HTTP proxy.

    Args:
        config: the plain server's settings (its `threads`: per replica; None: `replica_cpus`).
        address: a Ray cluster to join ("auto", "HOST:PORT", ...); None: RAY_ADDRESS, else a local Ray instance
            that this call starts and stops.
        verify: each replica's checksum policy ("full" or "auto").
        api_key_file: replicas read the key from this path on their node (it then never travels in Ray).
    Returns:
        0 after a drain on SIGTERM/SIGINT; 2 when the deployment failed (one line on stderr); 130 when a second
        signal cut the drain short.
    Raises:
        ArtifactError: the local artifact is missing, modified or not the pinned one.
    """
    import ray

    for name, value in (("RAY_USAGE_STATS_ENABLED", "0"),  # a server reports nothing home
                        ("RAY_DEDUP_LOGS", "0"),  # one log line per request, from every replica
                        ("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")):  # SIGTERM is a drain, not a crash dump
        os.environ.setdefault(name, value)
    _, digest = load_manifest(config.artifact, verify="full", manifest_sha256=config.manifest_sha256)
    address = address or os.environ.get("RAY_ADDRESS") or None
    port = port or free_port(host)
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=max(1, int(replicas * replica_cpus + 0.999)), include_dashboard=False,
                 object_store_memory=128 * 2 ** 20, logging_level=logging.WARNING)
    stop = _Stop()  # after ray.init, which installs its own SIGTERM handler
    shown = f"[{host}]" if ":" in host else host
    url, deployed = f"http://{shown}:{port}", False
    try:
        serve.start(http_options={"host": host, "port": port})
        settings = {k: v for k, v in dataclasses.asdict(config).items()
                    if k not in ("manifest_sha256", "verify", "drain_timeout")}
        if api_key_file:
            settings["api_key"] = None
        if settings["threads"] is None:
            settings["threads"] = max(1, int(replica_cpus))
        app = build(settings, digest, verify, api_key_file, num_replicas=replicas,
                    ray_actor_options={"num_cpus": replica_cpus},
                    graceful_shutdown_timeout_s=config.drain_timeout)
        _say(f"deploying {replicas} replica(s) x {replica_cpus:g} CPU of {config.artifact} (manifest sha256 "
             f"{digest}) on Ray {'at ' + address if address else '(local instance)'}")
        deployed = True
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except Exception as e:  # noqa: BLE001 - Ray reports a failed deployment as RuntimeError with tracebacks
            print(f"gptrun: error: {_refusal(e)}", file=sys.stderr, flush=True)
            return 2
        _say(f"ready at {url} (model {config.model_name!r}: Ray Serve application {APP_NAME!r}, {replicas} "
             f"replica(s), {settings['threads']} thread(s) each, {config.max_batch} slots each; "
             f"responses name their replica in {REPLICA_HEADER})")
        stop.event.wait()
        _say(f"draining: Ray finishes the requests in flight (up to {config.drain_timeout:g} s), then stops")
        serve.delete(APP_NAME)
        deployed = False
        _say("stopped")
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        _teardown(ray, started=not address, delete=deployed)


def _teardown(ray, started: bool, delete: bool) -> None:
    """Remove what this process put on Ray: the whole local instance it started, or its application."""
    try:
        if started:
            serve.shutdown()  # controller and proxies; then ray.shutdown stops every process of the instance
        elif delete:
            serve.delete(APP_NAME)
    except Exception as e:  # noqa: BLE001 - shutting down what is left regardless
        log.warning("ray serve cleanup: %s", e)
    ray.shutdown()
