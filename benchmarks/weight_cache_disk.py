"""Disk bytes of several artifacts of one checkpoint: stored separately (each self-contained) vs through the
content-addressed weight cache (issue #15 item 3), computed read-only from the artifacts themselves.

    python benchmarks/weight_cache_disk.py NAME=ART [NAME=ART ...] [--json OUT.json]

Each artifact (format 1 or 2) is split into the payloads the cache would store -- the same
`content_store._ranges` and blake3 digests `qvl-compile cache add` uses -- without writing anything. Only payloads
whose size occurs in two or more of the artifacts can be shared (within one artifact the writer already stored
each distinct tensor once), so only those are hashed: exact, and cheap on the 2B fp32 export.

* separate: the blocks (st_blocks) of every file of each artifact, as `du` counts them one artifact at a time;
* cached: every distinct payload once, rounded up to the 4 KiB blocks it occupies as its own file, plus each
  artifact's graphs and manifest (side files, identical across one checkpoint's artifacts, once).

`tests/test_weight_cache.py` measures the real thing (hard links, `du` of the directories) on the tiny checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BLOCK = 4096


def _blocks(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _du(path: Path) -> int:
    seen, total = set(), 0
    for p in Path(path).rglob("*"):
        st = p.lstat()
        if p.is_file() and not p.is_symlink() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def ranges(art: Path) -> tuple[list, int, dict]:
    """(the artifact's distinct payload ranges, bytes of its graphs + manifest, {side file digest: bytes})."""
    from qvl.artifacts.content_store import _Payloads, _ranges
    from qvl.artifacts.manifest import read_manifest

    m = read_manifest(art, verify_graphs=False)
    views = _Payloads(art, dict(m.weights.files))
    try:
        rs = _ranges(m, views)
    finally:
        views.close()
    files = [m.path(g.file) for g in m.graphs.values()] + [art / "manifest.json"]
    if m.ort_optimized is not None:
        files += [m.path(g.file) for g in m.ort_optimized.graphs.values()]
    other = sum(f.stat().st_blocks * 512 for f in files)
    sides = {s.blake3: s.bytes for s in m.side_files.values()}
    return rs, other, sides


def digests(art: Path, rs: list, hash_sizes: set) -> dict:
    """{payload identity: bytes}: the blake3 of payloads whose size another artifact has, else a unique key."""
    from qvl.artifacts import integrity
    from qvl.artifacts.content_store import _Payloads
    from qvl.artifacts.manifest import read_manifest

    m = read_manifest(art, verify_graphs=False)
    views = _Payloads(art, dict(m.weights.files))
    try:
        return {(integrity.hash_bytes(views.view(*r)) if r[2] in hash_sizes else f"{art}:{r}"): r[2] for r in rs}
    finally:
        views.close()


def payloads(art: Path) -> tuple[dict, int, dict]:
    """({digest: bytes} of every payload (all hashed), bytes of graphs + manifest, side files)."""
    rs, other, sides = ranges(art)
    return digests(art, rs, {r[2] for r in rs}), other, sides


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+", help="NAME=ARTIFACT_DIR")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows, union, sides_all = {}, {}, {}
    cached_other = 0
    specs = [(name, Path(path)) for name, _, path in (a.partition("=") for a in args.artifacts)]
    scanned = {name: ranges(path) for name, path in specs}
    seen: dict[int, int] = {}
    for rs, _, _ in scanned.values():
        for size in {r[2] for r in rs}:
            seen[size] = seen.get(size, 0) + 1
    hash_sizes = {size for size, n in seen.items() if n > 1}
    for name, path in specs:
        t0 = time.perf_counter()
        rs, other, sides = scanned[name]
        ds = digests(path, rs, hash_sizes)
        new = {d: n for d, n in ds.items() if d not in union}
        rows[name] = {"path": str(path), "separate_bytes": _du(path), "payloads": len(ds),
                      "payload_bytes": sum(ds.values()),
                      "new_payload_bytes_in_order": sum(_blocks(n) for n in new.values()),
                      "hashed_bytes": sum(r[2] for r in rs if r[2] in hash_sizes),
                      "seconds_to_hash": round(time.perf_counter() - t0, 1)}
        union.update(ds)
        sides_all.update(sides)
        cached_other += other
        print(f"{name}: {rows[name]}", file=sys.stderr)
    separate = sum(r["separate_bytes"] for r in rows.values())
    cached = sum(_blocks(n) for n in union.values()) + cached_other + sum(_blocks(n) for n in sides_all.values())
    out = {"artifacts": rows, "separate_bytes": separate, "cached_bytes": cached, "distinct_payloads": len(union),
           "saved_fraction": round(1 - cached / separate, 3)}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
