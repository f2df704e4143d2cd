"""`qvl-compile serve`: the OpenAI-compatible server, driven as a real subprocess with the official `openai` client.

The answers are compared with `qvl-compile run`'s (greedy) and with the runtime's own generations; continuous
batching is checked token for token against solo runs with staggered (interleaved) arrivals.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "test-key-123"
THREADS = "2"
MAX_TOKENS = 24


class Server:
    """`qvl-compile serve ART --port 0 ...` in a subprocess; the port comes from its `serving ...` stderr line."""

    def __init__(self, artifact: Path, *args: str):
        env = dict(os.environ, OMP_NUM_THREADS=THREADS)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from qvl.cli import main; main()", "serve", str(artifact), "--port", "0",
             "--device", "cpu", "--threads", THREADS, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(60) or self.proc.poll() is not None:
            self.proc.kill()
            raise AssertionError(f"server did not start: {self.stderr}")
        try:
            line = next(l for l in self.lines if l.startswith("serving "))
            self.url = line.split(" on ", 1)[1].split()[0]  # http://127.0.0.1:PORT/v1
            self.base = self.url[:-len("/v1")]
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(self.base + "/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline and self.proc.poll() is None, self.stderr
                time.sleep(0.1)
        except BaseException:  # never leave a server behind
            self.proc.kill()
            self.proc.wait()
            raise

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("serving "):
                self._ready.set()
        self._ready.set()

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def client(self, key: str = KEY):
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=60)

    def post(self, body, key: str = KEY, **kwargs) -> httpx.Response:
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + "/chat/completions", content=content, timeout=60,
                          headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}, **kwargs)

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        out = {}
        for family in text_string_to_metric_families(httpx.get(self.base + "/metrics", timeout=5).text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
        return out

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not stop on {sig!r}: {self.stderr}")


def _png(width: int, height: int, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(raw: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(raw).decode()}"


def _user(text: str, image_url: str | None = None) -> list[dict]:
    parts = ([{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def _assert_error(resp: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    allowed = root / "allowed"
    allowed.mkdir()
    image = allowed / "a.png"
    image.write_bytes(_png(128, 96))
    outside = root / "outside.png"
    outside.write_bytes(_png(64, 64, seed=1))
    (allowed / "escape.png").symlink_to(outside)  # inside by name, outside once resolved
    return {"allowed": allowed, "image": image, "outside": outside, "escape": allowed / "escape.png"}


@pytest.fixture(scope="module")
def server(tiny_cpu_artifact, files):
    srv = Server(tiny_cpu_artifact, "--max-batch", "4", "--api-key", KEY, "--allow-dir", str(files["allowed"]),
                 "--max-context", "512", "--max-image-pixels", "200000", "--max-body-bytes", str(1 << 20), "--max-video-frames", "48",
                 "--model-name", "tiny")
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


@pytest.fixture(scope="module")
def run_answers(tiny_cpu_artifact, files):
    """`qvl-compile run --json` (greedy) for a text prompt and an image prompt."""
    out = {}
    for key, args in (("text", ["--prompt", "hello there", "--greedy"]),
                      ("image", ["--prompt", "Describe the image.", "--image", str(files["image"]), "--greedy"]),
                      ("sampled", ["--prompt", "pick a word", "--temperature", "0.9", "--top-p", "0.95", "--seed", "7"])):
        proc = run_cli("run", str(tiny_cpu_artifact), *args, "--max-new-tokens", str(MAX_TOKENS), "--json",
                       "--device", "cpu", "--threads", THREADS, env={"OMP_NUM_THREADS": THREADS})
        assert proc.returncode == 0, proc.stderr
        out[key] = json.loads(proc.stdout)
    return out


def test_answers_equal_run_streaming_and_not(server, run_answers, files):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    msgs = _user("hello there")
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].message.content == run_answers["text"]["text"]
    assert r.choices[0].finish_reason == ("length" if run_answers["text"]["stop_reason"] == "max_new_tokens" else "stop")
    assert r.usage.prompt_tokens == run_answers["text"]["prompt_tokens"]
    assert r.usage.completion_tokens == run_answers["text"]["generated_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    # sampling: the same seed, temperature and top_p give run's sample
    sampled = client.chat.completions.create(model="tiny", messages=_user("pick a word"), max_tokens=MAX_TOKENS,
                                             temperature=0.9, top_p=0.95, seed=7)
    assert sampled.choices[0].message.content == run_answers["sampled"]["text"]
    # a stop string ends the answer before it (as Model.stream / run --stop do)
    text = run_answers["text"]["text"]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=MAX_TOKENS, stop=[stop])
    assert r.choices[0].message.content == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"

    # the image as a data URL, streamed; the same messages again reuse the slot's prefix cache
    image_msgs = _user("Describe the image.", _data_url(files["image"].read_bytes()))
    for attempt in range(2):
        pieces, finish, usage = [], None, None
        stream = client.chat.completions.create(model="tiny", messages=image_msgs, max_completion_tokens=MAX_TOKENS,
                                                stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert "".join(pieces) == run_answers["image"]["text"]
        assert finish in ("length", "stop") and usage.prompt_tokens == run_answers["image"]["prompt_tokens"]
        if attempt == 1:
            assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1

    # a local file under --allow-dir is the same image
    r = client.chat.completions.create(model="tiny", messages=_user("Describe the image.", str(files["image"])),
                                       max_tokens=MAX_TOKENS)
    assert r.choices[0].message.content == run_answers["image"]["text"]

    # the raw SSE framing: data: lines, ending with [DONE]
    with httpx.stream("POST", server.url + "/chat/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "messages": msgs, "max_tokens": 3, "stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_eight_concurrent_requests_interleaved(server, tiny_cpu_artifact):
    from qvl.runtime import GenerationStats, load

    model = load(tiny_cpu_artifact, device="cpu", threads=int(THREADS))
    prompts = [("one", 9), ("a longer question with quite a few more words in it, to differ in length", 30),
               ("x", 5), ("what colour is the sky at noon", 22), ("count to ten", 17), ("why", 12),
               ("tell me a story about a small cat who lived on a boat", 28), ("ok", 14)]
    stats = [GenerationStats() for _ in prompts]
    expected = [model.generate(_user(p), max_new_tokens=n, stats=st) for (p, n), st in zip(prompts, stats)]
    before = server.metrics()
    client = server.client()

    def ask(i):
        time.sleep(0.03 * i)  # staggered: sequences join and leave the batch between steps
        p, n = prompts[i]
        return client.chat.completions.create(model="tiny", messages=_user(p), max_tokens=n).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == expected
    after = server.metrics()
    steps = after["qvl_decode_batch_size_count"] - before.get("qvl_decode_batch_size_count", 0)
    solo = after['qvl_decode_batch_size_bucket{le=1.0}'] - before.get('qvl_decode_batch_size_bucket{le=1.0}', 0)
    assert steps > solo, "no decoder step ran more than one sequence"
    assert after["qvl_decode_batch_size_sum"] - before.get("qvl_decode_batch_size_sum", 0) == \
        sum(st.generated_tokens - 1 for st in stats)  # every token but the first (from the prefill) was decoded


def test_bad_inputs_get_openai_errors(server, files):
    good = {"model": "tiny", "max_tokens": 4}
    png = files["image"].read_bytes()
    _assert_error(server.post(b'{"model": "tiny", "messages": [', ), 400, "invalid_json")
    _assert_error(server.post({**good, "messages": _user("hi", _data_url(b"hello", "text/plain"))}), 400,
                  "invalid_image", "messages.0.content.0.image_url")
    _assert_error(server.post({**good, "messages": _user("hi", _data_url(b"not an image at all"))}), 400,
                  "invalid_image")
    _assert_error(server.post({**good, "messages": _user("hi", _data_url(_png(600, 400)))}), 400, "invalid_image")
    _assert_error(server.post({**good, "messages": _user("hello " * 600)}), 400, "context_length_exceeded")
    _assert_error(server.post({**good, "max_tokens": 500, "messages": _user("hello")}), 400,
                  "context_length_exceeded", "max_tokens")
    _assert_error(server.post({**good, "model": "gpt-4o", "messages": _user("hi")}), 404, "model_not_found", "model")
    for path in (str(files["outside"]), f"file://{files['outside']}", str(files["escape"]), "../outside.png",
                 "/etc/passwd"):
        _assert_error(server.post({**good, "messages": _user("hi", path)}), 400, "image_path_not_allowed")
    _assert_error(server.post({**good, "messages": _user("hi", "https://example.com/cat.png")}), 400,
                  "invalid_image_url")
    _assert_error(server.post({**good, "temperature": 5, "messages": _user("hi")}), 400, param="temperature")
    _assert_error(server.post({**good, "n": 2, "messages": _user("hi")}), 400, "unsupported_parameter", "n")
    _assert_error(server.post({**good, "messages": []}), 400, param="messages")
    _assert_error(server.post({**good, "messages": _user("hi"), "pad": "x" * (2 << 20)}), 413, "payload_too_large")
    _assert_error(server.post({**good, "messages": _user("hi")}, key="wrong"), 401, "invalid_api_key")
    _assert_error(httpx.get(server.base + "/v2/nothing", timeout=5), 404)
    # the official client raises its typed errors from these
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=_user("hi"), max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=_user("hi", _data_url(png[:50])), max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    # still healthy and answering
    assert httpx.get(server.base + "/health", timeout=5).json()["status"] == "ok"
    assert client.chat.completions.create(model="tiny", messages=_user("hi"), max_tokens=2).choices[0].message.content
    assert server.proc.poll() is None and "Traceback" not in server.stderr


def test_video_url_answers_equal_run_and_bad_videos_are_400(server, tiny_cpu_artifact, files, tmp_path):
    """A `video_url` part (data: URL or an allow-listed file) answers what `run --video` answers; a non-video, a
    video with more frames than --max-video-frames, or one in an assistant message is a 400 before any decoding."""
    pytest.importorskip("av")
    from test_video import write_video

    clip = write_video(files["allowed"] / "clip.mp4", 8, 4, 64, 64)  # 2 s: 4 sampled frames, 2 temporal groups
    proc = run_cli("run", str(tiny_cpu_artifact), "--prompt", "What happens?", "--video", str(clip), "--greedy",
                   "--max-new-tokens", str(MAX_TOKENS), "--json", "--device", "cpu", "--threads", THREADS,
                   env={"OMP_NUM_THREADS": THREADS})
    assert proc.returncode == 0, proc.stderr
    expected = json.loads(proc.stdout)
    client = server.client()
    for url in (_data_url(clip.read_bytes(), "video/mp4"), str(clip)):
        msgs = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "What happens?"}]}]
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=MAX_TOKENS)
        assert r.choices[0].message.content == expected["text"]
        assert r.usage.prompt_tokens == expected["prompt_tokens"]

    def video_msgs(url: str, role: str = "user") -> list[dict]:
        return [{"role": role, "content": [{"type": "video_url", "video_url": {"url": url}}]},
                *([] if role == "user" else [{"role": "user", "content": "hi"}])]

    good = {"model": "tiny", "max_tokens": 4}
    param = "messages.0.content.0.video_url"
    _assert_error(server.post({**good, "messages": video_msgs(_data_url(b"\x00" * 4000, "video/mp4"))}), 400,
                  "invalid_video", param)
    _assert_error(server.post({**good, "messages": video_msgs(_data_url(files["image"].read_bytes()))}), 400,
                  "invalid_video", param)  # an image/png data URL in a video part
    long = write_video(tmp_path / "long.mp4", 60, 10, 64, 64)  # over the fixture's --max-video-frames 48
    err = _assert_error(server.post({**good, "messages": video_msgs(_data_url(long.read_bytes(), "video/mp4"))}),
                        400, "invalid_video", param)
    assert "60 frames" in err["message"] and "48" in err["message"]
    _assert_error(server.post({**good, "messages": video_msgs(str(files["outside"]))}), 400, "video_path_not_allowed")
    _assert_error(server.post({**good, "messages": video_msgs(str(clip), role="assistant")}), 400, "invalid_video")
    assert httpx.get(server.base + "/health", timeout=5).json()["status"] == "ok"


def test_sigterm_stops_cleanly(server):
    assert server.stop(signal.SIGTERM) == 0, server.stderr
    assert server.lines[-1] == "stopped" and "Traceback" not in server.stderr


def test_queue_full_disconnect_and_ctrl_c(tiny_cpu_artifact):
    """One slot, no queue: a second request while one runs is a 429; a client leaving mid-stream frees the slot."""
    srv = Server(tiny_cpu_artifact, "--max-batch", "1", "--max-queue", "0", "--model-name", "tiny")
    try:
        long = {"model": "tiny", "messages": _user("go on"), "max_tokens": 1500, "stream": True}
        with httpx.stream("POST", srv.url + "/chat/completions", json=long, timeout=60) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")  # generating now
            _assert_error(srv.post({"model": "tiny", "messages": _user("hi"), "max_tokens": 2}), 429, "queue_full")
        # the stream was closed after one chunk: the generation stops, the slot is free again
        deadline = time.monotonic() + 10
        while httpx.get(srv.base + "/health", timeout=5).json()["running"]:
            assert time.monotonic() < deadline, "the slot was not freed"
            time.sleep(0.05)
        m = srv.metrics()
        assert m["qvl_cancelled_generations_total"] == 1 and m["qvl_generated_tokens_total"] < 1500
        r = srv.client().chat.completions.create(model="tiny", messages=_user("hi"), max_tokens=3)
        assert r.usage.completion_tokens >= 1
    finally:
        rc = srv.stop(signal.SIGINT)
    assert rc == 0 and srv.lines[-1] == "stopped", srv.stderr
    assert "Traceback" not in srv.stderr


def test_batched_decode_is_token_identical_with_interleaved_arrivals(tiny_cpu_artifact, tiny_artifact):
    """In process: staggered generations on 3 rows of one pool (rows reused, filler rows stepped) give the solo
    token ids, including an image prompt and a prefix-cache continuation on the same row."""
    import copy

    from qvl.runtime import load
    from qvl.runtime.prefix_cache import PrefixCache
    from qvl.runtime.serve.batching import DecodeBatcher

    assert load(tiny_artifact, device="cpu").engine.batched_decode is False  # concat cache: one length per batch
    model = load(tiny_cpu_artifact, device="cpu", threads=int(THREADS))
    image = {"type": "image", "image": _png(96, 64, seed=3)}
    convs = [[{"role": "user", "content": t}] for t in ("hello there", "a somewhat longer prompt with more words",
                                                        "x", "count from one to twenty", "why is that so")]
    convs.append([{"role": "user", "content": [image, {"type": "text", "text": "what is this?"}]}])
    limits = [20, 33, 7, 25, 12, 18]
    prompts = [model.prepare(c) for c in convs]
    solo = [[t for t, _ in model.generate_ids(p, n)] for p, n in zip(prompts, limits)]
    # a second turn of conversation 0, from scratch
    follow = convs[0] + [{"role": "assistant", "content": model.prompts.decode(solo[0])},
                         {"role": "user", "content": "and then?"}]
    follow_prompt = model.prepare(follow)
    follow_solo = [t for t, _ in model.generate_ids(follow_prompt, 15)]

    batcher = DecodeBatcher(model.engine, 256, 3)
    free, cv = list(range(3)), threading.Condition()
    caches = [PrefixCache() for _ in range(3)]
    runners = [batcher.runner(row) for row in range(3)]  # one per row for good: a cache is kept for its runner
    got: dict = {}

    def on_row(row, key, prompt, n):
        runner = runners[row]
        slot_model = copy.copy(model)  # what the server's scheduler does per slot
        slot_model.runner = slot_model.engine = runner
        try:
            got[key] = [t for t, _ in slot_model.generate_ids(prompt, n, cache=caches[row])]
        finally:
            runner.leave()

    def generate(i):
        time.sleep(0.02 * i)  # staggered arrivals: sequences join and leave between steps
        with cv:
            cv.wait_for(lambda: free)
            row = free.pop(0)
        try:
            on_row(row, i, prompts[i], limits[i])
            if i == 0:  # the conversation's next turn on the same row: its prefix comes from the row's KV
                on_row(row, "follow", follow_prompt, 15)
                got["follow_reused"] = caches[row].reused_tokens
        finally:
            with cv:
                free.append(row)
                cv.notify_all()

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got.get(i) for i in range(len(prompts))] == solo
    assert got["follow"] == follow_solo
    assert got["follow_reused"] > 0
    assert batcher.sequences_stepped > batcher.steps  # some steps decoded several sequences


def test_serve_usage_errors(tiny_cpu_artifact, tmp_path):
    from conftest import assert_one_line_error

    art = str(tiny_cpu_artifact)
    assert_one_line_error(run_cli("serve", art, "--max-batch", "0"), "--max-batch")
    assert_one_line_error(run_cli("serve", art, "--port", "70000"), "--port")
    assert_one_line_error(run_cli("serve", art, "--allow-dir", str(tmp_path / "missing")), "--allow-dir")
    assert_one_line_error(run_cli("serve", str(tmp_path / "no-artifact"), "--port", "0"), "no-artifact")
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = str(busy.getsockname()[1])
        assert_one_line_error(run_cli("serve", art, "--port", port), "cannot listen", port)


@pytest.mark.slow
def test_ray_serve_two_replicas(tiny_cpu_artifact):
    """`serve --ray --replicas 2` on a local Ray instance: the same answers, from two replica processes."""
    pytest.importorskip("ray.serve")
    import socket

    from qvl.runtime import load

    with socket.socket() as probe:  # Ray's proxy binds the port itself: pick a free one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    model = load(tiny_cpu_artifact, device="cpu", threads=1)
    prompts = [(f"question number {i} " + "more " * i, 6 + i) for i in range(8)]
    expected = [model.generate(_user(p), max_new_tokens=n) for p, n in prompts]
    env_threads = "1"
    srv = _RayServer(tiny_cpu_artifact, port, env_threads)
    try:
        client = srv.client()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda pn: client.chat.completions.create(
                model="tiny", messages=_user(pn[0]), max_tokens=pn[1]).choices[0].message.content, prompts))
        assert answers == expected
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny", messages=_user(prompts[0][0]), max_tokens=prompts[0][1], stream=True) if c.choices]
        assert "".join(pieces) == expected[0]
        _assert_error(httpx.post(srv.url + "/chat/completions", content=b"{", timeout=30), 400, "invalid_json")
        pids = {httpx.get(srv.base + "/health", timeout=10).json()["pid"] for _ in range(40)}
        assert len(pids) == 2, pids  # both replicas answer
    finally:
        rc = srv.stop(signal.SIGTERM, timeout=90)
    assert rc == 0 and srv.lines[-1] == "stopped", srv.stderr


class _RayServer(Server):
    def __init__(self, artifact: Path, port: int, threads: str):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from qvl.cli import main; main()", "serve", str(artifact), "--ray", "--replicas",
             "2", "--port", str(port), "--device", "cpu", "--threads", threads, "--max-batch", "2",
             "--model-name", "tiny"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines = []
        self._ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(240) or self.proc.poll() is not None:
            self.proc.kill()
            raise AssertionError(f"Ray Serve did not start: {self.stderr}")
        self.url = f"http://127.0.0.1:{port}/v1"
        self.base = f"http://127.0.0.1:{port}"


def test_serve_under_a_ram_budget_answers_like_run(tiny_cpu_artifact, run_answers, files, tmp_path):
    """`serve --ram-budget` on a partitioned artifact: the server runs the planner's placement on the partitioned
    runner (one request at a time) and answers as `run` does. The budget leaves room for the server's own imports
    (fastapi, uvicorn: RSS a `plan` process does not have); what streams under a tight budget is test_partition's."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_cpu_artifact, src)
    parted = tmp_path / "parted"
    assert run_cli("partition", str(src), "--out", str(parted), "--every", "1").returncode == 0
    plan = run_cli("plan", str(parted), "--device", "cpu", "--json")
    assert plan.returncode == 0, plan.stderr
    free = json.loads(plan.stdout)
    budget = free["ram_bytes"] + (256 << 20)
    srv = Server(parted, "--api-key", KEY, "--ram-budget", str(budget))
    try:
        assert any(l.startswith("note: placement:") for l in srv.lines), srv.stderr
        assert any("one request at a time" in l for l in srv.lines), srv.stderr
        client = srv.client()
        r = client.chat.completions.create(model=parted.name, messages=_user("hello there"), max_tokens=MAX_TOKENS,
                                           temperature=0)
        assert r.choices[0].message.content == run_answers["text"]["text"]
        image = _user("Describe the image.", _data_url(files["image"].read_bytes()))
        r = client.chat.completions.create(model=parted.name, messages=image, max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].message.content == run_answers["image"]["text"]
    finally:
        assert srv.stop() == 0
