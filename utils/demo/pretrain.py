"""Pretrain a tiny reference LM on synthetic word problems, on CPU, and cut the classifier LM from it.

    python -m utils.demo.pretrain --data_dir DIR --out_dir MODELS [--seed 0]
    python -m utils.demo.pretrain --data_dir DIR --out_dir MODELS --measure 200 [--skip_train 1]

writes ``MODELS/ref`` and ``MODELS/classifier`` like ``utils.tiny_models`` does (model,
tokenizer, generation config whose EOS ids are ``</s>`` and ``<|end|>``), both Llama models
over one byte-level BPE tokenizer built on synthetic text (digits one per token). The
classifier LM is the trained reference's first ``--cls_layers`` decoder layers (with its
embeddings, final norm and head), as the real-model demo guides SmolLM2 with its 6-layer cut.

Data: fresh problems from ``dataset/synthetic.py`` (none of them in ``DIR/synth_train.jsonl``
or ``DIR/synth_test.jsonl``, so the stage scripts' train and test problems are equally unseen).
A share ``--wrong_rate`` of the solutions fall into the problem's trap at their first
equation (e.g. ``3 + 4`` where ``3 * 4`` is right) and end with the wrong box, so the
reference learns to take that wrong branch with about that probability: room for guidance,
decided by one operator token early in the response.

Each example is the chat-formatted user turn holding the record's ``prompt``
(``tokenizer.apply_chat_template(..., add_generation_prompt=True)``, the text the stage
scripts feed with ``--use_chat_template 1``), then the solution and ``<|end|>``; the loss is
on the response tokens only.

Schedule and stopping rule (:data:`STOP`): the learning rate warms up, then stays constant
while the reference learns to copy and compute; every ``--stop_check_every`` steps a probe
samples held-out problems (T 0.8, top-p 0.9, as the stages sample) and measures pass@1 on
the samples that took the right branch. Once that reaches ``--stop_target``, the learning
rate decays linearly over ``--stop_decay_steps`` and training ends; the decay is what makes
the arithmetic exact (e.g. 50% -> 98% on the right branch). So the reference lands where
guidance has room whatever the seed, and ``--ref_max_steps`` bounds the time for a seed that
learns slowly. ``--measure N`` samples 4 responses for each of the first N test problems
and prints pass@1, split by whether the response took the wrong branch.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from transformers import AutoModelForCausalLM

from utils.demo.synthetic import FILES, generate_problems, pretraining_records, took_wrong_branch
from utils.data.answers import grade
from utils.cli import ArgumentParser, int01, nonneg_int, positive_float, positive_int, run, seed_int, unit_interval
from utils.data.io import read_jsonl
from utils.decoding.generate import generate_responses
from utils.models import format_prompts, get_stop_ids, load_causal_lm, load_tokenizer, tokenize_prompts
from utils.demo.tiny_models import END, build_model, build_tokenizer, first_layers_state

DEFAULTS = {"hidden": 128, "layers": 4, "heads": 4, "lr": 3e-3, "max_steps": 1800}
# The stopping rule: every ``check_every`` steps from ``min_steps`` on, sample ``samples``
# responses to each of ``problems`` held-out problems; once the reference solves ``target`` of
# those on which it takes the right branch, decay the learning rate over ``decay_steps`` and
# stop. The decay makes the arithmetic nearly exact (seed 2: decay from step 700 at 6% -> 72%;
# from 900 at 21% -> 94%; from 1100 at 50% -> 98%), so what the reference still gets wrong is
# the trap, which guidance can fix. Decaying earlier leaves arithmetic errors that blur the
# classifier's signal (seed 0, decay at 21%: Q# round 1 gained 9 points, not 30).
STOP = {"target": 0.5, "min_steps": 500, "check_every": 100, "decay_steps": 300, "problems": 64, "samples": 2}
# the classifier LM: the reference's first CLS_LAYERS decoder layers (no pretraining of its own)
CLS_LAYERS = 2
# problems of the stopping rule's probe come from their own random stream
PROBE_STREAM = 5_000_011


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


def wsd_lr(step: int, lr: float, warmup: int, decay_start: int | None, decay_steps: int) -> float:
    """Warm-up, stable, decay: linear warm-up to ``lr``, constant until ``decay_start`` (None: not
    yet decided), then linear decay to ``0.1 * lr`` over ``decay_steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if decay_start is None or step < decay_start:
        return lr
    return lr * (1.0 - 0.9 * min(1.0, (step - decay_start + 1) / max(1, decay_steps)))


def train_lm(
    model,
    num_examples: int,
    batch_of: Callable[[list[int]], dict[str, torch.Tensor]],
    max_steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    decay_steps: int = 0,
    ready: Callable[[int], bool] | None = None,
    check_every: int = 0,
    min_steps: int = 0,
    log_every: int = 100,
    name: str = "model",
) -> list[float]:
    """AdamW with a warm-up-stable-decay schedule (:func:`wsd_lr`) on ``batch_of(indices)``,
    the batches of a random order of ``num_examples`` examples (reshuffled when used up).

    The stable phase lasts until ``ready(step)`` returns True (asked every ``check_every``
    steps from ``min_steps`` on; it measures the model) or until ``max_steps - decay_steps``;
    then ``decay_steps`` more steps decay the learning rate and training ends. Returns the
    per-step losses.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, min(100, max_steps // 10))
    decay_start = None if ready is not None else max(warmup, max_steps - decay_steps)
    model.train()
    order = torch.randperm(num_examples, generator=generator).tolist()
    position, losses, t0, step = 0, [], time.time(), 0
    while decay_start is None or step < decay_start + decay_steps:
        if position + batch_size > len(order):
            order, position = torch.randperm(num_examples, generator=generator).tolist(), 0
        batch = batch_of(order[position : position + batch_size])
        position += batch_size
        for group in optimizer.param_groups:
            group["lr"] = wsd_lr(step, lr, warmup, decay_start, decay_steps)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if log_every and (step % log_every == 0):
            recent = losses[-log_every:]
            print(f"[{name}] step {step} loss {sum(recent) / len(recent):.4f} ({time.time() - t0:.0f} s)", flush=True)
        if decay_start is None:
            if step >= max_steps - decay_steps:
                print(f"[{name}] not ready after {step} steps; decaying anyway", flush=True)
                decay_start = step
            elif check_every and step >= min_steps and step % check_every == 0:
                model.eval()
                if ready(step):
                    decay_start = step
                model.train()
    model.eval()
    return losses


def probe_records(n: int, seed: int, exclude: Iterable[str]) -> list[dict]:
    """``n`` held-out problems (correct solutions) for the stopping rule: none of them in
    ``exclude`` (the stage scripts' problems and the pretraining problems)."""
    return generate_problems(n, seed * 7919 + PROBE_STREAM, exclude=exclude)


def cut_model(model, num_layers: int):
    """A copy of ``model`` with its embeddings, its first ``num_layers`` decoder layers, its final
    norm and its head (the classifier LM: it reads the problem as the reference learned to)."""
    config = copy.deepcopy(model.config)
    if num_layers > config.num_hidden_layers:
        raise ValueError(f"--cls_layers {num_layers}: the reference has {config.num_hidden_layers} layers")
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:num_layers]
    cut = AutoModelForCausalLM.from_config(config)
    cut.load_state_dict(first_layers_state(model.state_dict(), num_layers), strict=True)
    cut.generation_config = copy.deepcopy(model.generation_config)
    return cut.eval()


def pretrain(
    data_dir: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    ref: dict | None = None,
    stop: dict | None = None,
    cls_layers: int = CLS_LAYERS,
    batch_size: int = 32,
    wrong_rate: float = 0.45,
    num_examples: int | None = None,
    vocab_size: int = 1024,
    tokenizer_examples: int = 3000,
    arch: str = "llama",
    log_every: int = 100,
) -> dict[str, Path]:
    """Build the tokenizer, train the reference until the stopping rule (``stop``, see
    :data:`STOP`) holds, cut the classifier LM from it; write ``out_dir/ref`` and
    ``out_dir/classifier``. ``stop["target"] = 0`` trains ``ref["max_steps"]`` steps unmeasured."""
    ref = {**DEFAULTS, **(ref or {})}
    stop = {**STOP, **(stop or {})}
    if num_examples is None:  # every step sees fresh problems
        num_examples = ref["max_steps"] * batch_size
    t0 = time.time()
    excluded = load_excluded_problems(data_dir)
    examples = pretraining_records(num_examples, seed, wrong_rate, exclude=excluded)
    tokenizer = build_tokenizer(corpus=tokenizer_corpus(examples[:tokenizer_examples]), vocab_size=vocab_size)
    check_prompt_ids(tokenizer, examples[0][0], encode_examples(tokenizer, [examples[0][0]])[0][0])

    def batch_of(indices: list[int]) -> dict[str, torch.Tensor]:  # encoded when first used
        return make_batch(encode_examples(tokenizer, [examples[i][0] for i in indices]), tokenizer.pad_token_id)

    print(f"data: {len(examples)} examples ({sum(w for _, w in examples) / len(examples):.0%} trapped), "
          f"vocab {len(tokenizer)} ({time.time() - t0:.1f} s)", flush=True)
    ready = None
    if stop["target"] > 0:
        seen = excluded + [record["problem"] for record, _ in examples]
        probe = probe_records(stop["problems"], seed, exclude=seen)

        def ready(step: int) -> bool:
            result = sampled_pass_at_1(model, tokenizer, probe, stop["samples"], seed=seed)
            print(f"[ref] step {step} probe: pass@1 {result['pass@1']:.3f}, wrong branch "
                  f"{result['wrong_branch_rate']:.3f}, pass@1 on the right branch "
                  f"{result['pass@1_on_right_branch']:.3f} (target {stop['target']})", flush=True)
            return result["pass@1_on_right_branch"] >= stop["target"]

    start = time.time()
    model = build_model(arch, tokenizer, ref["hidden"], ref["layers"], ref["heads"], seed=seed)
    print(f"[ref] {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, at most "
          f"{ref['max_steps']} steps of {batch_size}", flush=True)
    losses = train_lm(
        model, len(examples), batch_of, ref["max_steps"], batch_size, ref["lr"], seed,
        decay_steps=stop["decay_steps"], ready=ready, check_every=stop["check_every"],
        min_steps=stop["min_steps"], log_every=log_every, name="ref",
    )
    print(f"[ref] {len(losses)} steps ({time.time() - start:.0f} s)", flush=True)
    paths = {"ref": Path(out_dir) / "ref", "classifier": Path(out_dir) / "classifier"}
    classifier = cut_model(model, cls_layers)
    for name, lm in (("ref", model), ("classifier", classifier)):
        lm.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
        print(f"[{name}] {sum(p.numel() for p in lm.parameters()) / 1e6:.2f} M parameters: wrote {paths[name]}", flush=True)
    return paths


# --------------------------------------------------------------------------- measuring


@torch.no_grad()
def sampled_pass_at_1(
    model,
    tokenizer,
    records: list[dict],
    num_samples: int = 4,
    temperature: float = 0.8,
    top_p: float = 0.9,
    max_new_tokens: int = 96,
    batch_size: int = 128,
    seed: int = 0,
) -> dict:
    """Sampled pass@1 of ``model`` on ``records`` (``num_samples`` each), as the stages sample.

    Also splits the samples by :func:`utils.demo.synthetic.took_wrong_branch` (first
    equation differs from the gold solution's). The global RNG is left as it was.
    """
    stop_ids = get_stop_ids(model, tokenizer)
    jobs = [record for record in records for _ in range(num_samples)]
    correct, wrong_branch, max_len, truncated = [], [], 0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
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


def measure_pass_at_1(model_dir: str | Path, records: list[dict], **kwargs) -> dict:
    """:func:`sampled_pass_at_1` of the model saved at ``model_dir``."""
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), dtype="float32", device="cpu")
    return sampled_pass_at_1(model, tokenizer, records, **kwargs)


# --------------------------------------------------------------------------- script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", type=str, required=True, help="folder of synth_train.jsonl / synth_test.jsonl")
    p.add_argument("--out_dir", type=str, required=True, help="writes OUT_DIR/ref and OUT_DIR/classifier")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the pretraining data, weights and batches")
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads")
    p.add_argument("--skip_train", type=int01, default=0, help="1: only measure the models already in OUT_DIR")
    p.add_argument("--batch_size", type=positive_int, default=32, help="sequences per step")
    p.add_argument("--wrong_rate", type=unit_interval, default=0.45, help="share of pretraining solutions that fall into the trap, in [0, 1]")
    p.add_argument("--num_examples", type=positive_int, default=None, help="pretraining problems (default: max_steps x batch, all fresh)")
    p.add_argument("--vocab_size", type=positive_int, default=1024, help="BPE vocabulary size")
    p.add_argument("--arch", type=str, default="llama", help="model family (utils.tiny_models.ARCHS)")
    p.add_argument("--ref_hidden", type=positive_int, default=DEFAULTS["hidden"], help="reference hidden size")
    p.add_argument("--ref_layers", type=positive_int, default=DEFAULTS["layers"], help="reference decoder layers")
    p.add_argument("--ref_heads", type=positive_int, default=DEFAULTS["heads"], help="reference attention heads")
    p.add_argument("--ref_lr", type=positive_float, default=DEFAULTS["lr"], help="peak learning rate")
    p.add_argument("--ref_max_steps", type=positive_int, default=DEFAULTS["max_steps"],
                   help="steps at most, decay included (the stopping rule usually ends sooner)")
    p.add_argument("--stop_target", type=unit_interval, default=STOP["target"],
                   help="stop when the probe's pass@1 on the right branch reaches this (0: no probe, train --ref_max_steps)")
    p.add_argument("--stop_min_steps", type=nonneg_int, default=STOP["min_steps"], help="first step the probe runs at")
    p.add_argument("--stop_check_every", type=positive_int, default=STOP["check_every"], help="steps between probes")
    p.add_argument("--stop_decay_steps", type=nonneg_int, default=STOP["decay_steps"],
                   help="steps of learning-rate decay after the rule holds")
    p.add_argument("--stop_problems", type=positive_int, default=STOP["problems"], help="held-out problems the probe samples")
    p.add_argument("--stop_samples", type=positive_int, default=STOP["samples"], help="samples per probe problem")
    p.add_argument("--cls_layers", type=positive_int, default=CLS_LAYERS,
                   help="the classifier LM is the reference's first N decoder layers")
    p.add_argument("--log_every", type=nonneg_int, default=100, help="steps between loss lines (0: none)")
    p.add_argument("--measure", type=nonneg_int, default=0, help="after training, pass@1 of ref on the first N test problems")
    p.add_argument("--measure_samples", type=positive_int, default=4, help="samples per problem when measuring")
    p.add_argument("--max_new_tokens", type=positive_int, default=96, help="generation budget when measuring")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if not args.skip_train:
        start = time.time()
        ref = {"hidden": args.ref_hidden, "layers": args.ref_layers, "heads": args.ref_heads, "lr": args.ref_lr,
               "max_steps": args.ref_max_steps}
        stop = {key: getattr(args, f"stop_{key}") for key in STOP}
        pretrain(
            args.data_dir, args.out_dir, args.seed, ref, stop, args.cls_layers, args.batch_size,
            args.wrong_rate, args.num_examples, args.vocab_size, arch=args.arch, log_every=args.log_every,
        )
        print(f"[time] pretraining: {time.time() - start:.0f} s", flush=True)
    if args.measure:
        start = time.time()
        records = read_jsonl(Path(args.data_dir) / FILES["test"][0])[: args.measure]
        result = measure_pass_at_1(
            Path(args.out_dir) / "ref", records, num_samples=args.measure_samples,
            max_new_tokens=args.max_new_tokens, seed=args.seed,
        )
        print("measure: " + json.dumps(result), flush=True)
        print(f"[time] measuring: {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    run(main, parse_args())
