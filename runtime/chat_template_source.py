"""Which file of a checkpoint / artifact directory the chat template comes from: transformers' precedence.

What `Qwen3VLProcessor.from_pretrained(dir).apply_chat_template(...)` renders with (transformers 5.x,
`ProcessorMixin.get_processor_dict` and `PreTrainedTokenizerBase.from_pretrained`, read from their source):

1. `processor_config.json["chat_template"]` -- the processor's own config keeps a template it has (transformers
   warns that it belongs in its own file, and uses it);
2. `chat_template.json` (the legacy processor file, `{"chat_template": ...}`) -- read before and *instead of*
   `chat_template.jinja`: when it exists the processor never looks at the .jinja file;
3. `chat_template.jinja` -- the processor's file when there is no legacy one, and also the tokenizer's;
4. `tokenizer_config.json["chat_template"]` -- the tokenizer's own entry (a `chat_template.jinja` replaces it
   when the tokenizer loads). The processor itself never falls back to the tokenizer: transformers'
   `processor.apply_chat_template` raises when 1-3 give nothing. We render with the tokenizer's template then
   (what `processor.tokenizer.apply_chat_template` uses), so checkpoints that keep their template only in
   tokenizer_config.json (older exports) still work; the eager oracle does the same (`hf_compat`).

So the tokenizer and the processor disagree when `chat_template.json` and `chat_template.jinja` differ (the
tokenizer uses the .jinja, the processor the .json): prompts follow the processor, as the model card's code
(`processor.apply_chat_template`) does. A `chat_template.json` whose entry is null leaves the processor without
a template (transformers does not go on to the .jinja then), and the tokenizer's order decides (.jinja, then
tokenizer_config.json). Named extra templates (`chat_templates/*.jinja`) are not read: prompts use the default.

Standard library only (the runtime's import path): `prompt.PromptBuilder.from_dir` resolves through here, and
the exporter records the winner in the manifest (`source.chat_template`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvl.errors import QvlError

PROCESSOR_CONFIG = "processor_config.json"
LEGACY_PROCESSOR_TEMPLATE = "chat_template.json"
RAW_TEMPLATE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
# Highest precedence first.
TEMPLATE_FILES = (PROCESSOR_CONFIG, LEGACY_PROCESSOR_TEMPLATE, RAW_TEMPLATE, TOKENIZER_CONFIG)


@dataclass(frozen=True)
class ChatTemplateSource:
    template: str
    file: str  # one of TEMPLATE_FILES: the file the template was read from
    shadowed: tuple[str, ...] = ()  # the other TEMPLATE_FILES that also hold a template (and lose)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QvlError(f"cannot read {path}: {e}") from None


def _template_from_value(value: Any, source: Path) -> str | None:
    """A template entry as transformers stores it: a string, a {name: template} dict or a
    [{"name", "template"}] list (then the one named "default"), or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(value, dict):
        if isinstance(value.get("default"), str):
            return value["default"]
        raise QvlError(f"{source} has several chat templates but none named 'default'")
    raise QvlError(f"{source}: chat_template must be a string")


def _json_entry(path: Path) -> tuple[bool, str | None]:
    """(file exists, its "chat_template" entry or None)."""
    if not path.is_file():
        return False, None
    data = _read_json(path)
    if not isinstance(data, dict):
        raise QvlError(f"cannot read {path}: not a JSON object")
    return True, _template_from_value(data.get("chat_template"), path)


def _raw_template(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QvlError(f"cannot read {path}: {e}") from None


def template_candidates(directory: str | os.PathLike) -> dict[str, str]:
    """Every template the directory holds, by file (TEMPLATE_FILES order; absent / null entries left out)."""
    d = Path(directory)
    found: dict[str, str] = {}
    for name in TEMPLATE_FILES:
        if name == RAW_TEMPLATE:
            value = _raw_template(d / name)
        else:
            value = _json_entry(d / name)[1]
        if value is not None:
            found[name] = value
    return found


def resolve_chat_template(directory: str | os.PathLike, file: str | None = None) -> ChatTemplateSource:
    """The chat template of `directory` in transformers' processor precedence (see the module docstring).

    `file`: use that file's template instead (an artifact's recorded source); a QvlError if it has none."""
    d = Path(directory)
    found = template_candidates(d)
    if file is not None:
        if file not in TEMPLATE_FILES:
            raise QvlError(f"{file!r} is not a chat template file (expected one of: {', '.join(TEMPLATE_FILES)})")
        if file not in found:
            raise QvlError(f"{d / file} holds no chat template, but the manifest says the template comes from it",
                           hint="re-export the artifact")
        winner = file
    elif found:
        # The first file of TEMPLATE_FILES that holds one. A null entry (in processor_config.json or
        # chat_template.json) counts as none: the processor then has no template from that file and the next
        # one decides, as in transformers (a null legacy entry leaves the processor without a template, and the
        # tokenizer's order is .jinja, then tokenizer_config.json: the same order).
        winner = next(iter(found))
    else:
        raise QvlError(
            f"no chat template in {d}",
            hint="expected chat_template.jinja, chat_template.json or a chat_template entry in "
                 "tokenizer_config.json (or processor_config.json)",
        )
    return ChatTemplateSource(found[winner], winner, tuple(n for n in found if n != winner))


__all__ = ["ChatTemplateSource", "TEMPLATE_FILES", "resolve_chat_template", "template_candidates"]
