"""What GRPOModule logs at a step: only what that step measured."""

import mmsr.sync
from mmsr.rollout.engine import ScriptedEngine
from mmsr.sync import SyncCheck, WeightSync
from tests.test_module import make_module, script


class ProbedEngine(ScriptedEngine):
    """A scripted engine that can ``score``, as ``VLLMEngine`` can: ``WeightSync`` then probes it."""

    def score(self, input_ids, vision=()):
        raise AssertionError("the test stands in for the probe")


def test_a_sync_probe_is_logged_at_the_step_that_ran_it_only(monkeypatch, fvqa_samples):
    """``verify_every=2``: syncs 0 and 2 check the weights. The step dict was never cleared, so the checked
    sync's ``sync/probe_diff`` and ``sync/sampling_diff`` were logged again at every step after it."""
    diffs = iter([0.25, 0.5])
    monkeypatch.setattr(mmsr.sync, "sampling_probe", lambda policy, text: ([1, 2], []))
    monkeypatch.setattr(mmsr.sync, "warm_probe", lambda engine, ids, vision: None)
    monkeypatch.setattr(mmsr.sync, "probe_inputs", lambda policy, text: ([1, 2], []))
    monkeypatch.setattr(mmsr.sync, "verify_sync", lambda *a, **k: SyncCheck(next(diffs), 1.0, 1))
    monkeypatch.setattr(mmsr.sync, "verify_sampling", lambda *a, **k: SyncCheck(0.125, 1.0, 1))
    module = make_module(engine=ProbedEngine(script), weight_sync=WeightSync(verify_every=2))
    module.start_engine()
    steps = []
    for _ in range(3):  # a step as RolloutCallback starts it: sync, then roll out
        module.sync_weights()
        module.generate_rollouts(fvqa_samples[:1])
        steps.append(dict(module._timings))
    assert [s.get("sync/probe_diff") for s in steps] == [0.25, None, 0.5]
    assert [s.get("sync/sampling_diff") for s in steps] == [0.125, None, 0.125]
    assert all({"timing/sync", "timing/rollout", "sync/seconds"} <= s.keys() for s in steps)  # the step's own
