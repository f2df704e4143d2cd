"""Parity of qvl artifacts on ONNX Runtime's CUDA provider against eager PyTorch (run on a GPU machine).

    python benchmarks/cuda_parity.py WORK_DIR [--kit] [--kit-int8] [--device cuda|cpu]

Makes the tiny checkpoint, exports it (fp32, standard ONNX ops), and runs the parity suite with the runtime
on device="cuda" (onnxruntime-gpu) against eager PyTorch fp32 on the CPU. With --kit it also builds the
sm61 engine kit (TensorRT-flavoured opset-17 graphs) and runs the same suite on those graphs via CUDA.
With --kit-int8 it also makes the INT8 sm61 kit (`compile --target sm61 --weights int8`: calibrated
explicit Q/DQ, default accuracy budget against the fp32 kit, measured on the CPU) and runs the suite on it
via CUDA; an INT8 kit is not expected to meet the fp32 logit tolerance, so its line also carries the
greedy prefix agreement with eager and the kit's own budget record. `--device cpu` runs everything on ONNX
Runtime CPU (a local dry run of this script). Prints one JSON line per artifact.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from qvl.artifacts.manifest import read_manifest


def main() -> int:
    import onnxruntime as ort

    work = Path(sys.argv[1])
    device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda"
    work.mkdir(parents=True, exist_ok=True)
    from qvl.toolchain.checkpoints.synthetic import make_checkpoint
    from qvl.toolchain.export.exporter import export_artifact
    from qvl.toolchain.eval.parity import run_parity

    print(json.dumps({"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}), flush=True)
    ckpt, art = work / "tiny", work / "tiny-art"
    make_checkpoint("tiny", ckpt, overwrite=True)
    export_artifact(ckpt, art, overwrite=True)
    targets = [("export-fp32", art)]
    if "--kit" in sys.argv:
        from qvl.toolchain.tensorrt.kit import make_engine_kit

        kit = work / "tiny-sm61-kit"
        make_engine_kit(art, "sm61", kit)
        targets.append(("sm61-kit", kit))
    if "--kit-int8" in sys.argv:
        from qvl.toolchain.quant.accuracy_budget import AccuracyBudget
        from qvl.toolchain.tensorrt.int8_kit import make_int8_engine_kit

        kit8 = work / "tiny-sm61-int8-kit"
        make_int8_engine_kit(art, "sm61", kit8, budget=AccuracyBudget(), overwrite=True, threads=1)
        targets.append(("sm61-int8-kit", kit8))
    ok = True
    for name, path in targets:
        t = time.time()
        from qvl.runtime import load

        placed = load(path, device=device).engine.decoder.get_providers()
        report = run_parity(path, ckpt, work / "imgs", device=device)
        line = {
            "artifact": name, "device": device, "session_providers": placed, "passed": report.passed, "seconds": round(time.time() - t, 1),
            "cases": {c.name: {"max_abs_logit_diff": c.max_abs_logit_diff, "vision_max_abs_diff": c.vision_max_abs_diff,
                               "greedy_identical": c.greedy_identical, "steps": len(c.step_max_abs_diff)}
                      for c in report.cases},
        }
        if name == "sm61-int8-kit":  # judged by its accuracy budget, not the fp32 tolerance
            agree = sum(_prefix(c.eager_tokens, c.artifact_tokens) for c in report.cases)
            total = sum(len(c.eager_tokens) for c in report.cases)
            search = read_manifest(path, verify_graphs=False).precision["budget_search"]
            line.update(greedy_prefix_agreement=agree / total, budget=search["budget"],
                        budget_measured_cpu=search["measured"], rolled_back=search["rolled_back"],
                        passed=agree / total >= search["budget"]["min_greedy_agreement"])
            ok &= line["passed"]
        else:
            ok &= report.passed
        print(json.dumps(line), flush=True)
    return 0 if ok else 1


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


if __name__ == "__main__":
    sys.exit(main())
