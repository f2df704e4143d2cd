"""Greedy decoding on the device: add a `next_token` output (argmax of the last position's logits) to the decoder.

A 2B decoder's logits are 151936 floats (600 KB) per token; read back over PCIe every token, then argmax-ed on
the host, they cost a device->host copy and a sync larger than the token's id. With `next_token =
ArgMax(logits[:, -1, :], axis=-1)` in the graph the runtime binds `logits` to a device buffer and reads back 8
bytes when decoding greedily (sampling still reads the logits). ONNX ArgMax returns the first index of the
maximum, as `numpy.argmax`/`torch.argmax` do, so greedy tokens are unchanged.

A decoder with the `logit_positions` input (logits `[batch, P, vocab]` for P requested positions) also gets
`next_tokens = ArgMax(logits, axis=-1)` `[batch, P]`: a speculative verify step reads back the greedy choice after
each of its positions (8 bytes each) instead of P rows of logits. `next_token` stays the argmax of the LAST row.

Only for targets that run on a device (`provider` "cuda"): on the CPU the logits are already in host memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qvl.passes.base import GraphPass, PassReport, Skip

NEXT_TOKEN = "next_token"
NEXT_TOKENS = "next_tokens"
LOGIT_POSITIONS = "logit_positions"


@dataclass(frozen=True)
class DeviceArgmaxConfig:
    graphs: tuple[str, ...] = ("decoder",)


class DeviceArgmaxPass(GraphPass):
    """Add `next_token` [batch] (int64) = argmax of the last position's `logits` to the decoder graph (and
    `next_tokens` [batch, P] = every row's argmax when the graph takes `logit_positions`)."""

    name = "device_argmax"
    config_type = DeviceArgmaxConfig
    scope = "on-device argmax"
    count_keys = ("next_token_outputs", "next_tokens_outputs")

    def applies_to(self, target, graph: str) -> str | None:
        reason = super().applies_to(target, graph)
        if reason is None and target.provider != "cuda":
            reason = f"target {target.name} runs on the {target.provider} provider: its logits are already on the host"
        return reason

    def run(self, model, report: PassReport) -> None:
        graph = model.graph
        outputs = {v.name: v for v in graph.outputs}
        if NEXT_TOKEN in outputs:
            report.details["already_present"] = True
            return
        logits = outputs.get("logits")
        if logits is None:
            report.skipped.append(Skip(self.graph, "no `logits` output"))
            return
        if logits.shape is None or logits.shape.rank() != 3:
            report.skipped.append(Skip(self.graph, "logits are not [batch, seq, vocab]"))
            return
        tape = ir.tape.Tape(graph)
        last = tape.initializer(ir.tensor(np.array(-1, dtype=np.int64), name="qvl_argmax.last"))
        final = tape.op("Gather", [logits, last], attributes={"axis": 1})  # [batch, vocab]
        token = tape.op("ArgMax", [final], attributes={"axis": -1, "keepdims": 0, "select_last_index": 0})
        token.name = NEXT_TOKEN
        token.dtype = ir.DataType.INT64
        token.shape = ir.Shape([logits.shape[0]])
        new_outputs = [token]
        if any(v.name == LOGIT_POSITIONS for v in graph.inputs):
            tokens = tape.op("ArgMax", [logits], attributes={"axis": -1, "keepdims": 0, "select_last_index": 0})
            tokens.name = NEXT_TOKENS
            tokens.dtype = ir.DataType.INT64
            tokens.shape = ir.Shape([logits.shape[0], logits.shape[1]])
            new_outputs.append(tokens)
            report.counts["next_tokens_outputs"] = 1
        graph.extend(tape.nodes)
        graph.outputs.extend(new_outputs)
        report.counts["next_token_outputs"] = 1
