"""`qvl-compile serve`: load the artifact, build the scheduler and the app, listen, run uvicorn until a signal.

The socket is bound here (a port in use is a one-line error; `--port 0` takes a free port and the line printed on
stderr names it). SIGINT and SIGTERM stop the server gracefully: no new connections, in-flight requests get
`shutdown_timeout_s` to finish, then running generations stop at their next token and the process exits 0.
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from qvl.errors import QvlError
from qvl.runtime.serve.limits import ServeLimits


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    threads: int | None = None
    max_batch: int = 4
    max_context: int | None = None  # positions per slot (prompt + completion); default min(context, 4096)
    api_key: str | None = None
    model_name: str | None = None  # the id clients send as `model`; default the artifact directory's name
    limits: ServeLimits = ServeLimits()
    gather_timeout_s: float = 0.02
    shutdown_timeout_s: float = 5.0
    # image limits of every request (None: the runtime's defaults; see PromptBuilder.set_image_limits)
    max_image_tokens: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    # a partitioned artifact under budgets (runtime/placement.py): decoded one sequence at a time (the parts have
    # no batched step); `warm`: page-cache warming at load
    ram_budget: int | None = None
    vram_budget: int | None = None
    warm: bool = False


def check_options(opts: ServeOptions) -> None:
    """Range checks before anything loads (one-line QvlErrors)."""
    if not 0 <= opts.port <= 65535:
        raise QvlError(f"--port must be in [0, 65535], got {opts.port}")
    if not 1 <= opts.max_batch <= 256:
        raise QvlError(f"--max-batch must be in [1, 256], got {opts.max_batch}")
    if opts.max_context is not None and opts.max_context < 2:
        raise QvlError(f"--max-context must be >= 2, got {opts.max_context}")
    lim = opts.limits
    for flag, value, low in (("--max-queue", lim.max_queue, 0), ("--max-body-bytes", lim.max_body_bytes, 1024),
                             ("--max-image-pixels", lim.max_image_pixels, 1), ("--max-images", lim.max_images, 0),
                             ("--default-max-tokens", lim.default_max_tokens, 1), ("--max-videos", lim.max_videos, 0),
                             ("--max-video-frames", lim.max_video_frames, 1)):
        if value < low:
            raise QvlError(f"{flag} must be >= {low}, got {value}")
    if lim.allow_dir is not None and not Path(lim.allow_dir).is_dir():
        raise QvlError(f"--allow-dir {lim.allow_dir} is not a directory")
    if opts.api_key is not None and not opts.api_key.strip():
        raise QvlError("--api-key must not be empty")


def _import_server_deps():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise QvlError(f"`serve` needs {exc.name}, which is not installed",
                       hint='pip install "qvl-compile[serve]"') from None
    return uvicorn


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name: resolved by bind
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts (after the model loads)
    except OSError as exc:
        sock.close()
        raise QvlError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                       hint="choose another --port (0 picks a free one) or --host") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def build_state(artifact: Path, opts: ServeOptions, echo=None):
    """Load the model and make the scheduler and the app state (no socket): what `serve` and tests run."""
    from qvl.runtime import load
    from qvl.runtime.serve.app import ServeState
    from qvl.runtime.serve.metrics import ServeMetrics
    from qvl.runtime.serve.scheduler import Scheduler

    model = load(artifact, device=opts.device, threads=opts.threads, ram_budget=opts.ram_budget,
                 vram_budget=opts.vram_budget, warm=opts.warm, context=opts.max_context)  # the plan's KV: one slot
    if model.device_note and echo:
        echo(f"note: {model.device_note}")
    if model.plan is not None and echo:
        from qvl.runtime.backends.select import plan_note

        echo(f"note: {plan_note(model.plan)}")
    model.prompts.set_image_limits(opts.max_image_tokens, opts.min_pixels, opts.max_pixels, flags=True)
    capacity = min(model.context_length, opts.max_context or 4096)
    metrics = ServeMetrics()
    slots = opts.max_batch
    if model.plan is not None:  # the memory plan holds one sequence's KV cache: keep one conversation, not max_batch
        slots = 1
        if echo and opts.max_batch > 1:
            echo("note: under --ram-budget / --vram-budget requests run one at a time and one conversation's KV cache "
                 "is kept (the memory plan holds one)")
    scheduler = Scheduler(model, slots, capacity, opts.limits.max_queue, metrics,
                          gather_timeout_s=opts.gather_timeout_s)
    if slots > 1 and not scheduler.batched and echo:
        echo(f"note: batched decoding needs the CPU and an in-place GQA cache (this runner: {model.engine.device}, "
             f"{model.engine.kv_mode}; compile with --target cpu); requests run one at a time, "
             f"{opts.max_batch} conversations' caches are kept")
    name = opts.model_name or Path(artifact).resolve().name
    return ServeState(model=model, scheduler=scheduler, model_id=name, limits=opts.limits, metrics=metrics,
                      api_key=opts.api_key)


def serve(artifact: Path, opts: ServeOptions, echo=print) -> int:
    check_options(opts)
    uvicorn = _import_server_deps()
    from qvl.runtime.serve.app import create_app

    sock = _bind(opts.host, opts.port)
    try:
        state = build_state(artifact, opts, echo)
    except BaseException:
        sock.close()
        raise
    if not _is_loopback(opts.host) and opts.api_key is None:
        echo(f"note: listening on {opts.host} without --api-key: anyone who can reach it can use it")
    s = state.scheduler
    host, port = sock.getsockname()[:2]
    mode = (f"batched decode, {len(s.slots)} slots" if s.batched else
            f"one request at a time, {len(s.slots)} slot{'s' if len(s.slots) > 1 else ''}")
    shown = f"[{host}]" if ":" in host else host
    pool = "" if s.batcher is None else f", KV pool {s.batcher.pool_bytes / 2 ** 20:.0f} MiB"
    echo(f"serving {state.model_id!r} on http://{shown}:{port}/v1 ({state.model.device}, {mode}, "
         f"{s.capacity} positions per slot{pool})")
    config = uvicorn.Config(create_app(state), log_level="warning", lifespan="on", access_log=False,
                            timeout_graceful_shutdown=opts.shutdown_timeout_s)
    server = _graceful_server_class()(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        state.scheduler.close()
    echo("stopped")
    return 0


def _graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, but a SIGINT/SIGTERM is a normal stop (exit 0): uvicorn re-raises the signal after its
        graceful shutdown, which would make Ctrl-C exit 130 and SIGTERM kill the process."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return GracefulServer
