"""Why an INT8 kit's greedy tokens differ from eager: first-token top-2 margins per parity case, eager vs the
kit on each device (diagnostic for the CUDA run of cuda_parity.py --kit-int8):
    python benchmarks/int8_kit_margins.py WORK_DIR [cpu cuda]
WORK_DIR must hold tiny/ and tiny-sm61-int8-kit/ (made by cuda_parity.py --kit-int8). Prints one JSON line per case."""
import json, sys
from pathlib import Path
import numpy as np
from qvl.runtime.model import Model
from qvl.toolchain.eval.parity import suite_cases, suite_images
from qvl.toolchain.eval.reference import EagerReference

work = Path(sys.argv[1]); devices = sys.argv[2:] or ["cpu"]
eager = EagerReference(work / "tiny")
models = {d: Model(work / "tiny-sm61-int8-kit", device=d) for d in devices}
for name, messages, chunk in suite_cases(suite_images(work / "imgs")):
    ref = eager.answer(messages, max_new_tokens=1).step_logits[0].reshape(-1)
    top = np.argsort(ref)[::-1][:2]
    row = {"case": name, "eager_top2": top.tolist(), "eager_margin": float(ref[top[0]] - ref[top[1]])}
    for d, m in models.items():
        (tok, logits), = list(m.generate_ids(m.prepare(messages), 1, keep_logits=True, prefill_chunk=chunk))
        logits = logits.reshape(-1)
        row[d] = {"token": int(tok), "margin_of_eager_top2": float(logits[top[0]] - logits[top[1]]),
                  "max_abs_logit_diff": float(np.abs(logits - ref).max())}
    print(json.dumps(row), flush=True)
