"""Generation with transformers on the trainer's own policy module.

The engine holds a reference to the policy the trainer optimizes, so weights are always current and
``update_weights`` has nothing to copy. It uses the exact inputs the training forward uses (``Policy``
positions and vision inputs), so engine and trainer log-probs agree to float precision.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from mmsr.checks import run_seed
from mmsr.models.policy import Policy
from mmsr.rollout.engine import GenerationOutput, GenerationRequest, SamplingParams, first_stop, turn_budget
from mmsr.rollout.hf_decode import DecodeBatch, additive_mask, decode_attention_for, slab_cache
from mmsr.rollout.sampling import gumbel_sample, request_seed
from mmsr.rollout.vllm_inputs import ImageTokenIds, ImageTokenMismatch, collapse_image_tokens


def sample_tokens(logits: torch.Tensor, sampling: SamplingParams, seeds: torch.Tensor, positions: torch.Tensor):
    """Draw one token per row from its own stream (``mmsr.rollout.sampling``).

    Args:
        logits: ``[B, V]`` float logits of the next token.
        seeds: ``[B]`` int64 request seeds; positions: ``[B]`` int64 index of the token in its turn.
    Returns:
        tokens ``[B]`` and their log-probs ``[B]`` under ``softmax(logits / T)`` (T = 1 if greedy).
    """
    logits = logits.float()
    if sampling.temperature <= 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    scaled = logits / sampling.temperature if sampling.temperature != 1 else logits  # x / 1 is x: a pass saved
    logp = torch.log_softmax(scaled, -1)
    filtered = scaled.clone() if sampling.top_k > 0 or sampling.top_p < 1.0 else scaled
    if sampling.top_k > 0:
        kth = torch.topk(scaled, min(sampling.top_k, scaled.shape[-1]), -1).values[:, -1:]
        filtered[scaled < kth] = float("-inf")
    if sampling.top_p < 1.0:
        sorted_logits, idx = torch.sort(filtered, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= sampling.top_p  # keep the token crossing top_p
        drop[:, 0] = False  # the most likely token always stays: a row all -inf would draw id 0
        filtered.scatter_(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    tokens = gumbel_sample(filtered, seeds, positions)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


class HFEngine:
    """Batched, KV-cached sampling with transformers; finished rows leave the batch.

    Every request is sampled from its own stream (``mmsr.rollout.sampling``), seeded by ``seed``, the
    request's rollout index (``stream``), episode key and turn: an episode's tokens do not depend on
    which other episodes share its batch, rank or micro-batch.

    Args:
        max_batch_size: most contexts per forward pass.
        seed: the sampling seed (rollouts are reproducible for a fixed seed); None: the run's
            ``seed_everything`` (``run_seed``), fixed when the engine is bound and kept in checkpoints.
    """

    def __init__(self, max_batch_size: int = 64, seed: int | None = None) -> None:
        self.max_batch_size, self.seed = max_batch_size, seed
        self.calls = 0  # generate() calls: the stream of requests that carry no episode key
        self.policy: Policy | None = None
        self.image_ids: ImageTokenIds | None = None  # None: a text-only policy
        self._candidates: dict[tuple[str, ...], frozenset[int]] = {}
        self._silent: frozenset[int] | None = None  # ids that decode to nothing (special tokens)

    def bind(self, policy: Policy) -> None:
        """Generate with ``policy`` (colocated: no weights are copied, nothing starts)."""
        self.policy, self._candidates, self._silent = policy, {}, None
        self.seed = run_seed(self.seed)
        self.image_ids = ImageTokenIds.from_tokenizer(policy.tokenizer) if policy.is_vision else None

    def state_dict(self) -> dict:
        """The sampler's state (saved in checkpoints so a resumed run draws the same tokens)."""
        return {"seed": run_seed(self.seed), "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.calls = state["seed"], state["calls"]

    def request_seeds(self, requests: Sequence[GenerationRequest]) -> list[int]:
        """One seed per request; requests without an episode key are told apart by call and index."""
        self.calls, self.seed = self.calls + 1, run_seed(self.seed)
        return [request_seed(self.seed, r.stream, r.key or f"call{self.calls}/{i}", r.turn) for i, r in enumerate(requests)]

    def generates_with(self, model: torch.nn.Module) -> bool:
        """Whether this engine samples from ``model`` itself (colocated on the trainer's module): there is then
        nothing to sync, and a copy cast for the sync (``weight_sync.dtype: bfloat16``) written back would
        round the trainer's fp32 master weights."""
        return self.policy is not None and self.policy.model is model

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the trainer's (full, gathered by ``mmsr.sync``) tensors. Colocated on the trainer's
        own module this copies nothing; with a separate copy (FSDP2-sharded trainer) it copies.

        A name the engine's model lacks is refused (``ValueError`` naming them): skipped, it would leave a
        separate copy generating with that parameter stale, unseen (the sync's probe needs ``score``). A tied
        parameter answers to each of its names. The whole stream is read first: under FSDP2 every rank
        gathers every bucket, so no rank may stop part way.
        """
        params = dict(self.policy.model.named_parameters(remove_duplicate=False))
        unknown = []
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:
                    unknown.append(name)
                elif params[name].data_ptr() != tensor.data_ptr():
                    params[name].copy_(tensor)
        if unknown:
            raise ValueError(f"HFEngine.update_weights: the engine's model has no parameter named {unknown[:5]} "
                             f"({len(unknown)} of the names sent); their weights would stay stale (a renamed parameter, "
                             "or another architecture)")  # fmt: skip

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[GenerationOutput]:
        if self.policy is None:
            raise RuntimeError("HFEngine.bind(policy) must be called before generate()")
        budgets = [self.request_budget(r, sampling) for r in requests]  # before any work, or a draw of a sampling stream
        model, seeds = self.policy.model, self.request_seeds(requests)
        was_training = model.training
        model.eval()
        try:
            outs: list[GenerationOutput] = []
            with self.policy.autocast():
                for i in range(0, len(requests), self.max_batch_size):
                    window = slice(i, i + self.max_batch_size)
                    outs += self._batch(requests[window], seeds[window], budgets[window], sampling)
            return outs
        finally:
            model.train(was_training)

    def request_budget(self, request: GenerationRequest, sampling: SamplingParams) -> int:
        """``turn_budget`` of a request whose image pads agree with its images, within the model's context.

        What vLLM refuses is refused here, naming the request, before any work: pads that disagree with the
        images (the model fails on them deep inside with an unexplained TypeError or shape error, or, for images
        in the wrong order, attends to the wrong image silently) and a prompt that leaves no room for a token in
        the context (``max_position_embeddings``, vLLM's ``max_model_len``). As in vLLM, a turn ends
        ("length") when its context reaches that length.
        """
        budget = turn_budget(request, sampling)
        self._check_images(request)
        limit = getattr(self.policy.model.config.get_text_config(), "max_position_embeddings", None)
        length = len(request.input_ids)
        if limit is None:
            return budget
        if length >= limit:
            raise ValueError(f"request {request.key!r}: its prompt of {length} tokens leaves no room for a token in "
                             f"the model's context of {limit} (max_position_embeddings)")  # fmt: skip
        return min(budget, limit - length)

    def _check_images(self, request: GenerationRequest) -> None:
        """Refuse images that disagree with the request's ``<|image_pad|>`` runs (VLLMEngine's check,
        ``collapse_image_tokens``: count, framing and length of every run), or given to a text-only policy."""
        try:
            if self.image_ids is not None:
                collapse_image_tokens(request.input_ids, request.vision, self.image_ids)
            elif request.vision:
                raise ImageTokenMismatch(f"a text-only policy got a context with {len(request.vision)} images")
        except ImageTokenMismatch as e:
            raise ImageTokenMismatch(f"request {request.key!r}: {e}") from None

    def _left_pad(self, requests: Sequence[GenerationRequest]):
        """ids ``[B, T]``, attention ``[B, T]``, positions ``[3, B, T]`` or ``[B, T]``, left-padded."""
        device = self.policy.model.device
        seqs = [torch.tensor(list(r.input_ids), dtype=torch.long) for r in requests]
        poss = [self.policy.position_ids(s, r.vision) for s, r in zip(seqs, requests)]
        width = max(s.numel() for s in seqs)
        pad_id = self.policy.tokenizer.pad_token_id or 0
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        attn = torch.zeros(len(seqs), width, dtype=torch.long)
        pos = torch.zeros(*poss[0].shape[:-1], len(seqs), width, dtype=torch.long)
        for b, (s, p) in enumerate(zip(seqs, poss)):
            ids[b, width - s.numel() :], attn[b, width - s.numel() :] = s, 1
            pos[..., b, width - s.numel() :] = p
        return ids.to(device), attn.to(device), pos.to(device)

    @torch.no_grad()
    def prefill(self, requests: Sequence[GenerationRequest], budget: int, additive: bool):
        """One forward over each distinct context (the ``n`` episodes of a GRPO group start from the
        same prompt and images), its KV cache then fanned out to every request that shares it.

        Args:
            budget: most tokens any request samples (the cache holds the padded prompt and these).
            additive: build the 4-D additive mask ``decode_attention`` takes (else the 2-D one).
        Returns: the ``DecodeBatch`` and next-token logits ``[B, V]``.
        """
        keys = [(tuple(r.input_ids), tuple(id(v.image) for v in r.vision)) for r in requests]
        slots: dict[tuple, int] = {}
        fan_out = [slots.setdefault(key, len(slots)) for key in keys]  # request -> distinct context
        distinct = [requests[fan_out.index(j)] for j in range(len(slots))]
        ids, attn, pos = self._left_pad(distinct)
        capacity = ids.shape[1] + budget
        cache = slab_cache(self.policy.model, capacity)
        vision = [v for r in distinct for v in r.vision]
        out = self.policy.forward(ids, attn, pos, vision, past_key_values=cache, use_cache=True, logits_to_keep=1)
        index = torch.tensor(fan_out, device=ids.device)
        if len(distinct) < len(requests):
            cache.batch_select_indices(index)
        if additive:
            mask = additive_mask(attn, capacity, out.logits.dtype)
        else:
            mask = torch.cat([attn, attn.new_ones(len(distinct), budget)], 1)
        batch = DecodeBatch(cache, mask[index], pos.amax(-1)[..., index] + 1, ids.shape[1])
        return batch, out.logits[index, -1]

    @torch.no_grad()
    def _batch(self, requests: Sequence[GenerationRequest], seeds: Sequence[int], budgets: Sequence[int],
               sampling: SamplingParams) -> list[GenerationOutput]:  # fmt: skip
        turns = [_Turn(budget) for budget in budgets]
        with decode_attention_for(self.policy.model) as additive:
            batch, logits = self.prefill(requests, max(t.budget for t in turns), additive)
            self._decode(batch, logits, turns, seeds, sampling)
        return [GenerationOutput(t.tokens, t.logprobs, t.finish) for t in turns]

    def _decode(self, batch: DecodeBatch, logits: torch.Tensor, turns: list[_Turn], seeds: Sequence[int], sampling: SamplingParams) -> None:
        """Sample every turn to its end; rows decode in lockstep, each drawing its token number ``step``."""
        seed_t = torch.tensor(list(seeds), dtype=torch.long)
        eos, candidates = self.policy.stop_token_ids(), self._stop_candidates(sampling.stop)
        rows = list(range(len(turns)))  # batch row -> request index
        for step in itertools.count():
            tokens, logprobs = sample_tokens(logits, sampling, seed_t[rows], torch.full((len(rows),), step))
            for i, token, logprob in zip(rows, tokens.tolist(), logprobs.tolist()):
                turns[i].add(token, logprob, self._finish(turns[i], token, eos, candidates, sampling.stop))
            keep = [b for b, i in enumerate(rows) if turns[i].finish is None]
            if not keep:
                return
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=tokens.device)
                batch.select(index)
                tokens, rows = tokens[index], [rows[b] for b in keep]
            logits = self.policy.mask_banned(batch.step(self.policy.model, tokens)).logits[:, -1]

    def _finish(self, turn: _Turn, token: int, eos: set[int], candidates: frozenset[int], stop: Sequence[str]) -> str | None:
        """Why the turn ends with ``token`` (appended next), or None. A stop string can only be
        completed by a token whose text holds its last character, so only those tokens are decoded.
        Special tokens decode to nothing, as in vLLM (``skip_special_tokens``) and the loop's parser, so a tag
        split by any number of them stops the turn here too (it ran on past a tag that vLLM stops at and the loop
        executes; ``_window``)."""
        if token in eos:
            return "eos"
        if token in candidates:
            window = self._window(turn.tokens, token, max(len(s) for s in stop) + 2)
            text = self.policy.tokenizer.decode(window, skip_special_tokens=True)
            if first_stop(text, stop) is not None:
                return "stop"
        return "length" if len(turn.tokens) + 1 >= turn.budget else None

    def _window(self, tokens: list[int], token: int, n: int) -> list[int]:
        """The ids to decode for a stop completed by ``token``: the last ``n`` that decode to text, ``token``
        included, and the special tokens among them. Each text token holds at least one character of a stop
        string it is part of, so ``n`` = longest stop + 2 hold it whole. Counted with the special tokens, which
        decode to nothing, ``n`` ids could start inside the tag (``</search>`` drawn a character a token with 8
        special tokens in it) and the turn ran on past a tag vLLM stops at (it checks the detokenized text).
        Without special tokens these are the last ``n`` ids, as before."""
        silent, start, texts = self._silent_ids(), len(tokens), 1
        while start > 0 and texts < n:
            start -= 1
            texts += tokens[start] not in silent
        return [*tokens[start:], token]

    def _silent_ids(self) -> frozenset[int]:
        """Ids that decode to nothing (``skip_special_tokens``): special tokens, all of them added tokens."""
        if self._silent is None:
            tok = self.policy.tokenizer
            added = sorted(tok.added_tokens_decoder)
            texts = tok.batch_decode([[i] for i in added], skip_special_tokens=True)
            self._silent = frozenset(i for i, t in zip(added, texts) if not t)
        return self._silent

    def _stop_candidates(self, stop: Sequence[str]) -> frozenset[int]:
        """Ids whose decoded text contains the last character of a stop string (cached per stops)."""
        key = tuple(stop)
        if key not in self._candidates:
            ends = {s[-1] for s in stop}
            vocab = range(len(self.policy.tokenizer))
            texts = self.policy.tokenizer.batch_decode([[i] for i in vocab])
            self._candidates[key] = frozenset(i for i, t in zip(vocab, texts) if ends & set(t))
        return self._candidates[key]


@dataclass
class _Turn:
    """The tokens sampled so far for one request."""

    budget: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str | None = None

    def add(self, token: int, logprob: float, finish: str | None) -> None:
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.finish = finish
