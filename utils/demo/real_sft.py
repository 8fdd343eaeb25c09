"""A short supervised fine-tune of SmolLM2-135M-Instruct into a reference that is partly right.

    python -m utils.real_models --out_dir models/ --sft 1 [--sft_source synthetic|gsm8k]

As it ships, SmolLM2-135M-Instruct almost never writes ``\\boxed{}`` (it ends with "The answer
is: N" or "#### N"), so the original's grader (last box only) scores it 0 and guidance has no
signal. Each example is the stage scripts' chat-formatted prompt (``format_prompts(...,
use_chat_template=True)``, default system prompt included) followed by a worked solution and
``<|im_end|>``; the loss is on the response tokens only. Two sources (:data:`SOURCES`):

- ``synthetic`` (the demo's default): the quickstart's synthetic problems
  (``dataset/synthetic.py``), a share ``WRONG_RATE`` of them solved into the trap at the first
  equation, as the quickstart's pretraining does. 60 steps put pass@1 on the synthetic test
  problems at about 27%, half of the samples on the trapped branch: room for guidance. None of
  the problems of ``dataset/synthetic.py --seed 0`` (2000 train, 500 test) is used.
- ``gsm8k``: GSM8K train solutions with their ``<<a*b=c>>`` calculator notes removed, ending
  in ``The answer is \\boxed{N}.``. It teaches the format, not the arithmetic: pass@1 on GSM8K
  test stays about 3%, as the base model's published GSM8K score (about 1%) predicts.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")
BATCH_SIZE = 8
MAX_LENGTH = 384
WRONG_RATE = 0.45  # share of trapped synthetic solutions, as utils.demo.pretrain's default
EXCLUDED_SPLITS = {"num_train": 2000, "num_test": 500, "seed": 0}  # dataset/synthetic.py's defaults


@dataclass(frozen=True)
class Source:
    """Where the fine-tune's (prompt, response) pairs come from, and its schedule."""

    examples: Callable[[int, int, Path | None], list[tuple[str, str]]]  # (count, seed, data) -> pairs
    steps: int
    lr: float
    warmup: int  # the LR ramps linearly over this many steps, then decays linearly to 0 at ``steps``
    data: str | None  # default ``--sft_data`` (None: the source needs no file)
    help: str


def sft_examples(raw_path: Path) -> list[tuple[str, str]]:
    """(prompt, response) pairs from a raw GSM8K file (``question``/``answer`` lines)."""
    from utils.data.problems import gsm8k_record

    pairs = []
    for line in raw_path.read_text().splitlines():
        if not line.strip():
            continue
        record = gsm8k_record(json.loads(line))
        steps = CALCULATOR_NOTE.sub("", record["solution"]).strip()
        pairs.append((record["prompt"], f" {steps}\nThe answer is \\boxed{{{record['answer']}}}."))
    return pairs


def gsm8k_examples(count: int, seed: int, data: Path | None) -> list[tuple[str, str]]:
    """GSM8K train pairs, shuffled with ``seed``, cycled to ``count``."""
    from utils.demo.model_files import RealModelError

    if data is None or not data.is_file():
        raise RealModelError(f"--sft_data {data} does not exist (GSM8K train, raw question/answer lines)")
    pairs = sft_examples(data)
    random.Random(seed).shuffle(pairs)
    return [pairs[i % len(pairs)] for i in range(count)]


def synthetic_examples(count: int, seed: int, data: Path | None = None) -> list[tuple[str, str]]:
    """``count`` fresh synthetic problems, a share ``WRONG_RATE`` of them solved into the trap."""
    from utils.demo.synthetic import generate_splits, pretraining_records

    splits = generate_splits(**EXCLUDED_SPLITS)
    exclude = [record["problem"] for part in splits.values() for record in part]
    return [(record["prompt"], f" {record['solution']}") for record, _ in pretraining_records(count, seed, WRONG_RATE, exclude)]


SOURCES = {
    "synthetic": Source(synthetic_examples, steps=60, lr=5e-5, warmup=5, data=None,
                        help="the quickstart's synthetic problems with traps (the demo's default)"),
    # 10 steps under a 20-step warm-up: the LR peaks at half of ``lr`` (as measured for the README)
    "gsm8k": Source(gsm8k_examples, steps=10, lr=5e-5, warmup=20, data="../shared/datasets/raw/gsm8k/train.jsonl",
                    help="GSM8K train solutions (--sft_data: the raw train file)"),
}


def get_source(name: str) -> Source:
    """The registered source ``name``; fails with the list of valid names."""
    from utils.demo.model_files import RealModelError

    if name not in SOURCES:
        raise RealModelError(f"unknown --sft_source {name!r}; valid: {', '.join(SOURCES)}")
    return SOURCES[name]


def encode(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted prompt, and of the response + EOS (cut to ``MAX_LENGTH`` in all)."""
    from utils.models import format_prompts

    prompt_ids = tokenizer(format_prompts(tokenizer, [prompt], True)[0], add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids, response_ids[: max(MAX_LENGTH - len(prompt_ids), 0)]


def build_sft_reference(ref_dir: Path, source: str, out_dir: Path, data: Path | None = None,
                        steps: int | None = None, seed: int = 0) -> Path:
    """Fine-tune the model in ``ref_dir`` on ``source`` and save it (atomically) to ``out_dir``.

    A complete ``out_dir`` is reused when its ``sft.json`` holds the same settings; other
    settings raise :class:`RealModelError` naming each difference.
    """
    from transformers import AutoModelForCausalLM

    from utils.models import load_tokenizer
    from utils.demo.pretrain import make_batch
    from utils.demo.model_files import RealModelError, is_complete, publish

    spec = get_source(source)
    steps = spec.steps if steps is None else steps
    if steps < 1:
        raise RealModelError(f"--sft_steps must be >= 1, got {steps}")
    data = data if data is not None else (Path(spec.data) if spec.data else None)
    settings = {"base": str(ref_dir), "source": source, "data": str(data) if data else None, "steps": steps,
                "batch_size": BATCH_SIZE, "lr": spec.lr, "warmup": spec.warmup, "seed": seed}
    if source == "synthetic":
        settings.update(wrong_rate=WRONG_RATE, excluded=EXCLUDED_SPLITS)
    if is_complete(out_dir):
        saved = json.loads((out_dir / "sft.json").read_text()) if (out_dir / "sft.json").is_file() else {}
        differ = [f"{key}: {saved.get(key)!r} there, {value!r} now" for key, value in settings.items()
                  if key != "base" and saved.get(key) != value]
        if differ:
            raise RealModelError(f"{out_dir} was fine-tuned with other settings ({'; '.join(differ)}); "
                                 "remove it or choose another --out_dir")
        print(f"reusing {out_dir}")
        return out_dir
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(str(ref_dir))
    pairs = spec.examples(steps * BATCH_SIZE, seed, data)
    model = AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / spec.warmup) * (1 - step / steps))
    start = time.time()
    for step in range(steps):
        chunk = pairs[step * BATCH_SIZE : (step + 1) * BATCH_SIZE]
        batch = make_batch([encode(tokenizer, p, r) for p, r in chunk], tokenizer.pad_token_id)  # loss on the response
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            print(f"sft step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    model.eval()
    publish(out_dir, model, tokenizer, {"sft.json": json.dumps(settings, indent=2)})
    print(f"wrote {out_dir} ({source}, {steps} steps, {time.time() - start:.0f} s)")
    return out_dir
