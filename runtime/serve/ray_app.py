"""Scale-out on Ray Serve: the same FastAPI app (`app.create_app`) as a Ray Serve deployment.

`qvl-compile serve ART --ray [--replicas N|auto]` (`pip install "qvl-compile[serve-ray]"`) connects to the Ray
cluster named by `RAY_ADDRESS` (or `ray start`'s local head, when one runs), else starts a local Ray instance, and
deploys one application: each replica loads the artifact and builds its own scheduler, slots and batching exactly as
`qvl-compile serve` does (Ray evaluates the app builder on the replica), and Ray's HTTP proxy on `--host`/`--port`
spreads requests over the replicas. Replica resources: `--threads` CPUs each (default 1) and one GPU each with
`--device cuda|trt`. `--replicas auto` autoscales between 1 and `--max-replicas` on ongoing requests (target:
`--max-batch` per replica: one full decode batch each). Per replica at most `--max-batch + --max-queue` requests are
in flight; more wait in Ray's proxy.

On a multi-node cluster the artifact path must exist on every node (shared storage, or the same copy at the same
path) and qvl-compile must be installed on every node; nothing else changes. Each replica keeps its own prefix and
image caches, and Ray routes by load, not by conversation, so a conversation's next turn reuses its cached prefix only
when it lands on the same replica. `/metrics` is the answering replica's own; Ray's metrics cover the cluster.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import replace
from pathlib import Path

from qvl.errors import QvlError
from qvl.runtime.serve.server import ServeOptions, check_options


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise QvlError("`serve --ray` needs Ray Serve, which is not installed",
                       hint='pip install "qvl-compile[serve-ray]"') from None
    return ray, serve


def parse_replicas(value: str) -> int | str:
    if value == "auto":
        return value
    if value.isdigit() and 1 <= int(value) <= 1024:
        return int(value)
    raise QvlError(f"--replicas must be an integer in [1, 1024] or 'auto', got {value!r}")


def deployment_options(opts: ServeOptions, replicas: int | str, max_replicas: int = 4) -> dict:
    """Ray Serve deployment options for one replica per `opts` (see the module docstring)."""
    actor = {"num_cpus": opts.threads or 1, "num_gpus": 1 if opts.device in ("cuda", "trt") else 0}
    options = {"ray_actor_options": actor, "max_ongoing_requests": opts.max_batch + opts.limits.max_queue,
               "health_check_period_s": 10}
    if replicas == "auto":
        options["autoscaling_config"] = {"min_replicas": 1, "max_replicas": max_replicas,
                                         "target_ongoing_requests": opts.max_batch}
    else:
        options["num_replicas"] = int(replicas)
    return options


def build_application(artifact: Path, opts: ServeOptions, replicas: int | str, max_replicas: int = 4):
    """The bound Ray Serve application (pass it to `serve.run`)."""
    _, serve = _import_ray()
    artifact = Path(artifact).resolve()

    def make_app():  # runs on each replica: the artifact is loaded there
        from qvl.runtime.serve.app import create_app
        from qvl.runtime.serve.server import build_state

        return create_app(build_state(artifact, opts))

    @serve.deployment(name="qvl", **deployment_options(opts, replicas, max_replicas))
    @serve.ingress(make_app)
    class QvlServe:
        pass

    return QvlServe.bind()


def serve_ray(artifact: Path, opts: ServeOptions, replicas: int | str, max_replicas: int = 4, echo=print) -> int:
    check_options(opts)
    if opts.port == 0:
        raise QvlError("--ray needs a fixed --port (Ray's proxy binds it)")
    if not (Path(artifact) / "manifest.json").is_file():
        raise QvlError(f"{artifact} is not an artifact directory (no manifest.json)")
    ray, serve = _import_ray()
    name = opts.model_name or Path(artifact).resolve().name
    opts = replace(opts, model_name=name)
    address = os.environ.get("RAY_ADDRESS")
    ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", configure_logging=True)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": opts.host, "port": opts.port})
        serve.run(build_application(artifact, opts, replicas, max_replicas), name="qvl", route_prefix="/")
        where = f"Ray cluster {address}" if address else "a local Ray instance"
        count = "autoscaling 1.." + str(max_replicas) if replicas == "auto" else str(replicas)
        echo(f"serving {name!r} on http://{opts.host}:{opts.port}/v1 (Ray Serve on {where}, {count} replicas)")
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # serve.shutdown() waits for the controller, which never answers if Ray itself is gone (its processes got the
        # terminal's SIGINT too): bounded, then ray.shutdown() stops the local instance this process started.
        # On a cluster someone else runs, remove only this application; a local instance goes entirely.
        target = (lambda: serve.delete("qvl")) if address else serve.shutdown
        closer = threading.Thread(target=target, daemon=True)
        closer.start()
        closer.join(30)
        ray.shutdown()
    echo("stopped")
    return 0
