"""Model and tokenizer loading, shared by every stage.

Everything that depends on the model family lives here once: dtype names, pad-token
set-up, stop ids, chat-template tokenisation, the reference/classifier vocabulary
check and the attention window of a backbone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from utils.registry import choose

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Tokens used as padding when a tokenizer has none, in order of preference. Padding is
# always masked, so any id works; one distinct from EOS keeps decoded text readable.
PAD_TOKEN_CANDIDATES = (
    "<|finetune_right_pad_id|>",  # Llama 3.1+
    "<|reserved_special_token_0|>",  # Llama 3.0
    "<|pad|>",
    "<pad>",
    "[PAD]",
    "<|endoftext|>",  # Qwen base models, when it is not the EOS
)


def get_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (valid: float32, bfloat16, float16)."""
    return choose("dtype", name, DTYPES)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token if it has none (in place); pads on the left.

    Prefers an existing pad-like token distinct from EOS, else falls back to EOS: the
    end of a response is found from the stop ids and recorded lengths, never by searching
    for padding, so a pad equal to EOS is safe.
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is not None:
        return tokenizer
    vocab = tokenizer.get_vocab()
    for candidate in PAD_TOKEN_CANDIDATES:
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            return tokenizer
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# A hub id: "name" or "org/name" (letters, digits, "-", "_", ".").
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_local_path(name_or_path: str | os.PathLike) -> bool:
    """Whether a model argument is judged as a local path rather than a hub id: it exists, or
    starts with ``/``, ``.`` or ``~``, or is not of the hub's ``name`` / ``org/name`` form
    (``checkpoints/exp/ckpt_10``, with two slashes). ``meta-llama/Meta-Llama-3-8B-Instruct``
    stays a hub id unless a folder of that name exists here."""
    text = os.fspath(name_or_path)
    return os.path.exists(text) or text.startswith(("/", ".", "~")) or not HUB_ID.fullmatch(text)


def unreadable_files(folder: str | os.PathLike) -> list[str]:
    """Files of a model folder that cannot be read: ``*.json`` that does not parse,
    ``*.safetensors`` whose header or size is wrong (e.g. truncated)."""
    from safetensors import safe_open

    folder, bad = Path(folder), []
    if not folder.is_dir():
        return bad
    for path in sorted(folder.glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            bad.append(path.name)
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception:  # safetensors raises its own SafetensorError (an Exception)
            bad.append(path.name)
    return bad


def _check_exists(what: str, text: str) -> None:
    if is_local_path(text) and not os.path.exists(text):
        raise FileNotFoundError(f"{what} {text} does not exist (a local path; hub ids have the form org/name)")


def check_model_files(name_or_path: str | os.PathLike, what: str = "model") -> None:
    """Before a stage writes anything: a local model or checkpoint folder must exist and its
    json and safetensors files must be readable (headers only; the weights load later). Hub
    ids are left to their load."""
    text = os.fspath(name_or_path)
    _check_exists(what, text)
    bad = unreadable_files(text) if is_local_path(text) else []
    if bad:
        raise ValueError(f"{what} {text}: {', '.join(bad)} cannot be read (truncated or corrupt)")


@contextlib.contextmanager
def loading(what: str, name_or_path: str | os.PathLike):
    """Around a library's load of ``what`` (tokenizer, model, checkpoint, ...) from
    ``name_or_path``: a local path (:func:`is_local_path`) that does not exist is refused
    before the hub is asked (no advice about the internet connection), and any library error
    (transformers, tokenizers, safetensors, json, torch) becomes one ``ValueError`` naming the
    path and the files of it that cannot be read. Out-of-memory errors pass through."""
    text = os.fspath(name_or_path)
    local = is_local_path(text)
    _check_exists(what, text)
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # tokenizers and safetensors raise plain Exception subclasses
        bad = unreadable_files(text) if local else []
        where = f" ({', '.join(bad)} cannot be read)" if bad else "" if local else " (no such local folder: a hub id)"
        raise ValueError(f"cannot load the {what} {text}{where}: {type(err).__name__}: {err}") from err


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Tokenizer with left padding and a pad token."""
    with loading("tokenizer", name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    return ensure_pad_token(tokenizer)


def load_causal_lm(
    name_or_path: str, dtype: str | torch.dtype = "bfloat16", device: str | torch.device | None = None
) -> torch.nn.Module:
    """A frozen causal LM in eval mode (the reference policy)."""
    if isinstance(dtype, str):
        dtype = get_dtype(dtype)
    with loading("model", name_or_path):
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    model.to(device or default_device()).eval().requires_grad_(False)
    return model


def get_stop_ids(model_or_config, tokenizer: PreTrainedTokenizerBase | None = None) -> list[int]:
    """Every id that ends a response: the generation config's EOS ids plus the tokenizer's EOS.

    Llama-3 Instruct, for instance, stops on both ``<|end_of_text|>`` and ``<|eot_id|>``.
    """
    config = getattr(model_or_config, "generation_config", None) or model_or_config
    ids: list[int] = []
    eos = getattr(config, "eos_token_id", None)
    if eos is not None:
        ids.extend([eos] if isinstance(eos, int) else list(eos))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model has no EOS token id in its generation config or tokenizer")
    return sorted(set(int(i) for i in ids))


def response_lengths(response_ids: torch.Tensor, stop_ids: Iterable[int]) -> torch.Tensor:
    """Length of each generated response, counting up to and including its first stop id.

    ``response_ids`` [batch, steps] holds only generated tokens; a row without a stop id
    (cut by ``max_new_tokens``) has the full length. Returns [batch] (long).
    """
    stops = torch.as_tensor(list(stop_ids), device=response_ids.device)
    is_stop = torch.isin(response_ids, stops)  # [batch, steps]
    first_stop = is_stop.int().argmax(dim=1)  # [batch], 0 when there is none
    return torch.where(is_stop.any(dim=1), first_stop + 1, response_ids.shape[1]).long()


def format_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], use_chat_template: bool) -> list[str]:
    """The exact text fed to the model: the prompt, wrapped as a user turn when ``use_chat_template``."""
    if not use_chat_template:
        return list(prompts)
    if tokenizer.chat_template is None:
        raise ValueError("--use_chat_template 1 but the tokenizer has no chat template; use --use_chat_template 0")
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    use_chat_template: bool,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` / ``attention_mask`` [batch, prompt_len] of raw prompts."""
    return tokenize_texts(tokenizer, format_prompts(tokenizer, prompts, use_chat_template), use_chat_template, device)


def tokenize_texts(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    use_chat_template: bool,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` / ``attention_mask`` of texts from ``format_prompts``, and nothing else.

    Only these two keys are returned: ``generate`` rejects ``token_type_ids``. With a chat
    template the template already holds the BOS token, so no special tokens are added.
    """
    if tokenizer.padding_side != "left":
        raise ValueError("prompts must be left-padded; load the tokenizer with utils.models.load_tokenizer")
    encoded = tokenizer(
        list(texts), add_special_tokens=not use_chat_template, padding=True, return_tensors="pt", return_attention_mask=True
    )
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    if device is not None:
        batch = {key: value.to(device) for key, value in batch.items()}
    return batch


def left_pad(sequences: list[list[int]], pad_token_id: int, device=None) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` / ``attention_mask`` [batch, max_len] from id lists."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, width - len(seq) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def attention_window(config) -> tuple[int | None, bool]:
    """``(window, mixed)``: the sliding attention window of a backbone (None = full attention
    everywhere) and whether some of its layers attend fully, as ``transformers`` masks them.

    A query at cache slot ``q`` sees slots ``> q - window``. Configs with ``layer_types``
    (Qwen2/3, Gemma, ...) name each layer's attention; without them ``sliding_window``
    applies to every layer (Mistral). Other kinds of attention layers are refused.
    """
    config = config.get_text_config()
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:
        return window, False
    other = sorted(set(types) - {"full_attention", "sliding_attention"})
    if other:
        raise ValueError(f"the classifier backbone ({config.model_type}) has {', '.join(other)} layers; guided "
                         "decoding supports full and sliding-window attention only")
    if "sliding_attention" not in types:
        return None, False
    return window, "full_attention" in types


def config_vocab_size(name_or_path: str) -> int:
    """Vocabulary of a model from its config alone, before any weights are read."""
    with loading("model config", name_or_path):
        return AutoConfig.from_pretrained(name_or_path).vocab_size


def check_vocab_compatible(
    ref_tokenizer: PreTrainedTokenizerBase,
    classifier_vocab_size: int,
    classifier_tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """Refuse a classifier that cannot read every token the reference tokenizer produces.

    The classifier consumes the reference's token ids, so the tokenizers must agree and
    the classifier's embedding must cover the tokenizer (the reference's logits may be
    wider, e.g. Qwen2.5 7B pads to 152064 while 1.5B has 151936 rows: that is fine).
    """
    ref_size = len(ref_tokenizer)
    if classifier_tokenizer is not None:
        cls_size = len(classifier_tokenizer)
        if cls_size != ref_size or classifier_tokenizer.get_vocab() != ref_tokenizer.get_vocab():
            raise ValueError(
                f"incompatible vocabularies: the reference tokenizer has {ref_size} tokens and the classifier "
                f"tokenizer has {cls_size} tokens{' with different ids' if cls_size == ref_size else ''}; "
                "the classifier must share the reference model's tokenizer"
            )
    if classifier_vocab_size < ref_size:
        raise ValueError(
            f"incompatible vocabularies: the reference tokenizer has {ref_size} tokens but the classifier's "
            f"embedding has only {classifier_vocab_size} rows; the classifier must share the reference model's tokenizer"
        )


def check_classifier_vocab(ref_tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """:func:`check_vocab_compatible` for a classifier LM or checkpoint (hub id or folder) from its
    config and tokenizer files, before any weights are read. A folder without a tokenizer
    (checkpoints of the original code) is checked on its embedding size alone."""
    vocab_size = config_vocab_size(source)
    folder = Path(source)
    has_tokenizer = not folder.is_dir() or (folder / "tokenizer_config.json").is_file()
    check_vocab_compatible(ref_tokenizer, vocab_size, load_tokenizer(source) if has_tokenizer else None)
