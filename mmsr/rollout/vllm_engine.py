"""Rollouts with vLLM, in the trainer's process and on its devices (colocated).

``VLLMEngine`` sits behind the same ``Engine`` interface as ``HFEngine``: the loop hands it token
contexts with their images and gets sampled ids with their log-probs back. What it adds:

- inputs: each context's expanded image pads are collapsed to one pad per image (vLLM expands them
  again) after a per-image check (``vllm_inputs``), images resized to the trainer's patch grid, under
  pixel bounds that hold each of them (``prompt_bounds``), so vLLM's own resize keeps that grid;
- sampling: temperature / top-p / top-k, a per-request token budget, stop strings at the action
  tags (kept in the output), the policy's end-of-turn tokens, banned tokens (image specials) biased
  to -100, and the log-prob of every sampled token as the sampler drew it (``processed_logprobs``:
  after temperature and the ban, as the trainer scores; with top-p/top-k on, after those too, the kept
  tokens renormalized, which the trainer does not score: ``mmsr.train.update.UpdateSettings.truncated``
  then logs no ``train/mismatch_*`` and refuses ``is_correction``. ``raw_logprobs`` come before the
  temperature and the ban, and vLLM 0.32 has no mode in between);
- weights: ``update_weights`` streams named tensors into the live model
  (``collective_rpc("reload_weights")``), then drops the prefix cache and the vision-encoder
  outputs, computed with the old weights; ``score`` gives the log-probs of a fixed probe (with its
  image, for a vision-language policy) for ``mmsr.sync.WeightSync``;
- memory (GPU only): ``sleep`` / ``wake`` around the training phase with ``enable_sleep_mode``; on
  CPU they do nothing and the KV cache is sized by ``cpu_kv_cache_gb``.
- start-up (``bind``, called by ``GRPOModule.setup`` once Lightning has set up the process group and
  the rank's device): without ``model`` no weights are written anywhere: vLLM starts from a
  config-only directory (config, tokenizer, image processor) with ``load_format="dummy"``, and the
  first weight sync, verified by the probe, loads the trainer's weights before the first rollout.
  Under a process group of several ranks every rank runs its own engine through vLLM's
  ``external_launcher`` executor on its own device, inside the trainer's process group.
- sampling streams: each request is seeded from the engine seed, its rollout index, episode key
  and turn (``mmsr.rollout.sampling.request_seed``), so its draws do not depend on its batch.
- incremental generation (``IncrementalEngine``): ``submit`` adds requests to vLLM's scheduler and
  ``step`` runs one engine step, returning the requests that finished, so the loop hands each turn to
  its tool the moment it ends and its next turn joins the running batch (continuous batching). The
  same engine, inputs, parameters and seeds as ``generate``: the same tokens and log-probs.

vLLM's ``AsyncLLM`` is not used: it always runs the engine core in a separate process (vLLM 0.32 builds
its client with ``make_async_mp_client`` whatever ``VLLM_ENABLE_V1_MULTIPROCESSING`` says, and an
in-process asyncio core raises NotImplementedError), so weights could only reach it serialized
("Object of type <class 'list_iterator'> is not serializable", from its ``collective_rpc``), and
``external_launcher`` ranks could not share the trainer's process group. Stepping the in-process
``LLMEngine`` is the same scheduler without the process boundary.

The engine must run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set by ``bind``): weights are
handed over as live tensors, never serialized.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from typing import Literal

import torch

from mmsr.checks import run_seed
from mmsr.models.build import save_policy
from mmsr.models.policy import Policy
from mmsr.models.vision import VisionInput, covering_bounds
from mmsr.rollout.engine import GenerationOutput, GenerationRequest, SamplingParams, turn_budget
from mmsr.rollout.sampling import request_seed
from mmsr.rollout.vllm_inputs import (
    GridImages,
    ImageTokenIds,
    ImageTokenMismatch,
    engine_input,
    pixel_bounds,
)
from mmsr.rollout.vllm_startup import (
    launcher_env,
    reload_covering,
    repack_cpu_lm_head,
    tolerant_kernel_scan,
)

# vLLM clamps logit biases to [-100, 100]; e^-100 relative to the other tokens is below float32
# resolution, so this equals the trainer's mask (Policy.mask_banned) to float precision.
BANNED_BIAS = -100.0
DType = Literal["float32", "bfloat16", "float16"]


class VLLMEngine:
    """An in-process ``vllm.LLM`` on the trainer's policy.

    Args:
        model: Hugging Face directory (or hub id) vLLM loads its weights from at start; ``None``
            starts from dummy weights that the first sync replaces (nothing is written but the
            config and tokenizer, to a temporary directory removed when the engine goes).
        dtype: engine weights dtype; ``None`` takes the policy's compute dtype (else its parameters').
        max_model_len: longest context (images expanded); at least ``RolloutSettings.max_context_tokens``
            (``GRPOModule`` refuses less); a longer prompt is refused naming its request.
        max_num_seqs: most sequences decoded at once.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (GPU only).
        cpu_kv_cache_gb: KV cache size on CPU (vLLM reads ``gpu_memory_utilization`` as a fraction of
            host RAM there, so the cache is sized explicitly instead).
        enable_prefix_caching: reuse the KV of shared prefixes (a multi-turn context re-sends its
            earlier turns; the ``n`` samples of a prompt share it).
        enable_sleep_mode: free the KV cache and offload weights while training (GPU only; ignored
            with a warning on CPU).
        sleep_level: 1 offloads weights to host memory, 2 discards them (a sync must follow ``wake``).
        enforce_eager: no CUDA graphs / compilation (faster start, slower decode).
        tensor_parallel_size: GPUs per engine. Only 1 is supported: with more, the ranks of a
            tensor-parallel group would have to roll out the same prompts in lockstep and share tool
            results, and mmsr's rollout is per rank; a larger value is refused at start.
        seed: sampling seed; None: the run's ``seed_everything`` (``run_seed``), fixed at ``bind``, kept in checkpoints.
    """

    def __init__(
        self,
        model: str | None = None,
        dtype: DType | None = None,
        max_model_len: int = 8192,
        max_num_seqs: int = 256,
        gpu_memory_utilization: float = 0.5,
        cpu_kv_cache_gb: float = 1.0,
        enable_prefix_caching: bool = True,
        enable_sleep_mode: bool = False,
        sleep_level: Literal[1, 2] = 1,
        enforce_eager: bool = False,
        tensor_parallel_size: int = 1,
        seed: int | None = None,
    ) -> None:
        self.model, self.dtype, self.seed = model, dtype, seed
        self.tensor_parallel_size = tensor_parallel_size
        self.calls = 0  # generate() and submit() calls: the streams of requests that carry no episode key
        self.submitted = 0  # requests submitted for stepping: their tickets
        self.in_flight: set[str] = set()  # tickets submitted and not yet finished or cancelled
        self._config_dir: tempfile.TemporaryDirectory | None = None
        self.max_model_len, self.max_num_seqs = max_model_len, max_num_seqs
        self.gpu_memory_utilization, self.cpu_kv_cache_gb = gpu_memory_utilization, cpu_kv_cache_gb
        self.enable_prefix_caching, self.enforce_eager = enable_prefix_caching, enforce_eager
        self.enable_sleep_mode, self.sleep_level = enable_sleep_mode, sleep_level
        self.policy: Policy | None = None
        self.llm = None
        self.asleep = False

    # -- set-up ---------------------------------------------------------------------------------
    def llm_kwargs(self, path: str, dtype: str, on_gpu: bool, load_format: str = "auto", world_size: int = 1) -> dict:
        """Arguments of ``vllm.LLM``; GPU-only memory features are dropped on CPU; with several
        ranks, each runs its own engine through the ``external_launcher`` executor."""
        if self.tensor_parallel_size != 1:
            raise ValueError(f"VLLMEngine(tensor_parallel_size={self.tensor_parallel_size}): only 1 is supported; "
                             "a tensor-parallel group would need its ranks to roll out the same prompts in lockstep")  # fmt: skip
        kw = dict(model=path, tokenizer=path, dtype=dtype, seed=self.seed, max_model_len=self.max_model_len,
                  max_num_seqs=self.max_num_seqs, enable_prefix_caching=self.enable_prefix_caching,
                  enforce_eager=self.enforce_eager, logprobs_mode="processed_logprobs", load_format=load_format)  # fmt: skip
        if load_format == "dummy":
            # vLLM 0.32's dummy loader randomizes persistent buffers too, and Qwen2.5-VL normalizes
            # images on the device with the processor's mean/std kept in such buffers
            # (FusedMMInputNorm), which no weight sync sends: normalize them in the processor instead.
            kw["mm_device_do_normalize"] = False
        if world_size > 1:
            kw |= dict(distributed_executor_backend="external_launcher", tensor_parallel_size=self.tensor_parallel_size)
        if on_gpu:
            return kw | dict(gpu_memory_utilization=self.gpu_memory_utilization, enable_sleep_mode=self.enable_sleep_mode)
        if self.enable_sleep_mode:
            warnings.warn("VLLMEngine: enable_sleep_mode needs a GPU; ignored on CPU", stacklevel=2)
        return kw | dict(kv_cache_memory_bytes=int(self.cpu_kv_cache_gb * 2**30))

    def bind(self, policy: Policy) -> None:
        """Start vLLM for ``policy`` on this rank's device (see the module doc: from ``model``'s
        weights, or from dummy weights that the first sync replaces)."""
        if self.policy is policy and self.llm is not None:
            return
        self.policy, self.seed = policy, run_seed(self.seed)
        self.image_ids = ImageTokenIds.from_tokenizer(policy.tokenizer) if policy.is_vision else None
        self.patch_size = getattr(policy.image_processor, "patch_size", 14)
        self.grid_images = GridImages(self.patch_size)
        vocab = policy.model.get_output_embeddings().weight.shape[0]
        self.logit_bias = {int(i): BANNED_BIAS for i in policy.banned_token_ids(vocab)}
        self.stop_ids = sorted(policy.stop_token_ids())
        self.mm_kwargs = pixel_bounds(policy.image_processor, policy.tool_image_processor)
        path, load_format = self.model, "auto"
        if path is None:
            self._config_dir = tempfile.TemporaryDirectory(prefix="mmsr-vllm-config-")
            path, load_format = str(save_policy(policy, self._config_dir.name, weights=False)), "dummy"
        dtype = self.dtype or str(policy.compute_dtype or policy.model.dtype).removeprefix("torch.")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # live tensors, no serialization (see module doc)
        world = launcher_env()
        from vllm import LLM

        with tolerant_kernel_scan():
            self.llm = LLM(**self.llm_kwargs(path, dtype, torch.cuda.is_available(), load_format, world))

    @property
    def block_size(self) -> int | None:
        """Tokens of a KV-cache block (vLLM's prefix cache holds whole blocks); ``None`` before ``bind``."""
        return None if self.llm is None else self.llm.llm_engine.vllm_config.cache_config.block_size

    @property
    def weights_dtype(self) -> str | None:
        """The dtype vLLM runs the weights in (``"bfloat16"`` ...); ``None`` before ``bind``."""
        return None if self.llm is None else str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")

    @property
    def sleep_enabled(self) -> bool:
        return self.enable_sleep_mode and torch.cuda.is_available()

    def _require(self, idle: bool = True):
        """The ``vllm.LLM``; with ``idle``, none of the submitted requests may be in flight (a batched
        call would run them to the end and take their outputs)."""
        if self.llm is None:
            raise RuntimeError("VLLMEngine.bind(policy) must be called first")
        if self.asleep:
            raise RuntimeError("VLLMEngine is asleep: call wake() before generating or syncing")
        if idle and self.in_flight:
            raise RuntimeError(f"VLLMEngine has {len(self.in_flight)} submitted requests in flight: step() until "
                               "they finish, or cancel() them, before generating, scoring or syncing")  # fmt: skip
        return self.llm

    # -- generation -----------------------------------------------------------------------------
    def sampling_params(self, sampling: SamplingParams, budget: int, seed: int | None = None):
        """vLLM's settings of one request; ``budget`` is ``turn_budget``'s (>= 1) and ``SamplingParams`` refuses a
        negative temperature, so neither needs clamping here."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VSamplingParams(
            n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=budget, stop=list(sampling.stop) or None, include_stop_str_in_output=True,
            stop_token_ids=self.stop_ids, logprobs=0, logit_bias=self.logit_bias or None,
            skip_special_tokens=True, seed=seed, output_kind=RequestOutputKind.FINAL_ONLY,
        )  # fmt: skip

    def _inputs(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[tuple[dict, object]]:
        """``(prompt, vllm.SamplingParams)`` of each request; requests without a key are seeded by call."""
        budgets = [turn_budget(r, sampling) for r in requests]  # all checked before any is submitted
        prompts = [self._prompt(r) for r in requests]
        self.calls += 1
        seeds = [request_seed(self.seed, r.stream, r.key or f"call{self.calls}/{i}", r.turn) for i, r in enumerate(requests)]
        return [(prompt, self.sampling_params(sampling, budget, seed)) for prompt, budget, seed in zip(prompts, budgets, seeds)]

    def _prompt(self, request: GenerationRequest) -> dict:
        """vLLM's prompt of one request, its image pads checked against its images (``engine_input``), and within
        ``max_model_len`` with room for a token; either refusal names the request, as ``HFEngine.request_budget``
        does (vLLM's own names neither the request nor the setting, and in a batch of a whole rollout's turns the
        bare message would not say whose context was wrong)."""
        if self.max_model_len is not None and len(request.input_ids) >= self.max_model_len:
            raise ValueError(f"request {request.key!r}: its prompt of {len(request.input_ids)} tokens leaves no room for "
                             f"a token in VLLMEngine's max_model_len={self.max_model_len}")  # fmt: skip
        try:
            checked = engine_input(request.input_ids, request.vision, self.image_ids, grids=self.grid_images)
        except ImageTokenMismatch as e:
            raise ImageTokenMismatch(f"request {request.key!r}: {e}") from None
        return checked.prompt(self.prompt_bounds(request.vision))

    def prompt_bounds(self, vision: Sequence[VisionInput]) -> dict:
        """The processor kwargs of one prompt: the policy's pixel bounds, widened to hold each of its
        images at its training grid (of the patches ``grid_images`` resized it to) so that vLLM's resize keeps
        that grid (``covering_bounds``)."""
        return covering_bounds(self.mm_kwargs, vision, self.grid_images.patch_size)

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[GenerationOutput]:
        llm = self._require()
        prompts, params = zip(*self._inputs(requests, sampling)) if requests else ((), ())
        outs = llm.generate(list(prompts), list(params), use_tqdm=False)
        return [to_output(o.outputs[0]) for o in outs]

    def submit(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[str]:
        """Add ``requests`` to vLLM's scheduler; they start at the next ``step``, beside those running."""
        engine, tickets = self._require(idle=False).llm_engine, []
        try:
            for prompt, params in self._inputs(requests, sampling):
                tickets.append(f"mmsr-{self.submitted}")
                self.submitted += 1
                engine.add_request(tickets[-1], prompt, params)
                self.in_flight.add(tickets[-1])
        except BaseException:  # all or none: the caller never gets the tickets of those added, so cannot cancel them
            self.cancel(tickets)
            raise
        return tickets

    def step(self) -> list[tuple[str, GenerationOutput]]:
        """One vLLM engine step (a decode step of every running request, prefill of new ones); returns
        ``(ticket, output)`` of the requests that finished in it."""
        outs = self._require(idle=False).llm_engine.step()
        done = [(o.request_id, to_output(o.outputs[0])) for o in outs if o.finished and o.request_id in self.in_flight]
        self.in_flight.difference_update(ticket for ticket, _ in done)
        return done

    def cancel(self, tickets: Iterable[str]) -> None:
        """Abort submitted requests still in flight (a rollout that failed part way)."""
        drop = self.in_flight.intersection(tickets)
        if drop:
            self._require(idle=False).llm_engine.abort_request(sorted(drop))
            self.in_flight -= drop

    def state_dict(self) -> dict:
        """The sampler's state (saved in checkpoints so a resumed run draws the same tokens)."""
        return {"seed": run_seed(self.seed), "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.calls = state["seed"], state["calls"]

    # -- weights --------------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load checkpoint-named tensors into the running model, then forget cached prefixes. An engine parameter
        that no tensor reached (a renamed parameter, another architecture's names) stops it (``ValueError`` naming
        them): vLLM only logs it, and the engine would sample with that parameter stale."""
        llm = self._require()
        missed = llm.collective_rpc(reload_covering, kwargs={"weights_iterator": iter(named_tensors)})
        llm.collective_rpc(repack_cpu_lm_head)
        llm.reset_prefix_cache()
        # vLLM 0.32's reload clears the worker's cached vision-encoder outputs but not the scheduler's
        # record of them, so the next request with an image seen before fails with "Encoder cache
        # miss"; resetting both also drops embeddings made with the old weights (tiny Qwen2.5-VL test).
        llm.llm_engine.reset_encoder_cache()
        if unloaded := sorted({name for names in missed if names for name in names}):
            raise ValueError(f"VLLMEngine.update_weights: no tensor of the sync reached {len(unloaded)} of the engine's "
                             f"parameters ({', '.join(unloaded[:5])}{', ...' if len(unloaded) > 5 else ''}): they would "
                             "stay stale (a renamed parameter, or another architecture)")  # fmt: skip

    def score(self, input_ids: Sequence[int], vision: Sequence[VisionInput] = ()) -> list[float]:
        """``[L-1]`` log-probs of tokens 1.. of one sequence, images expanded as in training (raw model,
        temperature 1): vLLM gets the collapsed prompt and the images, as in ``generate``."""
        from vllm import SamplingParams as VSamplingParams

        llm = self._require()
        checked = engine_input(input_ids, vision, self.image_ids, grids=self.grid_images)
        prompt = checked.prompt(self.prompt_bounds(vision))
        params = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        (out,) = llm.generate([prompt], params, use_tqdm=False)
        return expanded_prompt_logprobs(out, input_ids)

    # -- memory ---------------------------------------------------------------------------------
    def sleep(self) -> None:
        """Free the KV cache (and offload or drop weights) for the training phase; no-op on CPU."""
        if self.sleep_enabled and not self.asleep:
            self._require().sleep(level=self.sleep_level)
            self.asleep = True

    def wake(self) -> None:
        """Undo ``sleep``; call before syncing weights into the engine. Torch's allocator first hands back the
        blocks the update freed (activations, gradient buffers): vLLM maps its weights and KV cache back outside
        that allocator, which would otherwise keep them cached, unused, and leave the wake short of memory."""
        if self.asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up()
            self.asleep = False


def expanded_prompt_logprobs(out, input_ids: Sequence[int]) -> list[float]:
    """``[L-1]`` a ``vllm.RequestOutput``'s prompt log-probs of tokens 1.. of ``input_ids``.

    vLLM reports them over the prompt as it expanded it (each image's single pad grown to its
    tokens), so they line up with the training ids position by position once that expansion is
    checked to reproduce them.
    """
    ids = list(input_ids)
    if list(out.prompt_token_ids) != ids:
        raise ImageTokenMismatch(f"vLLM expanded the prompt to {len(out.prompt_token_ids)} tokens that differ "
                                 f"from the {len(ids)} training ids")  # fmt: skip
    return [float(d[t].logprob) for d, t in zip(out.prompt_logprobs[1:], ids[1:])]


def to_output(completion) -> GenerationOutput:
    """A ``vllm.CompletionOutput`` as the loop's record (finish: stop string, end token or budget)."""
    ids = list(completion.token_ids)
    logprobs = [float(d[t].logprob) for d, t in zip(completion.logprobs, ids)]
    if completion.finish_reason == "length":
        finish = "length"
    else:
        finish = "stop" if isinstance(completion.stop_reason, str) else "eos"
    return GenerationOutput(ids, logprobs, finish)
