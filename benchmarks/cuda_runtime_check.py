"""On a GPU machine: the ORT CUDA runner on every artifact form of the tiny checkpoint, then a decode timing.

    python benchmarks/cuda_runtime_check.py WORK_DIR [--targets cuda-sm61,cuda] [--only-targets] [--device cuda|cpu] > lines.jsonl

Makes the tiny checkpoint, exports it, compiles it for each GPU target (fp32 weights and int4), and prints one
JSON line per artifact:
* fp32-weight artifacts: the parity suite on `--device` against eager fp32 (CPU), with the CPU tolerances
  (an fp16-activation artifact with the stated fp16 tolerance, `FP16_LOGIT_TOL`);
* every artifact: greedy tokens and logits of the CUDA runner against the same artifact on ORT's CPU provider
  (int4 artifacts cannot meet the fp32 tolerance against eager; this isolates the device from quantization),
  the on-device-argmax path against the logits path, whether the session captured CUDA graphs (and why not),
  where ORT placed the decoder's nodes (from its verbose log), and decode tok/s of 64 greedy tokens.
`--device cpu` is a local dry run of the same script.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

# The fp16 (`cuda` target) tolerances: on the tiny checkpoint ORT CPU measured max |Δlogit| 0.055 and vision
# 0.0032 against eager fp32 (tests/test_cuda_target.py asserts the same bounds); fp32 artifacts keep 1e-4.
FP16_LOGIT_TOL = 0.1
FP16_VISION_TOL = 1e-2


def placement(artifact: Path, device: str) -> dict:
    """Node placement of the decoder, read from ORT's verbose session log in a child process."""
    import subprocess

    code = (
        "import onnxruntime as ort, json, sys; from qvl.artifacts.manifest import read_manifest;"
        "m = read_manifest(sys.argv[1], verify_graphs=False); so = ort.SessionOptions(); so.log_severity_level = 1;"
        "p = [('CUDAExecutionProvider', {'use_tf32': '0'}), 'CPUExecutionProvider'] if sys.argv[2] == 'cuda' else ['CPUExecutionProvider'];"
        "ort.InferenceSession(sys.argv[1] + '/' + m.graph_files()['decoder'], so, providers=p)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(artifact), device], capture_output=True, text=True)
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if "placed on" in l or "Memcpy" in l
             or "fall back" in l.lower() or "not supported" in l.lower()]
    return {"log_lines": [l[-300:] for l in lines[:40]], "rc": proc.returncode}


def compare_devices(artifact: Path, device: str, steps: int = 24) -> dict:
    from qvl.runtime.model import Model

    messages = [{"role": "user", "content": "Describe the weather on a quiet morning by the sea, in detail."}]
    ref = Model(artifact, device="cpu")
    dev = Model(artifact, device=device)
    prompt = ref.prepare(messages)
    r = list(ref.generate_ids(prompt, steps, keep_logits=True, ignore_stop=True))
    d = list(dev.generate_ids(prompt, steps, keep_logits=True, ignore_stop=True))
    fast = [t for t, _ in dev.generate_ids(prompt, steps, ignore_stop=True)]  # on-device argmax
    diffs = [float(np.abs(a[1] - b[1]).max()) for a, b in zip(r, d)]
    eng = dev.engine
    # decode speed: 64 greedy tokens, after a warm-up generation (graph capture happens there)
    list(dev.generate_ids(prompt, 8, ignore_stop=True))
    times = []
    for _ in dev.generate_ids(prompt, 64, ignore_stop=True):
        times.append(time.perf_counter())
    return {
        "greedy_identical_to_cpu": [t for t, _ in r] == [t for t, _ in d],
        "device_argmax_identical": fast == [t for t, _ in d],
        "max_abs_logit_diff_vs_cpu": max(diffs),
        "cuda_graph": bool(getattr(eng.caches, "cuda_graph", False)),
        "cuda_graph_note": getattr(eng, "cuda_graph_note", None),
        "next_token_output": bool(getattr(eng.caches, "has_next_token", False)),
        "providers": eng.decoder.get_providers(),
        "decode_tok_s_tiny": (len(times) - 1) / (times[-1] - times[0]),
    }


def main() -> int:
    import onnxruntime as ort

    from qvl.toolchain.checkpoints.synthetic import make_checkpoint
    from qvl.toolchain.compile.pipeline import compile_artifact, compile_with_precision
    from qvl.toolchain.compile.pipelines import has_stage
    from qvl.toolchain.eval.parity import LOGIT_TOL, VISION_TOL, run_parity
    from qvl.toolchain.export.exporter import export_artifact

    work = Path(sys.argv[1])
    device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda"
    targets = (sys.argv[sys.argv.index("--targets") + 1] if "--targets" in sys.argv else "cuda-sm61").split(",")
    work.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
                      "device": device}), flush=True)
    ckpt, art = work / "tiny", work / "tiny-export"
    if not (ckpt / "config.json").is_file():
        make_checkpoint("tiny", ckpt, overwrite=True)
    if not (art / "manifest.json").is_file():
        export_artifact(ckpt, art, overwrite=True)
    baseline = "--only-targets" not in sys.argv  # the plain export and the CPU target too (ORT CUDA runs both)
    forms = [("export", art, True)] if baseline else []
    for target in (["cpu"] if baseline else []) + targets:
        out = work / f"tiny-{target}"
        if not (out / "manifest.json").is_file():
            if has_stage(target, "activations"):  # fp16 targets convert after the (here: no) weight step
                compile_with_precision(art, target, out, weights="fp32", overwrite=True)
            else:
                compile_artifact(art, target, out, overwrite=True)
        forms.append((target, out, True))
        if target != "cpu":
            q = work / f"tiny-{target}-int4"
            if not (q / "manifest.json").is_file():
                compile_with_precision(art, target, q, weights="int4", overwrite=True)
            forms.append((f"{target}-int4", q, False))
    for name, path, fp32_weights in forms:
        line: dict = {"artifact": name}
        t0 = time.perf_counter()
        try:
            if fp32_weights:
                fp16 = name.startswith("cuda") and not name.startswith("cuda-sm61")
                tol = FP16_LOGIT_TOL if fp16 else LOGIT_TOL
                vtol = FP16_VISION_TOL if fp16 else VISION_TOL
                rep = run_parity(path, ckpt, work / f"parity-{name}", device=device, logit_tol=tol, vision_tol=vtol)
                line["parity"] = {"passed": rep.passed, "logit_tol": tol, "vision_tol": vtol,
                                  "max_abs_logit_diff": max(c.max_abs_logit_diff for c in rep.cases),
                                  "vision_max_abs_diff": max((c.vision_max_abs_diff or 0.0) for c in rep.cases),
                                  "greedy_identical": all(c.greedy_identical for c in rep.cases)}
            line.update(compare_devices(path, device))
            if os.environ.get("QVL_PLACEMENT", "1") == "1" and device == "cuda":
                line["placement"] = placement(path, device)
        except Exception as exc:  # keep going: one broken form must not hide the others' results
            line["error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
        line["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
