"""``--engine vllm`` (``utils.decoding.vllm_engine``): vLLM's rows as the processor follows them
(always), and, with vLLM installed: greedy float32 equality with ``generate()`` unguided and Q/V
guided (also with chunked prefill), the KL against the continuous engine's, seeded samples
independent of their batch mates, one-line errors, and the stage scripts on vLLM.

vLLM never runs in the test process (it initialises ``torch.distributed`` and sets environment
variables there): ``tests/helpers/vllm_checks.py`` runs the engine checks in a process of its
own, once for the module (and once for the real SmolLM2 pair), and the stage scripts run as real
processes."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers.stages import REPO
from utils.decoding.vllm_engine import HOST_KEY, VLLMRows

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (pip install -r requirements-vllm.txt)")


# ----------------------------------------------------------------------------- rows (no vLLM needed)


def added(index, request_id, prompt, outputs):
    return index, SimpleNamespace(extra_args={HOST_KEY: request_id}), prompt, outputs


def update(removed=(), add=(), moved=()):
    return SimpleNamespace(removed=list(removed), added=list(add), moved=list(moved))


def move(first, second, kind):
    return first, second, SimpleNamespace(name=kind)


def test_rows_follow_joins_moves_swaps_and_partial_prefills():
    """The rows the Q# processor follows, in vLLM's order: a row stays when it emitted one token
    since it was read, joins afresh otherwise (new, or after a step that emitted nothing), and
    moves and swaps carry a request to its new index; unguided requests are not followed."""
    rows = VLLMRows()
    a_out, b_out, c_out = [], [], []
    rows.update(update(add=[added(0, "a", [1, 2], a_out), added(1, "b", [3], b_out),
                            (2, SimpleNamespace(extra_args=None), [9], [])]))
    order, keep, new_ids, joins, join_rows = rows.plan()
    assert (order, keep, new_ids, joins, join_rows) == ([0, 1], [], [], [[1, 2], [3]], [0, 1])
    a_out.append(10)  # b's step was a partial prefill: no token
    order, keep, new_ids, joins, join_rows = rows.plan()
    assert (order, keep, new_ids, joins, join_rows) == ([0, 1], [0], [10], [[3]], [1])
    a_out.append(11)
    b_out.append(20)
    rows.update(update(removed=[2], add=[added(2, "c", [5, 6, 7], c_out)], moved=[move(0, 1, "SWAP")]))
    order, keep, new_ids, joins, join_rows = rows.plan()  # b now at 0, a at 1; c joins
    assert (order, keep, new_ids, joins, join_rows) == ([0, 1, 2], [1, 0], [20, 11], [[5, 6, 7]], [2])
    assert rows.followed == ["b", "a", "c"]
    b_out.append(21)
    c_out.append(30)
    rows.update(update(removed=[1], moved=[move(2, 1, "UNIDIRECTIONAL")]))  # a ends, c moves into its slot
    order, keep, new_ids, joins, join_rows = rows.plan()
    assert (order, keep, new_ids, joins, join_rows) == ([0, 1], [0, 2], [21, 30], [], [])
    assert rows.followed == ["b", "c"]


def test_v2_slots_follow_reordered_rows_and_recycled_slots():
    """vLLM's V2 interface gives no batch updates: rows are mapped to request slots anew every step
    and slots are recycled. Read from stand-in slot buffers, the rows the Q# processor follows stay
    in step with their requests while rows are reordered, and a recycled slot's new request joins afresh."""
    from utils.decoding.vllm_engine import slot_rows

    tokens = torch.zeros(6, 16, dtype=torch.long)
    tokens[0, :2], tokens[3, :3] = torch.tensor([1, 2]), torch.tensor([3, 4, 5])
    state = SimpleNamespace(all_token_ids=tokens, prompt_len=torch.tensor([2, 0, 0, 3, 0, 1]),
                            total_len=torch.tensor([2, 0, 0, 3, 0, 1]))
    tags, rows = {0: "a", 3: "b", 5: None}, VLLMRows()
    rows.slots = slot_rows(tags, state, [3, 0, 5])  # row 0: slot 3 (b), row 1: slot 0 (a), row 2: unguided
    assert rows.slots == {0: ("b", [3, 4, 5], []), 1: ("a", [1, 2], [])}  # (request, prompt, outputs so far)
    assert rows.plan() == ([0, 1], [], [], [[3, 4, 5], [1, 2]], [0, 1])
    tokens[0, 2], tokens[3, 3] = 10, 20  # each emitted one token
    state.total_len[0], state.total_len[3] = 3, 4
    rows.slots = slot_rows(tags, state, [0, 5, 3])  # reordered: a at row 0, b at row 2
    assert rows.plan() == ([0, 2], [1, 0], [10, 20], [], [])
    tags[0] = "c"  # slot 0 recycled (add_request): c's prompt is [7]
    tokens[0, :1], state.prompt_len[0], state.total_len[0] = 7, 1, 1
    tokens[3, 4], state.total_len[3] = 21, 5
    rows.slots = slot_rows(tags, state, [3, 0])
    assert rows.plan() == ([0, 1], [1], [21], [[7]], [1])
    assert rows.followed == ["b", "c"]


def test_workers_rebuild_the_guidance_from_its_recipe(tmp_path):
    """A tensor-parallel worker's guidance, built from the recipe of the run's (which travels
    pickled), guides as that one does; the worker loads the classifier once over an eta sweep and
    again for another checkpoint."""
    import dataclasses
    import pickle
    from argparse import Namespace

    from tests.helpers.vllm_checks import write_vllm_pair
    from utils.classifier import ClassifierSpec, QSharpClassifier
    from utils.decoding.rollout import make_processor
    from utils.decoding.vllm_engine import Host
    from utils.models import load_tokenizer

    write_vllm_pair(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path / "ref"))
    for seed in (1, 2):
        classifier = QSharpClassifier.from_causal_lm(str(tmp_path / "classifier"), ClassifierSpec("V", "bce"),
                                                     init_mode="random", dtype="float32", seed=seed)
        classifier.save_pretrained(tmp_path / f"ckpt_{seed}", tokenizer=tokenizer)
    args = Namespace(eta=3.0, top_k=5, inference_mode="bernoulli", classifier_type="V", loss_type="bce", num_atoms=11,
                     V_min=0.0, V_max=1.0, use_bias=0, classifier_model_id=str(tmp_path / "classifier"), dtype="float32")
    ids = torch.randint(5, len(tokenizer), (3, 7), generator=torch.Generator().manual_seed(0))  # [batch, prompt]
    scores = torch.randn(3, len(tokenizer), generator=torch.Generator().manual_seed(1))  # [batch, vocab]

    def guided(processor):
        processor.reset(torch.ones_like(ids))
        return processor(ids, scores.clone())

    host = Host()
    host.device = torch.device("cpu")
    ours = make_processor(args, tokenizer, checkpoint=str(tmp_path / "ckpt_1"), kl_temperature=0.8, kl_top_p=0.9,
                          device="cpu")
    recipe = pickle.loads(pickle.dumps(ours.recipe))
    theirs = host.build(recipe)
    assert (theirs.eta, theirs.mode, theirs.kl.temperature, theirs.kl.top_p) == (3.0, "bernoulli", 0.8, 0.9)
    torch.testing.assert_close(guided(theirs), guided(ours), rtol=0, atol=0)
    assert not torch.equal(guided(theirs), scores)
    again = host.build(dataclasses.replace(recipe, eta=10.0))
    assert again.classifier is theirs.classifier and again.eta == 10.0
    other = host.build(dataclasses.replace(recipe, source=str(tmp_path / "ckpt_2")))
    assert other.classifier is not theirs.classifier and not torch.equal(guided(other), guided(theirs))
    zero = make_processor(args, tokenizer, checkpoint=None, device="cpu").recipe  # round 1: a zero head
    assert zero.zero_head and host.build(zero).classifier.config.num_hidden_layers == 2
    assert make_processor(args, tokenizer, checkpoint=None, disabled=True, device="cpu").recipe.source is None


def test_tensor_parallel_refusals_are_one_line(monkeypatch):
    """``--vllm_tensor_parallel_size`` above 1 refuses several launched processes, more workers than
    CPU cores, and a guidance its workers cannot rebuild; on the CPU each worker gets its cores."""
    from utils.decoding.guidance import QSharpLogitsProcessor
    from utils.decoding.vllm_engine import VLLMBackend

    backend = VLLMBackend("ref", None, dtype="float32", device="cpu", batch_size=2,
                          vllm_settings={"tensor_parallel_size": 2})
    backend.tensor_parallel, backend.stop_ids = 2, [0]
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "")  # unset, and restored after the test
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 5, 6})
    backend._set_up_tensor_parallel()
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,5,6"
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {3})
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "")
    with pytest.raises(ValueError, match="needs a CPU core per worker; this process has 1$"):
        backend._set_up_tensor_parallel()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="runs in one process"):
        backend._set_up_tensor_parallel()
    with pytest.raises(ValueError, match="must say how each worker builds it"):
        backend._begin(QSharpLogitsProcessor(None, 0.0, 5, kl_temperature=1.0))


# ----------------------------------------------------------------------------- vLLM engines, in their own processes


@pytest.fixture(scope="module")
def vllm_models(tmp_path_factory):
    from tests.helpers.vllm_checks import write_vllm_pair

    root = tmp_path_factory.mktemp("vllm_models")
    write_vllm_pair(root)
    return root


@pytest.fixture(scope="module")
def checks(vllm_models):
    """The results of ``tests/helpers/vllm_checks.py`` (one process, two engines)."""
    import json
    import subprocess
    import sys

    from tests.helpers.scripts import ENV, TIMEOUT

    out = vllm_models / "checks.json"
    result = subprocess.run([sys.executable, "-m", "tests.helpers.vllm_checks", str(vllm_models), str(out)],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@needs_vllm
@pytest.mark.parametrize("classifier_type", ["None", "Q", "V"])
def test_greedy_equals_generate(checks, classifier_type):
    """Temperature 0, float32: token for token ``generate()``'s output, unguided and Q/V guided,
    seven prompts of 3 to 21 tokens joining a batch of 4."""
    result = checks[f"greedy_{classifier_type}"]
    assert result["vllm"] == result["generate"]
    recorded = [len(tokens) for tokens in result["vllm"]] if classifier_type != "None" else [0] * len(result["vllm"])
    assert result["kl_lengths"] == recorded  # guided: one KL value per token; unguided requests record none


@needs_vllm
def test_greedy_equals_generate_on_the_real_pair(real_dir, tmp_path):
    """SmolLM2-135M-Instruct guided by its 6-layer cut (pad == EOS, a chat template, a 49,152-token
    vocabulary), greedy float32, 48 new tokens for three chat prompts of different lengths: vLLM's
    tokens are ``generate()``'s, unguided and Q/V guided."""
    import json
    import subprocess
    import sys

    from tests.helpers.scripts import ENV, TIMEOUT

    out = tmp_path / "real.json"
    result = subprocess.run([sys.executable, "-m", "tests.helpers.vllm_checks", str(real_dir), str(out), "real"],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    for classifier_type, result in results.items():
        assert result["vllm"] == result["generate"], classifier_type
    assert [len(tokens) < 48 for tokens in results["greedy_None"]["vllm"]] == [True, False, False]  # one stops early
    for guided in ("greedy_Q", "greedy_V"):  # the guidance changes the greedy path
        assert results[guided]["vllm"] != results["greedy_None"]["vllm"]


@needs_vllm
def test_greedy_equals_generate_with_chunked_prefill(checks):
    """Prefills chunked at 24 tokens (a row whose step was a partial prefill emits nothing and is read
    again): V-guided greedy output still equals ``generate()``'s, with one KL value per token."""
    result = checks["chunked"]
    assert result["vllm"] == result["generate"]
    assert result["kl_lengths"] == [len(tokens) for tokens in result["vllm"]]


@needs_vllm
def test_kl_equals_the_continuous_engine(checks):
    """The KL recorded inside vLLM equals the continuous engine's on the same (greedy) tokens, within 1e-5."""
    (ours, kl, plain), (theirs, their_kl, their_plain) = checks["kl"]["vllm"], checks["kl"]["engine"]
    assert ours == theirs
    for a, b in ((kl, their_kl), (plain, their_plain)):
        for row_a, row_b in zip(a, b):
            torch.testing.assert_close(torch.tensor(row_a), torch.tensor(row_b), atol=1e-5, rtol=0)


@needs_vllm
def test_sample_does_not_depend_on_batch_mates(checks):
    """Temperature 0.8, top-p 0.9, V-guided: a request's tokens are the same alone and among others."""
    assert len(checks["batch_mates"]["alone"]) > 3
    assert checks["batch_mates"]["among"] == checks["batch_mates"]["alone"]


@needs_vllm
def test_processor_interface_follows_the_runner_vllm_picks(checks):
    """The V1 or V2 processor is chosen by vLLM's own rule: ``VLLM_USE_V2_MODEL_RUNNER`` when set, else
    Triton (absent from the CPU build, which runs V1); the engine started here agrees."""
    assert checks["v2_runner"] == {"0": 0, "1": 1, "None": 0}
    assert checks["v2_runner_engine"] is False


@needs_vllm
def test_aot_compilation_is_off_on_a_cpu(checks):
    """On a CPU the backend turns vLLM's AOT compilation off (vLLM 0.32's CPU build cannot load its AOT
    cache back, and would compile afresh at every start), so vLLM's torch.compile cache serves."""
    assert checks["aot_compile"] == "0"


@needs_vllm
def test_bad_input_is_one_line(checks):
    """A budget beyond the model's length, a model vLLM cannot serve, and a KV cache beyond the free
    memory, each end in one ValueError line."""
    assert "--max_new_tokens 5000 exceeds the 2048 tokens" in checks["too_long"]
    assert checks["kv_too_big"].startswith("vLLM could not start") and "(--vllm_kv_cache_gib)" in checks["kv_too_big"]
    assert "\n" not in checks["kv_too_big"]
    assert checks["unservable"].startswith("vLLM stopped while decoding: RuntimeError: Unsupported CPU attention")
    assert "\n" not in checks["unservable"]


def collect_command(models: Path, paths: dict, out: Path, engine: str) -> list[str]:
    from tests.helpers.scripts import command

    return command("collect_training_data.py", "--is_first_round", "1", "--end_index", "8", "--num_samples", "2",
                   "--ref_model_id", str(models / "ref"), "--classifier_model_id", str(models / "classifier"),
                   "--data_path", str(paths["train"]), "--train_eval_save_path", str(paths["train_eval"]),
                   "--use_chat_template", "0", "--max_new_tokens", "16", "--temperature", "0.8", "--top_p", "0.9",
                   "--eta", "5", "--dtype", "float32", "--batch_size", "2", "--output_dir", str(out), "--engine", engine,
                   "--vllm_enforce_eager", "1", "--vllm_kv_cache_gib", "1")


@needs_vllm
def test_collection_killed_and_restarted_gives_the_same_files_and_keeps_its_engine(vllm_models, tmp_path):
    """``collect_training_data.py --engine vllm``, guided (eta 5): a run SIGKILLed part-way and started
    again ends with the files of an uninterrupted run, byte for byte; the folder refuses another
    engine with one line."""
    import subprocess

    from tests.helpers.scripts import ENV, TIMEOUT, finish, run_and_kill, start
    from utils.demo.synthetic import write_synthetic_dataset

    paths = write_synthetic_dataset(tmp_path / "data", 8, 0, seed=0)
    full, killed = tmp_path / "full", tmp_path / "killed"
    finish(start(tmp_path, collect_command(vllm_models, paths, full, "vllm"), tmp_path / "full.log"), tmp_path / "full.log")
    files = {path.name: path.read_bytes() for path in sorted(full.glob("*_r*.json"))}
    assert len(files) == 16
    run_and_kill(tmp_path, collect_command(vllm_models, paths, killed, "vllm"), killed, len(files), tmp_path / "killed.log")
    finish(start(tmp_path, collect_command(vllm_models, paths, killed, "vllm"), tmp_path / "again.log"), tmp_path / "again.log")
    assert {path.name: path.read_bytes() for path in sorted(killed.glob("*_r*.json"))} == files
    other = subprocess.run(collect_command(vllm_models, paths, killed, "continuous"), cwd=tmp_path, env=ENV,
                           capture_output=True, text=True, timeout=TIMEOUT)
    assert other.returncode == 2 and "engine" in other.stderr.strip().splitlines()[-1]


@needs_vllm
def test_eval_sweep_on_vllm_on_one_and_two_processes_and_two_workers(vllm_models, tmp_path):
    """``eval_ckpt.py --engine vllm`` over etas 0 and 3 with one engine: every sample file, with the KL
    recorded per token (at eta 0 about -log(nucleus mass) per token, top-p 0.9). With
    ``--vllm_tensor_parallel_size 2`` (two workers, each its own copy of the classifier, the KL
    fetched from the first): the same tokens and KL. Launched on two processes (``accelerate
    launch``, an engine each): the same tokens, and the results of every problem, written once both
    ranks are done (each rank's vLLM makes a process group of its own, which the ranks' barrier must
    not use)."""
    import json
    import os

    from tests.helpers.scripts import ENV, TIMEOUT, command, finish, start
    from utils.classifier import ClassifierSpec, QSharpClassifier
    from utils.demo.synthetic import write_synthetic_dataset
    from utils.models import load_tokenizer

    paths = write_synthetic_dataset(tmp_path / "data", 0, 6, seed=0)
    ckpt = tmp_path / "exp" / "ckpt_0"
    classifier = QSharpClassifier.from_causal_lm(str(vllm_models / "classifier"), ClassifierSpec("V", "bce"),
                                                 init_mode="random", dtype="float32", seed=1)
    classifier.save_pretrained(ckpt, tokenizer=load_tokenizer(str(vllm_models / "ref")))
    (tmp_path / "exp" / "args.json").write_text(json.dumps({
        "ref_model_id": str(vllm_models / "ref"), "classifier_model_id": str(vllm_models / "classifier"),
        "classifier_type": "V", "loss_type": "bce", "inference_mode": "bernoulli", "use_chat_template": 0,
        "dtype": "float32", "original_problems_path": str(paths["test"]), "train_eval_save_path": str(paths["test_eval"])}))
    flags = ["--classifier_ckpt_path", str(ckpt), "--eta", "0", "3", "--num_samples", "2", "--max_new_tokens", "12",
             "--temperature", "0.8", "--top_p", "0.9", "--batch_size", "2", "--engine", "vllm", "--vllm_enforce_eager", "1",
             "--vllm_kv_cache_gib", "1"]
    log = tmp_path / "eval.log"
    finish(start(tmp_path, command("eval_ckpt.py", *flags, "--output_dir", "one"), log), log)
    assert log.read_text().count("eval [eta_") == 2
    tokens, kl = {}, {}
    for eta in ("0.0", "3.0"):
        folder = tmp_path / "one" / f"individual_eval_inference_eta_{eta}_top_k_20_temp_0.8"
        samples = {path.name: json.loads(path.read_text()) for path in folder.glob("*_r*.json")}
        assert len(samples) == 12
        assert all(len(s["token_kl"]) == s["num_response_tokens"] and s["traj_kl"] > 0 for s in samples.values())
        tokens[eta] = {name: s["output_ids"] for name, s in samples.items()}
        kl[eta] = {name: s["token_kl"] for name, s in samples.items()}
    log = tmp_path / "tp.log"
    finish(start(tmp_path, command("eval_ckpt.py", *flags, "--vllm_tensor_parallel_size", "2", "--output_dir", "tp"), log),
           log)
    for eta in ("0.0", "3.0"):
        folder = tmp_path / "tp" / f"individual_eval_inference_eta_{eta}_top_k_20_temp_0.8"
        samples = {path.name: json.loads(path.read_text()) for path in folder.glob("*_r*.json")}
        assert {name: s["output_ids"] for name, s in samples.items()} == tokens[eta]
        for name, sample in samples.items():  # the workers' all-reduce may change the logits' last bits
            torch.testing.assert_close(torch.tensor(sample["token_kl"]), torch.tensor(kl[eta][name]), rtol=0, atol=1e-5)
    if importlib.util.find_spec("accelerate") is None:
        return
    from tests.helpers.processes import accelerate_command, run_tree

    (tmp_path / "hf_home").mkdir()  # no accelerate config file of the user's is read
    result = run_tree(accelerate_command(REPO / "eval_ckpt.py", *flags, "--output_dir", "two"), cwd=tmp_path,
                      env={**ENV, "HF_HOME": str(tmp_path / "hf_home")}, timeout=TIMEOUT)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for eta in ("0.0", "3.0"):
        folder = tmp_path / "two" / f"individual_eval_inference_eta_{eta}_top_k_20_temp_0.8"
        # the same tokens; the KL floats may differ in their last bits (vLLM gives each rank its own CPU threads)
        assert {path.name: json.loads(path.read_text())["output_ids"] for path in folder.glob("*_r*.json")} == tokens[eta]
        stats = json.loads((tmp_path / "two" / f"reward_stats_eta_{eta}_top_k_20_temp_0.8.json").read_text())
        assert stats["num_problems"] == 6
    assert os.path.getsize(tmp_path / "two" / "inference_eval_results_eta_3.0_top_k_20_temp_0.8.jsonl") > 0


@needs_vllm
def test_guidance_overhead_bench_on_vllm(vllm_models, tmp_path):
    """``bench/guidance_overhead.py --engine vllm`` runs guided and unguided requests in one engine and
    reports the time per token of each against the floors."""
    import json
    import subprocess
    import sys

    from tests.helpers.scripts import ENV, TIMEOUT

    result = subprocess.run([sys.executable, str(REPO / "bench" / "guidance_overhead.py"), "--json", "--engine", "vllm",
                             "--ref_model_id", str(vllm_models / "ref"), "--classifier_model_id", str(vllm_models / "classifier"),
                             "--heads", "Q", "--repeats", "1", "--batch_size", "2", "--max_new_tokens", "4",
                             "--vllm_enforce_eager", "1", "--vllm_kv_cache_gib", "1", "--threads", "1"],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert line["engine"] == "vllm" and line["classifier_type"] == "Q" and line["limit"] > 1
    assert line["token_ratio"] > 0 and 0 < line["classifier_share"] < line["processor_share"] < 1
    assert all(2 <= line["tokens"][kind][0] <= 8 for kind in ("unguided", "guided"))  # 2 prompts x at most 4 tokens
