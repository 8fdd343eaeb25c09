"""The Q# processor's adapters to vLLM's two logits-processor interfaces, thin over
:func:`utils.decoding.vllm_engine.guide`. vLLM imports this module by name (``FQCN``) in the
process that samples: this one with one GPU, each tensor-parallel worker with several. Only
vLLM imports it (its base classes are vLLM's).
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from utils.decoding.vllm_engine import HOST_KEY, VLLMRows, guide, host_of, slot_rows


class QSharpV1Processor(LogitsProcessor):
    """vLLM's V1 interface (the CPU build, ``VLLM_USE_V2_MODEL_RUNNER=0``): rows from its batch updates."""

    def __init__(self, vllm_config, device, is_pin_memory):
        self.host = host_of(vllm_config.additional_config[HOST_KEY], device)
        self.host.rows = self.rows = VLLMRows()

    def is_argmax_invariant(self) -> bool:
        return False  # it changes the argmax: vLLM runs it before temperature and top-p

    def update_state(self, batch_update) -> None:
        self.rows.update(batch_update)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return guide(self.host, self.rows, logits)


class QSharpV2Processor(V2LogitsProcessor):
    """vLLM's V2 interface (the GPU default): requests by slot from ``add_request``, rows mapped to
    slots every step (``ctx.expanded_idx_mapping``), tokens from the runner's buffers. Not yet run
    on a GPU."""

    def __init__(self, vllm_config, req_states):
        self.host = host_of(vllm_config.additional_config[HOST_KEY], req_states.device)
        self.host.rows = self.rows = VLLMRows()
        self.req_states, self.tags = req_states, {}

    def add_request(self, req_idx: int, sampling_params) -> bool:
        self.tags[req_idx] = (sampling_params.extra_args or {}).get(HOST_KEY)  # a recycled slot is overwritten
        return self.tags[req_idx] is not None

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        self.rows.slots = slot_rows(self.tags, self.req_states, ctx.expanded_idx_mapping.tolist())
        return guide(self.host, self.rows, logits)
