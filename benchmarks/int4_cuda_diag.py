"""Where CPU and CUDA differ on an int4 artifact: vision, prefill logits, decode logits, with and without CUDA graphs."""
import os
import sys

import numpy as np


def main():
    art = sys.argv[1]
    from qvl.runtime.model import Model
    msgs = [{"role": "user", "content": "Describe the weather on a quiet morning by the sea, in detail."}]
    ref = Model(art, device="cpu")
    p = ref.prepare(msgs)
    r = [l for _, l in ref.generate_ids(p, 6, keep_logits=True, ignore_stop=True)]
    for cg in ("0", "1"):
        os.environ["QVL_CUDA_GRAPH"] = cg
        dev = Model(art, device="cuda")
        d = [l for _, l in dev.generate_ids(p, 6, keep_logits=True, ignore_stop=True)]
        print(f"cuda_graph={cg} ({dev.engine.caches.cuda_graph}) per-step max|dlogit| vs cpu:",
              [round(float(np.abs(a - b).max()), 4) for a, b in zip(r, d)], "max|logit|", round(float(np.abs(r[0]).max()), 2))
    # one MatMulNBits of the artifact on both providers
    import onnx
    import onnxruntime as ort
    from onnx import helper as h
    m = onnx.load(os.path.join(art, "decoder.onnx"))
    node = next(n for n in m.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: h.get_attribute_value(a) for a in node.attribute}
    inits = {t.name: t for t in m.graph.initializer}
    g = h.make_graph([node], "g", [h.make_tensor_value_info(node.input[0], 1, [1, attrs["K"]])],
                     [h.make_tensor_value_info(node.output[0], 1, [1, attrs["N"]])],
                     [inits[i] for i in node.input[1:] if i in inits])
    mm = h.make_model(g, opset_imports=list(m.opset_import)); mm.ir_version = m.ir_version
    x = np.random.default_rng(0).standard_normal((1, attrs["K"])).astype(np.float32)
    outs = [ort.InferenceSession(mm.SerializeToString(), providers=[pv]).run(None, {node.input[0]: x})[0]
            for pv in ("CPUExecutionProvider", "CUDAExecutionProvider")]
    print("one MatMulNBits", node.name, attrs, "inputs", list(node.input), "max|cpu-cuda|", float(np.abs(outs[0] - outs[1]).max()),
          "max|y|", float(np.abs(outs[0]).max()))


if __name__ == "__main__":
    main()
