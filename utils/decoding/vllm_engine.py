"""``--engine vllm``: requests decoded by vLLM, the Q# classifier inside vLLM's sampler.

Unguided requests are plain vLLM sampling. Guided ones are tagged in their ``SamplingParams``
(``extra_args``) and go through a vLLM logits processor (``utils.decoding.vllm_processors``, V1
or V2 interface) that hosts this project's :class:`~utils.decoding.guidance.QSharpLogitsProcessor`
on the same device: it follows vLLM's rows as they join, leave and move (``update_state``),
tells the Q# processor which of its rows stayed and which joined (``update_rows``), adds the
offsets to the raw logits, before temperature and top-p (``apply``), and records the
original's KL of every guided token from the logits it holds (no second pass).

Every request is seeded by its own stream (``SamplingParams.seed = request_seed(...)``), so a
file does not depend on its batch mates, the shard or a restart. vLLM's sampler draws other
samples than ``generate()``'s or the continuous engine's, the same in distribution; greedy
decoding gives the same tokens.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``). On one device (the ``uni``
executor) vLLM samples here too: the processor's :class:`Host` is this process's, and it hosts the
very guidance the run was given. With ``--vllm_tensor_parallel_size`` N > 1 (the ``mp`` executor)
every one of the N workers samples, each from the full logits, so each hosts its own copy of the
guidance, built on its device from the guidance's recipe (``processor.recipe``) and its classifier
loaded once per worker; this process starts each run in them and fetches the KL of finished
requests from the first (``collective_rpc``).
"""

from __future__ import annotations

import itertools
import os
import uuid

import torch

from utils.decoding.kl import sampling_logits
from utils.decoding.requests import Backend, OnFinish, Request
from utils.models import get_stop_ids, left_pad

INSTALL = "pip install -r requirements-vllm.txt"
HOST_KEY = "qsharp_host"  # vllm_config.additional_config entry naming the Host of an engine
PROCESSORS = ("utils.decoding.vllm_processors:QSharpV1Processor",  # by vLLM's runner: V1, V2
              "utils.decoding.vllm_processors:QSharpV2Processor")
_HOSTS: dict[str, Host] = {}  # the hosts of this process's engines, by key


def import_vllm():
    """The ``vllm`` package, or one line saying how to install it."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the processor lives in this process
    try:
        import vllm
    except ImportError as error:
        raise SystemExit(f"error: --engine vllm needs vLLM ({error}); install it with: {INSTALL}") from None
    return vllm


class Host:
    """What one vLLM engine's processor reads, in the process that samples: the Q# processor of the
    current run, the sampling settings the KL is taken at, and the KL recorded per request id."""

    def __init__(self):
        self.guidance = None  # the QSharpLogitsProcessor of the current run (None: no guided request)
        self.temperature, self.top_p = 1.0, 1.0  # of the current run's KL
        self.kl: dict[str, tuple[list[float], list[float]]] = {}  # request id -> (after, before top-p)
        self.rows = None  # the VLLMRows of the engine's processor, once vLLM built it
        self.device = None  # the device vLLM samples on here
        self.classifier = None  # (classifier_key, classifier) last built from a recipe here

    def begin(self, guidance, temperature: float, top_p: float, stop_ids: list[int]) -> None:
        """Start a run: its guidance (None: none) and the sampling its KL is taken at; rows and KL forgotten."""
        if guidance is not None:
            guidance.reset(stop_ids=stop_ids)
        self.guidance, self.temperature, self.top_p = guidance, temperature, top_p
        if self.rows is not None:
            self.rows.reset()
        self.kl.clear()

    def take_kl(self, request_ids: list[str]) -> dict[str, tuple[list[float], list[float]]]:
        """The KL recorded here for the finished ``request_ids`` (after, before top-p), forgotten here."""
        return {request: self.kl.pop(request) for request in request_ids if request in self.kl}

    def build(self, recipe):
        """The guidance of ``recipe`` on this host's device, its classifier reused while the recipe's
        :attr:`~utils.decoding.rollout.GuidanceRecipe.classifier_key` stays the same (an eta sweep)."""
        if self.classifier is None or self.classifier[0] != recipe.classifier_key:
            self.guidance = self.classifier = None  # the old one freed before the new one loads
            self.classifier = (recipe.classifier_key, recipe.load_classifier(self.device))
        return recipe.build(self.device, self.classifier[1])


def host_of(key: str, device) -> Host:
    """The host of engine ``key`` in this process (made here in a tensor-parallel worker), sampling on ``device``."""
    host = _HOSTS.setdefault(key, Host())
    host.device = torch.device(device)
    return host


def _begin_in_worker(worker, key: str, recipe, temperature: float, top_p: float, stop_ids: list[int]) -> None:
    """In each tensor-parallel worker (``collective_rpc``): :meth:`Host.begin` with the guidance of ``recipe``."""
    host = _HOSTS[key]
    host.begin(host.build(recipe) if recipe is not None else None, temperature, top_p, stop_ids)


def _take_kl_in_worker(worker, key: str, request_ids: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    """In each tensor-parallel worker (``collective_rpc``): :meth:`Host.take_kl`."""
    return _HOSTS[key].take_kl(request_ids)


class VLLMRows:
    """vLLM's rows, as its batch updates describe them, and the Q# processor's rows that follow
    the guided ones: per step, which followed rows stay (in vLLM's order) and which join.

    A followed row stays when it emitted exactly one token since the processor last read it;
    any other row (new, resumed, or one whose last step was a partial prefill, which emitted
    nothing) joins afresh with its prompt and the tokens it has so far."""

    def __init__(self):
        self.slots: dict[int, tuple[str, list[int], list[int]]] = {}  # batch index -> (id, prompt, live outputs)
        self.followed: list[str] = []  # request ids in the Q# processor's row order
        self.read: dict[str, int] = {}  # request id -> output tokens the classifier has read

    def reset(self) -> None:
        """Forget the followed rows (the Q# processor was reset)."""
        self.followed, self.read = [], {}

    def update(self, batch_update) -> None:
        """Apply vLLM's ``BatchUpdate``: removed, then added, then moved (``SWAP`` or one-way)."""
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.slots.pop(index, None)
        for index, params, prompt, outputs in batch_update.added:
            tag = (params.extra_args or {}).get(HOST_KEY) if params is not None else None
            if tag is None:
                self.slots.pop(index, None)
            else:
                self.slots[index] = (tag, list(prompt or []), outputs)
        for first, second, direction in batch_update.moved:
            a, b = self.slots.pop(first, None), self.slots.pop(second, None)
            if a is not None:
                self.slots[second] = a
            if b is not None and direction.name == "SWAP":
                self.slots[first] = b

    def plan(self) -> tuple[list[int], list[int], list[int], list[list[int]], list[int]]:
        """This step's guided batch rows in the Q# processor's new order: the staying ones, then
        the joiners. Returns (batch rows, keep indices into the old order, new ids of the
        staying rows, the joiners' token lists, batch rows of the joiners)."""
        position = {request: i for i, request in enumerate(self.followed)}
        stay_rows, keep, new_ids, join_tokens, join_rows = [], [], [], [], []
        for index in sorted(self.slots):
            request, prompt, outputs = self.slots[index]
            if request in position and len(outputs) == self.read[request] + 1:
                stay_rows.append(index)
                keep.append(position[request])
                new_ids.append(outputs[-1])
                self.read[request] += 1
            else:
                join_rows.append(index)
                join_tokens.append(prompt + list(outputs))
                self.read[request] = len(outputs)
        self.followed = [self.slots[i][0] for i in stay_rows + join_rows]
        return stay_rows + join_rows, keep, new_ids, join_tokens, join_rows


def guide(host: Host, rows: VLLMRows, logits: torch.Tensor) -> torch.Tensor:
    """The step of either interface: the Q# offsets on the guided rows of ``logits`` [rows, vocab]
    (raw, edited in place), and their KL recorded in ``host``."""
    guidance = host.guidance
    if guidance is None or not rows.slots:
        return logits
    order, keep, new_ids, join_tokens, _ = rows.plan()
    index = torch.tensor(order, dtype=torch.long, device=logits.device)
    scores = logits[index].float()  # [guided, vocab] raw
    if guidance.is_noop:
        guided = scores
    else:
        pad = guidance.pad_token_id if guidance.pad_token_id is not None else 0
        join = left_pad(join_tokens, pad, logits.device) if join_tokens else None
        guidance.update_rows(torch.tensor(keep, dtype=torch.long, device=logits.device), join)
        stay = torch.tensor(new_ids, dtype=torch.long, device=logits.device)[:, None] if new_ids else None
        guided = guidance.guide_rows(scores, stay)
        logits[index] = guided.to(logits.dtype)
    if guidance.records_kl:
        warped = sampling_logits(guided, host.temperature, host.top_p)
        kl, plain = guidance.kl.step(guided, scores, warped)
        for row, a, b in zip(order, kl.tolist(), plain.tolist()):
            request, _, outputs = rows.slots[row]
            after, before = host.kl.setdefault(request, ([], []))
            del after[len(outputs):], before[len(outputs):]  # a step that emitted nothing (partial prefill)
            after.append(a)
            before.append(b)
    return logits


def slot_rows(tags: dict[int, str | None], req_states, slots: list[int]) -> dict[int, tuple[str, list[int], list[int]]]:
    """The V2 interface's guided rows as :class:`VLLMRows` keeps them: logits row -> (request id,
    prompt, outputs so far), read from the runner's per-slot token buffers (``slots[row]``: the
    row's slot)."""
    guided = [(row, slot) for row, slot in enumerate(slots) if tags.get(slot) is not None]
    if not guided:
        return {}
    index = torch.tensor([slot for _, slot in guided])
    starts = _tensor(req_states.prompt_len).cpu()[index].tolist()  # one transfer each, not one per row
    ends = _tensor(req_states.total_len).cpu()[index].tolist()
    histories = _tensor(req_states.all_token_ids)[index.to(_tensor(req_states.all_token_ids).device), : max(ends)].tolist()
    return {row: (tags[slot], history[:start], history[start:end])
            for (row, slot), start, end, history in zip(guided, starts, ends, histories)}


def _tensor(buffer) -> torch.Tensor:
    """A runner buffer's tensor (vLLM wraps its per-slot buffers; ``.gpu`` holds the device copy)."""
    return getattr(buffer, "gpu", buffer)


class VLLMBackend(Backend):
    """``--engine vllm``: the reference served by vLLM (``LLM``), its engine stepped here so that a
    request's follow-ups join as soon as it ends; every request seeded from its own stream."""

    def __init__(self, model_id: str, tokenizer, *, vllm_settings: dict | None = None, **settings):
        super().__init__(model_id, tokenizer, **settings)
        self.vllm_settings = dict(vllm_settings or {})
        self.host = Host()  # this process's (the one vLLM samples in on one device)
        self.key = uuid.uuid4().hex
        self.llm = None
        self.tensor_parallel = 1  # vLLM's workers, once loaded

    @classmethod
    def missing(cls) -> str | None:
        import importlib.util

        return None if importlib.util.find_spec("vllm") else f"vLLM is not installed; install it with: {INSTALL}"

    @classmethod
    def options(cls, args) -> dict:
        """vLLM's own settings from the ``--vllm_*`` flags."""
        return {"vllm_settings": {
            "gpu_memory_utilization": args.vllm_gpu_memory_utilization, "tensor_parallel_size": args.vllm_tensor_parallel_size,
            "max_num_seqs": args.vllm_max_num_seqs if args.vllm_max_num_seqs > 0 else None,
            "enforce_eager": bool(args.vllm_enforce_eager), "kv_cache_gib": args.vllm_kv_cache_gib,
        }}

    @classmethod
    def gpus(cls, args) -> int:
        """vLLM runs on ``cuda:0`` (and its tensor-parallel workers on the next GPUs) of the GPUs its process sees."""
        return args.vllm_tensor_parallel_size

    def load(self) -> None:
        """Start the vLLM engine, once (``--vllm_*`` settings; the KV-cache space on the CPU)."""
        if self.llm is not None:
            return
        vllm = import_vllm()
        settings = dict(self.vllm_settings)
        self.tensor_parallel = settings.pop("tensor_parallel_size", 1)
        if self.tensor_parallel > 1:
            self._set_up_tensor_parallel()
        if torch.device(self.device).type == "cpu":
            # vLLM 0.32's CPU build cannot load its own AOT-compiled model back ("'function' object has no
            # attribute 'finalize_loading'") and compiles it afresh at every start (start-up 68 s
            # against 23 s for SmolLM2-135M in bench/collect_throughput.py); the plain torch.compile path reloads
            # from its cache.
            os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        kv_gib = settings.pop("kv_cache_gib", None)
        if kv_gib:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_gib))
        _HOSTS[self.key] = self.host  # its device is set by the processor vLLM builds (host_of)
        try:
            self.llm = vllm.LLM(
                model=self.model_id, tokenizer=self.model_id, dtype=self.dtype, seed=0, generation_config="vllm",
                max_num_seqs=settings.pop("max_num_seqs", None) or self.batch_size,
                tensor_parallel_size=self.tensor_parallel, distributed_executor_backend="uni" if self.tensor_parallel == 1 else "mp",
                logits_processors=[PROCESSORS[_v2_runner()]], additional_config={HOST_KEY: self.key},
                enable_prefix_caching=True, **settings,
            )
        except Exception as error:  # noqa: BLE001  (vLLM raises many types; the user gets one line)
            hint = " (--vllm_kv_cache_gib)" if "VLLM_CPU_KVCACHE_SPACE" in str(error) else ""
            raise ValueError(f"vLLM could not start {self.model_id}: {_last_line(error)}{hint}") from error
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.stop_ids = get_stop_ids(_generation_config(self.model_id), self.tokenizer)

    def _run(self, requests: list[Request], on_finish: OnFinish, processor) -> None:
        from vllm import SamplingParams

        engine = self.llm.llm_engine
        guided_run = processor is not None and (not processor.is_noop or processor.records_kl)
        if guided_run:
            processor.check_sampling(self.temperature, self.top_p)
        self._begin(processor if guided_run else None)
        take_kl = guided_run and processor.records_kl
        counter = itertools.count()
        live: dict[str, Request] = {}

        def add(request: Request) -> None:
            if len(request.prompt) + request.max_new_tokens > self.max_model_len:
                raise ValueError(f"a prompt of {len(request.prompt)} tokens plus --max_new_tokens {request.max_new_tokens} "
                                 f"exceeds the {self.max_model_len} tokens vLLM serves {self.model_id} with")
            request_id = f"{self.key}-{next(counter)}"
            sampled = self.temperature > 0
            params = SamplingParams(
                temperature=self.temperature if sampled else 0.0, top_p=self.top_p if sampled else 1.0,
                seed=request.seed, max_tokens=request.max_new_tokens, stop_token_ids=list(self.stop_ids),
                ignore_eos=True, detokenize=False,
                extra_args={HOST_KEY: request_id} if request.guided and guided_run else None,
            )
            live[request_id] = request
            engine.add_request(request_id, {"prompt_token_ids": list(request.prompt)}, params)

        for request in requests:
            add(request)
        while engine.has_unfinished_requests():
            try:
                outputs = engine.step()
            except Exception as error:  # noqa: BLE001  (the engine is dead; the user gets one line)
                raise ValueError(f"vLLM stopped while decoding: {_last_line(error)}") from error
            finished = [output for output in outputs if output.finished]
            kl = self._take_kl([output.request_id for output in finished]) if take_kl and finished else {}
            for output in finished:
                request = live.pop(output.request_id)
                request.tokens = list(output.outputs[0].token_ids)
                if output.request_id in kl:
                    after, before = kl[output.request_id]
                    request.token_kl, request.token_kl_before_top_p = after[: len(request.tokens)], before[: len(request.tokens)]
                self._count("tokens", request.kind, len(request.tokens))
                for follow in on_finish(request) or []:
                    add(follow)

    def _set_up_tensor_parallel(self) -> None:
        """On a CPU, check a ``--vllm_tensor_parallel_size`` above 1 can run here and give each worker
        its share of this process's cores (vLLM binds one NUMA node per worker otherwise). On GPUs
        each process already sees only its own block of GPUs (``process_device``)."""
        from utils.distributed import current_process

        if torch.device(self.device).type != "cpu":
            return
        if current_process().world_size > 1:
            raise ValueError("--vllm_tensor_parallel_size above 1 on a CPU runs in one process (its workers share "
                             "the cores): launch it without accelerate, or with --num_processes 1")
        if not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
            cores = sorted(os.sched_getaffinity(0))
            if len(cores) < self.tensor_parallel:
                raise ValueError(f"--vllm_tensor_parallel_size {self.tensor_parallel} needs a CPU core per worker; "
                                 f"this process has {len(cores)}")
            shares = [cores[len(cores) * i // self.tensor_parallel : len(cores) * (i + 1) // self.tensor_parallel]
                      for i in range(self.tensor_parallel)]
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, share)) for share in shares)

    def _begin(self, guidance) -> None:
        """Start a run in the process(es) vLLM samples in: its guidance (None: none) and the sampling
        its KL is taken at (greedy decoding: temperature 1 without top-p)."""
        sampled = self.temperature > 0
        temperature, top_p = (self.temperature, self.top_p) if sampled else (1.0, 1.0)
        if self.tensor_parallel == 1:
            self.host.begin(guidance, temperature, top_p, list(self.stop_ids))
            return
        recipe = None if guidance is None else guidance.recipe
        if guidance is not None and recipe is None:
            raise ValueError("guidance under --vllm_tensor_parallel_size above 1 must say how each worker builds it "
                             "(a processor from utils.decoding.rollout.make_processor)")
        self.llm.collective_rpc(_begin_in_worker, args=(self.key, recipe, temperature, top_p, list(self.stop_ids)))

    def _take_kl(self, request_ids: list[str]) -> dict[str, tuple[list[float], list[float]]]:
        """The KL recorded for the finished ``request_ids`` (after, before top-p), forgotten where it was kept."""
        if self.tensor_parallel == 1:
            return self.host.take_kl(request_ids)
        return self.llm.collective_rpc(_take_kl_in_worker, args=(self.key, request_ids))[0]  # every worker has it


def _generation_config(model_id: str):
    """The generation config ``generate()`` would use for ``model_id`` (its file, else the model config's)."""
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_id)
    except OSError:
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_id))


def _last_line(error: BaseException) -> str:
    """The gist of a vLLM error: its root cause's message, on one line."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def _v2_runner() -> int:
    """1 when vLLM will run its V2 model runner, else 0, by vLLM 0.32's own rule for a configuration
    like ours (no speculative decoding, one process): ``VLLM_USE_V2_MODEL_RUNNER`` when set, else
    whether vLLM found a usable Triton (a GPU build; the CPU build's Triton has no CPU backend)."""
    from vllm import envs
    from vllm.triton_utils import HAS_TRITON

    if envs.VLLM_USE_V2_MODEL_RUNNER is not None:
        return int(envs.VLLM_USE_V2_MODEL_RUNNER)
    return int(HAS_TRITON)
