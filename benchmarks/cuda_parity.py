"""Parity of qvl artifacts on ONNX Runtime's CUDA provider against eager PyTorch (run on a GPU machine).

    python benchmarks/cuda_parity.py WORK_DIR [--kit]

Makes the tiny checkpoint, exports it (fp32, standard ONNX ops), and runs the parity suite with the runtime
on device="cuda" (onnxruntime-gpu) against eager PyTorch fp32 on the CPU. With --kit it also builds the
sm61 engine kit (TensorRT-flavoured opset-17 graphs) and runs the same suite on those graphs via CUDA.
Prints one JSON line per artifact.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> int:
    import onnxruntime as ort

    work = Path(sys.argv[1])
    work.mkdir(parents=True, exist_ok=True)
    from qvl.toolchain.checkpoint import make_checkpoint
    from qvl.toolchain.export import export_artifact
    from qvl.toolchain.parity import run_parity

    print(json.dumps({"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}), flush=True)
    ckpt, art = work / "tiny", work / "tiny-art"
    make_checkpoint("tiny", ckpt, overwrite=True)
    export_artifact(ckpt, art, overwrite=True)
    targets = [("export-fp32", art)]
    if "--kit" in sys.argv:
        from qvl.toolchain.trt_kit import make_engine_kit

        kit = work / "tiny-sm61-kit"
        make_engine_kit(art, "sm61", kit)
        targets.append(("sm61-kit", kit))
    ok = True
    for name, path in targets:
        t = time.time()
        from qvl.runtime import load

        placed = load(path, device="cuda").engine.decoder.get_providers()
        report = run_parity(path, ckpt, work / "imgs", device="cuda")
        ok &= report.passed
        print(json.dumps({
            "artifact": name, "device": "cuda", "session_providers": placed, "passed": report.passed, "seconds": round(time.time() - t, 1),
            "cases": {c.name: {"max_abs_logit_diff": c.max_abs_logit_diff, "vision_max_abs_diff": c.vision_max_abs_diff,
                               "greedy_identical": c.greedy_identical, "steps": len(c.step_max_abs_diff)}
                      for c in report.cases},
        }), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
