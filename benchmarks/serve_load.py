"""Load test of `qvl-compile serve` on loopback: N concurrent streaming clients, batched vs `--max-batch 1`.

    python benchmarks/serve_load.py ART [--concurrency 1,4,16] [--requests 4] [--max-tokens 32]
                                        [--batched-slots 16] [--threads N] [--out FILE.json] [--host-label TEXT]

For each mode (batched: `--max-batch B`; unbatched: `--max-batch 1`) one server is started on 127.0.0.1 (a free
port), and for each concurrency c, c clients (the official `openai` client, streaming) each send `--requests`
requests one after another, every prompt distinct (no prefix-cache hits between requests). Bounded in count and
time (`--deadline-s` per server run): it never touches the network beyond loopback.

Per (mode, c): requests, errors, completion tokens (the server's usage counts), wall time, aggregate tok/s
(completion tokens / wall), client-side TTFT p50/p99 (request sent -> first content chunk), and the server's mean
decode batch size (from /metrics). The machine's load average before and after goes into the JSON: numbers from a
loaded host are only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


class _Server:
    def __init__(self, artifact: Path, max_batch: int, threads: int | None, max_context: int):
        cmd = [sys.executable, "-c", "from qvl.cli import main; main()", "serve", str(artifact), "--host", "127.0.0.1",
               "--port", "0", "--device", "cpu", "--max-batch", str(max_batch), "--max-queue", "1024",
               "--max-context", str(max_context), "--model-name", "bench"]
        if threads:
            cmd += ["--threads", str(threads)]
        self.command = " ".join(["qvl-compile", *cmd[3:]])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        ready = threading.Event()

        def drain():
            for line in self.proc.stderr:
                self.lines.append(line.rstrip())
                if line.startswith("serving "):
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(120) or self.proc.poll() is not None:
            self.proc.kill()
            raise SystemExit("server did not start:\n" + "\n".join(self.lines))
        line = next(l for l in self.lines if l.startswith("serving "))
        self.url = line.split(" on ", 1)[1].split()[0]
        import httpx

        for _ in range(300):
            try:
                if httpx.get(self.url[:-3] + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)

    def batch_stats(self) -> tuple[float, float]:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        total = count = 0.0
        for fam in text_string_to_metric_families(httpx.get(self.url[:-3] + "/metrics", timeout=5).text):
            for s in fam.samples:
                if s.name == "qvl_decode_batch_size_sum":
                    total = s.value
                elif s.name == "qvl_decode_batch_size_count":
                    count = s.value
        return total, count

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def _one(client, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    try:
        stream = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if ttft is None and any(c.delta.content for c in chunk.choices):
                ttft = time.perf_counter() - t0
        return {"ok": True, "ttft": ttft, "tokens": tokens, "seconds": time.perf_counter() - t0}
    except Exception as exc:  # counted, not fatal: the load test reports errors
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:200]}


def _run_level(server: _Server, concurrency: int, requests: int, max_tokens: int, tag: str, deadline: float) -> dict:
    import openai

    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=300)
    before = server.batch_stats()

    def client_loop(c: int) -> list[dict]:
        out = []
        for r in range(requests):
            if time.monotonic() > deadline:
                out.append({"ok": False, "error": "deadline"})
                continue
            out.append(_one(client, f"{tag} client {c} request {r}: tell me about the number {c * 1000 + r}",
                            max_tokens))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = [x for chunk in pool.map(client_loop, range(concurrency)) for x in chunk]
    wall = time.perf_counter() - t0
    after = server.batch_stats()
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    steps = after[1] - before[1]
    return {
        "concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
        "error_samples": sorted({r["error"] for r in results if not r["ok"]})[:3],
        "completion_tokens": tokens, "wall_s": round(wall, 3),
        "aggregate_tok_s": round(tokens / wall, 2) if wall > 0 else None,
        "ttft_p50_s": None if not ttfts else round(_percentile(ttfts, 50), 4),
        "ttft_p99_s": None if not ttfts else round(_percentile(ttfts, 99), 4),
        "mean_decode_batch": round((after[0] - before[0]) / steps, 2) if steps else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batched-slots", type=int, default=16)
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--deadline-s", type=float, default=600.0, help="per server run; later requests count as errors")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--host-label", default="loaded host")
    ap.add_argument("--artifact-recipe", default=None, help="how ART was made (recorded in the JSON)")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    load_before = os.getloadavg()
    runs, servers = [], {}
    for mode, slots in (("batched", args.batched_slots), ("unbatched", 1)):
        server = _Server(args.artifact, slots, args.threads, args.max_context)
        deadline = time.monotonic() + args.deadline_s
        try:
            for c in levels:
                row = {"mode": mode, "max_batch": slots,
                       **_run_level(server, c, args.requests, args.max_tokens, f"{mode}-{c}", deadline)}
                runs.append(row)
                print(json.dumps(row), flush=True)
        finally:
            rc = server.stop()
        servers[mode] = {"command": server.command, "exit_code": rc}
    report = {
        "host": args.host_label, "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count(),
        "artifact": str(args.artifact), "artifact_recipe": args.artifact_recipe, "command": " ".join(["python", *sys.argv]),
        "requests_per_client": args.requests, "max_tokens": args.max_tokens, "servers": servers, "results": runs,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "results"}))


if __name__ == "__main__":
    main()
