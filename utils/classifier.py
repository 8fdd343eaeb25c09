"""The Q# classifier: a causal-LM backbone with a value head.

Two heads (``classifier_type``):

- ``V``: ``score`` maps the hidden state after a token to ``A`` logits; the value of
  action ``a`` in state ``s`` is read at the position of ``a`` (V(s + a)).
- ``Q``: ``score`` maps the hidden state of ``s`` to ``A`` logits *per vocabulary token*
  (a ``[vocab * A, hidden]`` matrix, token-major); the value of ``a`` is row block ``a``.
  Only the rows that are needed are ever multiplied (gathered per target/candidate token).

``A`` is 1 for ``bce``/``mse`` (one logit ``l``, prediction ``sigmoid(l)``) and
``num_atoms`` for ``mle`` (a histogram over atoms evenly spaced in ``[V_min, V_max]``).

Checkpoints keep the layout of the original code: backbone weights under
``<base_model_prefix>.*`` (``model.*`` for Llama/Qwen/Mistral) and the head under
``score.*`` in the safetensors files, plus the backbone's own ``config.json``. The head
settings travel in that config under ``qsharp_classifier`` so a checkpoint describes
itself; original checkpoints, which lack the key, take the settings from the caller
(their ``args.json``) or from the shape of ``score.weight``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from utils.data.io import temporary_prefix
from utils.models import get_dtype, loading
from utils.registry import choose

CLASSIFIER_TYPES = ("Q", "V")
LOSS_TYPES = ("bce", "mse", "mle")
INIT_MODES = ("zero", "random", "reuse")  # how a fresh head starts; "warmstart" = load a checkpoint
CONFIG_KEY = "qsharp_classifier"
HEAD_PREFIX = "score."


@dataclasses.dataclass
class ClassifierSpec:
    """What the head predicts; saved in the checkpoint's config."""

    classifier_type: str = "V"
    loss_type: str = "bce"
    num_atoms: int = 11
    V_min: float = 0.0
    V_max: float = 1.0
    use_bias: bool = False

    def __post_init__(self):
        choose("classifier_type", self.classifier_type, CLASSIFIER_TYPES)
        choose("loss_type", self.loss_type, LOSS_TYPES)
        self.num_atoms, self.V_min, self.V_max = int(self.num_atoms), float(self.V_min), float(self.V_max)
        self.use_bias = bool(self.use_bias)
        if self.loss_type == "mle":
            if self.num_atoms < 2:
                raise ValueError(f"--num_atoms must be at least 2 for loss_type mle, got {self.num_atoms}")
            if not self.V_max > self.V_min:
                raise ValueError(f"--V_max ({self.V_max}) must be larger than --V_min ({self.V_min})")

    @property
    def num_outputs(self) -> int:
        """Logits per (state, action): ``num_atoms`` for mle, else 1."""
        return self.num_atoms if self.loss_type == "mle" else 1

    def atoms(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """Atom values [num_atoms] of the mle histogram."""
        return torch.linspace(self.V_min, self.V_max, self.num_atoms, device=device, dtype=dtype)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ClassifierSpec":
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


# ----------------------------------------------------------------------------- math


def expected_reward(logits: torch.Tensor, spec: ClassifierSpec) -> torch.Tensor:
    """E[R] from head logits [..., A] -> [...]: sigmoid(l), or the histogram mean for mle."""
    if spec.loss_type == "mle":
        return logits.float().softmax(-1) @ spec.atoms(logits.device)
    return torch.sigmoid(logits.float()[..., 0])


def atom_index(targets: torch.Tensor, spec: ClassifierSpec) -> torch.Tensor:
    """Index of the atom nearest to each target (long, same shape), ties to the even index.

    With the default atoms (11 in [0, 1]) this is the original's ``round(r * 10)`` clamped to
    [0, 10] on float32, bit for bit; the original hard-codes that formula, so with other
    ``num_atoms``/``V_min``/``V_max`` it bins wrongly, where this takes the nearest atom."""
    scaled = (targets.float() - spec.V_min) / (spec.V_max - spec.V_min) * (spec.num_atoms - 1)
    return scaled.round().clamp(0, spec.num_atoms - 1).long()


def per_position_loss(logits: torch.Tensor, targets: torch.Tensor, spec: ClassifierSpec) -> torch.Tensor:
    """Unreduced loss [batch, T] from logits [batch, T, A] and targets [batch, T].

    bce: binary cross-entropy of sigmoid(l) against the target in [0, 1];
    mse: (sigmoid(l) - target)^2; mle: -log pmf(nearest atom of the target).
    """
    logits = logits.float()
    if spec.loss_type == "bce":
        return F.binary_cross_entropy_with_logits(logits[..., 0], targets.float(), reduction="none")
    if spec.loss_type == "mse":
        return (torch.sigmoid(logits[..., 0]) - targets.float()) ** 2
    log_pmf = logits.log_softmax(-1)  # [batch, T, A]
    return -log_pmf.gather(-1, atom_index(targets, spec).unsqueeze(-1)).squeeze(-1)


def reduce_loss(
    losses: torch.Tensor, loss_mask: torch.Tensor, loss_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over each sequence's target positions, then over sequences that have any.

    ``losses`` and ``loss_mask`` are [batch, T]. ``loss_weights`` is [batch] (the original's
    per-example weight: it multiplies the example's mean) or [batch, T] (a weight per
    position; the divisor stays the number of target positions). As in the original, an
    example of weight 0 still counts in the batch mean; unlike it, an example without any
    target position is left out (the original's mean becomes NaN, 0/0).
    """
    mask = loss_mask.to(losses.dtype)
    if loss_weights is not None and loss_weights.dim() == 1:
        loss_weights = loss_weights[:, None]
    weighted = losses * mask if loss_weights is None else losses * mask * loss_weights.to(losses.dtype)
    counts = mask.sum(-1)  # [batch]
    per_sequence = weighted.sum(-1) / counts.clamp(min=1)
    has_targets = (counts > 0).to(losses.dtype)
    return (per_sequence * has_targets).sum() / has_targets.sum().clamp(min=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counting only unmasked ones (left padding gets 0), [batch, T]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------- model


class QSharpClassifier(nn.Module):
    """A causal-LM backbone (``self.model``) with a Q or V head (``self.score``)."""

    def __init__(self, backbone: PreTrainedModel, spec: ClassifierSpec, head: nn.Linear | None = None):
        super().__init__()
        self.model = backbone
        self.spec = spec
        self.config = backbone.config
        setattr(self.config, CONFIG_KEY, spec.to_dict())
        hidden, vocab = self.config.hidden_size, self.vocab_size
        out_features = spec.num_outputs * (vocab if spec.classifier_type == "Q" else 1)
        if head is None:
            param = next(backbone.parameters())
            head = nn.Linear(hidden, out_features, bias=spec.use_bias, device=param.device, dtype=param.dtype)
            nn.init.zeros_(head.weight)
            if head.bias is not None:
                nn.init.zeros_(head.bias)
        if tuple(head.weight.shape) != (out_features, hidden) or (head.bias is not None) != spec.use_bias:
            raise ValueError(
                f"head shape {tuple(head.weight.shape)} (bias: {head.bias is not None}) does not fit a "
                f"{spec.classifier_type}/{spec.loss_type} head with {spec.num_outputs} output(s) per token, "
                f"vocabulary {vocab} and hidden size {hidden} (expected {(out_features, hidden)}, bias: {spec.use_bias})"
            )
        self.score = head

    # ---- properties
    @property
    def vocab_size(self) -> int:
        """Token ids the classifier can read (rows of its input embedding)."""
        return self.model.get_input_embeddings().num_embeddings

    @property
    def device(self) -> torch.device:
        return self.score.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.score.weight.dtype

    # ---- forward pieces
    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        """Last hidden states [batch, T, hidden] and the (updated) cache.

        ``attention_mask`` is 2-D [batch, cache_len + T] or an additive 4-D mask; position
        ids default to the count of unmasked tokens (left padding safe).
        """
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            position_ids = position_ids_from_mask(attention_mask)[:, -input_ids.shape[1] :]
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        return out.last_hidden_state, (out.past_key_values if use_cache else None)

    def head_logits(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Head logits of (state, token) pairs.

        V: ``hidden`` [..., H] is the state *after* the token -> [..., A] (``token_ids`` unused).
        Q: ``hidden`` [..., H] is the state *before* the token and ``token_ids`` [..., k]
        the tokens -> [..., k, A]; only those k row blocks of the head are multiplied.
        ``token_ids=None`` with Q gives every token: [..., vocab, A].
        """
        A = self.spec.num_outputs
        if self.spec.classifier_type == "V":
            return self.score(hidden).unflatten(-1, (1, A))[..., 0, :]
        if token_ids is None:
            return self.score(hidden).unflatten(-1, (self.vocab_size, A))
        weight = self.score.weight.view(self.vocab_size, A, -1)  # [vocab, A, H]
        rows = weight[token_ids]  # [..., k, A, H]
        logits = torch.einsum("...h,...kah->...ka", hidden, rows)
        if self.score.bias is not None:
            logits = logits + self.score.bias.view(self.vocab_size, A)[token_ids]
        return logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Value logits of every (prefix, next token) pair of the sequences, [batch, T - 1, A].

        Entry ``t`` scores action ``input_ids[:, t + 1]`` in state ``input_ids[:, : t + 1]``
        (Q: head row of that token at position t; V: head at position t + 1).
        """
        hidden, _ = self.hidden_states(input_ids, attention_mask)
        if self.spec.classifier_type == "V":
            return self.head_logits(hidden[:, 1:])
        return self.head_logits(hidden[:, :-1], input_ids[:, 1:].unsqueeze(-1))[..., 0, :]

    # ---- training helpers
    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """E[R] [...] from logits [..., A]."""
        return expected_reward(logits, self.spec)

    def loss(self, logits, targets, loss_mask, loss_weights=None) -> torch.Tensor:
        """Scalar training loss: per-position loss averaged over target positions, then sequences."""
        return reduce_loss(per_position_loss(logits, targets, self.spec), loss_mask, loss_weights)

    # ---- construction
    @classmethod
    def from_causal_lm(
        cls,
        lm: str | PreTrainedModel,
        spec: ClassifierSpec,
        init_mode: str = "zero",
        dtype: str | torch.dtype | None = None,
        seed: int | None = None,
        rank: int = 0,
    ) -> "QSharpClassifier":
        """A new classifier on the backbone of a causal LM (hub id, local path or model).

        ``init_mode`` acts on a Q head as in the original: ``zero`` (weight and bias 0),
        ``random`` (the backbone's default init: normal with std = the config's
        ``initializer_range``, bias 0), ``reuse`` (the LM's ``lm_head`` rows repeated per atom,
        row ``v * A + a`` = ``lm_head[v]``, bias 0). The original ignores it for a V head, which
        keeps the default init (normal, bias 0) under ``random`` and ``reuse``; ``zero`` zeroes
        a V head here (the original leaves it at the default init too).

        ``seed`` is the training ``--seed``: the draw is seeded with ``seed * 42 + rank * 100003``,
        as the original's ``set_seed`` before loading, so the head comes out the same (float32, CPU).
        """
        choose("init_mode", init_mode, INIT_MODES)
        if isinstance(dtype, str):
            dtype = get_dtype(dtype)
        if isinstance(lm, (str, os.PathLike)):
            with loading("classifier base model", lm):
                lm = AutoModelForCausalLM.from_pretrained(lm, **({"dtype": dtype} if dtype else {}))
        elif dtype is not None:
            lm = lm.to(dtype)
        model = cls(lm.base_model, spec)  # weight and bias 0
        if seed is not None:
            torch.manual_seed(seed * 42 + rank * 100003)
        with torch.no_grad():
            if init_mode == "random" or (init_mode == "reuse" and spec.classifier_type == "V"):
                std = getattr(model.config, "initializer_range", 0.02)
                model.score.weight.normal_(0.0, std)
            elif init_mode == "reuse":
                rows = lm.get_output_embeddings().weight[: model.vocab_size]  # [vocab, H]
                model.score.weight.copy_(rows.repeat_interleave(spec.num_outputs, dim=0))
        return model

    def save_pretrained(
        self, save_directory: str | os.PathLike, tokenizer=None, max_shard_size: str = "5GB", extra_state: dict | None = None
    ) -> None:
        """Write config.json (with the head settings), safetensors weights, the tokenizer and
        ``extra_state`` (``{file name: object}``, saved with ``torch.save``, e.g. the optimizer;
        a ``.json`` name is written as JSON).

        The directory is assembled under a temporary name and renamed into place, so a
        killed job never leaves a half-written checkpoint.
        """
        from huggingface_hub import save_torch_state_dict

        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(target.name), dir=target.parent))
        try:
            prefix = self.model.base_model_prefix
            state = {f"{prefix}.{key}": value for key, value in self.model.state_dict().items()}
            state.update({HEAD_PREFIX + key: value for key, value in self.score.state_dict().items()})
            setattr(self.config, CONFIG_KEY, self.spec.to_dict())
            self.config.save_pretrained(tmp)
            save_torch_state_dict({k: v.contiguous() for k, v in state.items()}, tmp, max_shard_size=max_shard_size)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for name, state_dict in (extra_state or {}).items():
                if name.endswith(".json"):
                    (tmp / name).write_text(json.dumps(state_dict, indent=2))
                else:
                    torch.save(state_dict, tmp / name)
            if target.exists():  # displaced under a temporary name: a kill in between leaves it to be cleaned
                old = target.with_name(temporary_prefix(target.name) + "old")
                os.replace(target, old)
                try:
                    os.replace(tmp, target)
                except OSError:
                    os.replace(old, target)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        except (SafetensorError, RuntimeError) as err:  # how safetensors and torch.save report a failed write
            raise OSError(f"cannot write checkpoint {target}: {err}") from err
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        spec: ClassifierSpec | dict | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> "QSharpClassifier":
        """Load a checkpoint written by ``save_pretrained`` or by the original code.

        Head settings come from the checkpoint's config; ``spec`` (e.g. from ``args.json``)
        fills them in for original checkpoints and overrides saved values when given.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"classifier checkpoint {path} does not exist")
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a classifier checkpoint (no config.json)")
        if isinstance(dtype, str):
            dtype = get_dtype(dtype)
        with loading("classifier checkpoint", path):
            config = AutoConfig.from_pretrained(path)
            head_state = _read_tensors(path, HEAD_PREFIX)
        if "weight" not in head_state:
            raise ValueError(f"{path} holds no classifier head ({HEAD_PREFIX}weight not found in its weights)")
        values = dict(getattr(config, CONFIG_KEY, None) or {})
        overrides = spec.to_dict() if isinstance(spec, ClassifierSpec) else dict(spec or {})
        values.update(overrides)
        if not getattr(config, CONFIG_KEY, None) and not overrides:
            values = _infer_spec(head_state, config.vocab_size)
        values["use_bias"] = "bias" in head_state
        spec = ClassifierSpec.from_dict(values)
        with _quiet_transformers(), loading("classifier checkpoint", path):
            backbone = AutoModel.from_pretrained(path, config=config, **({"dtype": dtype} if dtype else {}))
        param = next(backbone.parameters())
        weight = head_state["weight"]
        head = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in head_state, device=param.device, dtype=param.dtype)
        head.load_state_dict({key: value.to(param.dtype) for key, value in head_state.items()})
        return cls(backbone, spec, head)


def _infer_spec(head_state: dict, vocab_size: int) -> dict:
    """Head settings of an original checkpoint that has neither config key nor args.json."""
    out = head_state["weight"].shape[0]
    if out == 1:
        return {"classifier_type": "V", "loss_type": "bce"}
    if out == vocab_size:
        return {"classifier_type": "Q", "loss_type": "bce"}
    if out % vocab_size == 0:
        return {"classifier_type": "Q", "loss_type": "mle", "num_atoms": out // vocab_size}
    return {"classifier_type": "V", "loss_type": "mle", "num_atoms": out}


def _read_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors whose name starts with ``prefix`` (prefix stripped) from a checkpoint's weight files."""
    from safetensors import safe_open

    index_files = [path / "model.safetensors.index.json", path / "pytorch_model.bin.index.json"]
    for index_file in index_files:
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            files = sorted({path / name for key, name in weight_map.items() if key.startswith(prefix)})
            break
    else:
        files = [f for f in (path / "model.safetensors", path / "pytorch_model.bin") if f.is_file()][:1]
    tensors = {}
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    if key.startswith(prefix):
                        tensors[key[len(prefix) :]] = handle.get_tensor(key)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            tensors.update({key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)})
    return tensors


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the load report listing ``score.*`` as unexpected when loading the backbone alone."""
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
