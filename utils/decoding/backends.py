"""The decoding backends by ``--engine`` name: each implements ``utils.decoding.requests.Backend``."""

from __future__ import annotations

from utils.decoding.engine import ContinuousBackend
from utils.decoding.generate import GenerateBackend
from utils.decoding.requests import Backend
from utils.decoding.vllm_engine import VLLMBackend
from utils.registry import choose

BACKENDS: dict[str, type[Backend]] = {"continuous": ContinuousBackend, "generate": GenerateBackend, "vllm": VLLMBackend}
ENGINES = tuple(BACKENDS)  # --engine


def make_backend(name: str, model_id: str, tokenizer, **settings) -> Backend:
    """The backend ``name`` for the reference ``model_id`` (loaded when it first runs); ``settings``:
    ``dtype``, ``device``, ``batch_size``, ``temperature``, ``top_p``, ``max_batch_tokens``."""
    return choose("--engine", name, BACKENDS)(model_id, tokenizer, **settings)


def backend_for(args, tokenizer, device) -> Backend:
    """The backend of a stage's flags (``--engine``, ``--ref_model_id``, ``--dtype``, ``--batch_size``,
    ``--temperature``, ``--top_p``, ``--max_batch_tokens``) on ``device``."""
    return make_backend(args.engine, args.ref_model_id, tokenizer, dtype=args.dtype, device=device,
                        batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p,
                        max_batch_tokens=args.max_batch_tokens, **choose("--engine", args.engine, BACKENDS).options(args))


def gpus_per_process(args) -> int | None:
    """GPUs each process of a run gives the ``--engine`` backend when it places itself on the first
    ones it sees (vLLM: ``--vllm_tensor_parallel_size``); None: the backend runs on ``cuda:LOCAL_RANK``."""
    return choose("--engine", args.engine, BACKENDS).gpus(args)
