"""`qvl-compile plan` and `runtime/placement.py` (issue #15 item 2): where each part of a partitioned artifact runs
under a RAM / VRAM budget, and why.

The decision rules are checked on the API with stated speeds (deterministic); the RAM rule against an exhaustive
search over every streamed set, built from the manifest's own byte counts. The command is checked through the
console script: tables, JSON, errors, and which numbers are measured or stated.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest

from conftest import assert_one_line_error, run_cli
from qvl.artifacts.manifest import read_manifest
from qvl.errors import QvlError
from qvl.runtime import placement as pl
from qvl.runtime.backends.partitioned import PartPlacement


def _partitioned(source, root, **cut):
    """A copy of `source` partitioned into `root/parted`: partition hard-links the weight files, and the shared
    session fixtures stay single-linked for the modules that test them as they are."""
    import shutil

    from qvl.toolchain.compile.partition import partition_artifact

    shutil.copytree(source, root / "source")
    partition_artifact(root / "source", root / "parted", **cut)
    return root / "parted"


@pytest.fixture(scope="module")
def parted(tiny_cpu_artifact, tmp_path_factory):
    """The cpu-target artifact (`shared` KV layout) cut after every layer."""
    return _partitioned(tiny_cpu_artifact, tmp_path_factory.mktemp("plan-every1"), every=1)


@pytest.fixture(scope="module")
def parted_uneven(tiny_cpu_artifact, tmp_path_factory):
    """Parts of different sizes: layer 0, layers 1-2, layer 3, head."""
    return _partitioned(tiny_cpu_artifact, tmp_path_factory.mktemp("plan-at"), at="1,3")


@pytest.fixture(scope="module")
def parted_concat(tiny_artifact, tmp_path_factory):
    """The plain fp32 export (`concat` KV layout, which ORT's CUDA provider runs) cut after every layer."""
    return _partitioned(tiny_artifact, tmp_path_factory.mktemp("plan-concat"), every=1)


@pytest.fixture(scope="module")
def parted_scatter(sm61_cuda_artifact, tmp_path_factory):
    """The tiny export compiled for cuda-sm61 (the Pascal target: `scatter` KV layout), cut per layer."""
    return _partitioned(sm61_cuda_artifact, tmp_path_factory.mktemp("plan-sm61"), every=1)


def _manifest(path):
    return read_manifest(path, verify_graphs=False)


def _plan(path, **kw):
    m = _manifest(path)
    kw.setdefault("speeds", pl.stated_speeds(m))
    return pl.make_plan(m, **{"ram_budget": None, "vram_budget": None, "device": "cpu", **kw})


def _plan_json(*args):
    proc = run_cli("plan", *map(str, args), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _base(plan) -> int:
    """The RAM every placement pays: everything but weights (vision, resident parts, the stream slot)."""
    f = plan.fixed
    return f["process"] + f["tokenizer"] + f["embedding_rows"] + f["kv"] + f["cuda_runtime"]


def _best_streamed(weights, vision, budget, base):
    """Exhaustive search of rule 3: the vision encoder streams whenever everything resident does not fit (exclusive
    when it does not fit beside the resident parts either); then the most resident weight bytes, the fewest
    streamed parts, the latest ones streamed. Returns (streamed indexes, vision streams, exclusive, peak)."""
    vision_streams = base + vision + sum(weights) > budget
    room = budget - base - (0 if vision_streams else vision)
    best = None
    for k in range(len(weights) + 1):
        for s in itertools.combinations(range(len(weights)), k):
            resident = sum(w for i, w in enumerate(weights) if i not in s)
            slot = max([weights[i] for i in s] + [0])
            if resident + slot > room:
                continue
            key = (resident, -k, tuple(sorted(s, reverse=True)))
            if best is None or key > best[0]:
                best = (key, list(s), resident, slot)
    if best is None or base + vision > budget:
        return None
    _, s, resident, slot = best
    exclusive = vision_streams and base + resident + vision > budget
    slot = max(slot, vision if vision_streams and not exclusive else 0)
    peak = base + resident + slot + (0 if vision_streams else vision)
    return s, vision_streams, exclusive, max(peak, base + vision if exclusive else 0)


def test_no_budget_keeps_every_part_resident_on_the_cpu(parted):
    data = _plan_json(parted, "--no-measure")
    m = _manifest(parted)
    assert [p["name"] for p in data["parts"]] == [p.name for p in m.partition.parts]
    assert {(p["placement"]["device"], p["placement"]["residency"], p["placement"]["prefill_device"])
            for p in data["parts"]} == {("cpu", "ram", None)}
    assert data["vision"]["placement"]["device"] == "cpu" and data["vision"]["placement"]["residency"] == "ram"
    assert data["device"] == "cpu" and data["ram_budget"] is None and data["image"] is False
    assert any("no CUDA provider" in n for n in data["notes"])  # auto on this CPU-only onnxruntime
    weights = sum(p.weight_bytes for p in m.partition.parts) + m.partition.vision_weight_bytes
    fixed = data["fixed"]
    assert data["ram_bytes"] == weights + fixed["process"] + fixed["tokenizer"] + fixed["embedding_rows"] + fixed["kv"]
    mi = m.model  # the KV cache at the default context (the model's 2048 < 4096), per part for its layers
    per_layer = 2 * mi.num_kv_heads * mi.head_dim * 4 * mi.context_length
    assert [p["kv_bytes"] for p in data["parts"]] == [p.layer_count * per_layer for p in m.partition.parts]
    assert data["context"] == mi.context_length and fixed["kv"] == mi.num_layers * per_layer


@pytest.mark.parametrize("fixture", ["parted", "parted_uneven"])
@pytest.mark.parametrize("short", ["one layer", "three layers", "all layers", "vision too", "exact minimum"])
def test_ram_budget_streams_the_set_the_rule_says(fixture, short, request):
    path = request.getfixturevalue(fixture)
    m = _manifest(path)
    weights = [p.weight_bytes for p in m.partition.parts]
    vision = m.partition.vision_weight_bytes
    free = _plan(path)
    base = _base(free)
    layer = min(weights)
    layers = sum(w for p, w in zip(m.partition.parts, weights) if p.kind == "layers")
    deficit = {"one layer": layer // 2, "three layers": layer * 5 // 2, "all layers": layers - layer // 2,
               "vision too": layers + vision // 2}
    if short == "exact minimum":
        budget = base + max(weights + [vision])
    else:
        budget = free.ram_bytes - deficit[short]
    plan = _plan(path, ram_budget=budget)
    want, vision_streams, exclusive, peak = _best_streamed(weights, vision, budget, base)
    got = [i for i, d in enumerate(plan.parts) if d.placement.residency == "stream"]
    assert got == sorted(want), (short, [(d.name, d.weight_bytes) for d in plan.parts])
    assert (plan.vision.placement.residency == "stream") is vision_streams
    assert plan.vision.placement.exclusive is exclusive
    assert plan.ram_bytes == peak <= budget
    assert all(d.placement.device == "cpu" for d in plan.parts)
    for i in want:
        assert plan.parts[i].reason.startswith("streamed")


def test_ram_budget_through_the_console_script_matches_the_api(parted):
    free = _plan(parted)
    budget = free.ram_bytes - free.vision.weight_bytes - min(d.weight_bytes for d in free.parts) * 3 // 2
    data = _plan_json(parted, "--ram", budget, "--no-measure", "--device", "cpu")
    placement, vision = pl.placements_from_json(data)
    api = _plan(parted, ram_budget=budget)
    assert placement == api.placement() and vision == api.vision_placement()
    assert vision.residency == "stream" and any(p.residency == "stream" for p in placement.values())
    assert data["ram_bytes"] == api.ram_bytes <= budget


def test_budget_below_the_minimum_is_one_error_with_the_number(parted):
    m = _manifest(parted)
    free = _plan(parted)
    minimum = _base(free) + max([p.weight_bytes for p in m.partition.parts] + [m.partition.vision_weight_bytes])
    proc = run_cli("plan", str(parted), "--ram", str(minimum - 1), "--no-measure")
    assert_one_line_error(proc, f"{minimum / 1e6:.1f} MB", "every part streamed", "--ram",
                          f"at least {-(-minimum // 2**20)}MiB")
    with pytest.raises(QvlError, match="--ram-budget"):
        _plan(parted, ram_budget=minimum - 1, ram_flag="--ram-budget")
    everything = _plan(parted, ram_budget=minimum)  # at the minimum: every part and the vision encoder stream
    assert {d.placement.residency for d in (*everything.parts, everything.vision)} == {"stream"}


def test_device_cuda_without_the_cuda_provider_is_one_error(parted):
    assert_one_line_error(run_cli("plan", str(parted), "--device", "cuda"), "onnxruntime-gpu")


def test_gpu_takes_the_prefix_of_parts_that_fits(parted_concat):
    m = _manifest(parted_concat)
    # stated speeds of a card whose session steps and crossings cost nothing: at tiny size they would otherwise
    # cost more than the GPU saves, and the planner would rightly keep every part on the CPU
    stated = replace(pl.stated_speeds(m), gpu_step=pl.Speed(0.0, "s", "stated", "no launch overhead"),
                     crossing=pl.Speed(0.0, "s", "stated", "no crossing latency"))
    probe = _plan(parted_concat, device="cuda", gpu_memory=64 << 30, speeds=stated)
    n = len(probe.parts)
    # the resident prefix runs as one session: its weights + KV, and one workspace (fp32 parts: no dequant scratch)
    need = lambda k: sum(d.weight_bytes + d.kv_bytes for d in probe.parts[:k]) + (pl.WORKSPACE_BYTES if k else 0)  # noqa: E731
    for fit in (0, 1, 2, n):
        room = pl.CUDA_CONTEXT_BYTES + need(fit) + (need(fit + 1) - need(fit) - 1 if fit < n else 0)
        for kw in ({"gpu_memory": room}, {"gpu_memory": 64 << 30, "vram_budget": room}):
            plan = _plan(parted_concat, device="cuda", speeds=stated, **kw)
            devices = [(d.placement.device, d.placement.residency) for d in plan.parts]
            assert devices == [("cuda", "vram")] * fit + [("cpu", "ram")] * (n - fit), (fit, kw)
            # the group's session cap (its parts' caps added up): its weights + one workspace, + what the plan
            # leaves over (on the first part); all caps + KV + the CUDA context stay within the budget
            limits = [d.placement.vram_limit for d in plan.parts[:fit]]
            assert limits[1:] == [d.weight_bytes for d in plan.parts[1:fit]]
            if fit:
                assert limits[0] >= plan.parts[0].weight_bytes + pl.WORKSPACE_BYTES
                assert pl.CUDA_CONTEXT_BYTES + sum(limits) + sum(d.kv_bytes for d in plan.parts[:fit]) <= room
            if fit < n:
                assert plan.parts[fit].reason.startswith("resident in RAM") and "VRAM full" in plan.parts[fit].reason
            assert plan.vram_bytes <= room
    everything = _plan(parted_concat, device="cuda", gpu_memory=64 << 30, speeds=stated)
    assert all(d.placement.device == "cuda" for d in everything.parts)
    assert everything.vision.placement == PartPlacement("cuda", "vram", vram_limit=m.partition.vision_weight_bytes
                                                         + pl.VISION_WORKSPACE_BYTES)
    assert everything.fixed["kv"] == 0 and everything.fixed["cuda_runtime"] == pl.CUDA_HOST_BYTES
    with pytest.raises(QvlError, match="--vram"):  # no NVML here, no budget: the plan asks for one
        _plan(parted_concat, device="cuda", speeds=stated)


def test_gpu_prefix_is_chosen_by_its_whole_step_one_session_step_per_device(parted_concat):
    """Joined parts pay the GPU's session step once: with a step cost larger than one part's saving but smaller
    than all parts' together, every part goes to the GPU when all fit and none when only one does (the old
    part-by-part rule put none there in both cases)."""
    from qvl.artifacts.manifest import read_manifest

    m = _manifest(parted_concat)
    free = replace(pl.stated_speeds(m), crossing=pl.Speed(0.0, "s", "stated", "none"),
                   cpu_step=pl.Speed(0.0, "s", "stated", "none"))
    costs = pl._Costs(read_manifest(parted_concat), free, 256)
    saving = [costs.decode_s(i, "cpu") - costs.decode_s(i, "cuda") for i in range(len(costs.parts))]
    assert min(saving) > 0
    step = 0.5 * sum(saving)
    assert saving[0] < step  # all parts together beat one step; the first part alone does not
    speeds = replace(free, gpu_step=pl.Speed(step, "s", "stated", "test"))
    everything = _plan(parted_concat, device="cuda", gpu_memory=64 << 30, speeds=speeds)
    assert [d.placement.device for d in everything.parts] == ["cuda"] * len(saving)
    assert everything.parts[0].decode_s == pytest.approx(costs.decode_s(0, "cuda") + step)  # the group's one step
    assert all(d.decode_s == pytest.approx(costs.decode_s(i, "cuda")) for i, d in enumerate(everything.parts) if i)
    assert everything.predicted["decode_tok_s"] == pytest.approx(
        1 / (sum(costs.decode_s(i, "cuda") for i in range(len(saving))) + step + costs.crossings_s(["cuda"] * len(saving), 1)))
    kv = [d.kv_bytes for d in everything.parts]
    one = _plan(parted_concat, device="cuda", gpu_memory=pl.CUDA_CONTEXT_BYTES + costs.prefix_vram(2, kv) - 1,
                speeds=speeds)
    assert [d.placement.device for d in one.parts] == ["cpu"] * len(saving)
    assert "fits VRAM, but the GPU prefix of 0 parts is the fastest" in one.parts[0].reason
    assert "VRAM full" in one.parts[1].reason


def test_prefill_moves_to_the_gpu_when_it_beats_the_cpu(parted_concat):
    m = _manifest(parted_concat)
    stated = pl.stated_speeds(m)
    # a machine whose GPU decodes slower than its CPU (no part stays in VRAM) but prefills much faster
    slow = replace(stated, gpu_decode=pl.Speed(1e6, "B/s", "stated", "slow card"),
                   cpu_prefill=pl.Speed(1e6, "B*pos/s", "stated", "slow cpu"))
    plan = _plan(parted_concat, device="cuda", gpu_memory=64 << 30, speeds=slow)
    for d in plan.parts:
        assert d.placement.device == "cpu" and d.placement.residency == "ram"
        if d.kind == "layers":
            assert d.placement.prefill_device == "cuda"
            assert d.placement.vram_limit == d.weight_bytes + pl.WORKSPACE_BYTES
            assert "prefill on cuda" in d.reason
        else:  # the head prefills one position: copying its weights never pays
            assert d.placement.prefill_device is None
    assert plan.phases["prefill"]["devices"]["layer.0"] == "cuda"
    assert plan.phases["decode"]["devices"]["layer.0"] == "cpu/ram"
    short = _plan(parted_concat, device="cuda", gpu_memory=64 << 30, speeds=slow, prompt_tokens=8)
    assert all(d.placement.prefill_device is None for d in short.parts)  # below the engine's prefill_min_tokens


def test_scatter_probe_is_the_onnx_model_it_says():
    """The runtime's serialized TensorScatter probe (no onnx dependency at run time) is the model onnx builds."""
    import base64

    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    g = helper.make_graph([helper.make_node("TensorScatter", ["past", "new", "at"], ["out"], axis=2)], "probe",
                          [helper.make_tensor_value_info("past", f, [1, 1, 2, 1]),
                           helper.make_tensor_value_info("new", f, [1, 1, 1, 1]),
                           helper.make_tensor_value_info("at", TensorProto.INT64, [1])],
                          [helper.make_tensor_value_info("out", f, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 24)], ir_version=10)
    assert base64.b64decode(pl._SCATTER_PROBE) == model.SerializeToString()


def test_scatter_artifact_splits_between_cuda_and_the_cpu(parted_scatter):
    """This onnxruntime's CPU provider runs TensorScatter: a cuda-sm61 artifact's parts split like any other's."""
    m = _manifest(parted_scatter)
    assert pl.cpu_runs_scatter()
    cpu = _plan(parted_scatter, device="cpu", speeds=pl.stated_speeds(m))
    assert all(d.placement == PartPlacement("cpu", "ram") for d in cpu.parts)
    free = replace(pl.stated_speeds(m), gpu_step=pl.Speed(0.0, "s", "stated", "no launch cost"),
                   crossing=pl.Speed(0.0, "s", "stated", "no crossing latency"))
    big = _plan(parted_scatter, device="cuda", gpu_memory=64 << 30, speeds=free)
    assert all(d.placement.device == "cuda" and d.placement.residency == "vram" for d in big.parts)
    from qvl.artifacts.manifest import read_manifest

    costs = pl._Costs(read_manifest(parted_scatter), free, 256)
    kv = [d.kv_bytes for d in big.parts]
    room = pl.CUDA_CONTEXT_BYTES + (costs.prefix_vram(2, kv) + costs.prefix_vram(3, kv)) // 2
    small = _plan(parted_scatter, device="cuda", gpu_memory=room, speeds=free)
    assert [d.placement.device for d in small.parts] == ["cuda", "cuda"] + ["cpu"] * (len(kv) - 2)
    assert small.vram_bytes == pl.CUDA_CONTEXT_BYTES + costs.prefix_vram(2, kv) <= room


def test_scatter_artifact_on_a_cpu_provider_without_tensorscatter_stays_on_cuda(parted_scatter, monkeypatch):
    """An onnxruntime older than TensorScatter's CPU kernel (the probe's answer set to False here: this one has it)."""
    monkeypatch.setattr(pl, "_CPU_SCATTER", False)
    m = _manifest(parted_scatter)
    assert m.kv_mode == "scatter"
    stated = pl.stated_speeds(m)
    big = _plan(parted_scatter, device="cuda", gpu_memory=64 << 30, speeds=stated)
    cost = [d.weight_bytes + pl.WORKSPACE_BYTES for d in big.parts]
    base = pl.CUDA_CONTEXT_BYTES + sum(d.kv_bytes for d in big.parts)
    # all resident: one joined session, the VRAM left over added to its cap (on the first part)
    assert all(d.placement == PartPlacement("cuda", "vram", vram_limit=c) for d, c in zip(big.parts[1:], cost[1:]))
    assert big.parts[0].placement.vram_limit >= cost[0]
    for room in (base + max(cost), base + sum(cost) - min(cost) // 2, base + sorted(cost)[-1] + 2 * sorted(cost)[0]):
        plan = _plan(parted_scatter, device="cuda", gpu_memory=room, speeds=stated)
        want, _, _, peak = _best_streamed(cost, 0, room, base)
        assert [i for i, d in enumerate(plan.parts) if d.placement.residency == "stream"] == sorted(want)
        assert {d.placement.device for d in plan.parts} == {"cuda"} and plan.vram_bytes == peak <= room
    with pytest.raises(QvlError, match=f"{(base + max(cost)) / 1e6:.1f} MB"):
        _plan(parted_scatter, device="cuda", gpu_memory=base + max(cost) - 1, speeds=stated)
    with pytest.raises(QvlError, match="does not run its parts on the CPU"):
        _plan(parted_scatter, device="cpu", speeds=stated)


def test_shared_kv_artifact_stays_on_the_cpu_with_a_note(parted):
    plan = _plan(parted, device="cuda", gpu_memory=64 << 30)
    assert all(d.placement == PartPlacement("cpu", "ram") for d in (*plan.parts, plan.vision))
    assert plan.device == "cpu" and any("GroupQueryAttention" in n for n in plan.notes)


def test_json_round_trips_and_every_speed_says_its_source(parted):
    stated = _plan_json(parted, "--no-measure", "--ram", _plan(parted).ram_bytes - 1)
    assert {s["source"] for s in stated["speeds"].values()} == {"stated"}
    measured = _plan_json(parted, "--prompt-tokens", "64", "--context", "512", "--threads", "1")
    sources = {name: s["source"] for name, s in measured["speeds"].items()}
    for name in ("cpu_decode", "cpu_head", "cpu_prefill", "cpu_session", "process"):
        assert sources[name] == "measured", (name, measured["speeds"][name])
    assert sources["disk"] == "stated" and all(sources[n] == "stated" for n in sources if n.startswith("gpu"))
    assert measured["context"] == 512 and measured["prompt_tokens"] == 64
    assert measured["predicted"]["ttft_s"] > 0 and measured["predicted"]["decode_tok_s"] > 0
    placement, vision = pl.placements_from_json(measured)
    assert set(placement) == {p["name"] for p in measured["parts"]}
    assert all(isinstance(p, PartPlacement) for p in [*placement.values(), vision])


def test_human_table_names_every_part_and_the_sources(parted):
    proc = run_cli("plan", str(parted), "--no-measure", "--ram", str(_plan(parted).ram_bytes - 1))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0].split()[:6] == ["part", "layers", "weight", "MB", "KV", "MB"]
    for d in _plan(parted).parts:
        assert any(line.startswith(d.name + " ") for line in out)
    assert any(line.startswith("predicted: time to first token") and "no image" in line for line in out)
    assert "cpu/stream" in proc.stdout and "(stated" in proc.stdout and "(measured" not in proc.stdout


def test_unpartitioned_artifact_is_one_error_with_the_partition_hint(tiny_cpu_artifact):
    assert_one_line_error(run_cli("plan", str(tiny_cpu_artifact)), "not partitioned", "qvl-compile partition",
                          "--every 1")


@pytest.mark.parametrize("text,value", [("2GiB", 2 << 30), ("512MiB", 512 << 20), ("8GB", 8 * 10**9),
                                        ("1.5G", 3 << 29), ("1000000", 10**6), ("64k", 64 << 10), ("3 MB", 3 * 10**6)])
def test_parse_size_reads_units(text, value):
    assert pl.parse_size(text, "--ram") == value


@pytest.mark.parametrize("text", ["", "0", "0.1", "-1GiB", "2GX", "GiB", "1e9", "2 i"])
def test_parse_size_rejects_naming_the_flag(text):
    with pytest.raises(QvlError, match="--vram"):
        pl.parse_size(text, "--vram")


def test_bad_flags_are_one_error_line(parted):
    assert_one_line_error(run_cli("plan", str(parted), "--ram", "lots"), "--ram", "not a size")
    assert_one_line_error(run_cli("plan", str(parted), "--context", "0", "--no-measure"), "--context")
    assert_one_line_error(run_cli("plan", str(parted), "--prompt-tokens", "999999", "--no-measure"), "--prompt-tokens")
    assert_one_line_error(run_cli("plan", str(parted), "--device", "trt"), "unknown device")


def test_joined_gpu_prefix_holds_one_workspace_and_the_largest_scratch(sm61_cuda_int4, tmp_path, monkeypatch):
    """An int4 prefix on CUDA runs as one session (one arena): its VRAM is weights + KV + one workspace + the largest
    layer's dequantization scratch; one session per part (QVL_PART_JOIN=0) pays both per part. At a budget between
    the two, the joined plan puts more parts on the GPU."""
    parted_int4 = _partitioned(sm61_cuda_int4, tmp_path, every=1)
    m = read_manifest(parted_int4)
    free = replace(pl.stated_speeds(m), gpu_step=pl.Speed(0.0, "s", "stated", "none"),
                   crossing=pl.Speed(0.0, "s", "stated", "none"))
    costs = pl._Costs(m, free, 256)
    parts = m.partition.parts
    kv = [p.layer_count * costs.kv_pos * 1024 for p in parts]
    scratch = [costs.scratch(i) for i in range(3)]
    assert min(scratch) > 0
    held = sum(parts[i].weight_bytes + kv[i] for i in range(3))
    joined = costs.prefix_vram(3, kv)
    assert joined == held + pl.WORKSPACE_BYTES + max(scratch)
    room = pl.CUDA_CONTEXT_BYTES + joined
    plan = pl.make_plan(m, ram_budget=None, vram_budget=None, device="cuda", context=1024, speeds=free,
                        gpu_memory=room)
    assert [d.placement.device for d in plan.parts][:4] == ["cuda"] * 3 + ["cpu"]
    assert sum(d.placement.vram_limit for d in plan.parts[:3]) == joined - sum(kv[:3])
    monkeypatch.setenv("QVL_PART_JOIN", "0")
    assert costs.prefix_vram(3, kv) == held + 3 * pl.WORKSPACE_BYTES + sum(scratch)
    apart = pl.make_plan(m, ram_budget=None, vram_budget=None, device="cuda", context=1024, speeds=free,
                         gpu_memory=room)
    assert [d.placement.device for d in apart.parts].count("cuda") < 3
    assert all(d.placement.vram_limit == d.weight_bytes + costs.session_vram(i)
               for i, d in enumerate(apart.parts) if d.placement.device == "cuda")


def test_overlap_is_planned_when_it_shortens_the_step_and_holds_two_slots(parted):
    """Down a range of RAM budgets, on a host where two session builds at once take the time of one (`load_pair`
    1): plans overlap (streamed parts made in pairs), hold the two largest streamed parts as their slot and stay in
    their budget; where a second build hides nothing (`load_pair` 0, as measured on a saturated host) none does."""
    m = read_manifest(parted)
    stated = pl.stated_speeds(m)
    pairs_free = replace(stated, load_pair=pl.Speed(1.0, "x", "stated", "two builds at once: the time of one"))
    pairs_cost = replace(stated, load_pair=pl.Speed(0.0, "x", "stated", "two builds at once: the time of two"))
    for speeds, want in ((pairs_free, True), (pairs_cost, False)):
        free = pl.make_plan(m, ram_budget=None, vram_budget=None, device="cpu", context=256, speeds=speeds,
                            vision=False)
        overlapped = 0
        for budget in range(free.ram_bytes, free.ram_bytes // 2, -max(1, free.ram_bytes // 2000)):
            try:
                plan = pl.make_plan(m, ram_budget=budget, vram_budget=None, device="cpu", context=256,
                                    speeds=speeds, vision=False)
            except QvlError:
                break
            assert plan.ram_bytes <= budget
            streamed = sorted(d.weight_bytes for d in plan.parts if d.placement.residency == "stream")
            assert plan.to_json()["overlap"] is plan.overlap
            if plan.overlap:
                overlapped += 1
                assert len(streamed) >= 2 and plan.fixed["stream_slot"] == sum(streamed[-2:])
                assert any("overlap" in n for n in plan.notes)
            else:
                assert plan.fixed["stream_slot"] == (streamed[-1] if streamed else 0)
        assert bool(overlapped) is want, (want, overlapped)
