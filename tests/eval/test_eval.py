"""``mmsr eval``: metrics on scripted episodes, and end to end on the tiny model with local tools."""

import json
from dataclasses import asdict, replace

import pytest

from mmsr.eval.report import markdown, summarize
from mmsr.eval.run import Evaluator, write_outputs
from mmsr.eval.work import WORK_FILE, EvalWork
from mmsr.rollout.engine import ScriptedEngine
from mmsr.rollout.hf_engine import HFEngine
from mmsr.rollout.loop import RolloutSettings
from mmsr.tools.local import LocalImageSearch, LocalTextSearch
from tests.conftest import FVQA

R = "<reason>r</reason>"


@pytest.fixture(scope="module")
def local_tools():
    search = FVQA / "search"
    return {"image_search": LocalImageSearch(str(search / "image_index.jsonl"), top_k=2),
            "text_search": LocalTextSearch(str(search / "corpus.jsonl"), top_k=2, max_chars=80)}  # fmt: skip


def test_scores_and_search_ratios_by_hand(tiny_policy, fvqa_samples, local_tools):
    s = [replace(x, data_source=src, category=cat) for x, src, cat in
         zip(fvqa_samples[:4], ["a", "a", "b", "b"], ["free", "req", "req", "req"])]  # fmt: skip
    gt = [x.ground_truth for x in s]
    script = {
        s[0].id: [f"{R}<answer>{gt[0]}</answer>"],  # correct, no search
        s[1].id: [f"{R}<search><img></search>", f"{R}<answer>The {gt[1]}!</answer>"],  # correct (EM normalizes)
        s[2].id: [f"{R}<text_search>q</text_search>", f"{R}<answer>{gt[2]} or so</answer>"],  # SubEM only
        s[3].id: [f"{R}<search><img></search>", f"{R}<text_search>q</text_search>", f"{R}<answer>no</answer>"],
    }
    engine = ScriptedEngine(script, tiny_policy.tokenizer)
    records = Evaluator(tiny_policy, engine, local_tools, batch_size=3).run(s, "on-demand", "dev")
    assert [r.em for r in records] == [True, True, False, False]
    assert [r.subem for r in records] == [True, True, True, False]
    assert [r.reward for r in records] == pytest.approx([1.0, 0.91, 0.1, 0.1])
    # per record, each kind where it was called (a swap keeps every pooled ratio above: they are symmetric)
    assert [(r.image_searches, r.text_searches) for r in records] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    m = summarize(records)["dev"]["on-demand"]
    assert m["all"]["search_ratio"] == 0.75  # 3 of 4 responses searched
    assert m["all"]["call_ratio"] == pytest.approx((0 + 1 + 1 + 2) / 2 / 4)  # calls / 2 allowed
    assert (m["all"]["image_only"], m["all"]["text_only"], m["all"]["mixed"]) == (0.25, 0.25, 0.25)
    # each source over its own rows: a searched 1 of 2, b searched 2 of 2
    assert m["by_data_source"]["a"]["search_ratio"] == 0.5 and m["by_data_source"]["b"]["search_ratio"] == 1.0
    assert m["by_category"]["free"]["n"] == 1 and m["by_category"]["req"]["em"] == pytest.approx(1 / 3)
    assert m["all"]["judge"] is None and "| dev | on-demand | source=b | 2 | 0.0 | 50.0 | – | 100.0 |" in markdown(summarize(records))
    assert "Judge unparsed" not in markdown(summarize(records))  # no judge: no column for its missing verdicts


class SpyEngine(HFEngine):
    """HFEngine that records the sampling settings it is called with."""

    def __init__(self, seed):
        super().__init__(seed=seed)
        self.temperatures = []

    def generate(self, requests, sampling):
        self.temperatures.append(sampling.temperature)
        return super().generate(requests, sampling)


def test_tiny_model_all_workflows_greedy_and_written(tmp_path, tiny_policy, fvqa_samples, local_tools):
    samples = fvqa_samples[:3]
    settings = RolloutSettings(max_tokens_per_turn=6, max_context_tokens=1024)
    runs = []
    for seed in (0, 1):  # different sampling seeds: greedy output must not depend on them
        engine = SpyEngine(seed)
        engine.bind(tiny_policy)
        ev = Evaluator(tiny_policy, engine, local_tools, settings, batch_size=2)
        runs.append([r for wf in ("on-demand", "direct", "rag") for r in ev.run(samples, wf, "fvqa")])
        assert set(engine.temperatures) == {0.0}
    assert [r.turns for r in runs[0]] == [r.turns for r in runs[1]]
    records = runs[0]
    direct = [r for r in records if r.workflow == "direct"]
    assert all(len(r.turns) == 1 and r.turns[0]["text"].startswith("<answer>") for r in direct)
    assert all(r.image_searches == r.text_searches == 0 for r in direct)
    rag = [r for r in records if r.workflow == "rag"]
    for r in rag:  # forced image search always runs; the model writes the query after a forced tag
        assert r.turns[0]["text"] == "<search><img></search>" and r.turns[0]["tool_ok"] is True
        assert r.image_searches == 1 and r.turns[0]["titles"]
        if len(r.turns) > 1:
            assert r.turns[1]["text"].startswith("<text_search>")
    write_outputs(records, tmp_path)
    lines = (tmp_path / "trajectories.jsonl").read_text().splitlines()
    assert len(lines) == 9 and json.loads(lines[0])["set"] == "fvqa"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["fvqa"]) == {"on-demand", "direct", "rag"}
    assert summary["fvqa"]["direct"]["all"]["call_ratio"] == 0.0
    assert "| fvqa | rag | all | 3 |" in (tmp_path / "summary.md").read_text()


class RecordingText(LocalTextSearch):
    async def __call__(self, request):
        self.queries = getattr(self, "queries", []) + [request.query]
        return await super().__call__(request)


@pytest.mark.parametrize("closed", [True, False])
def test_rag_forces_searches_and_the_model_writes_query_and_answer(tiny_policy, fvqa_samples, local_tools, closed):
    sample = fvqa_samples[2]
    end = "</text_search>" if closed else ""  # unclosed: the model's end-of-turn is replaced by the tag
    turns = {1: f"{sample.ground_truth} meaning{end}", 2: f"{sample.ground_truth}</answer>"}
    engine = ScriptedEngine(lambda r: turns[r.turn], tiny_policy.tokenizer)
    text = RecordingText(str(FVQA / "search" / "corpus.jsonl"), top_k=2)
    tools = {"image_search": local_tools["image_search"], "text_search": text}
    (rec,) = Evaluator(tiny_policy, engine, tools).run([sample], "rag", "dev")
    assert [t["action"] for t in rec.turns] == ["ImageSearch", "TextSearch", "Answer"]
    assert text.queries == [f"{sample.ground_truth} meaning"]
    assert rec.em and (rec.image_searches, rec.text_searches, rec.allowed_calls) == (1, 1, 2)
    assert [r.turn for r in engine.requests] == [1, 2]  # the model is never asked for turn 0
    assert tiny_policy.tokenizer.decode(engine.requests[0].input_ids).endswith("<text_search>")


@pytest.mark.parametrize(("query_turn", "answer_turn"), [
    ("<answer>{gt}</answer>", "{gt}</answer>"),  # answers where the query goes: it had ended the episode
    ("{gt}</text_search>", "<text_search>{gt}</text_search>"),  # searches again where the answer goes
])  # fmt: skip
def test_rag_forced_turns_take_the_forced_action_whatever_tags_the_model_writes(tiny_policy, fvqa_samples, local_tools,
                                                                                query_turn, answer_turn):  # fmt: skip
    sample = fvqa_samples[2]
    turns = {1: query_turn.format(gt=sample.ground_truth), 2: answer_turn.format(gt=sample.ground_truth)}
    engine = ScriptedEngine(lambda r: turns[r.turn], tiny_policy.tokenizer)
    text = RecordingText(str(FVQA / "search" / "corpus.jsonl"), top_k=2)
    tools = {"image_search": local_tools["image_search"], "text_search": text}
    (rec,) = Evaluator(tiny_policy, engine, tools).run([sample], "rag", "dev")
    assert [t["action"] for t in rec.turns] == ["ImageSearch", "TextSearch", "Answer"] and rec.finish_reason == "answer"
    assert text.queries == [sample.ground_truth] and (rec.image_searches, rec.text_searches) == (1, 1)
    assert rec.turns[1]["text"] == f"<text_search>{sample.ground_truth}</text_search>"
    assert rec.turns[2]["text"] == f"<answer>{sample.ground_truth}</answer>" and rec.em


def test_on_demand_allows_the_calls_of_every_configured_tool(tiny_policy, fvqa_samples):
    """The calls ratio's denominator adds up the limits of the tools configured, not only the two searches."""
    from mmsr.tools.crop import Crop
    from mmsr.tools.spec import ImageSearchTool, TextSearchTool, configured

    sample = fvqa_samples[0]
    engine = ScriptedEngine({f"{sample.id}#0": [f"{R}<answer>x</answer>"]}, tiny_policy.tokenizer)
    settings = RolloutSettings(max_rounds=8)
    pair = {"image_search": None, "text_search": None}
    (rec,) = Evaluator(tiny_policy, engine, pair, settings).run([sample], "on-demand", "dev")
    assert rec.allowed_calls == 1 + 2  # image search once, text search twice
    tools = configured([ImageSearchTool(), TextSearchTool(), Crop()])
    (rec,) = Evaluator(tiny_policy, engine, tools, settings).run([sample], "on-demand", "dev")
    assert rec.allowed_calls == 1 + 2 + Crop.spec.limit


class CrashingEngine(HFEngine):
    """HFEngine that dies on the episodes of sample ``crash_on`` (a kill, an OOM) and notes every episode
    it generates for."""

    def __init__(self, crash_on: str | None = None):
        super().__init__()
        self.crash_on, self.generated = crash_on, []

    def generate(self, requests, sampling):
        keys = {r.key.rsplit("#", 1)[0] for r in requests}
        if self.crash_on in keys:
            raise RuntimeError("killed")
        self.generated.append(keys)
        return super().generate(requests, sampling)


def _evaluate(policy, tools, samples, engine, work=None):
    engine.bind(policy)
    ev = Evaluator(policy, engine, tools, RolloutSettings(max_tokens_per_turn=6, max_context_tokens=1024), batch_size=2)
    return [asdict(r) for wf in ("on-demand", "rag") for r in ev.run(samples, wf, "fvqa", work)]


def test_a_crashed_evaluation_resumes_from_its_finished_batches_and_equals_an_uninterrupted_one(
    tmp_path, tiny_policy, fvqa_samples, local_tools
):
    samples, path, run = fvqa_samples[:5], tmp_path / WORK_FILE, {"model_dir": "m", "batch_size": 2}
    whole = _evaluate(tiny_policy, local_tools, samples, CrashingEngine())
    with pytest.raises(RuntimeError, match="killed"):  # dies in on-demand's second batch (questions 2-3)
        _evaluate(tiny_policy, local_tools, samples, CrashingEngine(crash_on=samples[2].id), EvalWork(path, run))
    assert len(path.read_text().splitlines()) == 2  # the run's arguments and the first batch
    engine = CrashingEngine()
    assert _evaluate(tiny_policy, local_tools, samples, engine, EvalWork(path, run)) == whole
    assert engine.generated[0] == {samples[2].id, samples[3].id}  # on-demand's first batch was not run again
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1] + [lines[-1][:100]]))  # killed while writing rag's last batch
    engine, work = CrashingEngine(), EvalWork(path, run)
    assert _evaluate(tiny_policy, local_tools, samples, engine, work) == whole
    assert set().union(*engine.generated) == {samples[4].id}  # only the batch whose line was cut
    assert [json.loads(line)["start"] for line in path.read_text().splitlines()[1:]] == [0, 2, 4, 0, 2, 4]
    work.finish()
    assert not path.exists()


def test_a_rerun_on_fewer_questions_keeps_the_batches_it_did_not_take(tmp_path, tiny_policy, fvqa_samples, local_tools,
                                                                      capsys):  # fmt: skip
    """A rerun with a smaller ``--limit`` takes its batches from the work file; the others are written nowhere
    else, so finishing keeps the file (said on stderr), and a rerun on every question still runs none again."""
    samples, path, run = fvqa_samples[:4], tmp_path / WORK_FILE, {"model_dir": "m", "batch_size": 2}
    whole = _evaluate(tiny_policy, local_tools, samples, CrashingEngine(), EvalWork(path, run))
    engine, work = CrashingEngine(), EvalWork(path, run)
    assert _evaluate(tiny_policy, local_tools, samples[:2], engine, work) == [r for r in whole if r["sample_id"] in
                                                                              {samples[0].id, samples[1].id}]
    work.finish()
    assert engine.generated == [] and path.is_file()
    assert f"{path} is kept: it holds 2 finished batches this run did not take" in capsys.readouterr().err
    engine, work = CrashingEngine(), EvalWork(path, run)
    assert _evaluate(tiny_policy, local_tools, samples, engine, work) == whole and engine.generated == []
    work.finish()
    assert not path.exists()


def test_a_work_file_of_other_arguments_is_refused_naming_it(tmp_path, tiny_policy, fvqa_samples):
    sample = fvqa_samples[0]
    engine = ScriptedEngine({f"{sample.id}#0": [f"{R}<answer>x</answer>"]}, tiny_policy.tokenizer)
    path = tmp_path / WORK_FILE
    Evaluator(tiny_policy, engine, {}).run([sample], "direct", "dev", EvalWork(path, {"ckpt": "a.ckpt", "limit": None}))
    with pytest.raises(ValueError, match=rf"{WORK_FILE} holds the episodes of another evaluation \(--ckpt was 'a.ckpt', now 'b.ckpt'\)"):
        EvalWork(path, {"ckpt": "b.ckpt", "limit": None})
    path.write_text('{"ru')  # its first line cut: nothing in it counts, and it goes
    assert EvalWork(path, {"ckpt": "b.ckpt"}).done(("dev", "direct", 0), [sample.id]) is None and not path.exists()


def test_em_the_reward_and_the_record_grade_one_answer_the_specs(tiny_policy, fvqa_samples, local_tools):
    sample = fvqa_samples[0]
    text = f"<reason>I write <answer> tags</reason><answer>{sample.ground_truth}</answer>"  # the parser: innermost
    engine = ScriptedEngine({sample.id: [text]}, tiny_policy.tokenizer)
    (rec,) = Evaluator(tiny_policy, engine, local_tools).run([sample], "on-demand", "dev")
    assert rec.answer == f"tags</reason><answer>{sample.ground_truth}"  # the spec's last <answer>(.*?)</answer>
    assert (rec.em, rec.subem, rec.reward) == (False, True, 0.0)


@pytest.mark.parametrize("workflow", ["direct", "rag"])
def test_a_forced_opening_the_model_writes_again_is_kept_once(tiny_policy, fvqa_samples, local_tools, workflow):
    sample = fvqa_samples[2]
    turns = {0: f" <answer>{sample.ground_truth}</answer>", 1: f"<text_search>{sample.ground_truth}</text_search>",
             2: f"<answer>{sample.ground_truth}</answer>"}  # fmt: skip
    engine = ScriptedEngine(lambda r: turns[r.turn], tiny_policy.tokenizer)
    (rec,) = Evaluator(tiny_policy, engine, local_tools).run([sample], workflow, "dev")
    space = " " if workflow == "direct" else ""  # the model's text, its own tags dropped, after the forced one
    assert rec.turns[-1]["text"] == f"<answer>{space}{sample.ground_truth}</answer>"
    assert rec.em and rec.answer == sample.ground_truth
    if workflow == "rag":
        assert rec.turns[1]["text"] == f"<text_search>{sample.ground_truth}</text_search>" and rec.text_searches == 1


@pytest.mark.parametrize("query_turn", ["", "  \n", "<answer></answer>", "</text_search>"])
def test_an_empty_rag_query_searches_the_question_so_rag_makes_both_calls(tiny_policy, fvqa_samples, local_tools,
                                                                          query_turn):  # fmt: skip
    """``<text_search></text_search>`` parsed as an empty query: the episode ended after one call (search ratio
    and call ratio of RAG then under its 100% by construction)."""
    sample = fvqa_samples[2]
    turns = {1: query_turn, 2: f"{sample.ground_truth}</answer>"}
    engine = ScriptedEngine(lambda r: turns[r.turn], tiny_policy.tokenizer)
    text = RecordingText(str(FVQA / "search" / "corpus.jsonl"), top_k=2)
    tools = {"image_search": local_tools["image_search"], "text_search": text}
    (rec,) = Evaluator(tiny_policy, engine, tools).run([sample], "rag", "dev")
    assert [t["action"] for t in rec.turns] == ["ImageSearch", "TextSearch", "Answer"] and rec.finish_reason == "answer"
    assert text.queries == [" ".join(sample.question.split())] and (rec.image_searches, rec.text_searches) == (1, 1)
    assert rec.em and summarize([rec])["dev"]["rag"]["all"]["call_ratio"] == 1.0


def test_numeric_categories_and_sources_are_summarized_by_their_text(tmp_path):
    """A jsonl set's ``category`` of numbers next to a row without one: ``summarize`` sorted ``"none"`` with ``1``
    and raised ``TypeError`` after every (paid) episode had run, leaving no summary."""
    from mmsr.eval.report import EvalRecord

    def record(source, category, em):
        return EvalRecord("dev", "direct", "q", source, category, "q?", "a", [], "a", em, em, float(em), True, 0, 0, 0, "answer", 3)

    records = [record(3, 1, True), record("s", 0, False), record("s", None, True), record("s", 1, False)]
    summary = write_outputs(records, tmp_path)["dev"]["direct"]
    assert {k: m["n"] for k, m in summary["by_category"].items()} == {"0": 1, "1": 2, "none": 1}
    assert {k: m["em"] for k, m in summary["by_data_source"].items()} == {"3": 1.0, "s": pytest.approx(1 / 3)}
    assert "| dev | direct | category=1 | 2 | 50.0 |" in (tmp_path / "summary.md").read_text()


def test_a_sample_id_that_repeats_in_a_set_is_refused_before_any_episode(tmp_path, tiny_policy, fvqa_samples, capsys):
    """Two questions under one id: RAG's empty query turn searched the other question (it finds the question by id),
    where ``mmsr fit`` and ``mmsr curate`` refuse such a set. The command names the id, the set and its file."""
    from mmsr.eval.cli import main

    twice = [fvqa_samples[0], replace(fvqa_samples[1], id=fvqa_samples[0].id)]
    engine = ScriptedEngine(lambda r: "</text_search>", tiny_policy.tokenizer)
    with pytest.raises(ValueError, match=rf"sample id '{twice[0].id}' repeats in set dev"):
        Evaluator(tiny_policy, engine, {}).run(twice, "rag", "dev")
    assert engine.requests == []
    rows = [json.loads(line) for line in (FVQA / "fvqa_dev.jsonl").read_text().splitlines()[:3]]
    rows[2]["data_id"] = rows[0]["data_id"]  # beyond --limit 1: the set itself is wrong
    for row in rows:
        row["image"] = str(FVQA / row["image"])
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["--policy", "never-loaded.yaml", "--data", str(tmp_path / "dev.jsonl"), "--workflow", "direct", "--limit", "1"]
    with pytest.raises(SystemExit, match=rf"sample id '{rows[0]['data_id']}' repeats in set dev \({tmp_path / 'dev.jsonl'}\)"):
        main([*argv, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
