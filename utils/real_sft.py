"""A short supervised fine-tune of SmolLM2-135M-Instruct into a reference that is partly right.

    python -m utils.real_models --out_dir models/ --sft 1      (the usual entry point)

As it ships, SmolLM2-135M-Instruct almost never writes ``\\boxed{}`` (it ends with "The answer
is: N" or "#### N"), so the original's grader (last box only) scores it 0 and guidance has no
signal. The fine-tune teaches the project's format on GSM8K train: each example is the stage
scripts' chat-formatted prompt (``format_prompts(..., use_chat_template=True)``, default system
prompt included) followed by the worked solution with its ``<<a*b=c>>`` calculator notes
removed and ``The answer is \\boxed{N}.<|im_end|>``; the loss is on the response tokens only.
Problems are drawn from the train split only; the demo's test problems are GSM8K test.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import torch

CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")
DEFAULT_STEPS = 10  # enough to learn the box; a step costs 22 s on 2 cores (batch 8)
BATCH_SIZE = 8
LR = 5e-5
MAX_LENGTH = 384


def sft_examples(raw_path: Path) -> list[tuple[str, str]]:
    """(prompt, response) pairs from a raw GSM8K file (``question``/``answer`` lines)."""
    from dataset.prepare_data import gsm8k_record

    pairs = []
    for line in raw_path.read_text().splitlines():
        if not line.strip():
            continue
        record = gsm8k_record(json.loads(line))
        steps = CALCULATOR_NOTE.sub("", record["solution"]).strip()
        pairs.append((record["prompt"], f" {steps}\nThe answer is \\boxed{{{record['answer']}}}."))
    return pairs


def encode(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted prompt, and of the response + EOS (cut to ``MAX_LENGTH`` in all)."""
    from utils.models import format_prompts

    prompt_ids = tokenizer(format_prompts(tokenizer, [prompt], True)[0], add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids, response_ids[: max(MAX_LENGTH - len(prompt_ids), 0)]


def build_sft_reference(ref_dir: Path, raw_path: Path, out_dir: Path, steps: int | None = None, seed: int = 0) -> Path:
    """Fine-tune the model in ``ref_dir`` and save it (atomically) to ``out_dir``; reuse it if present."""
    from transformers import AutoModelForCausalLM

    from utils.models import load_tokenizer
    from utils.pretrain import make_batch
    from utils.real_models import RealModelError, is_complete, publish

    if is_complete(out_dir):
        print(f"reusing {out_dir}")
        return out_dir
    if not raw_path.is_file():
        raise RealModelError(f"--sft_data {raw_path} does not exist (GSM8K train, raw question/answer lines)")
    steps = DEFAULT_STEPS if steps is None else steps
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = load_tokenizer(str(ref_dir))
    model = AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float32)
    model.train()
    pairs = sft_examples(raw_path)
    rng.shuffle(pairs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20) * (1 - step / steps))
    start = time.time()
    for step in range(steps):
        chunk = pairs[(step * BATCH_SIZE) % len(pairs) :][:BATCH_SIZE]
        batch = make_batch([encode(tokenizer, p, r) for p, r in chunk], tokenizer.pad_token_id)  # loss on the response
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == steps - 1:
            print(f"sft step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    model.eval()
    settings = {"base": str(ref_dir), "data": str(raw_path), "steps": steps, "batch_size": BATCH_SIZE, "lr": LR, "seed": seed}
    publish(out_dir, model, tokenizer, {"sft.json": json.dumps(settings, indent=2)})
    print(f"wrote {out_dir}")
    return out_dir
