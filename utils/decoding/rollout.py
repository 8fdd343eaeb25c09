"""Collection and evaluation, each written once over the backend seam (``utils.decoding.requests``).

Collection: for each (problem, repeat), the guided roll-in, a random cut, and the
reference's roll-out from the prefix, graded. Evaluation: one guided sample per (problem,
repeat) with the KL recorded while decoding. Every request's stream is (seed, repeat,
problem, stage); the backend decides how that seeds it.
"""

from __future__ import annotations

import dataclasses

import torch

from utils.classifier import ClassifierSpec, QSharpClassifier
from utils.data.answers import grade
from utils.data.problems import reference_of
from utils.decoding.guidance import QSharpLogitsProcessor, is_noop_guidance, resolve_guidance_mode
from utils.decoding.requests import Backend, Request
from utils.models import check_classifier_vocab, default_device, format_prompts, tokenize_texts


def prompt_ids(tokenizer, records: list[dict], use_chat_template: bool) -> tuple[list[str], list[list[int]]]:
    """The prompt texts fed to the model and their ids (unpadded), one per record."""
    texts = format_prompts(tokenizer, [r["prompt"] for r in records], use_chat_template)
    batch = tokenize_texts(tokenizer, texts, use_chat_template)
    return texts, [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def collect(backend: Backend, tokenizer, records: list[dict], work: list[tuple[int, int]], processor, on_result, *,
            seed: int, dataset_type: str, match_fn_type: str, use_chat_template: bool, max_new_tokens: int) -> None:
    """Collection for each (problem index, repeat) of ``work``; ``on_result(index, repeat, lists)``
    gets each one's graded lists (:func:`collect_record`) when its roll-out ends.

    Roll-in: a full response from the guided policy (``processor``). Cut at ``c`` uniform
    in ``[0, len)`` (len counts the stop token), drawn from ``backend.generator``. Roll-out:
    the reference policy completes prompt + the first ``c + 1`` response tokens (skipped when
    that is the whole response) with a fresh budget of ``max_new_tokens`` new tokens, as the
    original (prefix + roll-out can reach ``c + 1 + max_new_tokens`` tokens). Reward:
    correctness of prefix + roll-out.
    """
    indices = sorted({index for index, _ in work})
    texts, ids = prompt_ids(tokenizer, [records[i] for i in indices], use_chat_template)
    prompts = dict(zip(indices, zip(texts, ids)))

    def finish(request: Request):
        _, repeat, index, _ = request.stream
        text, prompt = prompts[index]
        reference = reference_of(records[index], dataset_type)
        if request.kind == "roll_out":
            response, cut = request.tag
            on_result(index, repeat, collect_record(tokenizer, text, prompt, response, cut, request.tokens, reference,
                                                    dataset_type, match_fn_type))
            return None
        response = request.tokens
        generator = backend.generator((seed, repeat, index, "cut"))
        cut = int(torch.randint(0, len(response), (1,), generator=generator)) + 1  # c + 1 response tokens kept
        if cut < len(response):
            return [Request(prompt + response[:cut], max_new_tokens, (seed, repeat, index, "roll_out"),
                            tag=(response, cut))]
        on_result(index, repeat, collect_record(tokenizer, text, prompt, response, cut, [], reference, dataset_type,
                                                match_fn_type))
        return None

    backend.run([Request(prompts[i][1], max_new_tokens, (seed, r, i, "roll_in"), guided=processor is not None)
                 for i, r in work], finish, processor)


def collect_record(tokenizer, prompt_text: str, prompt: list[int], response: list[int], cut: int, rollout: list[int],
                   reference: str, dataset_type: str, match_fn_type: str) -> dict:
    """The lists of one repeat of one problem (one entry each), graded: roll-in ``response``
    (to and including its stop id), its first ``cut`` tokens kept, then ``rollout`` (empty when
    the cut kept the whole response)."""
    prefix = response[:cut]
    full_prediction = tokenizer.decode(response, skip_special_tokens=True)
    partial_prediction = tokenizer.decode(prefix + rollout, skip_special_tokens=True) if rollout else full_prediction
    full_correct = grade(full_prediction, reference, dataset_type, match_fn_type)
    partial_correct = grade(partial_prediction, reference, dataset_type, match_fn_type) if rollout else full_correct
    return {
        "fully_guided_predictions": [full_prediction],
        "fully_guided_predictions_correctness": [full_correct],
        "partial_guided_prompts": [prompt_text + tokenizer.decode(prefix, skip_special_tokens=False)],
        "partial_guided_prompts_tokenized": [prompt + prefix],
        "num_response_tokens_in_partial_guided_prompts": [cut],
        "partial_guided_responses_tokenized": [rollout],
        "partial_guided_predictions": [partial_prediction],
        "partial_guided_predictions_correctness": [partial_correct],
    }


def sample(backend: Backend, tokenizer, records: list[dict], work: list[tuple[int, int]], processor, on_result, *,
           seed: int, use_chat_template: bool, max_new_tokens: int) -> None:
    """Evaluation: one guided sample per (problem index, repeat) of ``work``; ``on_result(index,
    repeat, fields)`` gets each one's :func:`sample_record` as it ends."""
    indices = sorted({index for index, _ in work})
    _, ids = prompt_ids(tokenizer, [records[i] for i in indices], use_chat_template)
    prompts = dict(zip(indices, ids))

    def finish(request: Request):
        _, repeat, index, _ = request.stream
        kl = request.token_kl or [0.0] * len(request.tokens)
        plain = request.token_kl_before_top_p or [0.0] * len(request.tokens)
        on_result(index, repeat, sample_record(tokenizer, request.prompt, request.tokens, kl, plain))

    backend.run([Request(prompts[i], max_new_tokens, (seed, r, i, "eval"), guided=processor is not None)
                 for i, r in work], finish, processor)


def sample_record(tokenizer, prompt: list[int], output_ids: list[int], token_kl: list[float],
                  token_kl_before_top_p: list[float]) -> dict:
    """One sample's fields under the original's names.

    ``input_ids`` (the prompt, unpadded), ``output_ids`` (the response up to and including
    its stop id), ``prediction`` (the response text), ``num_response_tokens``, and the KL
    recorded while decoding (``processor`` created with ``kl_temperature``, which a no-op
    guidance records too): ``token_kl`` (one value per response token) and ``traj_kl``
    (their sum), the original evaluation's definition (see ``utils.decoding.kl.kl_divergence``),
    and ``traj_kl_before_top_p``, the same sum at top_p 1. Without KL recording all are 0.
    """
    return {
        "input_ids": prompt,
        "output_ids": output_ids,
        "prediction": tokenizer.decode(output_ids, skip_special_tokens=True),
        "num_response_tokens": len(output_ids),
        "token_kl": list(token_kl),
        "traj_kl": float(torch.tensor(token_kl, dtype=torch.float32).sum()),
        "traj_kl_before_top_p": float(torch.tensor(token_kl_before_top_p, dtype=torch.float32).sum()),
    }


@dataclasses.dataclass(frozen=True)
class GuidanceRecipe:
    """What :func:`make_processor` builds a guidance from, so that another process can build the same
    one on its own device (vLLM's tensor-parallel workers): the classifier's source and the
    processor's settings. ``source`` None: no classifier (a no-op guidance)."""

    source: str | None  # the checkpoint, or the backbone of a zero head (round 1)
    zero_head: bool
    spec: ClassifierSpec | None
    dtype: str | None  # of the classifier
    eta: float
    top_k: int
    inference_mode: str
    cd_baseline: bool
    pad_token_id: int | None
    kl_temperature: float | None
    kl_top_p: float

    @property
    def classifier_key(self) -> tuple:
        """What decides the classifier's weights: recipes with the same key can share one classifier."""
        return self.source, self.zero_head, repr(self.spec), self.dtype

    def load_classifier(self, device) -> QSharpClassifier | None:
        """The classifier on ``device``, frozen (None without a source)."""
        if self.source is None:
            return None
        if self.zero_head:
            classifier = QSharpClassifier.from_causal_lm(self.source, self.spec, init_mode="zero", dtype=self.dtype)
        else:
            classifier = QSharpClassifier.from_pretrained(self.source, spec=self.spec, dtype=self.dtype)
        return classifier.to(device).eval().requires_grad_(False)

    def build(self, device, classifier: QSharpClassifier | None = None) -> QSharpLogitsProcessor:
        """The guidance, its classifier on ``device`` (``classifier``: one already loaded, of this
        recipe's :attr:`classifier_key`); it keeps this recipe as ``processor.recipe``."""
        if classifier is None:
            classifier = self.load_classifier(device)
        processor = QSharpLogitsProcessor(classifier, self.eta, self.top_k, self.inference_mode, self.cd_baseline,
                                          pad_token_id=self.pad_token_id, kl_temperature=self.kl_temperature,
                                          kl_top_p=self.kl_top_p)
        processor.recipe = self
        return processor


def make_processor(
    args,
    tokenizer,
    *,
    checkpoint: str | None,
    cd_baseline: bool = False,
    kl_temperature: float | None = None,
    kl_top_p: float = 1.0,
    disabled: bool = False,
    device: str | torch.device | None = None,
) -> QSharpLogitsProcessor:
    """The guidance of collection/evaluation from the script flags, its classifier on ``device``
    (default: the first GPU, else the CPU), built from its :class:`GuidanceRecipe`.

    ``checkpoint`` None builds a zero head on ``args.classifier_model_id`` (round 1).
    A no-op guidance (``disabled``, or eta 0 except with ``expectation``, whose offset
    ignores eta, as in the original) loads no classifier at all; ``disabled=True`` forces
    it (evaluation at eta 0, as the original's eval script).
    """
    common = {"pad_token_id": tokenizer.pad_token_id, "kl_temperature": kl_temperature, "kl_top_p": kl_top_p}
    mode = resolve_guidance_mode(args.inference_mode, args.loss_type, cd_baseline)
    if disabled or is_noop_guidance(mode, args.eta):
        recipe = GuidanceRecipe(None, False, None, None, 0.0, args.top_k, "disabled", False, **common)
    else:
        spec = ClassifierSpec(args.classifier_type, args.loss_type, args.num_atoms, args.V_min, args.V_max,
                              bool(args.use_bias))
        source = args.classifier_model_id if checkpoint is None else checkpoint
        check_classifier_vocab(tokenizer, source)  # before any weights are read
        recipe = GuidanceRecipe(source, checkpoint is None, spec, args.dtype, args.eta, args.top_k, args.inference_mode,
                                cd_baseline, **common)
    return recipe.build(device or default_device())
