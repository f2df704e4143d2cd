"""The bench's llama.cpp peer, part 3: run `llama-bench` and `llama-mtmd-cli` on the bench's inputs and parse them.

Same threads (`-t N`, `OMP_NUM_THREADS=N`) and the same cases as the qvl / eager engines:

* **text**: `llama-bench -m TEXT.gguf -p 128 -n 64 -t N -r R -o json` (its own warm-up run first). pp128 gives
  `prefill_tok_s` (median of its R samples); tg64 gives `decode_tok_s` (median; generated from an empty context,
  while the qvl side decodes after its 128-token prompt: at 2B size the 128 extra KV positions are ~2 % of the
  bytes a step reads). `ttft_text_s = 128 / prefill_tok_s` (prefill only: llama-bench feeds token ids, so no
  tokenization or chat template, and no sampling).
* **image**: `llama-mtmd-cli -m TEXT.gguf --mmproj MMPROJ.gguf --image bench_448.png -p QUESTION --temp 0 -n 64
  --ignore-eos -t N -c CTX -fit off -lv 4` (the same PNG and question as the other engines, its own chat template
  from the GGUF; `-fit off`: no device memory to fit on a CPU build, so no probe load), one untimed warm-up process
  (`-n 2`) then R timed processes. From its log:
  - `vision_s`: the image encoder (`mtmd batch encoding done in X ms`);
  - `ttft_image_s`: llama_perf's `prompt eval time`. llama.cpp books time at its next synchronisation, which
    comes when the first logits are read, so this one figure runs from the first prompt decode (the template
    text before the image) through the image encode, the visual-token decode (`image decoded (batch i/n) in X
    ms`) and the rest of the prompt to the first logits: TTFT without the image file load/resize, the chat
    template and tokenization before it, and the first sampling after it (llama.cpp times none of them, all
    milliseconds). Checked: it must be >= encode + visual decode, else (a llama.cpp that synchronises between
    chunks) `ttft = encode + prompt eval`;
  - `prefill_s_image = ttft_image_s - vision_s` (the LLM's share), `prefill_tok_s_image` = prompt tokens / that;
  - `decode_tok_s_image` = `eval` runs / `eval time`: one-token steps; 64 tokens give 63 booked steps (the last
    token's decode is never synchronised), the same (n - 1) / (t_last - t_first) as the qvl side.
* `load_s`: wall time from process start (the log clock's zero) to `main: loading model` (printed once the text
  model, its context with the KV cache, the mmproj and mtmd's warm-up are ready), median of the image runs;
  llama_perf's own `load time` (until the first synchronisation) is kept as `perf_load_s`.
* `peak_rss_bytes`: each llama.cpp child's own `VmHWM`, polled from /proc every 10 ms while it runs (like the qvl
  side's VmHWM it includes file-backed pages of the mmapped GGUF; `ru_maxrss` from wait4 is not used: a child
  inherits the parent's high-water mark on Linux); the max over the text and image processes, each also reported.
* `simd`: the features of the `system_info` line printed by `llama-completion -n 1` on the text GGUF (`CPU :
  SSE3 = 1 | AVX2 = 1 | ...`; this llama.cpp lists only what the build has, so an absent feature is 0).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from qvl.errors import QvlError

_NUM = r"([0-9]+(?:\.[0-9]+)?)"
_PERF = {
    "load_ms": re.compile(r"_print:\s+load time =\s*" + _NUM + r" ms"),
    "prompt_eval": re.compile(r"_print:\s+prompt eval time =\s*" + _NUM + r" ms /\s*(\d+) tokens"),
    "eval": re.compile(r"_print:\s+eval time =\s*" + _NUM + r" ms /\s*(\d+) runs"),
    "total": re.compile(r"_print:\s+total time =\s*" + _NUM + r" ms /\s*(\d+) tokens"),
}
_ENCODE = re.compile(r"mtmd batch encoding done in (\d+) ms")
_SLICE = re.compile(r"(\w+) slice encoded in (\d+) ms")
_DECODED = re.compile(r"(\w+) decoded \(batch (\d+)/(\d+)\) in (\d+) ms")
_SYSINFO = re.compile(r"system_info: (.*)$", re.M)
_STAMP = re.compile(r"^(\d+)\.(\d{2})\.(\d{3})\.(\d{3}) ")


# ---------------------------------------------------------------------------------------------------
# Parsers (unit-tested on captured output: tests/data/llamacpp/)


def parse_system_info(text: str) -> dict | None:
    """`system_info: n_threads = 2 (n_threads_batch = 2) / 2 | CPU : SSE3 = 1 | AVX2 = 1 | ...` -> the numbers.

    Returns {"n_threads", "features": {"CPU": {"AVX2": 1, ...}}, "line"} or None when there is no such line.
    """
    m = _SYSINFO.search(text)
    if not m:
        return None
    line = m.group(1).strip()
    out: dict = {"line": line, "features": {}}
    t = re.match(r"n_threads = (\d+)", line)
    out["n_threads"] = int(t.group(1)) if t else None
    backend = None
    for part in (p.strip() for p in line.split("|")):
        if " : " in part:  # "CPU : SSE3 = 1" starts a backend's list
            backend, _, part = part.partition(" : ")
            backend = backend.strip()
            out["features"].setdefault(backend, {})
        kv = re.fullmatch(r"([A-Za-z0-9_]+) = ([0-9]+)", part)
        if kv and backend is not None:
            out["features"][backend][kv.group(1)] = int(kv.group(2))
    return out


def simd_summary(info: dict | None) -> dict:
    """The x86 kernels a build ran, as 0/1 (absent from the list = 0)."""
    cpu = (info or {}).get("features", {}).get("CPU", {})
    keys = ("SSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2", "AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI",
            "AVX512_BF16", "AMX_INT8", "REPACK", "OPENMP", "LLAMAFILE")
    out = {k: int(cpu.get(k, 0)) for k in keys}
    out["isa"] = "AVX-512" if out["AVX512"] else "AVX2" if out["AVX2"] else "SSE" if out["SSE3"] else "other"
    return out


def parse_llama_bench(text: str) -> dict:
    """llama-bench `-o json` output -> {"pp": {...}, "tg": {...}, "meta": {...}} (medians of the samples)."""
    try:
        rows = json.loads(text)
    except ValueError as exc:
        raise RuntimeError(f"llama-bench printed no JSON: {exc}") from None
    out: dict = {}
    for r in rows:
        kind = "pp" if r["n_prompt"] > 0 and r["n_gen"] == 0 else "tg" if r["n_gen"] > 0 and r["n_prompt"] == 0 else None
        if kind is None:
            continue
        ts = [float(x) for x in r.get("samples_ts", [])] or [float(r["avg_ts"])]
        out[kind] = {"tokens": r["n_prompt"] or r["n_gen"], "tok_s": statistics.median(ts), "samples_tok_s": ts,
                     "avg_tok_s": float(r["avg_ts"]), "stddev_tok_s": float(r["stddev_ts"]), "n_depth": r.get("n_depth")}
        out["meta"] = {k: r.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends", "model_type",
                                             "model_size", "model_n_params", "n_threads", "n_batch", "n_ubatch",
                                             "type_k", "type_v", "flash_attn", "repack", "load_mode")}
    if "pp" not in out or "tg" not in out:
        raise RuntimeError(f"llama-bench JSON has no pp/tg rows: {text[:200]!r}")
    return out


def log_seconds(text: str, needle: str) -> float | None:
    """The log clock (`M.SS.mmm.uuu` at the start of each line, zero at process start) of the first line with needle."""
    for line in text.splitlines():
        if needle in line:
            m = _STAMP.match(line)
            if m:
                mins, secs, ms, us = (int(x) for x in m.groups())
                return mins * 60 + secs + ms / 1e3 + us / 1e6
    return None


def parse_mtmd_log(text: str) -> dict:
    """llama-mtmd-cli's log (stdout + stderr, `-lv 4`) -> timings in seconds and token counts (see module doc)."""
    out: dict = {}
    for key, rx in _PERF.items():
        m = rx.search(text)
        if m:
            out[key] = m.groups()
    missing = [k for k in ("load_ms", "prompt_eval", "eval") if k not in out]
    if missing:
        raise RuntimeError(f"llama-mtmd-cli printed no llama_perf {', '.join(missing)} line")
    enc = [int(x) for x in _ENCODE.findall(text)] or [int(ms) for _, ms in _SLICE.findall(text)]
    if not enc:
        raise RuntimeError("llama-mtmd-cli printed no image encode time")
    decoded = [int(ms) for *_, ms in _DECODED.findall(text)]
    vision, image_decode = sum(enc) / 1e3, sum(decoded) / 1e3
    prompt_s, p_tok = float(out["prompt_eval"][0]) / 1e3, int(out["prompt_eval"][1])
    e_s, e_runs = float(out["eval"][0]) / 1e3, int(out["eval"][1])
    inclusive = prompt_s >= vision + image_decode  # the encode happened inside the booked prompt-eval span
    ttft = prompt_s if inclusive else vision + prompt_s
    prefill = ttft - vision
    res = {
        "ttft_s": ttft,
        "vision_s": vision,
        "image_decode_s": image_decode,
        "prefill_s": prefill,
        "prompt_tokens": p_tok,
        "prefill_tok_s": p_tok / prefill if prefill > 0 else None,
        "prompt_eval_s": prompt_s,
        "prompt_eval_includes_vision": inclusive,
        "decode_s": e_s,
        "decode_steps": e_runs,
        "decode_tok_s": e_runs / e_s if e_s > 0 else None,
        "load_s": log_seconds(text, "main: loading model"),
        "perf_load_s": float(out["load_ms"][0]) / 1e3,
    }
    if res["load_s"] is None:
        raise RuntimeError("llama-mtmd-cli printed no timestamped 'main: loading model' line (run it with -lv 4)")
    if "total" in out:
        res["perf_total_s"] = float(out["total"][0]) / 1e3
    return res


# ---------------------------------------------------------------------------------------------------
# Running


def _vmhwm(pid: int, exe: str) -> int | None:
    """The child's VmHWM in bytes once it runs `exe` (before its exec, /proc shows the parent's memory), else None."""
    try:
        if os.path.realpath(f"/proc/{pid}/exe") != exe:
            return None
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def run_measured(cmd: list[str], log: Path, threads: int, stdout: Path | None = None, poll_s: float = 0.01) -> dict:
    """Run `cmd` to completion; {"rc", "wall_s", "peak_rss_bytes", "rss_source"}.

    Peak RSS is the child's own `VmHWM`, polled from /proc every `poll_s` while it runs (VmHWM only grows, and a
    process does not grow while exiting). Not `ru_maxrss` from wait4: on Linux a child inherits the parent's
    high-water mark at fork/exec, so a bench parent of 2 GB would report >= 2 GB for every child.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    exe = os.path.realpath(cmd[0])
    peak = None
    with log.open("w") as err, (stdout.open("w") if stdout else open(os.devnull, "w")) as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out if stdout else err, stderr=err if stdout else subprocess.STDOUT,
                                env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            hwm = _vmhwm(proc.pid, exe)
            if hwm is not None:
                peak = max(peak or 0, hwm)
            time.sleep(poll_s)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    source = "VmHWM"
    if peak is None:  # no /proc (or it ended before the first poll): ru_maxrss, an upper bound (see above)
        peak, source = int(usage.ru_maxrss) * (1 if sys.platform == "darwin" else 1024), "ru_maxrss"
    return {"rc": proc.returncode, "wall_s": wall, "peak_rss_bytes": peak, "rss_source": source}


def _check(res: dict, what: str, log: Path) -> None:
    if res["rc"] != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{what} failed (exit {res['rc']}), log {log}:\n{tail}")


def bench_text(build, text_gguf: Path, threads: int, repeats: int, text_tokens: int, new_tokens: int,
               work_dir: Path) -> dict:
    tag = build.label.replace(".", "_")
    log, out = work_dir / f"{tag}.llama-bench.log", work_dir / f"{tag}.llama-bench.json"
    cmd = [str(build.tool("llama-bench")), "-m", str(text_gguf), "-p", str(text_tokens), "-n", str(new_tokens),
           "-t", str(threads), "-r", str(repeats), "-o", "json"]
    res = run_measured(cmd, log, threads, stdout=out)
    _check(res, "llama-bench", log)
    parsed = parse_llama_bench(out.read_text())
    return {"command": cmd, "wall_s": res["wall_s"], "peak_rss_bytes": res["peak_rss_bytes"],
            "rss_source": res["rss_source"], **parsed}


def bench_image(build, text_gguf: Path, mmproj: Path, image: Path, question: str, threads: int, repeats: int,
                new_tokens: int, ctx: int, work_dir: Path, warmup: bool = True, step=lambda m: None) -> dict:
    tag = build.label.replace(".", "_")

    def cmd(n: int) -> list[str]:
        return [str(build.tool("llama-mtmd-cli")), "-m", str(text_gguf), "--mmproj", str(mmproj), "--image", str(image),
                "-p", question, "--temp", "0", "-n", str(n), "--ignore-eos", "-t", str(threads), "-c", str(ctx),
                "-fit", "off", "-lv", "4"]

    runs = []
    for i in range(int(warmup) + repeats):
        timed = i >= int(warmup)
        step(f"{build.label}: image case " + (f"run {i + 1 - int(warmup)}/{repeats}" if timed else "warm-up"))
        log = work_dir / f"{tag}.mtmd.{i}.log"
        res = run_measured(cmd(new_tokens if timed else 2), log, threads)
        _check(res, "llama-mtmd-cli", log)
        if timed:
            rec = parse_mtmd_log(log.read_text(errors="replace"))
            if rec["decode_steps"] != new_tokens - 1:  # 64 tokens: 63 booked one-token steps (module doc)
                raise RuntimeError(f"llama-mtmd-cli booked {rec['decode_steps']} decode steps for {new_tokens} tokens ({log})")
            runs.append({**rec, "wall_s": res["wall_s"], "peak_rss_bytes": res["peak_rss_bytes"],
                         "rss_source": res["rss_source"]})
    keys = ("ttft_s", "vision_s", "image_decode_s", "prefill_s", "prefill_tok_s", "prompt_eval_s", "decode_s",
            "decode_tok_s", "load_s", "perf_load_s", "wall_s", "peak_rss_bytes")
    med = {k: statistics.median(r[k] for r in runs) for k in keys if all(r.get(k) is not None for r in runs)}
    return {"command": cmd(new_tokens), "prompt_tokens": runs[0]["prompt_tokens"], "new_tokens": new_tokens,
            "ctx": ctx, **med, "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs), "runs": runs}


def system_info(build, text_gguf: Path, threads: int, work_dir: Path) -> dict:
    """The build's `system_info` line: `llama-completion` on the text GGUF, one token (it prints the line after load)."""
    log = work_dir / f"{build.label.replace('.', '_')}.system-info.log"
    cmd = [str(build.tool("llama-completion")), "-m", str(text_gguf), "-p", "hi", "-n", "1", "-t", str(threads),
           "-c", "256", "-no-cnv", "--no-warmup", "-fit", "off"]
    res = run_measured(cmd, log, threads)
    _check(res, "llama-completion", log)
    info = parse_system_info(log.read_text(errors="replace"))
    if info is None:
        raise RuntimeError(f"{build.label}: llama-completion printed no system_info line ({log})")
    return info


def run_peer(build, ggufs: dict, summaries: dict, inputs: dict, image: Path, threads: int, repeats: int,
             text_tokens: int, new_tokens: int, work_dir: Path, warmup: bool = True, step=lambda m: None) -> dict:
    """One llama.cpp build through both cases; the peer's record for the bench report (see module doc)."""
    step(f"{build.label}: llama-bench pp{text_tokens} + tg{new_tokens} ({repeats} repetitions)")
    text = bench_text(build, Path(ggufs["text"]), threads, repeats, text_tokens, new_tokens, work_dir)
    question = next(p["text"] for p in inputs["image"]["messages"][0]["content"] if p.get("type") == "text")
    want = inputs["image"]["prompt_tokens"]
    ctx = 256 * -(-(want + new_tokens + 16) // 256)
    img = bench_image(build, Path(ggufs["text"]), Path(ggufs["mmproj"]), image, question, threads, repeats, new_tokens,
                      ctx, work_dir, warmup, step)
    info = system_info(build, Path(ggufs["text"]), threads, work_dir)
    prefill = text["pp"]["tok_s"]
    bpt = summaries["text"]["tensor_bytes"]
    return {
        "label": build.label,
        "decode_tok_s": text["tg"]["tok_s"],
        "prefill_tok_s": prefill,
        "ttft_text_s": text_tokens / prefill,
        "decode_tok_s_image": img["decode_tok_s"],
        "prefill_tok_s_image": img["prefill_tok_s"],
        "ttft_image_s": img["ttft_s"],
        "vision_s": img["vision_s"],
        "load_s": img["load_s"],
        "peak_rss_bytes": max(text["peak_rss_bytes"], img["peak_rss_bytes"]),
        "peak_rss_text_bytes": text["peak_rss_bytes"],
        "peak_rss_image_bytes": img["peak_rss_bytes"],
        "bytes_per_token": bpt,
        "threads": threads,
        # passed through from the bench's environment (OpenMP's spin-wait policy decides how llama.cpp's barriers
        # behave on a loaded host: benchmarks/README.md, "Peer: llama.cpp")
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "quant": summaries["quant"],
        "simd": simd_summary(info),
        "system_info": info["line"],
        "system_info_threads": info.get("n_threads"),
        "prompt_tokens_image": img["prompt_tokens"],
        "prompt_tokens_image_qvl": want,
        "build": {"flavour": build.flavour, "version": build.version, "bin_dir": str(build.bin_dir), **build.record},
        "gguf": {"text": summaries["text"], "mmproj": summaries["mmproj"], "dir": ggufs["dir"],
                 "digest": ggufs["digest"], "convert_seconds": ggufs["seconds"], "cached": ggufs["cached"]},
        "cases": {"text": text, "image": img},
    }


def check_peer_names(peers: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """`--peer` values: llama.cpp only (for now)."""
    known = ("llama.cpp",)
    out = []
    for p in peers:
        name = p.strip()
        if name not in known:
            raise QvlError(f"unknown --peer {p!r}", hint=f"known peers: {', '.join(known)}")
        if name not in out:
            out.append(name)
    return tuple(out)
