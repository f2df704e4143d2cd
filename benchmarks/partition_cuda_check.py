"""The partitioned runner on ORT's CUDA provider (run on the lent GPU; no GPU in CI): every placement form against the
whole-decoder runner on the same inputs. Prints one JSON line per check.

    python benchmarks/partition_cuda_check.py WHOLE_ART PARTITIONED_ART

* all parts on CUDA (`vram`) vs `Engine(device="cuda")`: one session, the artifact's whole decoder graph through the
  unpartitioned runner's cache binder (CUDA graphs on in-place caches), so the logits should be equal; and with
  `join=False` (a session per part);
* a split (the first half of the parts on CUDA, the rest on the CPU) vs the CPU and the CUDA whole runners;
* CPU parts that prefill on CUDA (`prefill_device="cuda"`, the KV brought back) vs the all-CPU runner;
* streamed CUDA parts (a session per use) vs resident ones;
* a split whose CUDA parts are joined into one session from the part graphs (a streamed part in the middle);
* `vram_limit` of 1 MiB on a part (one session per part), and 1 KiB on every part (joined: the group's cap is their
  sum): the arena cap must refuse it (an error, not a silent overrun).
"""

from __future__ import annotations

import json
import sys

import numpy as np


def steps(engine, seed=0, seqs=(40, 1, 1, 3, 1)):
    rng = np.random.default_rng(seed)
    cache, out = engine.new_cache(64), []
    for seq in seqs:
        x = rng.standard_normal((1, seq, engine.hidden_size)).astype(np.float32) * 0.1
        pos = np.broadcast_to(np.arange(cache.length, cache.length + seq)[None, None], (3, 1, seq)).copy()
        ds = rng.standard_normal((engine.num_deepstack, 1, seq, engine.hidden_size)).astype(np.float32) * 0.1
        out.append(engine.step(cache, x, pos, ds))
    return out


def diff(a, b) -> dict:
    d = max(float(np.abs(x - y).max()) for x, y in zip(a, b))
    same = all(bool((x.argmax(-1) == y.argmax(-1)).all()) for x, y in zip(a, b))
    return {"max_abs_logit_diff": d, "argmax_equal": same}


def main() -> int:
    from qvl.errors import QvlError
    from qvl.runtime.backends.ort import Engine
    from qvl.runtime.backends.partitioned import PartitionedEngine, PartPlacement

    whole, parted = sys.argv[1], sys.argv[2]
    cpu = steps(Engine(whole, device="cpu"))
    cuda = steps(Engine(whole, device="cuda"))
    from qvl.artifacts.manifest import read_manifest

    names = [p.name for p in read_manifest(parted, verify_graphs=False).partition.parts]

    def check(label, placement, ref_label, ref, **kw):
        try:
            engine = PartitionedEngine(parted, placement, **kw)
            got = steps(engine)
            sessions = [p.spec.name for p in engine.parts]
            whole = engine.caches is not None
            print(json.dumps({"check": label, "vs": ref_label, **diff(got, ref), "sessions": sessions,
                              "whole_decoder_graph": whole, "cuda_graph": bool(whole and engine.caches.cuda_graph),
                              "cuda_graph_note": engine.cuda_graph_note}), flush=True)
            return got
        except QvlError as exc:
            print(json.dumps({"check": label, "error": str(exc)[:300]}), flush=True)
            return None

    print(json.dumps({"check": "whole cuda vs whole cpu", **diff(cuda, cpu)}), flush=True)
    all_cuda = {n: PartPlacement("cuda", "vram") for n in names}
    check("all parts cuda", all_cuda, "whole cuda", cuda)
    check("all parts cuda, a session per part", all_cuda, "whole cuda", cuda, join=False)
    middle = {**all_cuda, names[1]: PartPlacement("cuda", "stream")}
    check("all parts cuda, part 1 streamed (joined groups around it)", middle, "whole cuda", cuda)
    half = len(names) // 2
    split = {n: PartPlacement("cuda", "vram") if i < half else PartPlacement("cpu", "ram") for i, n in enumerate(names)}
    got = check(f"first {half} parts cuda, rest cpu", split, "whole cpu", cpu)
    if got is not None:
        print(json.dumps({"check": f"first {half} parts cuda, rest cpu", "vs": "whole cuda", **diff(got, cuda)}))
    borrow = {n: PartPlacement("cpu", "ram", prefill_device="cuda") for n in names}
    check("cpu parts, prefill (40 positions) on cuda", borrow, "whole cpu", cpu)
    streamed = {n: PartPlacement("cuda", "stream") for n in names}
    check("all parts cuda, streamed per use", streamed, "whole cuda", cuda)
    capped = {n: PartPlacement("cuda", "vram", vram_limit=1 << 20) if i == 0 else PartPlacement("cuda", "vram")
              for i, n in enumerate(names)}
    check("part 0 capped at 1 MiB of VRAM (a session per part)", capped, "whole cuda", cuda, join=False)
    tiny = {n: PartPlacement("cuda", "vram", vram_limit=1 << 10) for n in names}
    check("every part capped at 1 KiB (joined: the sum caps the session)", tiny, "whole cuda", cuda)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
