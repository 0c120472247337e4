"""The policy bundle (model + tokenizer + image processor) and how the trainer and engines feed it.

Both the rollout engine and the training forward call ``Policy.position_ids`` and ``Policy.forward``,
so a sampled token's log-prob is computed from the same inputs in both places: full 3-D M-RoPE over
the whole multi-turn sequence, including the images that tools returned (upstream trains on 1-D
positions, spec §2.6).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmsr.models.vision import VisionInput, distinct_images
from mmsr.prompt.encode import Encoder
from mmsr.prompt.render import ChatFormat

# Tokens the policy must never sample: a sampled image pad breaks the image-token/image count of every
# later forward pass (upstream issue #20). Ids past the tokenizer (padded vocab rows) are banned too.
BANNED_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|im_start|>")
# Finite, so a banned token at a masked (prompt) position still has a finite log-prob.
BANNED_LOGIT = -1.0e4


@dataclass
class Policy:
    """A causal LM, vision-language (Qwen2.5-VL or Qwen3-VL) or text-only, with its processors.

    Attributes:
        model: the transformers model.
        tokenizer: its tokenizer.
        image_processor: a PIL-based Qwen2-VL image processor, ``None`` for text-only models.
        chat: the chat-format pieces used to build multi-turn contexts (the builders read them from
            the tokenizer's chat template, ``mmsr.prompt.chat_template.chat_format``).
        tool_image_processor: the processor of images returned by tools (thumbnails), with pixel
            bounds of their own; ``None``: the question images' processor.
        compute_dtype: the dtype matmuls run in when it is lower than the parameters' (fp32 master
            weights, bf16 compute): every forward of the trainer, the HF engine and the sync probe runs
            under ``autocast()``. ``None``: the parameters' dtype.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    image_processor: object | None = None
    chat: ChatFormat = field(default_factory=ChatFormat)
    tool_image_processor: object | None = None
    compute_dtype: torch.dtype | None = None
    _banned: torch.Tensor | None = field(default=None, repr=False)
    _banned_vocab: int = field(default=0, repr=False)

    @property
    def is_vision(self) -> bool:
        return self.image_processor is not None

    def encoder(self) -> Encoder:
        return Encoder(self.tokenizer, image_token="<|image_pad|>" if self.is_vision else None)

    def banned_token_ids(self, vocab_size: int) -> torch.Tensor:
        """``[K]`` ids whose logits are set to ``BANNED_LOGIT`` in every forward (engine and trainer)."""
        vocab = self.tokenizer.get_vocab()
        ids = [vocab[t] for t in BANNED_TOKENS if t in vocab]
        return torch.tensor(sorted(set(ids) | set(range(len(self.tokenizer), vocab_size))), dtype=torch.long)

    def vision_tower(self) -> torch.nn.Module | None:
        """The vision encoder (Qwen2.5-VL's and Qwen3-VL's ``model.visual``), ``None`` for a text-only policy."""
        return self.model.model.visual if self.is_vision else None

    def stop_token_ids(self) -> set[int]:
        """The ids that end a turn: the chat's end of turn, the tokenizer's eos, and the eos ids of the model's
        generation config (an int or a list: Qwen2.5-VL-Instruct's holds ``<|endoftext|>`` beside
        ``<|im_end|>``), on which vLLM stops too (``SamplingParams.update_from_generation_config``)."""
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        config = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        ids = {self.tokenizer.convert_tokens_to_ids(self.chat.end_of_turn), self.tokenizer.eos_token_id, *config}
        return {int(i) for i in ids if i is not None}

    def process_image(self, image: Image.Image, tool: bool = False) -> VisionInput:
        """Patchify one image (``tool``: an image a tool returned, resized within the tool bounds).
        ``pixel_values``: ``[P, D]``; it occupies ``P // merge**2`` tokens."""
        if self.image_processor is None:
            raise ValueError("a text-only policy cannot take images")
        processor = self.tool_image_processor if tool and self.tool_image_processor is not None else self.image_processor
        out = processor(images=[image.convert("RGB")], return_tensors="pt")
        grid = tuple(int(x) for x in out["image_grid_thw"][0])
        merge = processor.merge_size
        return VisionInput(image, out["pixel_values"], grid, grid[0] * grid[1] * grid[2] // merge**2)

    def autocast(self) -> AbstractContextManager:
        """Autocast to ``compute_dtype`` when it is lower than the parameters' dtype, else nothing.

        Raises ``ValueError`` when it is wider (fp32 compute over bf16 parameters): torch disables an
        fp32 autocast with a warning, so the matmuls ran in bf16 while FSDP2 would have gathered fp32.
        """
        param = next(self.model.parameters())
        if self.compute_dtype is None or self.compute_dtype == param.dtype:
            return nullcontext()
        if self.compute_dtype.itemsize > param.dtype.itemsize:
            raise ValueError(f"compute_dtype {self.compute_dtype} is wider than the parameters' {param.dtype}: autocast only "
                             "lowers precision; for fp32 matmuls keep fp32 parameters (param_dtype float32)")  # fmt: skip
        return torch.autocast(param.device.type, dtype=self.compute_dtype)

    def position_ids(self, input_ids: torch.Tensor, vision: Sequence[VisionInput]) -> torch.Tensor:
        """Positions of one unpadded sequence ``[L]``: ``[3, L]`` M-RoPE ids from the model's own
        ``get_rope_index`` (each family's: Qwen2.5-VL, Qwen3-VL), or ``[L]`` text-only."""
        if not self.is_vision:
            return torch.arange(input_ids.numel())
        image_id = self.model.config.image_token_id
        grid = torch.tensor([v.grid_thw for v in vision]) if vision else None
        types = (input_ids == image_id).int()[None]
        pos, _ = self.model.model.get_rope_index(input_ids[None], mm_token_type_ids=types, image_grid_thw=grid)
        return pos[:, 0]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        vision: Sequence[VisionInput],
        model: PreTrainedModel | None = None,
        **kwargs,
    ):
        """Run ``model`` (default: the policy) on a padded batch.

        Args:
            input_ids: ``[N, T]``.
            attention_mask: ``[N, T]``, 1 on real tokens.
            position_ids: ``[3, N, T]`` (vision) or ``[N, T]``.
            vision: every image of the batch, row-major in order of appearance.
        Returns: the model output (``.logits`` ``[N, T', V]``). A vision-language policy given no images
        beside other ranks still runs its vision tower (``idle_vision_tower``), at zero weight.
        """
        model = model if model is not None else self.model
        distinct, which = distinct_images(vision)
        if vision:
            dev = input_ids.device
            kwargs["pixel_values"] = torch.cat([v.pixel_values for v in distinct]).to(dev, model.dtype)
            kwargs["image_grid_thw"] = torch.tensor([v.grid_thw for v in vision], device=dev)
        repeat = repeated_image_features(model, distinct, which) if len(distinct) < len(vision) else nullcontext()
        idle = idle_vision_tower(model) if self.is_vision and not vision and runs_beside_other_ranks() else nullcontext()
        with self.autocast(), repeat, idle:
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        return self.mask_banned(out)

    def mask_banned(self, out):
        """Set banned logits to ``BANNED_LOGIT`` (out of place, so gradients stay correct)."""
        # Rebuilt on a new device too: a policy first run on CPU, then moved to the GPU, would index with a CPU tensor.
        if self._banned is None or self._banned_vocab != out.logits.shape[-1] or self._banned.device != out.logits.device:
            self._banned_vocab = out.logits.shape[-1]
            self._banned = self.banned_token_ids(self._banned_vocab).to(out.logits.device)
        if self._banned.numel():
            out.logits = out.logits.index_fill(-1, self._banned, BANNED_LOGIT)
        return out


@contextmanager
def repeated_image_features(model: PreTrainedModel, distinct: Sequence[VisionInput], which: Sequence[int]) -> Iterator[None]:
    """While inside, ``model``'s vision tower encodes each distinct image once and its features stand
    for every copy (the ``n`` episodes of a GRPO group in one micro-batch hold one question image: the
    tower ran ``n`` times on it). A copy's features are the same tensor, so its gradients sum into the
    one encoding. The forward is given the distinct images' ``pixel_values`` and every image's grid.

    Qwen VL models compute image features in their forward through ``get_image_features`` (per-image
    ``pooler_output``, and Qwen3-VL's per-layer ``deepstack_features``); the call stays inside the root
    forward, so FSDP2's hooks and gradient checkpointing see what they always do.
    """
    inner = model.model
    encode = inner.get_image_features
    grid = torch.tensor([v.grid_thw for v in distinct])

    def repeated(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, **kwargs):
        out = encode(pixel_values, grid.to(image_grid_thw.device), **kwargs)
        out.pooler_output = tuple(out.pooler_output[k] for k in which)
        if getattr(out, "deepstack_features", None) is not None:
            out.deepstack_features = [tuple(layer[k] for k in which) for layer in out.deepstack_features]
        return out

    inner.get_image_features = repeated
    try:
        yield
    finally:
        del inner.get_image_features


def runs_beside_other_ranks() -> bool:
    """Whether other processes run their forwards in step with this one (``torch.distributed``, several ranks).
    Alone, a text-only forward leaves the tower out: zero gradients would still move it under AdamW (its step
    count, bias correction and weight decay), so one process trains as it did before the blank image existed."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def idle_vision_tower(model: PreTrainedModel) -> Iterator[None]:
    """While inside, a forward of ``model`` without images encodes one blank image of ``merge x merge``
    patches (one token's worth) and adds 0 x the sum of its features (Qwen3-VL's deepstack ones too) to
    the text embeddings ``[N, T, D]``: the loss and every other gradient are unchanged, the tower's
    gradients are zeros.

    Every rank must run the same modules, whatever its micro-batch holds: DDP expects every parameter's
    gradient (a text-only rank failed the step) and FSDP2 gathers and reduce-scatters the tower's blocks
    only on the ranks that run them (the others hung). The encoding runs inside the root forward, between
    the text embeddings and the language model, where images are encoded, so FSDP2's hooks and gradient
    checkpointing see it as they see an image (veRL and EasyR1 add such a dummy image too).
    """
    inner, vision = model.model, model.config.vision_config
    merge = vision.spatial_merge_size
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2

    def encode_blank(module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        grid = torch.tensor([[1, merge, merge]], device=embeds.device)
        out = inner.get_image_features(embeds.new_zeros(merge * merge, width), grid)
        features = [*out.pooler_output, *(f for layer in getattr(out, "deepstack_features", None) or () for f in layer)]
        # summed in fp32: an fp16 sum could overflow, and 0 x inf is NaN
        kwargs["inputs_embeds"] = embeds + 0 * sum(f.float().sum() for f in features).to(embeds.dtype)
        return args, kwargs

    # prepended: before any hook of the language model's own, as the image encoding comes before them
    handle = inner.language_model.register_forward_pre_hook(encode_blank, prepend=True, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def check_image_tokens(input_ids: Sequence[int], vision: Sequence[VisionInput], image_token_id: int) -> None:
    """Fail loudly if the image pads in a sequence disagree with its images (upstream issue #20)."""
    expected = sum(v.num_tokens for v in vision)
    found = sum(1 for t in input_ids if t == image_token_id)
    if found != expected:
        raise ValueError(
            f"image tokens and images disagree: {found} <|image_pad|> tokens in the sequence but "
            f"{len(vision)} images needing {expected}"
        )
