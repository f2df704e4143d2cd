"""`qvl-compile partition` and the partitioned runner (issue #15 item 1).

The contract: a partitioned artifact computes exactly what the unpartitioned one computes on the same device (every
compiled node is kept; only the graph is cut), for every cut, for fp32 and int4 artifacts and for each KV layout
the CPU runs; streamed parts hold memory only while they run; the parts are tamper-evident like every graph.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def cpu_source(tiny_cpu_artifact, tmp_path_factory):
    """A copy of the fp32 cpu artifact: partitioning hard-links its weights, and the session fixture stays as it is
    for the modules that test it (hard links are tested here)."""
    import shutil

    out = tmp_path_factory.mktemp("p-src") / "cpu"
    shutil.copytree(tiny_cpu_artifact, out)
    return out


@pytest.fixture(scope="module")
def parted(cpu_source, tmp_path_factory):
    """The fp32 cpu artifact cut after every layer, through the console script: (dir, stdout)."""
    out = tmp_path_factory.mktemp("p-every1") / "parted"
    proc = run_cli("partition", str(cpu_source), "--out", str(out), "--every", "1")
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_partition_cli_writes_parts_sharing_the_weights(cpu_source, parted):
    out, stdout = parted
    m = _manifest(out)
    layers = m["model"]["num_layers"]
    parts = m["partition"]["parts"]
    assert [p["name"] for p in parts] == [f"layer.{i}" for i in range(layers)] + ["head"]
    assert [p["layers"] for p in parts] == [[i, i + 1] for i in range(layers)] + [[layers, layers]]
    assert f"{layers + 1} parts" in stdout and "final norm + lm_head" in stdout
    for p in parts:
        assert (out / m["graphs"][p["graph"]]["file"]).is_file()
        assert p["weight_bytes"] > 0 and p["ranges"]
        # a part reads its own layer's cache only (the prologue's length comes from its first layer's past)
        pasts = {n for n in p["inputs"] if n.startswith("past_")}
        assert pasts == ({f"past_key_{p['layers'][0]}", f"past_value_{p['layers'][0]}"} if p["kind"] == "layers" else set())
    from qvl.artifacts.manifest import read_manifest

    for rel in read_manifest(cpu_source).weights.files:
        assert os.stat(out / rel).st_ino == os.stat(cpu_source / rel).st_ino  # hard-linked, not copied
    verify = run_cli("verify", str(out))
    assert verify.returncode == 0, verify.stderr
    assert m["steps"][-1]["name"] == "partition"


def _steps_equal(whole, parts, seed=0):
    """Logits of a prefill and decode steps on random inputs: the largest difference, and the argmaxes."""
    rng = np.random.default_rng(seed)
    ca, cb = whole.new_cache(64), parts.new_cache(64)
    worst = 0.0
    for seq in (7, 1, 1, 4, 1):
        x = rng.standard_normal((1, seq, whole.hidden_size)).astype(np.float32) * 0.1
        pos = np.broadcast_to(np.arange(ca.length, ca.length + seq)[None, None], (3, 1, seq)).copy()
        ds = rng.standard_normal((whole.num_deepstack, 1, seq, whole.hidden_size)).astype(np.float32) * 0.1
        la, lb = whole.step(ca, x, pos, ds), parts.step(cb, x, pos, ds)
        worst = max(worst, float(np.abs(la - lb).max()))
    return worst, ca.length, cb.length


@pytest.mark.parametrize("which, cut", [("fp32", ("--every", "2")), ("int4", ("--every", "1")),
                                        ("int4", ("--at", "1,3")), ("export", ("--every", "1"))])
def test_partitioned_logits_equal_the_whole_decoder_bit_for_bit(which, cut, cpu_source, tiny_cpu_int4, tiny_artifact,
                                                                tmp_path):
    """fp32 / int4: the cpu target (`shared` GQA cache); export: the plain export (`concat` cache)."""
    import shutil

    from qvl.runtime.backends.ort import Engine
    from qvl.runtime.backends.partitioned import PartitionedEngine

    src = {"fp32": cpu_source, "int4": tiny_cpu_int4}.get(which)  # tiny_cpu_int4: used by this module only
    if src is None:  # a copy: the session fixture stays single-linked for the modules that load it with onnx_ir
        src = tmp_path / "export"
        shutil.copytree(tiny_artifact, src)
    out = tmp_path / "p"
    proc = run_cli("partition", str(src), "--out", str(out), *cut)
    assert proc.returncode == 0, proc.stderr
    whole = Engine(src, threads=1)
    for join in (True, False):  # every part kept on the CPU: one joined session, or one session per part
        parts = PartitionedEngine(out, threads=1, join=join)
        assert parts.kv_mode == {"export": "concat"}.get(which, "shared")
        assert len(parts.parts) == (1 if join else len(parts.manifest.partition.parts))
        worst, la, lb = _steps_equal(whole, parts)
        assert worst == 0.0 and la == lb == 14, join


def test_scatter_layout_parts_equal_on_the_cpu(sm61_cuda_int4, tmp_path):
    """The cuda-sm61 artifact (TensorScatter in-place cache, the form a CPU+GPU split runs) partitions and its
    parts run on ORT's CPU provider with the whole decoder's result (an index crossing a boundary keeps int64)."""
    from qvl.runtime.backends.ort import Engine
    from qvl.runtime.backends.partitioned import PartitionedEngine

    import shutil

    src = tmp_path / "sm61"
    shutil.copytree(sm61_cuda_int4, src)  # the session fixture keeps its single-linked weights
    part = tmp_path / "sm61p"
    assert run_cli("partition", str(src), "--out", str(part), "--every", "2").returncode == 0
    whole = Engine(src, threads=1)
    for join in (False, True):
        engine = PartitionedEngine(part, threads=1, join=join)
        assert engine.kv_mode == "scatter"
        worst, _, _ = _steps_equal(whole, engine)
        assert worst == 0.0, join


def test_parts_with_one_placement_run_joined_in_one_session(parted, tiny_cpu_artifact):
    """Consecutive parts with one kept placement share a session (the per-run cost is paid once per group): a
    streamed part splits the run; the joined graph's outputs are only what leaves the group; logits stay exact."""
    from qvl.runtime.backends.ort import Engine
    from qvl.runtime.backends.partitioned import PartitionedEngine, PartPlacement
    from qvl.runtime.part_merge import part_groups

    out, _ = parted
    names = [p["name"] for p in _manifest(out)["partition"]["parts"]]
    whole = Engine(tiny_cpu_artifact, threads=1)
    stream = PartPlacement("cpu", "stream")
    for placement, want in (({}, [names]),
                            ({names[1]: stream}, [names[:1], names[1:2], names[2:]]),
                            ({names[0]: stream, names[-1]: stream}, [names[:1], names[1:-1], names[-1:]])):
        engine = PartitionedEngine(out, placement, threads=1)
        report = engine.residency_report()
        assert [r["part"] for r in report] == names
        groups = [[r["part"] for r in report if r["group"] == g] for g in dict.fromkeys(r["group"] for r in report)]
        assert groups == want, placement
        # every part in one kept session: the artifact's own decoder graph, stepped like the unpartitioned runner
        assert (engine.caches is not None) == (len(want) == 1) and (engine.decoder is not None) == (len(want) == 1)
        for p in engine.parts:
            if len(p.members) > 1:  # a hidden state passed between members is internal, the KV and logits leave
                internal = {o for m in p.members[:-1] for o in m.outputs if not o.startswith("present_")}
                read_later = {i for s in engine.manifest.partition.parts if s not in p.members for i in s.inputs}
                assert not (set(p.outputs) & (internal - read_later))
                assert {o for m in p.members for o in m.outputs if o.startswith("present_")} <= set(p.outputs)
        worst, la, lb = _steps_equal(whole, engine)
        assert worst == 0.0 and la == lb, placement
    # the rules, on placements alone: a different device, a streamed part or a prefill elsewhere split a run;
    # the group's VRAM cap is its parts' caps added up
    cuda = PartPlacement("cuda", "vram", vram_limit=10)
    assert part_groups([cuda, cuda, PartPlacement(), PartPlacement(), stream, stream, PartPlacement()]) == \
        [[0, 1], [2, 3], [4], [5], [6]]
    borrowed = PartPlacement("cpu", "ram", prefill_device="cuda", vram_limit=5)
    assert part_groups([PartPlacement(), borrowed, borrowed, PartPlacement("cpu", "ram", prefill_device="cpu")]) == \
        [[0], [1], [2], [3]]
    from qvl.runtime.backends.partitioned import _group_placement

    assert _group_placement([cuda, cuda]) == PartPlacement("cuda", "vram", vram_limit=20)
    assert _group_placement([cuda, PartPlacement("cuda", "vram")]).vram_limit is None


def test_overlapped_streaming_makes_the_next_part_while_one_computes(parted, tiny_cpu_artifact):
    """`overlap=True`: the next streamed part's session is made on a background thread while the current part runs;
    logits stay exact, at most two streamed sessions are alive at once (the plan's two slots), none after a step."""
    from qvl.runtime.backends.ort import Engine
    from qvl.runtime.backends.partitioned import PartitionedEngine, PartPlacement

    out, _ = parted
    names = [p["name"] for p in _manifest(out)["partition"]["parts"]]
    streamed = {n: PartPlacement("cpu", "stream") for n in names[1:3] + names[-1:]}
    whole = Engine(tiny_cpu_artifact, threads=1)
    for overlap, most in ((False, 1), (True, 2)):
        engine = PartitionedEngine(out, streamed, threads=1, overlap=overlap)
        worst, la, lb = _steps_equal(whole, engine)
        assert worst == 0.0 and la == lb
        assert engine.max_live_per_use == most and engine.live_per_use == 0, overlap
        assert (engine.overlapped > 0) is overlap
        assert all(r["loaded"] == [] for r in engine.residency_report() if r["part"] in streamed)
        assert {r["part"]: r["loads"] for r in engine.residency_report() if r["part"] in streamed} == \
            {n: 5 for n in streamed}  # one session per step per streamed part, overlapped or not


def test_streamed_parts_answer_the_same_and_are_released(parted, tiny_cpu_artifact, tmp_path):
    from PIL import Image

    from qvl.runtime import Model
    from qvl.runtime.backends.ort import Engine
    from qvl.runtime.backends.partitioned import PartitionedEngine, PartPlacement

    out, _ = parted
    img = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(1).random((64, 80, 3)) * 255).astype("uint8")).save(img)
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(img)}, {"type": "text", "text": "what is it?"}]}]
    streamed = {"layer.2": PartPlacement("cpu", "stream"), "head": PartPlacement("cpu", "stream")}
    engine = PartitionedEngine(out, streamed, threads=1, vision_placement=PartPlacement("cpu", "stream"))
    whole = Model(Engine(tiny_cpu_artifact, threads=1)).generate(msgs, max_new_tokens=12, temperature=0)
    model = Model(engine)
    assert model.generate(msgs, max_new_tokens=12, temperature=0) == whole
    report = {r["part"]: r for r in engine.residency_report()}
    assert report["head"]["loaded"] == [] and report["layer.2"]["loaded"] == []
    assert report["head"]["loads"] >= 12 and report["layer.0"]["loads"] == 1 and report["layer.0"]["loaded"] == ["cpu"]
    # a streamed session is really gone after its step (nothing keeps its weights alive)
    part = engine.parts[-1]
    sess = part.open()
    ref = weakref.ref(sess)
    del sess
    part.close("cpu")
    assert ref() is None
    # follow-up turn through the prefix cache (truncate) equals a fresh run
    session = model.session()
    first = session.generate(msgs, max_new_tokens=6, temperature=0)
    follow = msgs + [{"role": "assistant", "content": first}, {"role": "user", "content": "and then?"}]
    assert session.generate(follow, max_new_tokens=6, temperature=0) == \
        Model(Engine(tiny_cpu_artifact, threads=1)).generate(follow, max_new_tokens=6, temperature=0)


_RSS_PROBE = r"""
import gc, json, sys, numpy as np
from qvl.runtime.backends.partitioned import PartitionedEngine, PartPlacement
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
residency = sys.argv[2]
e = PartitionedEngine(sys.argv[1], {"head": PartPlacement("cpu", residency)}, threads=1)
c = e.new_cache(16)
for _ in range(3):
    e.step(c, np.zeros((1, 1, e.hidden_size), np.float32), np.zeros((3, 1, 1), np.int64))
gc.collect()
print(json.dumps({"rss": rss(), "head": e.manifest.partition.parts[-1].weight_bytes}))
"""


def test_a_streamed_part_does_not_stay_in_rss(parted):
    """The fp32 tiny head (lm_head, ~39 MB) kept vs streamed: after the steps a kept head's copy sits in ORT's heap,
    a streamed one's is back with the OS (arena off, session dropped): RSS differs by about the head's bytes."""
    out, _ = parted
    rss = {}
    for residency in ("ram", "stream"):
        proc = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(out), residency], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        rss[residency] = json.loads(proc.stdout)
    head = rss["ram"]["head"]
    assert head > 30e6
    assert rss["ram"]["rss"] - rss["stream"]["rss"] > 0.8 * head, rss


def test_tampered_part_graph_is_refused(parted, tmp_path):
    import shutil

    out, _ = parted
    copy = tmp_path / "tampered"
    shutil.copytree(out, copy)
    graph = copy / "decoder.part1.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    proc = run_cli("verify", str(copy))
    assert proc.returncode == 2 and "decoder.part1.onnx" in proc.stderr, proc.stderr
    proc = run_cli("run", str(copy), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu", "--ram-budget", "4GiB")
    assert_one_line_error(proc, "decoder.part1.onnx")


def test_partition_refuses_bad_input(tiny_cpu_artifact, parted, tmp_path):
    out, _ = parted
    cases = [
        (("--at", "0,9"), "cut points must lie in 1..3"),
        (("--at", "x"), "is not a comma-separated list"),
        (("--every", "0"), "--every must be at least 1"),
        ((), "give exactly one of --every N and --at"),
        (("--every", "1", "--at", "2"), "give exactly one of --every N and --at"),
    ]
    for flags, needle in cases:
        proc = run_cli("partition", str(tiny_cpu_artifact), "--out", str(tmp_path / "x"), *flags)
        assert_one_line_error(proc, needle)
        assert not (tmp_path / "x").exists()
    proc = run_cli("partition", str(out), "--out", str(tmp_path / "y"), "--every", "1")
    assert_one_line_error(proc, "already partitioned")
    proc = run_cli("partition", str(tiny_cpu_artifact), "--out", str(out), "--every", "2")
    assert_one_line_error(proc, "already exists")
    assert _manifest(out)["partition"]["parts"][0]["layers"] == [0, 1]  # the existing output is untouched


def test_a_budget_needs_a_partitioned_artifact(tiny_cpu_artifact):
    proc = run_cli("run", str(tiny_cpu_artifact), "--prompt", "hi", "--ram-budget", "1GiB", "--device", "cpu")
    assert_one_line_error(proc, "need a partitioned artifact", "qvl-compile partition")
    proc = run_cli("run", str(tiny_cpu_artifact), "--prompt", "hi", "--ram-budget", "lots")
    assert_one_line_error(proc, "--ram-budget")


def test_manifest_partition_section_is_validated(parted, tmp_path):
    import shutil

    out, _ = parted
    for mutate, needle in (
        (lambda p: p["parts"].pop(1), "does not continue the parts before it"),
        (lambda p: p["parts"][0].update(graph="decoder"), "does not name a part graph"),
        (lambda p: p["parts"][0]["ranges"].append(["weights.bin", 0, 1 << 40]), "a run outside the weight files"),
        (lambda p: p.update(version=9), "partition.version 9 is not supported"),
    ):
        copy = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        shutil.copytree(out, copy)
        m = _manifest(copy)
        mutate(m["partition"])
        (copy / "manifest.json").write_text(json.dumps(m))
        proc = run_cli("verify", str(copy))
        assert_one_line_error(proc, needle)


def test_run_under_a_ram_budget_answers_like_the_whole_artifact(parted, tiny_cpu_artifact, tmp_path):
    """The console script end to end: `run --ram-budget` on the partitioned artifact (a budget that makes the planner
    stream) gives the whole artifact's greedy answer, with an image, and says what it placed where."""
    from PIL import Image

    out, _ = parted
    img = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(2).random((48, 64, 3)) * 255).astype("uint8")).save(img)
    plan = run_cli("plan", str(out), "--device", "cpu", "--context", "256", "--json")
    assert plan.returncode == 0, plan.stderr
    free = json.loads(plan.stdout)
    budget = free["ram_bytes"] - free["vision"]["weight_bytes"] // 2  # everything resident does not fit
    args = ("--image", str(img), "--prompt", "what is it?", "--greedy", "--json", "--max-new-tokens", "8",
            "--device", "cpu")
    whole = run_cli("run", str(tiny_cpu_artifact), *args)
    assert whole.returncode == 0, whole.stderr
    budgeted = run_cli("run", str(out), *args, "--ram-budget", str(budget), "--context", "256")
    assert budgeted.returncode == 0, budgeted.stderr
    assert json.loads(budgeted.stdout)["text"] == json.loads(whole.stdout)["text"]
    notes = [l for l in budgeted.stderr.splitlines() if l.startswith("note: placement:")]
    assert len(notes) == 1 and "vision stream on cpu" in notes[0], budgeted.stderr
    # a prompt longer than the planned context is refused with the numbers, nothing generated
    long = run_cli("run", str(out), "--prompt", "hi", "--max-new-tokens", "300", "--device", "cpu",
                   "--ram-budget", str(budget), "--context", "64")
    assert_one_line_error(long, "the memory plan holds 64", "--context")
