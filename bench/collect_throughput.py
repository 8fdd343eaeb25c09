"""Problems per minute of one collection round (``collect_training_data.py``) on the tiny setup.

    python bench/collect_throughput.py [--json] [--ref_model_id quickstart_out/models/ref --classifier_model_id quickstart_out/models/classifier]
    python bench/collect_throughput.py [--json] --ref_model_id REF --classifier_model_id LM --use_chat_template 1 [--dtype float32]

Synthetic GSM8K-format problems (``dataset/synthetic.py``) go through the real script's
``main`` in this process: round 1 (``--eta 0``, the reference policy) by default, or a
guided round with ``--eta 10`` (a zero V head on the classifier model: every top-k token
lifted alike). Without ``--ref_model_id`` the models are the random tiny ones of
``python -m utils.tiny_models`` (their responses rarely stop, so every one runs to
``--max_new_tokens``); the quickstart's pretrained models give responses that end.
Prompts are raw text (``--use_chat_template 0``, what the tiny and quickstart models are
trained on); give ``--use_chat_template 1`` for an instruct pair with a chat template (e.g.
SmolLM2-135M-Instruct, whose pad token is its EOS: the collection handles that, ends being
found from the stop ids). ``--dtype`` (float32) is the dtype of both models, on the first
GPU, else the CPU; ``--threads 1`` is the steadiest on a CPU shared with other jobs.
The time covers the whole ``main`` (model loading included) over ``--repeats`` fresh
output folders (median), after one untimed run (``--warmup 0`` times the first run too:
for long real-model runs). ``--engine`` is collection's: ``continuous`` (default),
``generate`` or ``vllm``; several (``--engine continuous vllm``) run one after the other on the same
problems in one invocation, one JSON line each, then a line of each engine's speed-up over the
first (``speedup``: ``tokens_per_s`` and ``decode_tokens_per_s`` ratios). ``load_seconds`` is the
time the backend took to load or start (vLLM's start-up and compilation included). Also reported: the share of that time spent decoding (``generate_share``: the
backend's own time, its callbacks' grading and file writing left out) and ``row_steps_kept``, the share of
row-steps that produce kept tokens. For ``generate`` it is given for the roll-in, the
roll-out and ``all`` (the rest pad rows that already ended); for ``continuous`` it is
``all``: decoded tokens over ``batch_size`` slots per step (the rest are slots left empty
when the queue runs dry). ``tokens_per_s``: the response tokens kept in
the roll-ins and roll-outs of the timed runs (stop ids included, padding after them not)
over those runs' whole wall time; ``decode_tokens_per_s``: the same tokens over the backends'
decode time only (model loading, vLLM's start-up and compilation, grading and writing left out). ``--profile 1`` adds ``profile``: the
shares of the decode loop's time spent in the reference's decode forwards and prefills, the
Q# processor (its classifier included), the top-p filter (transformers' ``TopPLogitsWarper``
in ``generate``, ``utils.decoding.kl.top_p_filter`` in the engine) and the rest.
``--json`` prints ``{"problems_per_min", "samples_per_min", "tokens_per_s",
"generate_share", "row_steps_kept", ...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import TopPLogitsWarper  # noqa: E402

import collect_training_data  # noqa: E402
from bench.common import set_threads  # noqa: E402
from utils.decoding import kl, requests  # noqa: E402
from utils.decoding.backends import BACKENDS  # noqa: E402
from utils.decoding.guidance import QSharpLogitsProcessor  # noqa: E402
from utils.demo.synthetic import write_synthetic_dataset  # noqa: E402
from utils.demo.tiny_models import write_tiny_models  # noqa: E402


def row_steps_kept(stats: dict) -> dict:
    """The share of the row-steps a backend ran that produced kept tokens, per request kind where
    the backend counts row-steps per kind (``generate``), and over ``all``."""
    tokens, steps = stats["tokens"], stats["row_steps"]
    if not steps:  # a backend that does not count its row-steps (vllm)
        return {}
    kept = {kind: round(tokens.get(kind, 0) / max(count, 1), 3) for kind, count in steps.items() if kind != "all"}
    return {**kept, "all": round(sum(tokens.values()) / max(sum(steps.values()), 1), 3)}


def add_stats(total: dict, stats: dict) -> None:
    """Add one run's backend ``stats`` to ``total``."""
    total["seconds"] = total.get("seconds", 0.0) + stats["seconds"]
    for key in ("tokens", "row_steps"):
        counts = total.setdefault(key, {})
        for kind, count in stats[key].items():
            counts[kind] = counts.get(kind, 0) + count


class Profile:
    """Seconds inside the reference's forwards (decode steps and prefills apart), the Q#
    processor (the classifier's forward included) and the top-p filter (its sort of the
    vocabulary: transformers' ``TopPLogitsWarper``, or ``utils.decoding.kl.top_p_filter``, which
    calls the warper on rows with a tie at the nucleus' edge), for either engine. Installed
    around collection's model loading, so that the reference's forward is timed on the instance."""

    def __init__(self):
        self.seconds = {"reference_decode": 0.0, "reference_prefill": 0.0, "processor": 0.0, "top_p": 0.0}
        self.calls = {"reference_decode": 0, "reference_prefill": 0}
        self.patched = []
        self.running = set()  # keys being timed (a call inside another of the same key is not counted again)

    @contextlib.contextmanager
    def clock(self, key):
        if key in self.running:
            yield
            return
        self.running.add(key)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[key] += time.perf_counter() - start
            self.running.discard(key)

    def timed(self, function, key):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            with self.clock(key):
                return function(*args, **kwargs)
        return wrapper

    def timed_forward(self, forward):
        """The reference's forward, timed as a decode step (one new token per row) or a prefill."""
        @functools.wraps(forward)
        def wrapper(*args, **kwargs):
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            key = "reference_decode" if ids.shape[1] == 1 else "reference_prefill"
            self.calls[key] += 1
            with self.clock(key):
                return forward(*args, **kwargs)
        return wrapper

    def install(self):
        load = requests.load_causal_lm

        def load_timed(*args, **kwargs):
            model = load(*args, **kwargs)
            model.forward = self.timed_forward(model.forward)
            return model

        targets = [(requests, "load_causal_lm", load_timed),
                   (QSharpLogitsProcessor, "__call__", self.timed(QSharpLogitsProcessor.__call__, "processor")),
                   (QSharpLogitsProcessor, "guide_rows", self.timed(QSharpLogitsProcessor.guide_rows, "processor")),
                   (TopPLogitsWarper, "__call__", self.timed(TopPLogitsWarper.__call__, "top_p")),
                   (kl, "top_p_filter", self.timed(kl.top_p_filter, "top_p"))]
        for owner, name, value in targets:
            self.patched.append((owner, name, getattr(owner, name)))
            setattr(owner, name, value)

    def uninstall(self):
        for owner, name, value in reversed(self.patched):
            setattr(owner, name, value)
        self.patched = []

    def report(self, decode_seconds: float) -> dict:
        """Each part's share of the decode loop's time; ``rest`` is what remains (sampling, cache
        and row bookkeeping, generate()'s or the engine's own code)."""
        shares = {key: round(value / decode_seconds, 3) for key, value in self.seconds.items()}
        shares["rest"] = round(1 - sum(self.seconds.values()) / decode_seconds, 3)
        return {**shares, "decode_seconds": round(decode_seconds, 2), **{f"{k}_calls": v for k, v in self.calls.items()}}


def timed_round(args: argparse.Namespace, output_dir: Path, paths: dict, ref_id: str,
                classifier_id: str) -> tuple[float, dict]:
    """Seconds of one whole collection ``main`` into ``output_dir`` (its files counted) and its
    backend's ``stats``."""
    argv = [
        "--is_first_round", "1", "--start_index", "0", "--end_index", str(args.num_problems),
        "--ref_model_id", ref_id, "--classifier_model_id", classifier_id,
        "--data_path", str(paths["train"]), "--train_eval_save_path", str(paths["train_eval"]),
        "--output_dir", str(output_dir), "--num_samples", str(args.num_samples),
        "--batch_size", str(args.batch_size), "--max_new_tokens", str(args.max_new_tokens),
        "--eta", str(args.eta), "--classifier_type", "V", "--use_chat_template", str(args.use_chat_template),
        "--temperature", "0.8", "--top_p", "0.9", "--match_fn_type", args.match_fn_type, "--dtype", args.dtype,
        "--engine", args.engine, "--vllm_enforce_eager", str(args.vllm_enforce_eager),
        "--vllm_kv_cache_gib", str(args.vllm_kv_cache_gib),
    ]
    collect_args = collect_training_data.parse_args(argv)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the result
        stats = collect_training_data.main(collect_args)
    seconds = time.perf_counter() - start
    files = len(list(output_dir.glob("*_r*.json")))
    if files != args.num_problems * args.num_samples:
        raise SystemExit(f"error: expected {args.num_problems * args.num_samples} files, found {files}")
    return seconds, stats


def main(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_synthetic_dataset(tmp / "data", args.num_problems, 0, seed=args.seed)
        ref_id, classifier_id = args.ref_model_id, args.classifier_model_id or args.ref_model_id
        if ref_id is None:
            models = write_tiny_models(tmp / "models")
            ref_id, classifier_id = str(models["ref"]), str(models["classifier"])
        for engine in args.engine:
            result = measure(argparse.Namespace(**{**vars(args), "engine": engine}), tmp / engine, paths, ref_id, classifier_id)
            results.append(result)
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                print(f"{engine}: {result['problems_per_min']} problems/min ({result['samples_per_min']} samples/min, "
                      f"{result['tokens_per_s']} generated tokens/s, {result['decode_tokens_per_s']} while decoding): "
                      f"{args.num_problems} problems x {args.num_samples} samples in {result['seconds']:.1f} s", flush=True)
    if len(results) > 1:
        first = results[0]
        speedup = {"speedup": {r["engine"]: {key: round(r[key] / first[key], 2) for key in ("tokens_per_s", "decode_tokens_per_s")}
                               for r in results[1:]}, "over": first["engine"]}
        print(json.dumps(speedup) if args.json else f"speed-up over {first['engine']}: {speedup['speedup']}")


def measure(args: argparse.Namespace, tmp: Path, paths: dict, ref_id: str, classifier_id: str) -> dict:
    """The result of one engine (``args.engine``): ``--warmup`` + ``--repeats`` collection rounds."""
    times, tokens, total = [], [], {}
    profile = Profile() if args.profile else None
    loads = []
    backend_class = BACKENDS[args.engine]
    load = backend_class.load

    def timed_load(backend):
        start = time.perf_counter()
        load(backend)
        loads.append(time.perf_counter() - start)

    backend_class.load = timed_load
    if profile:
        profile.install()
    try:
        for repeat in range(args.warmup + args.repeats):  # the first --warmup runs are not timed
            seconds, stats = timed_round(args, tmp / f"out_{repeat}", paths, ref_id, classifier_id)
            times.append(seconds)
            tokens.append(sum(stats["tokens"].values()))
            add_stats(total, stats)
    finally:
        backend_class.load = load
        if profile:
            profile.uninstall()
    timed, timed_tokens = times[args.warmup:], tokens[args.warmup:]
    seconds = statistics.median(timed)
    result = {
        "problems_per_min": round(args.num_problems / seconds * 60, 1),
        "samples_per_min": round(args.num_problems * args.num_samples / seconds * 60, 1),
        "tokens_per_s": round(sum(timed_tokens) / sum(timed), 1),
        "seconds": round(seconds, 2),
        "tokens_per_round": round(statistics.median(timed_tokens), 1),
        "generate_share": round(total["seconds"] / sum(times), 3),  # of the whole main(), loading included
        "decode_tokens_per_s": round(sum(tokens) / max(total["seconds"], 1e-9), 1),  # all runs, warm-up included
        "load_seconds": round(sum(loads), 2),  # all runs (the backend loads once per run)
        "row_steps_kept": row_steps_kept(total),
        "engine": args.engine,
        "num_problems": args.num_problems,
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "eta": args.eta,
        "use_chat_template": args.use_chat_template,
        "dtype": args.dtype,
        "models": args.ref_model_id or "random tiny",
    }
    if profile:
        result["profile"] = profile.report(total["seconds"])  # over all runs, the warm-up included
    return result


def parse_args(argv=None) -> argparse.Namespace:
    """The flags; --repeats under 1 and a classifier without a reference are refused (exit 2)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref_model_id", type=str, default=None, help="reference model (default: random tiny)")
    parser.add_argument("--classifier_model_id", type=str, default=None,
                        help="classifier model (with --ref_model_id; default: the reference)")
    parser.add_argument("--use_chat_template", type=int, default=0, choices=[0, 1],
                        help="wrap prompts in the chat template: 0 for the tiny/quickstart models, 1 for an instruct pair")
    parser.add_argument("--dtype", type=str, default="float32", help="dtype of both models (float32, bfloat16, float16)")
    parser.add_argument("--num_problems", type=int, default=32, help="synthetic problems collected")
    parser.add_argument("--num_samples", type=int, default=2, help="repeats per problem")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="live rows (continuous engine) or problems per generate call (generate engine)")
    parser.add_argument("--engine", type=str, nargs="+", default=["continuous"], choices=list(BACKENDS),
                        help="collection's --engine; several run one after the other, each on the same problems "
                             "(vllm: a model with a head dimension of 32 or more, e.g. the real pair)")
    parser.add_argument("--vllm_enforce_eager", type=int, default=0, choices=[0, 1],
                        help="--engine vllm: 1 = no torch.compile (faster start, slower decoding)")
    parser.add_argument("--vllm_kv_cache_gib", type=int, default=2, help="--engine vllm on a CPU: GiB of KV cache")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="response budget")
    parser.add_argument("--eta", type=float, default=0.0, help="0: round 1 (reference); > 0: guided by a zero V head")
    parser.add_argument("--match_fn_type", type=str, default="symbolic", help="answer matcher")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--warmup", type=int, default=1, choices=[0, 1],
                        help="1: one untimed run first (loads and warms the caches); 0: time the first run too")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic problems")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--profile", type=int, default=0, choices=[0, 1],
                        help="1: add the decode loop's time split (reference decode / prefill forwards, Q# processor, "
                             "top-p, rest) to the result, over all runs")
    parser.add_argument("--json", action="store_true", help="one JSON line")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.classifier_model_id is not None and args.ref_model_id is None:
        parser.error("--classifier_model_id needs --ref_model_id")
    return args


if __name__ == "__main__":
    main(parse_args())
