"""The checkpoint's decoding defaults (`generation_config.json`), typed and validated, and what `run` / `chat` decode with.

A published Qwen3-VL-Instruct checkpoint samples by default: its generation_config.json has `do_sample: true`,
`temperature: 0.7`, `top_p: 0.8`, `top_k: 20`, `repetition_penalty: 1.0` -- what transformers' `generate` uses
when the caller gives nothing. The exporter validates the file (`GenerationDefaults.from_dir`: a bad value is a
one-line error before anything is written) and copies it into the artifact as a side file (digest in the
manifest); the runtime reads it back through the same class.

`resolve_decoding` is the rule of the `run` and `chat` commands, in this order:

1. `--greedy`: argmax decoding, nothing from the file (no repetition penalty either): the reproducible answer,
   the one `parity`, `eval` and `bench` compare (those always decode greedily);
2. `--temperature T`: T > 0 samples, `--top-p` / `--top-k` or else the file's values (else `generate`'s
   defaults, `sampling.GENERATE_DEFAULTS`) fill the rest, as `generate(temperature=T)` resolves them; T = 0 is greedy;
3. `--speculative` (greedy only, exact): greedy;
4. the file's `do_sample: true`: sampling with its temperature (1.0 when it gives none), top-p, top-k and
   repetition penalty; `--top-p` / `--top-k` override single values;
5. otherwise (no file, or `do_sample` false / absent): greedy, with the file's repetition penalty if it has one
   other than 1.0 (`generate` applies it to greedy decoding too).

The Python API (`Model.generate` / `stream`) and the server keep their own rule -- greedy unless a temperature
> 0 is given -- so a library call never samples by surprise; `Model.generation_defaults` is this file's content
for callers that want the checkpoint's behaviour (`resolve_decoding(model.generation_defaults).stream_kwargs()`).

Standard library only (the runtime's import path).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvl.errors import QvlError

GENERATION_CONFIG = "generation_config.json"
_HINT = f"fix the checkpoint's {GENERATION_CONFIG} (without the file, run and chat decode greedily)"


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class GenerationDefaults:
    """The fields of generation_config.json that decoding reads (None: the file does not set it)."""

    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    eos_token_id: tuple[int, ...] = ()
    file: str | None = None  # GENERATION_CONFIG when read from that file, None when there is none

    @classmethod
    def from_dict(cls, d: Any, where: str = GENERATION_CONFIG) -> "GenerationDefaults":
        """Validate a parsed generation_config.json (unknown keys ignored; null = not set)."""
        if not isinstance(d, dict):
            raise QvlError(f"{where} is not a JSON object", hint=_HINT)

        def bad(key: str, accepted: str):
            raise QvlError(f"{where}: {key} must be {accepted}, got {d[key]!r}"[:300], hint=_HINT)

        get = lambda key: d.get(key)  # noqa: E731
        do_sample = get("do_sample")
        if do_sample is not None and not isinstance(do_sample, bool):
            bad("do_sample", "true or false")
        temperature, top_p, top_k, penalty = get("temperature"), get("top_p"), get("top_k"), get("repetition_penalty")
        if temperature is not None and not (_is_real(temperature) and temperature >= 0):
            bad("temperature", "a finite number >= 0")
        if do_sample and temperature is not None and temperature == 0:
            bad("temperature", "> 0 when do_sample is true (transformers refuses to sample at 0)")
        if top_p is not None and not (_is_real(top_p) and 0 < top_p <= 1):
            bad("top_p", "a number in (0, 1]")
        if top_k is not None and not (_is_int(top_k) and top_k >= 0):
            bad("top_k", "an integer >= 0")
        if penalty is not None and not (_is_real(penalty) and penalty > 0):
            bad("repetition_penalty", "a finite number > 0")
        min_p = get("min_p")
        if min_p is not None and not (_is_real(min_p) and 0 <= min_p <= 1):
            bad("min_p", "a number in [0, 1]")
        eos = get("eos_token_id")
        eos_ids = [eos] if _is_int(eos) else eos
        if eos is not None and not (isinstance(eos_ids, list) and all(_is_int(i) and i >= 0 for i in eos_ids)):
            bad("eos_token_id", "a token id or a list of token ids")
        return cls(
            do_sample=bool(do_sample),
            temperature=None if temperature is None else float(temperature),
            top_p=None if top_p is None else float(top_p),
            top_k=top_k,
            repetition_penalty=None if penalty is None else float(penalty),
            min_p=None if min_p is None else float(min_p),
            eos_token_id=tuple(eos_ids or ()),
            file=GENERATION_CONFIG,
        )

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> "GenerationDefaults":
        """The directory's generation_config.json (a checkpoint's or an artifact's); greedy defaults without one."""
        path = Path(directory) / GENERATION_CONFIG
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise QvlError(f"cannot read {path}: {e}"[:300], hint=_HINT) from None
        return cls.from_dict(raw, where=str(path))

    def as_generation_config(self) -> dict:
        """The sampling fields as a generation_config dict (`SamplingConfig.from_generation_config`'s input)."""
        out = {"do_sample": self.do_sample, "temperature": self.temperature, "top_p": self.top_p,
               "top_k": self.top_k, "repetition_penalty": self.repetition_penalty, "min_p": self.min_p}
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class Decoding:
    """What one `run` / `chat` decodes with, fully resolved, and why (`source`)."""

    sample: bool
    temperature: float | None = None  # None when greedy
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None  # None: no penalty
    min_p: float | None = None  # from generation_config.json only (Model.stream reads it there)
    source: str = ""  # what decided: "--greedy", "--temperature", "--speculative", GENERATION_CONFIG, "default"

    def stream_kwargs(self) -> dict:
        """The keyword arguments of `Model.stream` / `Session.stream` that decode exactly like this."""
        if not self.sample:
            return {"temperature": None, "top_p": None, "top_k": None, "repetition_penalty": self.repetition_penalty}
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "repetition_penalty": self.repetition_penalty}

    def describe(self) -> str:
        """One phrase for the stats line: 'greedy' or the sampling values and where they came from."""
        penalty = (f", repetition penalty {self.repetition_penalty:g}"
                   if self.repetition_penalty not in (None, 1.0) else "")
        if not self.sample:
            return f"greedy{penalty}" + (f" ({self.source})" if self.source != "--greedy" else "")
        top_k = "off" if not self.top_k else str(self.top_k)
        min_p = f", min-p {self.min_p:g}" if self.min_p is not None else ""
        return (f"sampled: temperature {self.temperature:g}, top-p {self.top_p:g}, top-k {top_k}{min_p}{penalty} "
                f"({self.source}, --greedy for the argmax answer)")

    def to_json(self, seed: int | None = None) -> dict:
        out = {"mode": "sample" if self.sample else "greedy", "source": self.source}
        if self.sample:
            out.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=seed)
            if self.min_p is not None:
                out["min_p"] = self.min_p
        if self.repetition_penalty is not None:
            out["repetition_penalty"] = self.repetition_penalty
        return out


def resolve_decoding(defaults: GenerationDefaults, *, greedy: bool = False, temperature: float | None = None,
                     top_p: float | None = None, top_k: int | None = None,
                     speculative: bool = False) -> Decoding:
    """The `run` / `chat` rule (module docstring); the values are the ones `SamplingConfig` will use."""
    from qvl.runtime.sampling import SamplingConfig

    if greedy:
        given = [f for f, v in (("--temperature", temperature), ("--top-p", top_p), ("--top-k", top_k))
                 if v is not None and not (f == "--temperature" and v == 0)]
        if given:
            raise QvlError(f"--greedy cannot be combined with {', '.join(given)}",
                           hint="--greedy decodes by argmax; drop it to sample")
        return Decoding(sample=False, source="--greedy")
    if temperature is not None:
        if temperature == 0:
            return Decoding(sample=False, source="--temperature 0")
        source = "--temperature"
    elif speculative:
        return Decoding(sample=False, source="--speculative is greedy only")
    elif defaults.do_sample:
        temperature = defaults.temperature if defaults.temperature is not None else 1.0
        source = defaults.file or GENERATION_CONFIG
    else:
        penalty = defaults.repetition_penalty if defaults.repetition_penalty not in (None, 1.0) else None
        why = f"{defaults.file}: do_sample false" if defaults.file else f"no {GENERATION_CONFIG}"
        return Decoding(sample=False, repetition_penalty=penalty, source=why)
    # The same resolution `Model.stream` applies to (temperature, top_p, top_k) given explicitly.
    cfg = SamplingConfig.from_generation_config(defaults.as_generation_config(), do_sample=True,
                                                temperature=temperature, top_p=top_p, top_k=top_k)
    return Decoding(sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                    repetition_penalty=cfg.repetition_penalty, min_p=cfg.min_p, source=source)


__all__ = ["GENERATION_CONFIG", "Decoding", "GenerationDefaults", "resolve_decoding"]
