"""Command-line plumbing shared by the four stage scripts.

- Flag domains: ``int01`` (the original scripts' 0/1 integer flags) and the numeric types
  below (``positive_int``, ``unit_interval``, ...). Every numeric flag of the four scripts is
  declared with one of them (``--start_index/--end_index`` excepted: they are checked against
  the problem file), so argparse refuses a value outside its domain (NaN and infinities
  included) in one line naming the flag and the value; values inherited from args.json go
  through the same types (:func:`load_run_args`).
- ``ArgumentParser`` and ``run``: a user error (bad flag, ``ValueError``, ``OSError``) prints
  one ``error: ...`` line on stderr and exits 2 instead of a usage block or a traceback
  (``QSHARP_DEBUG=1`` re-raises).
- args.json inheritance: collection (round 2+) and evaluation read the training arguments
  saved next to a checkpoint (``<ckpt>/../args.json``); flags given on the command line
  win, then args.json, then the script's default. ``describe_sources`` says where each
  value came from, so the eta in force is always visible.
- Output names shared by the scripts.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

from utils.data.io import read_json, write_json

ARGS_FILE = "args.json"


def int01(value: str) -> int:
    """argparse type of the 0/1 integer flags (``--use_bias 0``)."""
    if value not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected 0 or 1, got {value!r}")
    return int(value)


def _integer(value: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None


def _number(value: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


def int_at_least(low: int, off: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """argparse type of an integer flag in ``[low, high]``; ``off`` (e.g. -1 = no limit) is allowed too."""
    domain = f"at least {low}" if high is None else f"in [{low}, {high}]"
    domain += f", or {off}" if off is not None else ""

    def parse(value: str) -> int:
        number = _integer(value)
        if number != off and not (low <= number and (high is None or number <= high)):
            raise argparse.ArgumentTypeError(f"must be {domain}, got {value!r}")
        return number

    parse.__name__ = f"int_at_least_{low}"
    return parse


def float_in(low: float | None = None, high: float | None = None, *, open_low: bool = False,
             open_high: bool = False) -> Callable[[str], float]:
    """argparse type of a finite float flag between ``low`` and ``high`` (None: unbounded;
    ``open_*``: that end excluded). NaN and infinities are refused."""
    if low is not None and high is not None:
        domain = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    elif low is not None:
        domain = f"{'greater than' if open_low else 'at least'} {low:g}"
    else:
        domain = f"{'less than' if open_high else 'at most'} {high:g}" if high is not None else ""

    def parse(value: str) -> float:
        number = _number(value)
        below = low is not None and (number <= low if open_low else number < low)
        above = high is not None and (number >= high if open_high else number > high)
        if below or above:
            raise argparse.ArgumentTypeError(f"must be {domain}, got {value!r}")
        return number

    parse.__name__ = "float_in"
    return parse


# The numeric domains of the stages' flags.
positive_int = int_at_least(1)  # counts and sizes: batch_size, num_samples, max_new_tokens, ...
nonneg_int = int_at_least(0)  # 0 = none/off: max_batch_tokens, num_workers
positive_int_or_off = int_at_least(1, off=-1)  # -1 = off/all: top_k, max_length, keep_last_n, ...
nonneg_int_or_off = int_at_least(0, off=-1)  # warmup_step: -1 (the default) and 0 both mean none
atoms_int = int_at_least(2)  # num_atoms: a histogram has two atoms at least
seed_int = int_at_least(0, high=2**32 - 1)  # numpy's RandomState and bootstrap take no other seed
finite_float = float_in()  # shift_reward, V_min, V_max
nonneg_float = float_in(0.0)  # eta, temperature (0 = greedy), weight_decay
positive_float = float_in(0.0, open_low=True)  # lr
unit_interval = float_in(0.0, 1.0)  # top_p (1 = no nucleus), eval_ratio
unit_interval_open = float_in(0.0, 1.0, open_high=True)  # id_eval_ratio: 1 would hold out every example


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors (unknown choice, missing flag, bad 0/1 value)
    are one ``error: ...`` line on stderr and exit code 2, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n")


def run(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> None:
    """Run a script's ``main``; user errors end with one line on stderr and exit code 2.

    User errors are ``ValueError`` (bad values, malformed files) and ``OSError`` (missing,
    unreadable or unwritable paths).
    """
    try:
        main(args)
    except (ValueError, OSError) as err:
        if os.environ.get("QSHARP_DEBUG"):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)


def one_line(err: BaseException) -> str:
    """An error's message on one line (libraries' messages may span several)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def load_run_args(checkpoint_path: str | os.PathLike) -> dict:
    """The training arguments saved next to a checkpoint (``<checkpoint>/../args.json``); the
    values of the flags that collection and evaluation inherit must lie in those flags' domains."""
    checkpoint = Path(checkpoint_path)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    path = checkpoint.resolve().parent / ARGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} has no {ARGS_FILE} in its parent directory ({path})")
    saved = read_json(path)
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(saved).__name__}")
    for name, (type_, _) in INHERITABLE_FLAGS.items():
        value = saved.get(name)
        if type_ is not str and value is not None:
            try:
                type_(str(int(value) if isinstance(value, bool) else value))
            except argparse.ArgumentTypeError as err:
                raise ValueError(f"{path}: {name} {err}") from None
    return saved


def inherit(
    args: argparse.Namespace, defaults: dict[str, Any], saved: dict | None, renamed: dict[str, str] | None = None
) -> dict[str, str]:
    """Fill every flag of ``defaults`` left at ``None``: from ``saved`` (args.json), else the default.

    ``renamed`` maps a flag to its key in args.json (``data_path`` -> ``original_problems_path``).
    Returns ``{flag: "flag" | "args.json" | "default"}``.
    """
    renamed = renamed or {}
    sources = {}
    for name, default in defaults.items():
        key = renamed.get(name, name)
        if getattr(args, name) is not None:
            sources[name] = "flag"
        elif saved is not None and saved.get(key) is not None:
            setattr(args, name, saved[key])
            sources[name] = "args.json"
        else:
            setattr(args, name, default)
            sources[name] = "default"
    return sources


def describe_sources(args: argparse.Namespace, sources: dict[str, str], names: list[str]) -> str:
    """``eta=1.0 (args.json), top_k=20, ...`` for the start-up log (source shown for inherited flags)."""
    return ", ".join(
        f"{name}={getattr(args, name)}" + (f" ({sources[name]})" if name in sources else "") for name in names
    )


def inherited_help(text: str, default: Any) -> str:
    return f"{text} (default: {default}; inherited from the checkpoint's args.json when not given)"


def eval_tag(eta: float, top_k: int, temperature: float, cd_baseline: bool = False) -> str:
    """``eta_10.0_top_k_20_temp_0.8``: the suffix of every evaluation output (``_cd`` appended
    for the CD baseline, so its results never mix with Q#'s at the same settings)."""
    return f"eta_{float(eta)}_top_k_{int(top_k)}_temp_{float(temperature)}" + ("_cd" if cd_baseline else "")


def problem_file_name(problem_id: int, repeat: int) -> str:
    """Per-problem, per-repeat output file of collection and evaluation: ``<id>_r<repeat>.json``."""
    return f"{problem_id}_r{repeat}.json"


# Defaults shared by collection and evaluation for the flags they inherit from args.json.
MODEL_DEFAULTS = {
    "ref_model_id": "meta-llama/Meta-Llama-3-8B-Instruct",
    "classifier_type": "V",
    "inference_mode": "bernoulli",
    "loss_type": "bce",
    "use_bias": 0,
    "dataset_type": None,
    "use_chat_template": 1,
    "temperature": 0.8,
    "top_p": 0.9,
    "dtype": "bfloat16",
    "match_fn_type": "symbolic",
    "num_atoms": 11,
    "V_min": 0.0,
    "V_max": 1.0,
}

# Flags that collection and evaluation inherit from args.json: name -> (type, help).
INHERITABLE_FLAGS = {
    "ref_model_id": (str, "reference model (hub id or path)"),
    "classifier_model_id": (str, "base LM of the classifier (round 1)"),
    "classifier_type": (str, "value head"),
    "inference_mode": (str, "guidance offset"),
    "loss_type": (str, "classifier loss"),
    "use_bias": (int01, "head has a bias (0/1)"),
    "data_path": (str, "problems jsonl"),
    "train_eval_save_path": (str, "split map json"),
    "dataset_type": (str, "grading: gsm8k answers or math solutions (default: inferred from the records)"),
    "use_chat_template": (int01, "wrap prompts in the chat template (0/1)"),
    "eta": (nonneg_float, "guidance strength (0 = the reference policy)"),
    "temperature": (nonneg_float, "sampling temperature (0 = greedy)"),
    "top_p": (unit_interval, "nucleus sampling (1 = off)"),
    "max_new_tokens": (positive_int, "response budget in tokens"),
    "dtype": (str, "model dtype"),
    "match_fn_type": (str, "answer matching"),
    "num_atoms": (atoms_int, "histogram atoms (mle)"),
    "V_min": (finite_float, "lowest atom (mle)"),
    "V_max": (finite_float, "highest atom (mle)"),
}


def add_inherited_flags(
    parser: argparse.ArgumentParser, defaults: dict[str, Any], several: tuple[str, ...] = ()
) -> None:
    """Declare the flags of ``defaults`` (a subset of ``INHERITABLE_FLAGS``) with ``None`` as
    parse default, so that ``inherit`` can tell a given flag from a missing one. Flags named
    in ``several`` take one or more values (a list; see :func:`sweep_values`)."""
    from utils.data.answers import MATCH_FNS
    from utils.classifier import CLASSIFIER_TYPES, LOSS_TYPES
    from utils.decoding.guidance import INFERENCE_MODES
    from utils.models import DTYPES
    from utils.data.problems import DATASET_TYPES

    choices = {
        "classifier_type": CLASSIFIER_TYPES, "inference_mode": INFERENCE_MODES, "loss_type": LOSS_TYPES,
        "dataset_type": DATASET_TYPES, "dtype": list(DTYPES), "match_fn_type": list(MATCH_FNS),
    }
    for name, default in defaults.items():
        type_, text = INHERITABLE_FLAGS[name]
        extra = {"nargs": "+", "metavar": name.upper()} if name in several else {}
        text = f"{text}; several values are evaluated one after the other" if name in several else text
        parser.add_argument(f"--{name}", type=type_, choices=choices.get(name), help=inherited_help(text, default), **extra)


def sweep_values(args: argparse.Namespace, name: str) -> list:
    """The values of a flag declared with ``several`` (after ``inherit``, which may have put a
    single value from args.json or the default there), duplicates dropped, order kept. A single
    value is stored back as a plain value, so that logs read as before."""
    value = getattr(args, name)
    values = list(dict.fromkeys(value if isinstance(value, list) else [value]))
    setattr(args, name, values[0] if len(values) == 1 else values)
    return values


# A dot-name: the original's globs (``<dir>/*.json`` in its combine, ``*_r<k>.json`` in its
# eval) skip it, so either code's folders work with the other's scripts.
SETTINGS_FILE = ".run_settings.json"
LEGACY_SETTINGS_FILE = "run_settings.json"  # written by earlier versions; renamed on sight


def _comparable(value: Any) -> Any:
    """Local paths compare by their real location, so ``./x`` and ``/abs/x`` are the same setting."""
    if isinstance(value, str) and value and os.path.exists(value):
        return os.path.realpath(value)
    return value


def setting_differences(saved: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """``"name <saved> there, <current> now"`` for every setting that differs (paths compared by
    their real location), names in ``ignore`` left out."""
    names = sorted((set(saved) | set(current)) - set(ignore))
    return [f"{name} {saved.get(name)!r} there, {current.get(name)!r} now" for name in names
            if _comparable(saved.get(name)) != _comparable(current.get(name))]


def check_run_settings(folder: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Keep one run's files apart from another's: the first run records ``settings`` in
    ``folder/.run_settings.json``; a later run (a resume, another shard) must bring the same.

    Raises ``ValueError`` naming every setting that differs, unless the folder holds no
    results yet (a first run that failed before writing any). Settings that do not change
    what is sampled (batch size, dtype, index range, number of repeats) are left out by the caller.
    """
    path = Path(folder) / SETTINGS_FILE
    legacy = Path(folder) / LEGACY_SETTINGS_FILE
    if legacy.is_file() and not path.exists():
        os.replace(legacy, path)
    current = {name: _comparable(value) for name, value in settings.items()}
    # Results are looked for before the record is read: a concurrent run (another rank or
    # shard) records its settings before it writes any result, so results seen here come
    # with their settings already on disk. Ranks of one run bring identical settings, and an
    # identical record written twice is harmless (atomic writes).
    holds_results = any(p.name != LEGACY_SETTINGS_FILE and not p.name.startswith(".") for p in Path(folder).iterdir())
    if path.is_file():
        saved = read_json(path)
        differ = setting_differences(saved, current)
        if differ and holds_results:
            raise ValueError(f"{folder} holds files from other settings ({', '.join(differ)}); "
                             "use another output folder, or remove that one to start over")
        if not differ:
            return
    write_json(path, current)  # a folder without results takes the new settings


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """``--engine`` and ``--max_batch_tokens`` of collection and evaluation."""
    from utils.decoding.backends import ENGINES

    def engine(value: str) -> str:
        from utils.decoding.backends import BACKENDS

        missing = BACKENDS[value].missing() if value in BACKENDS else None
        if missing:
            raise argparse.ArgumentTypeError(missing)
        return value

    parser.add_argument("--engine", type=engine, default="continuous", choices=ENGINES,
                        help="continuous: keep --batch_size live rows, refilled as rows end, each request sampled from "
                             "its own seeded stream; generate: one model.generate() call per --batch_size problems, "
                             "seeded per batch (the original's loop); vllm: vLLM serves the reference, the Q# "
                             "classifier inside its sampler, each request from its own seeded stream "
                             "(pip install -r requirements-vllm.txt)")
    parser.add_argument("--max_batch_tokens", type=nonneg_int, default=0,
                        help="continuous engine: at most this many padded prompt tokens prefilled in one step "
                             "(0 = no cap; one request always joins)")
    parser.add_argument("--vllm_gpu_memory_utilization", type=float_in(0.0, 1.0, open_low=True), default=0.9,
                        help="--engine vllm: share of the GPU's memory vLLM may take (vLLM's gpu_memory_utilization)")
    parser.add_argument("--vllm_tensor_parallel_size", type=positive_int, default=1,
                        help="--engine vllm: GPUs one reference is split over (vLLM's tensor_parallel_size), per process; "
                             "each GPU also holds a copy of the classifier (on a CPU: one process, its cores split "
                             "between the workers)")
    parser.add_argument("--vllm_max_num_seqs", type=positive_int_or_off, default=-1,
                        help="--engine vllm: most sequences vLLM decodes at once (vLLM's max_num_seqs); -1 = --batch_size")
    parser.add_argument("--vllm_enforce_eager", type=int01, default=0,
                        help="--engine vllm: 1 = no torch.compile / CUDA graphs (vLLM's enforce_eager): faster start, "
                             "slower decoding")
    parser.add_argument("--vllm_kv_cache_gib", type=nonneg_int, default=0,
                        help="--engine vllm on a CPU: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE; 0 = that variable or "
                             "vLLM's default)")
