"""Activation calibration for explicit INT8 Q/DQ: per-input-channel max|x| of every linear site.

`calibrate_artifact(artifact)` runs the fp32 artifact (or engine kit) graphs in ONNX Runtime CPU over the
calibration prompts (default: the parity suite, `accuracy_budget.calibration_cases`: text-only, three
image shapes, two images, chunked prefill) with the torch-free runtime (`runtime/model.py` prepares the
prompts, encodes the images, prefills and decodes `decode_steps` greedy tokens), and records, for the
activation input of every linear site (`passes/linear_sites.linear_sites`: decoder and vision), the maximum
|x| per input channel over every row (token / patch) it saw. Keys are `"graph/value name"`, as the pass
reads them (`qdq_int8.stats_key`).

How the activations are read: a temporary copy of each graph lists the site activations as extra graph
outputs (`tap_model`), saved next to a hard link of the artifact's weight store (ONNX Runtime refuses
external data outside the model's folder, and symlinks; a copy is the fallback across file systems).
The runtime loads that temporary artifact; its sessions are wrapped (`_TapSession`) so the runtime sees
exactly the original outputs while every run's extra outputs feed the running maxima. Greedy decoding
with one intra-op thread and a fixed case list: the statistics are deterministic.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from qvl.artifacts import manifest as mf
from qvl.artifacts.writer import link_weight_files, load_graphs, save_graphs_in_place, write_artifact
from qvl.passes.linear_sites import linear_sites
from qvl.passes.qdq_int8 import stats_key
from qvl.toolchain.quant.accuracy_budget import calibration_cases
from qvl.toolchain.staging import scratch_dir

DECODE_STEPS = 4  # decode-phase rows (one token each) next to the prefill rows, per case


@dataclass
class CalibrationStats:
    channel_max: dict[str, np.ndarray]  # "graph/value" -> float32 [K]
    cases: list[str] = field(default_factory=list)
    decode_steps: int = 0
    runs: dict[str, int] = field(default_factory=dict)  # graph -> session runs
    rows: dict[str, int] = field(default_factory=dict)  # graph -> activation rows seen by its first site
    seconds: float = 0.0

    def digest(self) -> str:
        h = hashlib.sha256()
        for k in sorted(self.channel_max):
            h.update(k.encode())
            h.update(np.ascontiguousarray(self.channel_max[k], np.float32).tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        sites: dict[str, int] = {}
        for k in self.channel_max:
            g = k.split("/", 1)[0]
            sites[g] = sites.get(g, 0) + 1
        return {"method": "per-input-channel max|x| (ONNX Runtime CPU, fp32 graphs)", "cases": list(self.cases),
                "decode_steps": self.decode_steps, "activation_sites": sites, "runs": dict(self.runs),
                "rows": dict(self.rows), "digest": self.digest(), "seconds": round(self.seconds, 2)}


def activation_sites(model, graph_name: str) -> dict[str, object]:
    """stats key -> activation Value for every linear site of the graph (convertible or not)."""
    out = {}
    for _, lin, _ in linear_sites(model, graph_name):
        if not isinstance(lin, str):
            out.setdefault(stats_key(graph_name, lin.activation), lin.activation)
    return out


def tap_model(model, graph_name: str) -> list[str]:
    """Append every site activation to the graph outputs (in place); returns their stats keys in output order."""
    sites = activation_sites(model, graph_name)
    present = {id(v) for v in model.graph.outputs}
    keys = []
    for key, value in sites.items():
        if id(value) in present or value.is_graph_input():
            continue
        model.graph.outputs.append(value)
        keys.append(key)
    return keys


class ChannelMax:
    """Running per-channel max|x| (last axis) per key."""

    def __init__(self):
        self.values: dict[str, np.ndarray] = {}
        self.rows: dict[str, int] = {}

    def update(self, key: str, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        flat = np.abs(x.reshape(-1, x.shape[-1]))
        if flat.shape[0] == 0:
            return
        m = flat.max(axis=0)
        old = self.values.get(key)
        self.values[key] = m if old is None else np.maximum(old, m)
        self.rows[key] = self.rows.get(key, 0) + flat.shape[0]


class _TapSession:
    """An ORT session over a tapped graph that answers like the original one (first `n_outputs` outputs)."""

    def __init__(self, session, n_outputs: int, keys: list[str], sink: ChannelMax):
        self.session, self.n_outputs, self.keys, self.sink = session, n_outputs, keys, sink
        self.runs = 0

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()[: self.n_outputs]

    def get_providers(self):
        return self.session.get_providers()

    def run(self, output_names, feeds, run_options=None):
        outs = self.session.run(None, feeds, run_options)
        self.runs += 1
        for key, value in zip(self.keys, outs[self.n_outputs:]):
            self.sink.update(key, value)
        return outs[: self.n_outputs]


def calibrate_model(model, graph_name: str, feeds: Iterable[dict], threads: int = 1) -> dict[str, np.ndarray]:
    """Per-channel max|x| of the site activations of an in-memory (small) model over `feeds`. The model is
    not modified (a serialized copy is tapped)."""
    import onnx_ir as ir
    import onnxruntime as ort

    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    n = len(copy.graph.outputs)
    keys = tap_model(copy, graph_name)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(ir.to_proto(copy).SerializeToString(), so, providers=["CPUExecutionProvider"])
    sink = ChannelMax()
    tap = _TapSession(sess, n, keys, sink)
    for f in feeds:
        tap.run(None, f)
    return dict(sink.values)


def calibrate_artifact(
    artifact: Path,
    cases: list | None = None,
    work_dir: Path | None = None,
    decode_steps: int = DECODE_STEPS,
    threads: int | None = 1,
    graphs: tuple[str, ...] = ("vision", "decoder"),
    progress: Callable[[str], None] | None = None,
) -> CalibrationStats:
    """Per-channel activation maxima of every linear site of an fp32 artifact / kit over the calibration cases."""
    from qvl.runtime.model import Model

    say = progress or (lambda m: None)
    t0 = time.perf_counter()
    artifact = Path(artifact)
    manifest = mf.read_manifest(artifact)
    sink = ChannelMax()
    # Next to the artifact, so the weight store can be hard-linked (same file system) rather than copied.
    with scratch_dir(".qvl-calib-", dir=artifact.parent) as tmp:
        tmp = Path(tmp)
        if cases is None:
            cases = calibration_cases(Path(work_dir) if work_dir is not None else tmp / "images")
        run_dir = tmp / "tapped"
        run_dir.mkdir()
        link_weight_files(manifest, run_dir)  # weights.bin, or each weight object of a format-2 artifact
        taps: dict[str, tuple[int, list[str]]] = {}
        models = load_graphs(manifest)
        for name, model in models.items():
            n = len(model.graph.outputs)
            taps[name] = (n, tap_model(model, name) if name in graphs else [])
        fields = manifest.derive()
        # initializers keep their `weights.bin` references (linked above); the taps are outputs too
        fields["graphs"] = save_graphs_in_place(models, run_dir, manifest.graph_files(), base=fields["graphs"])
        write_artifact(run_dir, fields, side_files_from=artifact)
        model = Model(run_dir, threads=threads)
        engine = model.engine
        engine.vision = _TapSession(engine.vision, *taps["vision"], sink)
        engine.decoder = _TapSession(engine.decoder, *taps["decoder"], sink)
        for name, messages, chunk in cases:
            say(f"calibrating on {name}")
            prompt = model.prepare(messages)
            for _ in model.generate_ids(prompt, decode_steps, prefill_chunk=chunk):
                pass
        runs = {"vision": engine.vision.runs, "decoder": engine.decoder.runs}
        rows = {g: sink.rows.get(taps[g][1][0], 0) if taps[g][1] else 0 for g in taps}
        del model, engine
    return CalibrationStats(channel_max=dict(sink.values), cases=[c[0] for c in cases], decode_steps=decode_steps,
                            runs=runs, rows=rows, seconds=time.perf_counter() - t0)


def save_stats(stats: CalibrationStats, path: Path) -> None:
    """The statistics as .npz (keys as given) + their summary as JSON next to it (for inspection / reuse)."""
    np.savez(path, **{k: v for k, v in stats.channel_max.items()})
    Path(str(path) + ".json").write_text(json.dumps(stats.summary(), indent=2))
