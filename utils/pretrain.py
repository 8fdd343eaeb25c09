"""Pretrain a tiny reference LM (and a smaller classifier LM) on synthetic word problems, on CPU.

    python -m utils.pretrain --data_dir DIR --out_dir MODELS [--seed 0] [--ref_steps N] [--cls_steps N]
    python -m utils.pretrain --data_dir DIR --out_dir MODELS --measure 200 [--skip_train 1]

writes ``MODELS/ref`` and ``MODELS/classifier`` like ``utils.tiny_models`` does (model,
tokenizer, generation config whose EOS ids are ``</s>`` and ``<|end|>``), both Llama models
over one byte-level BPE tokenizer built on synthetic text (digits one per token).

Data: fresh problems from ``dataset/synthetic.py`` (none of them in ``DIR/synth_train.jsonl``
or ``DIR/synth_test.jsonl``, so the stage scripts' train and test problems are equally unseen).
A share ``--wrong_rate`` of the solutions fall into the problem's trap at their first
equation (e.g. ``3 + 4`` where ``3 * 4`` is right) and end with the wrong box, so the
reference learns to take that wrong branch with about that probability: room for guidance,
decided by one operator token early in the response.

Each example is the chat-formatted user turn holding the record's ``prompt``
(``tokenizer.apply_chat_template(..., add_generation_prompt=True)``, the text the stage
scripts feed with ``--use_chat_template 1``), then the solution and ``<|end|>``; the loss is
on the response tokens only. ``--measure N`` samples 4 responses for each of the first N
test problems (T 0.8, top-p 0.9) and prints pass@1, split by whether the response took
the wrong branch.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from dataset.synthetic import FILES, pretraining_records, took_wrong_branch
from utils.answers import grade
from utils.data import read_jsonl
from utils.guidance import generate_responses
from utils.models import format_prompts, get_stop_ids, load_causal_lm, load_tokenizer, tokenize_prompts
from utils.tiny_models import END, build_model, build_tokenizer

DEFAULTS = {
    # 1200 steps learn the arithmetic for some data draws only (final loss 0.035 -> pass@1 41%,
    # 0.084 -> 15%); 1600 leave a margin
    "ref": {"hidden": 128, "layers": 4, "heads": 4, "steps": 1600, "lr": 3e-3},
    # smaller than the reference, but pretrained long enough to read the problem: a weaker
    # backbone (hidden 64, 2 layers, 300 steps) made a classifier that barely steers
    "classifier": {"hidden": 96, "layers": 3, "heads": 4, "steps": 700, "lr": 3e-3},
}


# --------------------------------------------------------------------------- data


def load_excluded_problems(data_dir: str | Path) -> list[str]:
    """Problem texts of the stage scripts' train and test files (kept out of pretraining)."""
    problems = []
    for data_name, _ in FILES.values():
        path = Path(data_dir) / data_name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; run python dataset/synthetic.py --out_dir {data_dir} first")
        problems.extend(record["problem"] for record in read_jsonl(path))
    return problems


def tokenizer_corpus(examples: list[tuple[dict, bool]]) -> str:
    """Text the BPE is trained on: the formatted prompts and solutions of the examples."""
    return "\n".join(record["prompt"] + "\n" + record["solution"] for record, _ in examples)


def encode_examples(tokenizer, records: list[dict]) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, response ids)`` per record: the chat-template prompt exactly as
    ``utils.models.tokenize_prompts`` tokenises it, then solution + ``<|end|>``."""
    end_id = tokenizer.convert_tokens_to_ids(END)
    texts = format_prompts(tokenizer, [r["prompt"] for r in records], use_chat_template=True)
    prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer([r["solution"] for r in records], add_special_tokens=False)["input_ids"]
    return [(list(p), list(r) + [end_id]) for p, r in zip(prompt_ids, response_ids)]


def check_prompt_ids(tokenizer, record: dict, prompt_ids: list[int]) -> None:
    """The training prefix must be the ids the stage scripts feed at inference."""
    batch = tokenize_prompts(tokenizer, [record["prompt"]], use_chat_template=True)
    if batch["input_ids"][0].tolist() != prompt_ids:
        raise AssertionError("training prompt ids differ from utils.models.tokenize_prompts")


def make_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (-100 on prompt and padding)."""
    width = max(len(p) + len(r) for p, r in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, (prompt, response) in enumerate(examples):
        ids = prompt + response
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, len(prompt) : len(ids)] = torch.tensor(response)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------- training


def train_lm(
    model,
    examples: list[tuple[list[int], list[int]]],
    pad_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_every: int = 100,
    name: str = "model",
) -> list[float]:
    """AdamW with linear warm-up and cosine decay on response tokens; returns the per-step losses."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, min(100, steps // 10))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    order = torch.randperm(len(examples), generator=generator).tolist()
    position, losses, t0 = 0, [], time.time()
    for step in range(steps):
        if position + batch_size > len(order):
            order, position = torch.randperm(len(examples), generator=generator).tolist(), 0
        batch = make_batch([examples[i] for i in order[position : position + batch_size]], pad_id)
        position += batch_size
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            recent = losses[-log_every:]
            print(f"[{name}] step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    return losses


def pretrain(
    data_dir: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    ref: dict | None = None,
    classifier: dict | None = None,
    batch_size: int = 32,
    wrong_rate: float = 0.45,
    num_examples: int | None = None,
    vocab_size: int = 1024,
    tokenizer_examples: int = 3000,
    arch: str = "llama",
    log_every: int = 100,
) -> dict[str, Path]:
    """Build the tokenizer, train both models, write ``out_dir/ref`` and ``out_dir/classifier``."""
    ref = {**DEFAULTS["ref"], **(ref or {})}
    classifier = {**DEFAULTS["classifier"], **(classifier or {})}
    if num_examples is None:  # every step sees fresh problems
        num_examples = max(ref["steps"], classifier["steps"]) * batch_size
    t0 = time.time()
    examples = pretraining_records(num_examples, seed, wrong_rate, exclude=load_excluded_problems(data_dir))
    tokenizer = build_tokenizer(corpus=tokenizer_corpus(examples[:tokenizer_examples]), vocab_size=vocab_size)
    encoded = encode_examples(tokenizer, [record for record, _ in examples])
    check_prompt_ids(tokenizer, examples[0][0], encoded[0][0])
    lengths = [len(p) + len(r) for p, r in encoded]
    print(
        f"data: {len(encoded)} examples ({sum(w for _, w in examples) / len(examples):.0%} trapped), "
        f"vocab {len(tokenizer)}, tokens/example mean {sum(lengths) / len(lengths):.0f} max {max(lengths)}, "
        f"response tokens max {max(len(r) for _, r in encoded)} ({time.time() - t0:.1f} s)",
        flush=True,
    )
    paths = {}
    for offset, (name, spec) in enumerate((("ref", ref), ("classifier", classifier))):
        start = time.time()
        model = build_model(arch, tokenizer, spec["hidden"], spec["layers"], spec["heads"], seed=seed + offset)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[{name}] {n_params / 1e6:.2f} M parameters, {spec['steps']} steps of {batch_size}", flush=True)
        train_lm(model, encoded, tokenizer.pad_token_id, spec["steps"], batch_size, spec["lr"], seed + offset, log_every, name)
        path = Path(out_dir) / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = path
        print(f"[{name}] wrote {path} ({time.time() - start:.0f} s)", flush=True)
    return paths


# --------------------------------------------------------------------------- measuring


@torch.no_grad()
def measure_pass_at_1(
    model_dir: str | Path,
    records: list[dict],
    num_samples: int = 4,
    temperature: float = 0.8,
    top_p: float = 0.9,
    max_new_tokens: int = 96,
    batch_size: int = 128,
    seed: int = 0,
) -> dict:
    """Sampled pass@1 of the model at ``model_dir`` on ``records`` (``num_samples`` each).

    Also splits the samples by :func:`dataset.synthetic.took_wrong_branch` (first
    equation differs from the gold solution's).
    """
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), dtype="float32", device="cpu")
    stop_ids = get_stop_ids(model, tokenizer)
    jobs = [record for record in records for _ in range(num_samples)]
    torch.manual_seed(seed)
    correct, wrong_branch, max_len, truncated = [], [], 0, 0
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        batch = tokenize_prompts(tokenizer, [r["prompt"] for r in chunk], use_chat_template=True)
        responses, lengths = generate_responses(
            model, batch, stop_ids, tokenizer.pad_token_id, max_new_tokens, temperature, top_p
        )
        for row, record in enumerate(chunk):
            length = int(lengths[row])
            ids = responses[row, :length].tolist()
            max_len = max(max_len, length)
            truncated += not ids or ids[-1] not in stop_ids
            text = tokenizer.decode(ids, skip_special_tokens=True)
            correct.append(grade(text, record["answer"], "gsm8k"))
            wrong_branch.append(took_wrong_branch(text, record["solution"]))

    def rate(values):
        return sum(values) / len(values) if values else float("nan")

    on_wrong = [c for c, w in zip(correct, wrong_branch) if w]
    on_right = [c for c, w in zip(correct, wrong_branch) if not w]
    return {
        "num_problems": len(records),
        "num_samples": num_samples,
        "pass@1": rate(correct),
        "wrong_branch_rate": rate(wrong_branch),
        "pass@1_on_wrong_branch": rate(on_wrong),
        "pass@1_on_right_branch": rate(on_right),
        "max_response_tokens": max_len,
        "truncated": truncated,
    }


# --------------------------------------------------------------------------- script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", type=str, required=True, help="folder of synth_train.jsonl / synth_test.jsonl")
    p.add_argument("--out_dir", type=str, required=True, help="writes OUT_DIR/ref and OUT_DIR/classifier")
    p.add_argument("--seed", type=int, default=0, help="seed of the pretraining data, weights and batches")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--skip_train", type=int, default=0, help="1: only measure the models already in OUT_DIR")
    p.add_argument("--batch_size", type=int, default=32, help="sequences per step")
    p.add_argument("--wrong_rate", type=float, default=0.45, help="share of pretraining solutions that fall into the trap")
    p.add_argument("--num_examples", type=int, default=None, help="pretraining problems (default: steps x batch, all fresh)")
    p.add_argument("--vocab_size", type=int, default=1024, help="BPE vocabulary size")
    p.add_argument("--arch", type=str, default="llama", help="model family (utils.tiny_models.ARCHS)")
    for name, spec in DEFAULTS.items():
        prefix = "ref" if name == "ref" else "cls"
        for key, value in spec.items():
            p.add_argument(f"--{prefix}_{key}", type=type(value), default=value, help=f"{name} {key}")
    p.add_argument("--log_every", type=int, default=100, help="steps between loss lines (0: none)")
    p.add_argument("--measure", type=int, default=0, help="after training, pass@1 of ref on the first N test problems")
    p.add_argument("--measure_samples", type=int, default=4, help="samples per problem when measuring")
    p.add_argument("--max_new_tokens", type=int, default=96, help="generation budget when measuring")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if not args.skip_train:
        start = time.time()
        spec = {
            name: {key: getattr(args, f"{'ref' if name == 'ref' else 'cls'}_{key}") for key in DEFAULTS[name]}
            for name in DEFAULTS
        }
        pretrain(
            args.data_dir, args.out_dir, args.seed, spec["ref"], spec["classifier"], args.batch_size,
            args.wrong_rate, args.num_examples, args.vocab_size, arch=args.arch, log_every=args.log_every,
        )
        print(f"[time] pretraining: {time.time() - start:.0f} s", flush=True)
    if args.measure:
        start = time.time()
        records = read_jsonl(Path(args.data_dir) / FILES["test"][0])[: args.measure]
        result = measure_pass_at_1(
            Path(args.out_dir) / "ref", records, args.measure_samples, max_new_tokens=args.max_new_tokens, seed=args.seed
        )
        print("measure: " + json.dumps(result), flush=True)
        print(f"[time] measuring: {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(parse_args())
