"""Tiny random causal LMs sharing a locally built tokenizer, for tests and offline runs.

    python -m utils.tiny_models --out_dir tiny [--arch llama|qwen2|qwen3|mistral|gpt2]

writes ``tiny/ref`` (the reference policy) and ``tiny/classifier`` (a smaller model of the
same family), both loadable with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained``. The tokenizer is a byte-level BPE trained in
milliseconds on a built-in corpus (digits split one per token); it has a chat template,
a BOS, an EOS, an end-of-turn token that is a second stop id, and a pad token distinct
from both. No download.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from utils.registry import choose

BOS, EOS, PAD, UNK, END = "<s>", "</s>", "<pad>", "<unk>", "<|end|>"
# The pre-tokenizer split of Qwen2's tokenizer (one digit per pre-token). transformers loads a
# qwen2 checkpoint's tokenizer as ``Qwen2Tokenizer`` whatever it was saved as, and that class
# rebuilds its pipeline with this split; using it here gives identical ids for every arch.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = """Problem:

Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May? Write your answer inside \\boxed{}.

Solution: Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May.
The answer is \\boxed{72}.
Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?
Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs.
Her parents decided to give her $15 for that purpose, and her grandparents twice as much as her parents.
James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?
If x + y = 10 and x - y = 2, then x = 6 and y = 4. Compute \\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}.
Find the value of \\sqrt{16} \\cdot 3^2 - (7 \\times 8) \\div 4, and the interval (-\\infty, 2] or [0, 1).
The total cost is 3 * 15 = 45 dollars, so each person pays 45 / 3 = 15 dollars. Therefore the answer is 15.
She has 5 apples, buys 12 more apples and gives away 7 apples; then she has 10 apples left.
"""


def build_tokenizer(corpus: str = CORPUS, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (deterministic for a given corpus) with chat template and pad token."""
    specials = [PAD, BOS, EOS, UNK, END, *ROLE_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[END, *ROLE_TOKENS],
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    return tokenizer


def _llama_like(config_cls, **extra):
    def make(vocab_size, hidden, layers, heads, special):
        return config_cls(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            **special,
            **extra,
        )

    return make


def _gpt2(vocab_size, hidden, layers, heads, special):
    return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=2048, **special)


ARCHS = {
    "llama": _llama_like(LlamaConfig),
    "qwen2": _llama_like(Qwen2Config),
    "qwen3": _llama_like(Qwen3Config, head_dim=16),
    "mistral": _llama_like(MistralConfig, sliding_window=None),
    "gpt2": _gpt2,
}
# (hidden, layers, heads): the reference is larger than the classifier
SIZES = {"ref": (64, 4, 4), "classifier": (32, 2, 2)}


def build_model(arch: str, tokenizer, hidden: int, layers: int, heads: int, seed: int = 0):
    """A random causal LM of family ``arch`` over ``tokenizer`` with the tokenizer's stop ids."""
    make_config = choose("arch", arch, ARCHS)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = make_config(len(tokenizer), hidden, layers, heads, special)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END)],
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


_LAYER_KEY = re.compile(r"^(?:model\.layers|transformer\.h)\.(\d+)\.")


def first_layers_state(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """A causal LM's state dict without the decoder layers from ``num_layers`` on (embeddings,
    final norm and head stay)."""
    kept = {}
    for key, value in state.items():
        match = _LAYER_KEY.match(key)
        if match is None or int(match.group(1)) < num_layers:
            kept[key] = value
    return kept


def write_tiny_models(out_dir: str | Path, arch: str = "llama", seed: int = 0) -> dict[str, Path]:
    """Write ``out_dir/ref`` and ``out_dir/classifier`` (model + tokenizer); returns their paths."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    paths = {}
    for offset, (name, (hidden, layers, heads)) in enumerate(SIZES.items()):
        model = build_model(arch, tokenizer, hidden, layers, heads, seed=seed + offset)
        path = out_dir / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = path
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", type=str, required=True, help="writes OUT_DIR/ref and OUT_DIR/classifier")
    parser.add_argument("--arch", type=str, default="llama", choices=sorted(ARCHS), help="model family")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    paths = write_tiny_models(args.out_dir, args.arch, args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main(parse_args())
