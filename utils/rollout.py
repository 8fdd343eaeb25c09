"""Sampling work of collection and evaluation: on the continuous engine (``utils.engine``), or
one ``generate()`` batch of problems at a time (``--engine generate``)."""

from __future__ import annotations

import torch

from utils.answers import grade
from utils.engine import ContinuousEngine, Request, left_pad
from utils.classifier import ClassifierSpec, QSharpClassifier
from utils.guidance import QSharpLogitsProcessor, generate_responses, is_noop_guidance, resolve_guidance_mode
from utils.models import check_classifier_vocab, default_device, format_prompts, tokenize_texts
from utils.problems import reference_of
from utils.seeding import request_seed

ENGINES = ("continuous", "generate")  # --engine


def unpadded_prompts(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """The prompt ids of each row without its left padding."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu())]


def roll_in(ref_model, tokenizer, records, processor, *, use_chat_template, temperature, top_p, max_new_tokens, stop_ids):
    """Prompt texts, the left-padded prompt batch, and one (guided) response per record
    ([batch, steps] ids and [batch] lengths)."""
    texts = format_prompts(tokenizer, [r["prompt"] for r in records], use_chat_template)
    batch = tokenize_texts(tokenizer, texts, use_chat_template, ref_model.device)
    responses, lengths = generate_responses(
        ref_model, batch, stop_ids, tokenizer.pad_token_id, max_new_tokens, temperature, top_p, processor
    )
    return texts, batch, responses, lengths


def collect_batch(
    ref_model,
    tokenizer,
    records: list[dict],
    references: list[str],
    processor: QSharpLogitsProcessor | None,
    *,
    dataset_type: str,
    match_fn_type: str,
    use_chat_template: bool,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop_ids: list[int],
) -> list[dict]:
    """One repeat of data collection for a batch of problems.

    Roll-in: a full response from the guided policy (``processor``). Cut at ``c`` uniform
    in ``[0, len)`` (len counts the stop token). Roll-out: the reference policy completes
    prompt + the first ``c + 1`` response tokens (skipped when that is the whole response)
    with a fresh budget of ``max_new_tokens`` new tokens, as the original (prefix + roll-out
    can reach ``c + 1 + max_new_tokens`` tokens). Reward: correctness of prefix + roll-out.
    Returns, per problem, the lists of one repeat (one entry each).
    """
    device = ref_model.device
    pad = tokenizer.pad_token_id
    prompt_texts, batch, responses, lengths = roll_in(
        ref_model, tokenizer, records, processor, use_chat_template=use_chat_template, temperature=temperature,
        top_p=top_p, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
    )
    responses, lengths = responses.cpu(), lengths.tolist()
    prompts = unpadded_prompts(batch)
    cuts = [int(torch.randint(0, length, (1,)).item()) + 1 for length in lengths]  # c + 1 response tokens kept

    rollout_rows = [row for row, (cut, length) in enumerate(zip(cuts, lengths)) if cut < length]
    rollouts: dict[int, list[int]] = {}
    if rollout_rows:
        partial = left_pad([prompts[row] + responses[row, : cuts[row]].tolist() for row in rollout_rows], pad, device)
        rollout_ids, rollout_lengths = generate_responses(
            ref_model, partial, stop_ids, pad, max_new_tokens, temperature, top_p, processor=None
        )
        rollout_ids = rollout_ids.cpu()
        for index, row in enumerate(rollout_rows):
            rollouts[row] = rollout_ids[index, : int(rollout_lengths[index])].tolist()

    results = []
    for row, record in enumerate(records):
        response = responses[row, : lengths[row]].tolist()
        results.append(collect_record(tokenizer, prompt_texts[row], prompts[row], response, cuts[row],
                                      rollouts.get(row, []), references[row], dataset_type, match_fn_type))
    return results


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


def sample_batch(
    ref_model,
    tokenizer,
    records: list[dict],
    processor: QSharpLogitsProcessor | None,
    *,
    use_chat_template: bool,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop_ids: list[int],
) -> list[dict]:
    """One guided sample per problem, with the original's per-sample fields.

    ``input_ids`` (the prompt, unpadded), ``output_ids`` (the response up to and including
    its stop id), ``prediction`` (the response text), ``num_response_tokens``, and the KL
    recorded while decoding (``processor`` created with ``kl_temperature``, which a no-op
    guidance records too): ``token_kl`` (one value per response token) and ``traj_kl``
    (their sum), the original evaluation's definition (see ``utils.guidance.kl_divergence``),
    and ``traj_kl_before_top_p``, the same sum at top_p 1. Without KL recording all are 0.
    """
    _, batch, responses, lengths = roll_in(
        ref_model, tokenizer, records, processor, use_chat_template=use_chat_template, temperature=temperature,
        top_p=top_p, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
    )
    if processor is not None and processor.records_kl:
        kl_steps = processor.kl_per_step().cpu()  # [batch, steps]
        plain_steps = processor.kl_per_step(before_top_p=True).cpu()  # [batch, steps]
    else:
        kl_steps = plain_steps = torch.zeros(responses.shape, dtype=torch.float32)
    prompts = unpadded_prompts(batch)
    responses = responses.cpu()
    results = []
    for row in range(len(records)):
        length = int(lengths[row])
        results.append(sample_record(tokenizer, prompts[row], responses[row, :length].tolist(),
                                     kl_steps[row, :length].tolist(), plain_steps[row, :length].tolist()))
    return results


def sample_record(tokenizer, prompt: list[int], output_ids: list[int], token_kl: list[float],
                  token_kl_before_top_p: list[float]) -> dict:
    """One sample's fields under the original's names (see :func:`sample_batch`)."""
    return {
        "input_ids": prompt,
        "output_ids": output_ids,
        "prediction": tokenizer.decode(output_ids, skip_special_tokens=True),
        "num_response_tokens": len(output_ids),
        "token_kl": list(token_kl),
        "traj_kl": float(torch.tensor(token_kl, dtype=torch.float32).sum()),
        "traj_kl_before_top_p": float(torch.tensor(token_kl_before_top_p, dtype=torch.float32).sum()),
    }


def prompt_ids(tokenizer, records: list[dict], use_chat_template: bool) -> tuple[list[str], list[list[int]]]:
    """The prompt texts fed to the model and their ids (unpadded), one per record."""
    texts = format_prompts(tokenizer, [r["prompt"] for r in records], use_chat_template)
    return texts, unpadded_prompts(tokenize_texts(tokenizer, texts, use_chat_template))


def collect_continuous(ref_model, tokenizer, records: list[dict], work: list[tuple[int, int]], processor, on_result,
                       *, seed: int, batch_size: int, max_batch_tokens: int, dataset_type: str, match_fn_type: str,
                       use_chat_template: bool, temperature: float, top_p: float, max_new_tokens: int,
                       stop_ids: list[int]) -> dict:
    """Collection on the continuous engine: for each (problem index, repeat) of ``work``, the
    guided roll-in, the random cut and the reference roll-out, as :func:`collect_batch` does,
    each request from its own seeded stream (``utils.seeding.request_seed``). A roll-out joins
    the queue's front as soon as its roll-in ends. ``on_result(index, repeat, result)`` gets
    each problem-repeat's lists when its roll-out ends. Returns the engine's ``stats``."""
    indices = sorted({index for index, _ in work})
    texts, ids = prompt_ids(tokenizer, [records[i] for i in indices], use_chat_template)
    prompts = dict(zip(indices, zip(texts, ids)))
    guided = processor is not None

    def finish(request: Request):
        index, repeat = request.tag[:2]
        text, prompt = prompts[index]
        reference = reference_of(records[index], dataset_type)
        if request.kind == "roll_out":
            response, cut = request.tag[2], request.tag[3]
            on_result(index, repeat, collect_record(tokenizer, text, prompt, response, cut, request.tokens, reference,
                                                    dataset_type, match_fn_type))
            return None
        response = request.tokens
        generator = torch.Generator().manual_seed(request_seed(seed, repeat, index, "cut"))
        cut = int(torch.randint(0, len(response), (1,), generator=generator)) + 1  # c + 1 response tokens kept
        if cut < len(response):
            return [Request(prompt + response[:cut], max_new_tokens, request_seed(seed, repeat, index, "roll_out"),
                            kind="roll_out", tag=(index, repeat, response, cut))]
        on_result(index, repeat, collect_record(tokenizer, text, prompt, response, cut, [], reference, dataset_type,
                                                match_fn_type))
        return None

    requests = [Request(prompts[i][1], max_new_tokens, request_seed(seed, r, i, "roll_in"), guided=guided,
                        kind="roll_in", tag=(i, r)) for i, r in work]
    engine = ContinuousEngine(ref_model, stop_ids, tokenizer.pad_token_id, batch_size, temperature=temperature,
                              top_p=top_p, processor=processor, max_batch_tokens=max_batch_tokens)
    engine.run(requests, finish)
    return engine.stats


def sample_continuous(ref_model, tokenizer, records: list[dict], work: list[tuple[int, int]], processor, on_result,
                      *, seed: int, batch_size: int, max_batch_tokens: int, use_chat_template: bool, temperature: float,
                      top_p: float, max_new_tokens: int, stop_ids: list[int]) -> dict:
    """Evaluation samples on the continuous engine: one guided sample per (problem index,
    repeat) of ``work``, from its own seeded stream, with :func:`sample_batch`'s fields;
    ``on_result(index, repeat, sample)`` gets each as it ends. Returns the engine's ``stats``."""
    indices = sorted({index for index, _ in work})
    _, ids = prompt_ids(tokenizer, [records[i] for i in indices], use_chat_template)
    prompts = dict(zip(indices, ids))

    def finish(request: Request):
        index, repeat = request.tag
        kl = request.token_kl or [0.0] * len(request.tokens)
        plain = request.token_kl_before_top_p or [0.0] * len(request.tokens)
        on_result(index, repeat, sample_record(tokenizer, request.prompt, request.tokens, kl, plain))

    requests = [Request(prompts[i], max_new_tokens, request_seed(seed, r, i, "eval"), guided=processor is not None,
                        tag=(i, r)) for i, r in work]
    engine = ContinuousEngine(ref_model, stop_ids, tokenizer.pad_token_id, batch_size, temperature=temperature,
                              top_p=top_p, processor=processor, max_batch_tokens=max_batch_tokens)
    engine.run(requests, finish)
    return engine.stats


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
    (default: the first GPU, else the CPU).

    ``checkpoint`` None builds a zero head on ``args.classifier_model_id`` (round 1).
    A no-op guidance (``disabled``, or eta 0 except with ``expectation``, whose offset
    ignores eta, as in the original) loads no classifier at all; ``disabled=True`` forces
    it (evaluation at eta 0, as the original's eval script).
    """
    common = {"pad_token_id": tokenizer.pad_token_id, "kl_temperature": kl_temperature, "kl_top_p": kl_top_p}
    mode = resolve_guidance_mode(args.inference_mode, args.loss_type, cd_baseline)
    if disabled or is_noop_guidance(mode, args.eta):
        return QSharpLogitsProcessor(None, 0.0, args.top_k, "disabled", **common)
    spec = ClassifierSpec(args.classifier_type, args.loss_type, args.num_atoms, args.V_min, args.V_max, bool(args.use_bias))
    source = args.classifier_model_id if checkpoint is None else checkpoint
    check_classifier_vocab(tokenizer, source)  # before any weights are read
    if checkpoint is None:
        classifier = QSharpClassifier.from_causal_lm(source, spec, init_mode="zero", dtype=args.dtype)
    else:
        classifier = QSharpClassifier.from_pretrained(checkpoint, spec=spec, dtype=args.dtype)
    classifier.to(device or default_device()).eval().requires_grad_(False)
    return QSharpLogitsProcessor(classifier, args.eta, args.top_k, args.inference_mode, cd_baseline, **common)
