"""Shared set-up of the benchmarks: random models of chosen sizes on the tiny tokenizer, timing."""

from __future__ import annotations

import time

import torch

from utils.tiny_models import build_model, build_tokenizer

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


def matmul_params(model) -> int:
    """Weights multiplied per token: every parameter but the input embeddings (and norms' vectors)."""
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not embedding)


def prompt_batch(tokenizer, batch_size: int) -> dict[str, torch.Tensor]:
    """A left-padded batch of ``batch_size`` prompts of different lengths."""
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    return tokenizer(texts, return_tensors="pt", padding=True)


def elapsed(fn) -> float:
    """Wall time of one call of ``fn`` (seconds)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
