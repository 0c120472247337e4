"""What GRPOModule logs at a step: only what that step measured, and over ranks counts summed, ratios of sums."""

import lightning as L
import torch

import mmsr.metrics
import mmsr.sync
from mmsr.metrics import tool_rates, tool_sums
from mmsr.rollout.engine import ScriptedEngine
from mmsr.sync import SyncCheck, WeightSync
from tests.rollout.test_loop import FakeImageSearch
from tests.test_module import RIGHT, WRONG, fit_one_step, make_module, script


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


class CountedImageSearch(FakeImageSearch):
    """The fake image search with an API-call counter, as a web tool keeps one (``tools/image_search/api_calls``)."""

    def metrics(self):
        return {"tools/api_calls": 3.0}


def test_two_ranks_log_summed_counts_and_ratios_of_the_summed_counts(monkeypatch, fvqa_samples):
    """Two ranks that rolled out alike (every gather gets this rank's values twice): the tool's own counter and the
    calls are the step's totals (the counter was averaged over ranks); the ratios are those of one rank, bit for bit,
    and the ranks exchange counts, never ratios (each rank computed the tool rates, all-reduced them, and the pooled
    ones overwrote them); a step of one category and one source logs both."""
    sent, logged = [], {}
    monkeypatch.setattr(mmsr.metrics, "gather_per_rank", lambda obj: sent.append(repr(obj)) or [obj, obj])
    module = make_module(image_search=CountedImageSearch())
    log_dict = module.log_dict
    monkeypatch.setattr(module, "log_dict", lambda metrics, **kw: logged.update(metrics) or log_dict(metrics, **kw))
    fit_one_step(module, fvqa_samples[:1])
    stats = module.loop.stats
    assert logged["tools/image_search/api_calls"] == 6.0
    assert logged["tools/image_search_calls"] == 2 * stats.tool_calls["image_search"] > 0
    one_rank = tool_rates(tool_sums(stats))
    assert {k: logged[k] for k in ("tools/failure_rate", "tools/latency_s", "rollout/overlap")} == {
        k: one_rank[k] for k in ("tools/failure_rate", "tools/latency_s", "rollout/overlap")}
    assert not [s for s in sent if "tools/failure_rate" in s or "tools/latency_s" in s or "rollout/overlap" in s]
    category, source = fvqa_samples[0].category, fvqa_samples[0].data_source
    assert f"reward/accuracy/{category}" in logged and f"reward/accuracy/data_source/{source}" in logged


class CallCounted(FakeImageSearch):
    """The fake image search counting its calls since it was built, as a web or cached tool does: this process's
    (``api_calls``) and its run's shared budget's (``run_api_calls``)."""

    calls = 0

    async def __call__(self, request):
        self.calls += 1
        return await super().__call__(request)

    def metrics(self):
        return {"tools/api_calls": float(self.calls), "tools/run_api_calls": float(self.calls)}


def test_a_tools_own_counters_log_what_each_step_added(fvqa_samples):
    """Three steps of one image search each: ``api_calls`` read 1, 2, 3 (the tool's running total, not the
    step's); the run-wide total is logged as read."""
    module, logged = make_module(image_search=CallCounted()), []
    log_dict = module.log_dict
    module.log_dict = lambda metrics, **kw: logged.append(dict(metrics)) or log_dict(metrics, **kw)
    loader = torch.utils.data.DataLoader(fvqa_samples[:3], batch_size=1, collate_fn=list)
    L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, loader)  # fmt: skip
    assert [m["tools/image_search_calls"] for m in logged] == [1.0, 1.0, 1.0]
    assert [m["tools/image_search/api_calls"] for m in logged] == [1.0, 1.0, 1.0]
    assert [m["tools/image_search/run_api_calls"] for m in logged] == [1.0, 2.0, 3.0]


def test_a_step_without_tool_calls_logs_no_tool_ratios(fvqa_samples):
    """No episode searched: a failure rate and latency of 0 and an overlap of 1 were logged, read as measured."""
    logged = {}
    module = make_module(engine=ScriptedEngine(lambda r: [RIGHT, WRONG][int(r.key.rsplit("#", 1)[1]) % 2]))
    log_dict = module.log_dict
    module.log_dict = lambda metrics, **kw: logged.update(metrics) or log_dict(metrics, **kw)
    fit_one_step(module, fvqa_samples[:1])
    assert logged["tools/image_search_calls"] == logged["tools/text_search_calls"] == 0.0
    assert not {"tools/failure_rate", "tools/latency_s", "rollout/overlap"} & logged.keys()
