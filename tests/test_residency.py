"""Residency tiers (`runtime/residency.py`): eviction, page-cache residency, read-ahead, the Prefetcher, warming.

Real files on a real disk: the page cache of tmpfs cannot be dropped (its pages are the file), so every file here
lives in a directory where eviction was seen to work (tmp_path, the repo's build/, /var/tmp, in that order); the
module skips only when none of them can evict. Artifacts: the conftest's tiny cpu artifact, partitioned with
`partition_artifact(every=1)`, and a `--cache` (format 2) copy made by `content_store.intern`.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from qvl.runtime.residency import (PAGE, Prefetcher, artifact_load_files, artifact_resident_fraction, evict_artifact,
                                   evict_file, measure_disk_read, read_ahead, resident_fraction, support,
                                   warm_artifact)

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(support()["evict"] or support()["resident_fraction"],
                                reason=str(support()["evict"] or support()["resident_fraction"]))


def _write(path: Path, size: int) -> Path:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def _evictable(d: Path) -> bool:
    probe = _write(d / ".evict-probe", 2 * MiB)
    try:
        probe.read_bytes()
        evict_file(probe)
        return resident_fraction(probe) < 0.5
    finally:
        probe.unlink()


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory):
    """A directory whose page cache can be evicted (see the module doc)."""
    made = []
    for cand in (tmp_path_factory.mktemp("residency"), REPO / "build" / f"residency-test-{os.getpid()}",
                 Path("/var/tmp") / f"qvl-residency-test-{os.getpid()}"):
        try:
            top = next((p for p in reversed([cand, *cand.parents]) if not p.exists()), None)
            cand.mkdir(parents=True, exist_ok=True)
            if top is not None:
                made.append(top)  # removed afterwards (build/ too when this made it)
            if _evictable(cand):
                yield cand
                break
        except OSError:
            continue
    else:
        pytest.skip("no directory here (tmp_path, build/, /var/tmp) lets the page cache be evicted: all tmpfs?")
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def disk_artifact(tiny_cpu_artifact, disk_dir) -> Path:
    """A copy of the tiny cpu artifact where eviction works. Always a copy: the session fixture may be memory-mapped
    by an engine another test of this process still holds (pytest-xdist runs other modules' tests in it first), and
    the kernel does not drop mapped pages."""
    out = disk_dir / "tiny-cpu"
    shutil.copytree(tiny_cpu_artifact, out)
    return out


@pytest.fixture(scope="module")
def part_artifact(disk_artifact, disk_dir) -> Path:
    from qvl.toolchain.compile.partition import partition_artifact

    out = disk_dir / "tiny-cpu-p1"
    partition_artifact(disk_artifact, out, every=1)
    return out


def _parts(art: Path):
    from qvl.artifacts.manifest import read_manifest

    return read_manifest(art, verify_graphs=False).partition.parts


def test_evict_drops_a_file_and_resident_fraction_sees_it(disk_dir):
    f = _write(disk_dir / "eight.bin", 8 * MiB)
    assert len(f.read_bytes()) == 8 * MiB
    assert resident_fraction(f) == 1.0
    evict_file(f, 4 * MiB, 0)  # the second half only (length 0: to the end)
    assert resident_fraction(f, 0, 4 * MiB) == 1.0
    assert resident_fraction(f, 4 * MiB) == 0.0
    assert resident_fraction(f) == 0.5
    evict_file(f)
    assert resident_fraction(f) == 0.0
    assert resident_fraction(f, 0, 0) == 0.0  # length 0 = to the end, as posix_fadvise reads it
    assert resident_fraction(f, 9 * MiB, 10) == 1.0  # an empty range (past the end) misses nothing


def test_read_ahead_makes_exactly_its_ranges_resident(disk_dir):
    f = _write(disk_dir / "thirtytwo.bin", 32 * MiB)
    evict_file(f)
    ranges = [(1 * MiB, 2 * MiB), (20 * MiB + 12345, MiB + 777)]  # the second one not page-aligned at either end
    assert read_ahead(f, ranges) == sum(length for _, length in ranges)
    for off, length in ranges:
        assert resident_fraction(f, off, length) == 1.0
    # nothing else: the kernel's own read-ahead (8 MiB on some disks) is off for read_ahead's descriptor
    first_page = ranges[1][0] - ranges[1][0] % PAGE
    last_page_end = -(-(ranges[1][0] + ranges[1][1]) // PAGE) * PAGE
    assert resident_fraction(f, 0, MiB) == 0.0
    assert resident_fraction(f, 3 * MiB, first_page - 3 * MiB) == 0.0
    assert resident_fraction(f, last_page_end) == 0.0
    assert read_ahead(f, [(31 * MiB, 4 * MiB)]) == MiB  # clipped at the end of the file


def test_measure_disk_read_leaves_the_cache_as_found(disk_dir):
    f = _write(disk_dir / "sixteen.bin", 16 * MiB)
    evict_file(f)
    assert measure_disk_read(f) > 0
    assert resident_fraction(f) == 0.0  # it was not resident: evicted again
    f.read_bytes()
    assert measure_disk_read(f, 8 * MiB) > 0
    assert resident_fraction(f, 0, 8 * MiB) == 1.0  # it was: read back in, left resident


def _gate(disk_dir: Path, name: str) -> Path:
    """A FIFO: reading it (opening it) blocks the prefetch thread until the test opens the write end."""
    path = disk_dir / name
    os.mkfifo(path)
    return path


def _release(path: Path, prefetcher: Prefetcher, name: str) -> None:
    deadline = time.monotonic() + 10
    while prefetcher.running != name:  # the thread is inside the gate's open()
        assert time.monotonic() < deadline, "the prefetch thread never started the gate"
        time.sleep(0.005)
    os.close(os.open(path, os.O_WRONLY))


def test_prefetcher_reads_in_queue_order_dedups_and_drops_the_oldest(disk_dir):
    files = {n: _write(disk_dir / f"part-{n}.bin", MiB) for n in "abcde"}
    for f in files.values():
        evict_file(f)
    queued = ["c", "a", "e", "b", "d"]
    gate = _gate(disk_dir, "gate-order")
    with Prefetcher(max_queued_parts=8) as p:
        p.prefetch_ranges("gate", [(gate, 0, 0)])
        for n in queued:  # all queued while the thread is held at the gate: the order is the queue's, not a race
            p.prefetch_ranges(n, [(files[n], 0, MiB)])
        p.prefetch_ranges("c", [(files["c"], 0, MiB)])  # already queued: not again
        _release(gate, p, "gate")
        p.wait(timeout=30)
        assert p.order == ["gate", *queued]
        assert p.errors == [] and p.dropped == []
        assert p.bytes_read == 5 * MiB
    assert all(resident_fraction(f) == 1.0 for f in files.values())

    gate2 = _gate(disk_dir, "gate-drop")
    with Prefetcher(max_queued_parts=2) as p:
        p.prefetch_ranges("gate", [(gate2, 0, 0)])
        deadline = time.monotonic() + 10
        while p.running != "gate":  # held at the gate: what follows only waits
            assert time.monotonic() < deadline
            time.sleep(0.005)
        for n in "abc":  # a third waiting part drops the oldest waiting one
            p.prefetch_ranges(n, [(files[n], 0, MiB)])
        p.prefetch_ranges("gate", [(gate2, 0, 0)])  # being read now: not queued again
        _release(gate2, p, "gate")
        p.wait(timeout=30)
        assert p.dropped == ["a"]
        assert p.order == ["gate", "b", "c"]


def test_prefetcher_records_a_failed_read_and_goes_on(disk_dir):
    ok = _write(disk_dir / "ok.bin", MiB)
    with Prefetcher() as p:
        p.prefetch_ranges("missing", [(disk_dir / "no-such-file", 0, 10)])
        p.prefetch_ranges("ok", [(ok, 0, MiB)])
        p.wait(timeout=30)
        assert [name for name, _ in p.errors] == ["missing"] and "no-such-file" in p.errors[0][1]
        assert p.order == ["ok"]
    with pytest.raises(RuntimeError, match="closed"):
        p.prefetch_ranges("late", [(ok, 0, MiB)])


def test_prefetch_of_partition_parts_makes_their_ranges_resident(part_artifact):
    import json

    parts = _parts(part_artifact)
    graph_files = json.loads((part_artifact / "manifest.json").read_text())["graphs"]
    evict_artifact(part_artifact)
    ranges = [(part_artifact / f, off, ln) for spec in parts for f, off, ln in spec.ranges]
    assert all(resident_fraction(f, off, ln) == 0.0 for f, off, ln in ranges)
    with Prefetcher(max_queued_parts=len(parts)) as p:
        for spec in parts:
            p.prefetch_part(part_artifact, spec)
        p.wait(timeout=30)
        assert p.errors == []
        assert p.order == [spec.name for spec in parts]
        graphs = [part_artifact / graph_files[spec.graph]["file"] for spec in parts]
        assert p.bytes_read == sum(ln for *_, ln in ranges) + sum(g.stat().st_size for g in graphs)
    assert all(resident_fraction(f, off, ln) == 1.0 for f, off, ln in ranges)
    assert all(resident_fraction(g) == 1.0 for g in graphs)
    with Prefetcher(max_queued_parts=len(parts)) as again:  # all cached now: checked with mincore, nothing read
        for spec in parts:
            again.prefetch_part(part_artifact, spec)
        again.wait(timeout=30)
        assert again.order == [spec.name for spec in parts] and again.bytes_read == 0
    # the bytes no part reads (the vision weights, before the first part's range) were left on disk
    store, first = ranges[0][0], min(off for f, off, _ in ranges if f == ranges[0][0])
    assert first > PAGE and resident_fraction(store, 0, first - first % PAGE) == 0.0


def _manifest_files(art: Path) -> list[Path]:
    import json

    raw = json.loads((art / "manifest.json").read_text())
    names = {g["file"] for g in raw["graphs"].values()}
    names |= {g["file"] for g in ((raw.get("ort_optimized") or {}).get("graphs") or {}).values()}
    w = raw["weights"]
    names |= {f"{w['dir']}/{o}" for o in w["objects"]} if w.get("layout") == "objects" else {w["file"]}
    return sorted(art / n for n in names)


def test_warm_artifact_reads_every_graph_and_weight_file(disk_artifact):
    files = _manifest_files(disk_artifact)
    assert sorted(artifact_load_files(disk_artifact)) == files
    evicted = evict_artifact(disk_artifact)
    assert evicted["files"] >= len(files) and evicted["bytes"] >= sum(f.stat().st_size for f in files)
    assert artifact_resident_fraction(disk_artifact) == 0.0
    res = warm_artifact(disk_artifact, threads=2)
    total = sum(f.stat().st_size for f in files)
    assert res["bytes"] == total and res["skipped"] == 0 and res["files"] == len(files)
    assert res["gb_s"] > 0 and res["threads"] == 2
    assert all(resident_fraction(f) == 1.0 for f in files)
    again = warm_artifact(disk_artifact, threads=2)  # a warm start: nothing to read
    assert again["bytes"] == 0 and again["skipped"] == total
    half = files[0].stat().st_size // 2 // PAGE * PAGE
    evict_file(files[0], half)  # the second half of one file only
    assert warm_artifact(disk_artifact)["bytes"] == files[0].stat().st_size - half


def test_a_cache_artifacts_linked_objects_are_warmed_and_evicted(disk_artifact, disk_dir, monkeypatch):
    from qvl.artifacts.content_store import WeightCache, intern

    monkeypatch.setenv("QVL_CACHE", str(disk_dir / "qvl-cache"))
    art = disk_dir / "tiny-cached"
    shutil.copytree(disk_artifact, art)
    report = intern(art, WeightCache.open(disk_dir / "weight-cache", create=True))
    assert report.note is None, report.note
    objects = sorted((art / "weights").iterdir())
    assert len(objects) > 1 and all(o.stat().st_nlink == 2 for o in objects)  # linked into the cache
    evict_artifact(art)  # intern just wrote them: in the cache
    assert all(resident_fraction(o) == 0.0 for o in objects)
    assert warm_artifact(art, threads=3)["bytes"] == sum(f.stat().st_size for f in _manifest_files(art))
    assert all(resident_fraction(o) == 1.0 for o in objects)
    evict_artifact(art)
    cached = sorted((disk_dir / "weight-cache" / "objects").rglob("*"))
    assert all(resident_fraction(o) == 0.0 for o in objects + [c for c in cached if c.is_file()])


@pytest.mark.parametrize("kept", [1, 0], ids=["first-part-kept", "all-streamed"])
def test_partitioned_engine_prefetches_the_streamed_parts_in_execution_order(part_artifact, kept):
    from qvl.runtime.backends.partitioned import PartitionedEngine, PartPlacement
    from qvl.runtime.mrope import decode_position_ids

    parts = [spec.name for spec in _parts(part_artifact)]
    # a kept prefix and every later part streamed, as a RAM budget below the model places it; or every part streamed
    streamed = parts[kept:]
    placement = {name: PartPlacement("cpu", "stream") for name in streamed}
    # room for a whole step's requests, and a wait after each step: nothing is dropped however slow this host is
    prefetcher = Prefetcher(max_queued_parts=len(streamed))
    engine = PartitionedEngine(part_artifact, placement=placement, threads=1, prefetcher=prefetcher)
    try:
        cache = engine.new_cache(capacity=16)
        ids = np.array([1, 2, 3, 4, 5], dtype=np.int64)
        steps = [(ids, decode_position_ids(0, 5, 0)), (ids[:1], decode_position_ids(5, 1, 0)),
                 (ids[1:2], decode_position_ids(6, 1, 0))]
        for tokens, pos in steps:
            logits = engine.step(cache, engine.embed(tokens)[None], pos)
            assert logits.shape[-1] == engine.vocab_size and np.isfinite(logits).all()
            prefetcher.wait(timeout=30)
        assert prefetcher.errors == [] and prefetcher.dropped == []
        assert prefetcher.order == streamed * len(steps)
        loads = {r["part"]: r["loads"] for r in engine.residency_report()}
        assert loads == {**{n: 1 for n in parts[:kept]}, **{n: len(steps) for n in streamed}}
    finally:
        prefetcher.close()
        del engine
