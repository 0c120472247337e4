"""The engine's log-probs of sampled tokens equal the training forward's (fp32, 1e-4), on
multi-turn contexts holding the question image and images returned by a tool (3-D M-RoPE), for
each vision-language family (Qwen2.5-VL, and Qwen3-VL with DeepStack and interleaved M-RoPE)."""

import torch

from mmsr.algo import logprobs_and_entropy
from mmsr.rollout.engine import GenerationRequest, SamplingParams
from mmsr.rollout.hf_engine import HFEngine
from mmsr.rollout.loop import RolloutSettings
from mmsr.train.batch import collate
from tests.rollout.test_loop import ANS, IMG, TXT, make_loop


def multi_turn_contexts(policy, samples):
    """Scripted episodes (image search -> text search -> answer); contexts cut before the last turn."""
    loop, _ = make_loop(policy, lambda r: [IMG, TXT, ANS][r.turn], RolloutSettings())
    trajs = loop.run(samples, 1, SamplingParams())
    return [t for t in trajs], [t.turns[-1].span[0] for t in trajs]


def test_engine_and_trainer_logprobs_agree(vl_policy, fvqa_samples):
    trajs, cuts = multi_turn_contexts(vl_policy, fvqa_samples[:3])
    assert all(len(t.vision) == 3 for t in trajs)  # question image + 2 tool thumbnails each
    engine = HFEngine(seed=0)
    engine.bind(vl_policy)
    requests = [GenerationRequest(t.input_ids[:c], t.vision) for t, c in zip(trajs, cuts)]
    outs = engine.generate(requests, SamplingParams(temperature=1.0, max_tokens=12, stop=()))
    for t, c, o in zip(trajs, cuts, outs):  # compare on the engine-sampled last turn only
        t.input_ids = t.input_ids[:c] + o.token_ids
        t.loss_mask = [0] * c + [1] * len(o.token_ids)
        t.logprobs = [0.0] * c + o.logprobs
    batch = collate(trajs, range(len(trajs)), vl_policy, torch.device("cpu"))
    with torch.no_grad():
        logits = vl_policy.forward(batch.input_ids, batch.attention_mask, batch.position_ids, batch.vision).logits
        logp, _ = logprobs_and_entropy(logits[:, :-1], batch.labels, with_entropy=False)
    mask = batch.loss_mask.bool()
    assert mask.sum() == sum(len(o.token_ids) for o in outs) > 0
    diff = (logp[mask] - batch.engine_logprobs[mask]).abs().max()
    assert diff < 1e-4, diff


def test_positions_are_3d_for_tool_images(vl_policy, fvqa_samples):
    (traj,), _ = multi_turn_contexts(vl_policy, fvqa_samples[:1])
    ids = torch.tensor(traj.input_ids)
    pos = vl_policy.position_ids(ids, traj.vision)
    image = ids == vl_policy.model.config.image_token_id
    assert pos.shape == (3, len(ids))
    # Inside images the three axes differ (time, height, width); in text they coincide.
    assert not torch.equal(pos[1][image], pos[2][image])
    assert torch.equal(pos[0][~image], pos[1][~image]) and torch.equal(pos[1][~image], pos[2][~image])
    # Positions keep increasing across turns (text after the last tool image is past every image id).
    assert pos[0][-1] > pos[:, image].max()


def test_greedy_generation_is_deterministic_and_batch_invariant(vl_policy, fvqa_samples):
    trajs, cuts = multi_turn_contexts(vl_policy, fvqa_samples[:2])
    engine = HFEngine()
    engine.bind(vl_policy)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, stop=())
    reqs = [GenerationRequest(t.input_ids[:c], t.vision) for t, c in zip(trajs, cuts)]
    together = engine.generate(reqs, greedy)
    alone = [engine.generate([r], greedy)[0] for r in reqs]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert all(o.finish == "length" for o in together)
