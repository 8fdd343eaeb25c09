"""Shared set-up of the benchmarks: random models of chosen sizes on the tiny tokenizer (or a
loaded model pair), the compute and weight-read floors of guidance, timing."""

from __future__ import annotations

import time

import torch

from utils.models import check_classifier_vocab, load_causal_lm, load_tokenizer, tokenize_prompts
from utils.demo.tiny_models import build_model, build_tokenizer

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "Betty is saving money for a new wallet which costs $100.",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
]


def add_size_flags(parser, ref=(64, 24), classifier=(64, 3), vocab_size=0) -> None:
    """--arch, --vocab_size and the hidden size / layer count of both random models."""
    parser.add_argument("--arch", type=str, default="llama", help="model family of both models")
    parser.add_argument("--vocab_size", type=int, default=vocab_size,
                        help="vocabulary of both models: the tiny tokenizer's 400 tokens plus added ones (0 = 400)")
    parser.add_argument("--ref_hidden", type=int, default=ref[0], help="reference hidden size")
    parser.add_argument("--ref_layers", type=int, default=ref[1], help="reference layers")
    parser.add_argument("--classifier_hidden", type=int, default=classifier[0], help="classifier hidden size")
    parser.add_argument("--classifier_layers", type=int, default=classifier[1], help="classifier layers")


def add_run_flags(parser, repeats: int, json_help: str) -> None:
    """--repeats, --seed, --threads and --json of the timing benchmarks."""
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs of each configuration (median)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of every sampling call")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--json", action="store_true", help=json_help)


def set_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` unless 0 (torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)


def build_pair(args, seed: int = 0):
    """Tokenizer, reference LM and classifier backbone LM (random weights, eval mode)."""
    tokenizer = build_tokenizer()
    if args.vocab_size > len(tokenizer):
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(args.vocab_size - len(tokenizer))])
    heads = lambda hidden: max(2, hidden // 64)  # noqa: E731  head_dim 64 (32 at the smallest sizes)
    ref = build_model(args.arch, tokenizer, args.ref_hidden, args.ref_layers, heads(args.ref_hidden), seed=seed)
    lm = build_model(
        args.arch, tokenizer, args.classifier_hidden, args.classifier_layers, heads(args.classifier_hidden), seed=seed + 1
    )
    return tokenizer, ref.eval(), lm.eval()


def add_pair_flags(parser) -> None:
    """--ref_model_id / --classifier_model_id (a loaded pair instead of the random one) and --dtype."""
    parser.add_argument("--ref_model_id", type=str, default=None,
                        help="reference model (hub id or folder; with --classifier_model_id; default: the random pair)")
    parser.add_argument("--classifier_model_id", type=str, default=None,
                        help="causal LM whose backbone carries the classifier head (with --ref_model_id)")
    parser.add_argument("--dtype", type=str, default="float32", help="dtype of a loaded pair (float32, bfloat16, float16)")


def load_pair(ref_model_id: str, classifier_model_id: str, dtype: str = "float32", device=None):
    """Tokenizer (of the reference), reference LM and classifier backbone LM, loaded (eval mode,
    frozen, on ``device``: default the first GPU, else the CPU)."""
    tokenizer = load_tokenizer(ref_model_id)
    check_classifier_vocab(tokenizer, classifier_model_id)  # before any weights are read
    ref = load_causal_lm(ref_model_id, dtype, device)
    lm = load_causal_lm(classifier_model_id, dtype, ref.device)
    return tokenizer, ref, lm


def _matmul_weights(model, lm_head: bool = True) -> list[torch.Tensor]:
    """The 2-D weights ``model`` multiplies per token, each once.

    Every 2-D parameter but those of embedding tables (the input embedding, GPT-2's
    position embedding: lookups, never multiplied) and norms' vectors (1-D), plus the
    output embedding (``lm_head``) when ``lm_head`` (else never), counted once even when it is
    tied to the input embedding (it is still multiplied by every token's last hidden state).
    """
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings()
    head = None if head is None else head.weight
    weights = [p for p in model.parameters() if p.dim() == 2 and id(p) not in lookups and p is not head]
    return weights + ([head] if head is not None and lm_head else [])


def matmul_params(model, lm_head: bool = True) -> int:
    """Multiply-adds per token of ``model``'s weight matrices: attention q, k, v, o and MLP
    projections of every layer, plus the ``lm_head`` (vocab x hidden; the output embedding,
    tied or not) when ``lm_head``. The input embedding lookup is never counted, nor the
    attention scores (they grow with the context, not with the weights)."""
    return sum(p.numel() for p in _matmul_weights(model, lm_head))


def weight_bytes(model, lm_head: bool = True) -> int:
    """Bytes of the weights :func:`matmul_params` counts (each matrix read once)."""
    return sum(p.numel() * p.element_size() for p in _matmul_weights(model, lm_head))


def classifier_step_costs(classifier, top_k: int, batch_size: int) -> dict[str, int]:
    """Multiply-adds per row and weight bytes per step of the guidance classifier (a decode step,
    after the prompt), as :class:`utils.decoding.guidance.QSharpLogitsProcessor` feeds it.

    ``k`` = ``top_k`` (the whole vocabulary for -1), at most the vocabulary; ``B`` the backbone's
    multiply-adds per token (its decoder layers: the classifier reads the backbone's hidden
    states, no LM head runs); ``A`` the head's outputs per (state, token) (1, or ``num_atoms``
    for mle); ``H`` the hidden size.

    - Q: one new token per row through the backbone, then only the k head row blocks of the
      candidates: ``B + k * A * H``. Bytes: backbone + the gathered head rows, at most
      ``min(vocab, batch_size * k) * A * H`` of them (fewer when rows share candidates).
    - V: the new token and the k candidates, 1 + k tokens per row, go through the backbone in
      one forward; the head runs on the k candidates' hidden states only:
      ``(1 + k) * B + k * A * H``. Bytes: backbone + the ``A * H`` head, once whatever k.
    """
    spec, hidden = classifier.spec, classifier.config.hidden_size
    vocab = classifier.vocab_size
    k = vocab if top_k == -1 else min(top_k, vocab)
    backbone, row = matmul_params(classifier.model, lm_head=False), spec.num_outputs * hidden
    backbone_bytes = weight_bytes(classifier.model, lm_head=False)
    size = classifier.score.weight.element_size()
    if spec.classifier_type == "Q":
        return {"macs": backbone + k * row, "bytes": backbone_bytes + min(vocab, batch_size * k) * row * size}
    return {"macs": (1 + k) * backbone + k * row, "bytes": backbone_bytes + row * size}


def guidance_floors(ref, classifier, top_k: int, batch_size: int) -> dict:
    """The floors of guided over plain decoding, per decode step, from the weight shapes.

    ``limit`` (compute): ``1 + classifier multiply-adds / reference multiply-adds`` per row and
    step, the reference's being :func:`matmul_params` (decoder layers + lm_head) for its one
    token, the classifier's :func:`classifier_step_costs`. ``memory_limit`` (weights read):
    ``1 + classifier weight bytes / reference weight bytes`` per step (each weight matrix once per
    step whatever the batch, the Q head's gathered rows at most once each; the KV caches,
    embedding lookups and norms left out).
    Attention-score FLOPs are left out of both: the floors count weight matrices only.
    """
    ref_macs, ref_bytes = matmul_params(ref), weight_bytes(ref)
    costs = classifier_step_costs(classifier, top_k, batch_size)
    return {
        "limit": 1 + costs["macs"] / ref_macs,
        "memory_limit": 1 + costs["bytes"] / ref_bytes,
        "reference_macs": ref_macs,
        "classifier_macs": costs["macs"],
        "reference_bytes": ref_bytes,
        "classifier_bytes": costs["bytes"],
    }


def prompt_batch(tokenizer, batch_size: int) -> dict[str, torch.Tensor]:
    """A left-padded batch of ``batch_size`` prompts of different lengths (raw text, the random pair)."""
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    return tokenizer(texts, return_tensors="pt", padding=True)


def chat_prompt_batch(tokenizer, batch_size: int, device=None) -> dict[str, torch.Tensor]:
    """The prompts of :func:`prompt_batch` as a loaded pair reads them: user turns of the chat
    template when the tokenizer has one (else raw text), left-padded, on ``device``."""
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    return tokenize_prompts(tokenizer, texts, use_chat_template=tokenizer.chat_template is not None, device=device)


def sync(device) -> None:
    """Wait for the GPU's queued work (so wall times cover it); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def elapsed(fn) -> float:
    """Wall time of one call of ``fn`` (seconds)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
