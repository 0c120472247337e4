"""The arithmetic of ``mmsr plan``: bytes per GPU of every term, in two phases, and the token budget.

A step has two phases that never overlap on a GPU:
- rollout: sharded params + AdamW state (grads are freed after each optimizer step) + the reference model
  when it stays on the GPU + the engine (vLLM takes ``gpu_memory_utilization`` of the GPU; an HF engine
  under FSDP2 keeps a full compute-dtype copy of the policy) + the weight sync (a bucket's gather, or the sync
  probe's trainer forward that follows it, whichever is larger) + overhead;
- training: params + grads + AdamW + reference + what FSDP2 gathers (root params and two blocks in flight,
  in compute dtype) and the unsharded grads of the root and one block (compute dtype, plus the float32
  reduce-scatter input of the block before) + activations of one micro-batch + its logits + the dense
  mask of shared prefixes in packed rows + the engine while asleep (0 with vLLM sleep mode) + overhead.

Not counted: FSDP2's padding of dim 0 to a multiple of W (0.004% of the 7B), DDP's gradient buckets,
the float32 copy of the root grads FSDP2 reduce-scatters at the very end of the backward (after the
activations are freed), the float32 ``pixel_values`` during the forward, the sync probe's own activations
(one layer's at ~1,000 tokens), and allocator fragmentation beyond ``overhead``. Every number is an upper
bound for episodes at the rollout limits.
"""

from __future__ import annotations

import math
from dataclasses import replace

from mmsr.algo.logprobs import DEFAULT_CHUNK_SIZE
from mmsr.plan.config import CARD_GIB, GiB, ModelShape, RunSpec
from mmsr.sync.probe import PROBE_TOKENS, SAMPLING_PROBE_MIN_TOKENS
from mmsr.tools.base import IMAGE_MARKER

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NORM_BYTES = 4  # Qwen2 RMSNorm computes in float32 and saves its float32 input
REDUCE_DTYPE = "float32"  # FSDP2's gradient reduction below fp32 params (mmsr.parallel.mixed_precision)


def nbytes(dtype: str) -> int:
    """Bytes per element of a dtype named as in the configs."""
    return DTYPE_BYTES[dtype]


def shard(total: int, spec: RunSpec) -> int:
    """Bytes per GPU of ``total`` bytes sharded over the ranks under FSDP2 (replicated otherwise)."""
    return math.ceil(total / spec.world_size) if spec.fsdp else total


def training_state(shape: ModelShape, spec: RunSpec) -> dict[str, int]:
    """params, grads and AdamW ``exp_avg`` + ``exp_avg_sq``, all in param dtype."""
    per = shard(shape.params * nbytes(spec.param_dtype), spec)
    return {"params": per, "grads": per, "adamw": 2 * per}


def reference(shape: ModelShape, spec: RunSpec) -> dict[str, int]:
    """The frozen reference model (compute dtype): ``resident`` on the GPU, or ``transient`` while it scores.

    FSDP2 shards it like the policy; offloaded (FSDP2 CPU offload) it only gathers blocks while it scores,
    no more than the policy's gathered term. Without FSDP2 it is a full copy, moved whole to the GPU to
    score when offloaded.
    """
    if not spec.kl:
        return {"resident": 0, "transient": 0}
    full = shape.params * nbytes(spec.compute_dtype)
    if spec.fsdp:
        return {"resident": 0 if spec.ref_offload else shard(full, spec), "transient": 0}
    return {"resident": 0, "transient": full} if spec.ref_offload else {"resident": full, "transient": 0}


def gathered(shape: ModelShape, spec: RunSpec) -> dict[str, int]:
    """Unsharded copies in compute dtype during forward/backward.

    FSDP2: the root params stay gathered from the forward to the end of the backward, plus two blocks in
    flight (the current one and the prefetched one); the root's and one block's unsharded grads wait to
    be reduce-scattered, and where FSDP2 reduces in float32 (compute dtype below the params') the block
    before's grads, copied into a float32 reduce-scatter input, stay alive through this block's backward.
    Without FSDP2, mixed precision caches a compute-dtype copy of every weight (autocast) for the forward
    and backward.
    """
    c = nbytes(spec.compute_dtype)
    if spec.fsdp:
        root, block = shape.root_params, shape.block_params
        reduce = block * nbytes(REDUCE_DTYPE) if spec.compute_dtype != spec.param_dtype else 0
        return {"params": (root + 2 * block) * c, "grads": (root + block) * c + reduce}
    return {"params": shape.params * c if spec.compute_dtype != spec.param_dtype else 0, "grads": 0}


def layer_bytes(hidden: int, kv_dim: int, intermediate: int, c: int, r: int | None = None) -> int:
    """Bytes per token one Qwen2 decoder layer saves for backward, flash/sdpa attention.

    In compute dtype (``c`` bytes): per RMSNorm its normalized input and its output, which feeds q/k/v
    (or the MLP) (4h); q (h), k and v (2 kv_dim: the width SDPA is handed them at, ``lm_layer_bytes``);
    the attention output (h) and o_proj's contiguous input (h); MLP gate, up, act(gate), act(gate) * up
    (4 intermediate): ``c * (7h + 2 kv_dim + 4 I)``. Each RMSNorm also saves its float32 input (2 x 4h).
    For 7B in bf16, K and V at full width: 244,736 bytes per token and layer.

    ``r``: bytes of the residual stream when autocast keeps it above ``c`` (no FSDP2, float32 params): each
    normalized input is saved at ``r``, and the norm's output, in ``r`` too, is cast once per projection it
    feeds, each cast saved (q, k, v: 3; gate, up: 2; 3 more than one shared output): ``2 (r - c) h + 3 c h``.
    """
    autocast = 2 * (r - c) * hidden + 3 * c * hidden if r is not None and r != c else 0
    return c * (7 * hidden + 2 * kv_dim + 4 * intermediate) + 2 * NORM_BYTES * hidden + autocast


def residual_bytes(spec: RunSpec) -> int:
    """Bytes per element of the language model's residual stream (the layers' inputs). FSDP2 gathers the
    weights in compute dtype, so every output is in it; autocast leaves the embedding, the norms' weight
    products and the residual adds in the param dtype (float32 under ``bf16-mixed``)."""
    return nbytes(spec.compute_dtype) if spec.fsdp else nbytes(spec.param_dtype)


def qk_norm_bytes(shape: ModelShape, c: int) -> int:
    """Bytes per token the per-head RMSNorms of q and k (Qwen3, Qwen3-VL; none in Qwen2) save in one layer: each
    its float32 input and its normalized output in compute dtype (``c`` bytes, what its weight multiplies) at q's
    and k's widths, and 1/rms (float32) per head: ``(4 + c)(q_dim + k_dim) + 4 (heads + kv_heads)``. They run
    before ``repeat_kv``: k at the KV heads' width whatever the attention. Qwen3-VL-8B in bf16: 30,880 bytes."""
    if not shape.qk_norm:
        return 0
    heads = shape.heads or shape.hidden // shape.head_dim
    width = (heads + shape.kv_heads) * shape.head_dim
    return (NORM_BYTES + c) * width + NORM_BYTES * (heads + shape.kv_heads)


def lm_layer_bytes(shape: ModelShape, spec: RunSpec) -> int:
    """``layer_bytes`` of one decoder layer of ``shape`` under ``spec``, plus its q and k norms' (``qk_norm_bytes``).
    K and V are saved at the KV heads' width by flash-attention 2 only: transformers' sdpa path expands them to
    every head (``repeat_kv``) whenever it is given a mask (packed rows' 4-D mask, padded whole rows), and eager
    always (q's width, taken as h)."""
    c = nbytes(spec.compute_dtype)
    kv_dim = shape.kv_heads * shape.head_dim if spec.attention == "flash_attention_2" else shape.hidden
    return layer_bytes(shape.hidden, kv_dim, shape.intermediate, c, residual_bytes(spec)) + qk_norm_bytes(shape, c)


def activations(shape: ModelShape, spec: RunSpec) -> int:
    """Language-model activations of one micro-batch of ``micro_batch_tokens(spec)`` padded tokens.

    Without checkpointing every layer's saved tensors; with it, each layer's input (``layers x h x r``,
    ``residual_bytes``) plus one layer's saved tensors while it is recomputed in backward. The final norm
    adds its float32 input, its normalized input (``r``) and lm_head's input: ``(4 + r + c) h``.
    """
    c, r, t = nbytes(spec.compute_dtype), residual_bytes(spec), micro_batch_tokens(spec)
    layer = lm_layer_bytes(shape, spec) * t
    final_norm = (NORM_BYTES + r + c) * shape.hidden * t
    if spec.gradient_checkpointing:
        return shape.layers * shape.hidden * r * t + layer + final_norm
    return shape.layers * layer + final_norm


def micro_batch_tokens(spec: RunSpec) -> int:
    """The most tokens one micro-batch holds: ``micro_batch_tokens``, or an episode at the context bound that is
    longer and goes alone (``pack_by_tokens``)."""
    return max(spec.micro_batch_tokens, spec.max_context_tokens)


def episodes_per_micro_batch(spec: RunSpec) -> int:
    """Episodes at the context bound that one micro-batch packs (a longer one goes alone)."""
    return max(1, spec.micro_batch_tokens // spec.max_context_tokens)


def episodes_per_update(spec: RunSpec) -> int:
    """Episodes of a rank's largest mini-batch (the ``tensor_split`` of ``mmsr.train.update``)."""
    return math.ceil(spec.prompts_per_rank * spec.num_generations / spec.mini_batches)


def image_tokens_per_micro_batch(shape: ModelShape, spec: RunSpec) -> int:
    """LM image tokens of the distinct images one micro-batch runs through the vision tower.

    Episodes shorter than the context bound pack many to a micro-batch (the packing keeps a whole
    mini-batch's groups, each with its own question image, in one where the budget allows), so the images
    are bounded by the update's episodes x ``images_per_episode`` at ``max_pixels``, and by the micro-batch's
    tokens: every image it encodes has its pad tokens in its rows (whole or packed), which hold at most
    ``micro_batch_tokens(spec)`` tokens whatever the images are (questions, tool thumbnails)."""
    per_image = min(spec.max_pixels // shape.patch_pixels, spec.max_context_tokens)
    return min(episodes_per_update(spec) * spec.images_per_episode * per_image, micro_batch_tokens(spec))


def vision_block_bytes(shape: ModelShape, c: int, autocast: bool = False) -> int:
    """Bytes per patch one vision block saves for backward, in compute dtype (``c`` bytes): each RMSNorm's
    normalized input and output (4h), the whole qkv projection (3h: v is a view of it), the rotated q and k (2h),
    attention's output and proj's concatenated input (2h), and the MLP's gate, up, act(gate) and their product
    (4 I; ungated, Qwen3-VL: fc1 and its activation, 2 I). In float32: each norm's input and 1/rms (2 x (4h + 4))
    and attention's log-sum-exp (4 bytes a head). Under autocast (float32 weights) the second norm's float32
    output is cast once for gate and once for up (h more). 7B in bf16: 65,832 bytes."""
    h, mlp = shape.vision_hidden, (4 if shape.vision_gated_mlp else 2) * shape.vision_intermediate
    cast = c * h if autocast else 0
    return c * (11 * h + mlp) + cast + 2 * (NORM_BYTES * h + NORM_BYTES) + NORM_BYTES * shape.vision_heads


def vision_backward_bytes(shape: ModelShape, c: int) -> int:
    """The most a vision block's backward holds per patch beyond what it saved: the MLP's (the residual's grad and two
    I-wide grads) or, the MLP's saved tensors freed by then, an RMSNorm's (``norm_backward_bytes``)."""
    h, mlp = shape.vision_hidden, (4 if shape.vision_gated_mlp else 2) * shape.vision_intermediate
    return max(c * (h + 2 * shape.vision_intermediate), norm_backward_bytes(h, c) - c * mlp)


def norm_backward_bytes(h: int, c: int) -> int:
    """An RMSNorm's backward per row of ``h``: five float32 temporaries (the grad cast up, its products with 1/rms
    and with the input, 2x and the mean's grad) and the residual's grad in compute dtype."""
    return 5 * NORM_BYTES * h + c * h


def merger_bytes(shape: ModelShape, c: int) -> int:
    """The patch merger's peak per patch: its norm's float32 input and 1/rms, then either the normalized input,
    output, fc1 output and activation it saved and two grads (6 ch), or its norm's backward."""
    h = shape.vision_hidden
    return NORM_BYTES * h + NORM_BYTES + max(6 * c * h, c * h + norm_backward_bytes(h, c))


def vision_once_bytes(shape: ModelShape, c: int) -> int:
    """Per patch, once for the tower: the rotary cos and sin (float32, ``head_dim`` each), four int64 indices
    (Qwen3-VL's position-embedding interpolation, Qwen2.5-VL's window order), the patch embedding's input in compute
    dtype, the merged features and their grad (LM width, ``patches_per_token`` patches a token) of the merger and of
    each deepstack merger, and each deepstack merger's norm output, fc1 output and activation (and float32 mean,
    1/std)."""
    h, mergers = shape.vision_hidden, 1 + shape.vision_deepstack
    rope, indices = 2 * NORM_BYTES * (h // shape.vision_heads), 4 * 8
    features = mergers * 2 * c * shape.hidden // shape.patches_per_token
    return rope + indices + c * shape.patch_values + features + shape.vision_deepstack * (3 * c * h + 2 * NORM_BYTES)


def vision_activations(shape: ModelShape, spec: RunSpec) -> int:
    """Vision tower activations of one micro-batch: the patches of ``image_tokens_per_micro_batch`` (merge² per LM
    image token) at the peak of the tower's backward (measured on CPU, ``tests/test_plan.py``). Checkpointed: every
    block's input, plus one block's saved tensors and backward or the merger's peak, whichever is larger;
    otherwise every block's saved tensors, plus the larger of one block's backward and the merger's peak. The
    residual stream is in compute dtype, under autocast too (the patch embedding's output is)."""
    if not shape.vision_layers:
        return 0
    patches = image_tokens_per_micro_batch(shape, spec) * shape.patches_per_token
    c, autocast = nbytes(spec.compute_dtype), residual_bytes(spec) != nbytes(spec.compute_dtype)
    block, backward = vision_block_bytes(shape, c, autocast), vision_backward_bytes(shape, c)
    if spec.gradient_checkpointing:
        body = shape.vision_layers * shape.vision_hidden * c + max(block + backward, merger_bytes(shape, c))
    else:
        body = shape.vision_layers * block + max(backward, merger_bytes(shape, c))
    return patches * (body + vision_once_bytes(shape, c))


def logits(shape: ModelShape, spec: RunSpec) -> int:
    """The ``[T, V]`` logits in compute dtype, kept by the chunked log-softmax for its backward, plus
    their gradient (``empty_like(logits)``, allocated in backward while the logits are alive), plus at
    most three float32 ``[512, V]`` chunk temporaries (scaled logits, log p and p; the softmax is
    recomputed per chunk, never stored whole)."""
    t = micro_batch_tokens(spec)
    return 2 * nbytes(spec.compute_dtype) * t * shape.vocab + 3 * 4 * min(DEFAULT_CHUNK_SIZE, t) * shape.vocab


def packed_mask(shape: ModelShape, spec: RunSpec) -> int:
    """The dense ``[G, 1, L, L]`` boolean mask of shared prefixes in packed rows (``mmsr.train.packed``), and the
    additive bias in compute dtype that SDPA makes of it and saves for backward: every layer's without
    checkpointing, only the recomputed layer's with it (counted on CPU in ``tests/test_plan.py``). A
    micro-batch's packed rows hold at most ``micro_batch_tokens`` B (``G x L <= B``) unless one longer episode
    goes alone, so ``G x L^2 <= max(B, max_context_tokens)^2``. ``eager`` takes a float32 additive mask as it is
    (its attention probabilities, like any eager run's, are not counted)."""
    if not spec.packed_rows:
        return 0
    pairs = micro_batch_tokens(spec) ** 2
    if spec.attention == "eager":
        return 4 * pairs
    return pairs * (1 + (1 if spec.gradient_checkpointing else shape.layers) * nbytes(spec.compute_dtype))


def kv_bytes_per_token(shape: ModelShape, dtype: str, tp: int = 1) -> int:
    """K and V of every layer for one token, of the KV heads one GPU holds (heads split over ``tp``)."""
    return 2 * shape.layers * math.ceil(shape.kv_heads / tp) * shape.head_dim * nbytes(dtype)


def vllm(shape: ModelShape, spec: RunSpec, gpu: int, allowance: int) -> dict[str, int]:
    """vLLM takes ``gpu_memory_utilization x GPU`` for weights (``P x bytes / tp``), its profiled
    activations, CUDA graphs and non-torch memory (``allowance``, stated, not derived) and the KV cache
    (the rest). With sleep mode (level 1) it holds ~0 during the training phase."""
    budget = int(spec.gpu_memory_utilization * gpu)
    weights = math.ceil(shape.params * nbytes(spec.engine_dtype) / spec.tp)
    kv = budget - weights - allowance
    per_token = kv_bytes_per_token(shape, spec.engine_dtype, spec.tp)
    tokens = max(kv, 0) // per_token
    return dict(rollout=budget, training=0 if spec.sleep_mode else budget, weights=weights, allowance=allowance,
                kv_cache=kv, kv_bytes_per_token=per_token, kv_tokens=tokens,
                contexts=tokens // spec.max_model_len)  # fmt: skip


def hf_engine(shape: ModelShape, spec: RunSpec) -> dict[str, int]:
    """HFEngine: under FSDP2 a full unsharded copy of the policy in compute dtype, resident in both
    phases; otherwise the trainer's own module, whose weights autocast caches in compute dtype while it
    generates (if that differs from the param dtype). Its KV cache holds a context of ``max_context_tokens``
    in compute dtype for each episode it generates at once: at most ``max_batch_size``, and at most the
    ``prompts_per_step x num_generations`` a step rolls out (validation: ``prompts_per_step``, one each)."""
    c = nbytes(spec.compute_dtype)
    copy = shape.params * c if spec.fsdp else 0
    cast = shape.params * c if not spec.fsdp and spec.compute_dtype != spec.param_dtype else 0
    contexts = min(spec.hf_batch, spec.prompts_per_rank * spec.num_generations)
    kv = contexts * spec.max_context_tokens * kv_bytes_per_token(shape, spec.compute_dtype)
    return dict(rollout=copy + cast + kv, training=copy, weights=copy + cast, kv_cache=kv, contexts=contexts)


def syncs_nothing(spec: RunSpec) -> bool:
    """An HF engine without FSDP2 generates with the trainer's own module: the sync sends it nothing."""
    return spec.engine == "hf" and not spec.fsdp


def sync_buffer(shape: ModelShape, spec: RunSpec) -> int:
    """What ``gather_bucket`` holds for one bucket of ``bucket_mb`` B in the sync dtype (a tensor T bigger than it
    goes alone). Under FSDP2: its flat ``[L]`` input (B/W), the gathered ``[W, L]`` buffer (B), and each tensor
    cut out of it (B again: a column slice of several tensors' buffer is copied by ``reshape``), all alive when
    it returns; a tensor alone is a view of the buffer: ``max(2B + B/W, T + T/W)``. Unsharded, each tensor is
    cast on its own: ``max(B, T)``. An HF engine on the trainer's own module needs none."""
    if syncs_nothing(spec):
        return 0
    bucket, largest = int(spec.bucket_mb * 2**20), shape.largest_param * nbytes(spec.sync_dtype)
    if not spec.fsdp:
        return max(bucket, largest)
    w = spec.world_size
    return max(2 * bucket + math.ceil(bucket / w), largest + math.ceil(largest / w))


def probe_tokens(spec: RunSpec) -> int:
    """Tokens of the sync probe's longest trainer forward, the sampling check's (``mmsr.sync.probe``): its
    prefix grows by whole fillers (the probe text without images) until it holds ``SAMPLING_PROBE_MIN_TOKENS``,
    so it ends under that plus one filler, then ``PROBE_TOKENS`` greedy tokens follow. A filler has at most one
    token per byte of its text (byte-level BPE). A probe already that long is not extended (its text and image
    pads alone), so this holds while its images' pads and delimiters stay under ``SAMPLING_PROBE_MIN_TOKENS``
    (the 112x84 probe image at the 7B recipes' min_pixels: 352 pads for Qwen2.5-VL, 266 for Qwen3-VL)."""
    filler = len(spec.probe_text.replace(IMAGE_MARKER, "").encode())
    return SAMPLING_PROBE_MIN_TOKENS - 1 + filler + PROBE_TOKENS


def sync_probe(shape: ModelShape, spec: RunSpec) -> int:
    """The trainer's forward of the sync probe (``trainer_logits``), right after the sync on its first and every
    ``verify_every`` syncs, with vLLM awake (only engines that ``score`` are probed: vLLM): the weights as a
    training forward holds them (``gathered``: FSDP2's root and two blocks, or autocast's weight cache) and
    the ``[L, V]`` logits in compute dtype, their float32 copy (none if already float32) and the copy the
    banned-token ``index_fill`` makes. The compute-dtype logits freed by ``.float()`` are smaller than either
    float32 tensor, so the allocator cannot hand them on: all three count."""
    if spec.engine != "vllm" or not spec.verify_every:
        return 0
    c = nbytes(spec.compute_dtype)
    per_logit = c + (4 if c != 4 else 0) + 4
    return gathered(shape, spec)["params"] + probe_tokens(spec) * shape.vocab * per_logit


def weight_sync(shape: ModelShape, spec: RunSpec) -> dict[str, int]:
    """Per step: bytes each rank hands the engine (P x sync bytes; none to an HF engine on the trainer's own
    module) and, under FSDP2, the all-gather traffic it receives for them ((W-1)/W of it); the two parts of the
    rollout's ``weight_sync`` term."""
    handed = 0 if syncs_nothing(spec) else shape.params * nbytes(spec.sync_dtype)
    received = handed * (spec.world_size - 1) // spec.world_size if spec.fsdp else 0
    return {"bytes_per_step": handed, "all_gather_received_per_rank": received, "buffer": sync_buffer(shape, spec),
            "probe_forward": sync_probe(shape, spec)}  # fmt: skip


def tokens(spec: RunSpec) -> dict[str, dict[str, int] | int]:
    """Tokens per step implied by the rollout limits, per rank and in total (upper bounds), and the
    micro-batches of one optimizer update if every episode were at the context bound."""
    per_rank = {"prompts": spec.prompts_per_rank, "episodes": spec.prompts_per_rank * spec.num_generations}
    sampled = min(spec.max_rounds * spec.max_tokens_per_turn, spec.max_context_tokens)
    per_rank["context_tokens"] = per_rank["episodes"] * spec.max_context_tokens
    per_rank["sampled_tokens"] = per_rank["episodes"] * sampled
    per_update = episodes_per_update(spec)
    return dict(per_rank=per_rank, total={k: v * spec.world_size for k, v in per_rank.items()},
                sampled_tokens_per_episode=sampled, updates_per_step=spec.ppo_epochs * spec.mini_batches,
                episodes_per_update=per_update, episodes_per_micro_batch=episodes_per_micro_batch(spec),
                micro_batches_per_update=math.ceil(per_update / episodes_per_micro_batch(spec)))  # fmt: skip


def phases(shape: ModelShape, spec: RunSpec, engine: dict[str, int], overhead: int) -> dict[str, dict[str, int]]:
    """Bytes per GPU of every term in the rollout and the training phase, and each phase's total."""
    state, ref, full = training_state(shape, spec), reference(shape, spec), gathered(shape, spec)
    common = dict(params=state["params"], adamw=state["adamw"], reference=ref["resident"])
    # the bucket is freed before the probe runs (WeightSync.__call__): never both
    sync = max(sync_buffer(shape, spec), sync_probe(shape, spec))
    rollout = common | dict(engine=engine["rollout"], weight_sync=sync, overhead=overhead)
    training = common | dict(grads=state["grads"], reference_scoring=ref["transient"], gathered_params=full["params"],
                             unsharded_grads=full["grads"], activations=activations(shape, spec),
                             vision_activations=vision_activations(shape, spec), packed_mask=packed_mask(shape, spec),
                             logits=logits(shape, spec),
                             engine=engine["training"], overhead=overhead)  # fmt: skip
    return {"rollout": rollout | {"total": sum(rollout.values())},
            "training": training | {"total": sum(training.values())}}


def activations_both_ways(shape: ModelShape, spec: RunSpec) -> dict[str, int]:
    """Language-model + vision activations of one micro-batch with and without gradient checkpointing."""
    both = {}
    for key, on in (("checkpointed", True), ("not_checkpointed", False)):
        s = replace(spec, gradient_checkpointing=on)
        both[key] = activations(shape, s) + vision_activations(shape, s)
    return both


def problems(spec: RunSpec, engine: dict[str, int]) -> list[str]:
    """What keeps the run from starting besides the peak (empty when nothing does)."""
    if spec.engine == "vllm" and engine["kv_tokens"] < spec.max_model_len:
        return [f"vLLM's KV cache ({engine['kv_cache'] / GiB:.1f} GiB = {engine['kv_tokens']} tokens) cannot hold "
                f"one max_model_len context ({spec.max_model_len} tokens): raise gpu_memory_utilization"]  # fmt: skip
    return []


def plan(shape: ModelShape, spec: RunSpec, gpu_gib: float = CARD_GIB[80], overhead_gib: float = 2.0,
         vllm_allowance_gib: float = 4.0) -> dict:  # fmt: skip
    """Everything ``mmsr plan`` reports, in bytes (the JSON of ``--json``); ``fits`` is the verdict."""
    gpu = int(gpu_gib * GiB)
    engine = vllm(shape, spec, gpu, int(vllm_allowance_gib * GiB)) if spec.engine == "vllm" else hf_engine(shape, spec)
    memory = phases(shape, spec, engine, int(overhead_gib * GiB))
    peak = max(memory["rollout"]["total"], memory["training"]["total"])
    why = problems(spec, engine)
    return dict(
        gpu_bytes=gpu,
        world_size=spec.world_size,
        strategy="fsdp2" if spec.fsdp else "replicated",
        dtypes={k: getattr(spec, f"{k}_dtype") for k in ("param", "compute", "engine", "sync")},
        params={"total": shape.params, "vision": shape.vision_params, "root": shape.root_params,
                "largest_block": shape.block_params},  # fmt: skip
        memory=memory,
        peak=peak,
        margin=gpu - peak,
        fits=peak <= gpu and not why,
        problems=why,
        engine={"kind": spec.engine} | engine,
        activations=activations_both_ways(shape, spec),
        weight_sync=weight_sync(shape, spec),
        tokens=tokens(spec),
    )
