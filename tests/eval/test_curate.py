"""``mmsr curate`` on a scripted engine: labels, the search-free share, the parquet schema, resuming."""

import pytest

from mmsr.data.loaders import load_samples
from mmsr.eval.curate import Outcome, curate, label, select
from mmsr.prompt.render import PromptBuilder
from mmsr.rollout.engine import ScriptedEngine
from mmsr.rollout.loop import RolloutLoop
from tests.rollout.test_loop import FakeImageSearch, FakeTextSearch

R = "<reason>r</reason>"
IMG, TXT = f"{R}<search><img></search>", f"{R}<text_search>q</text_search>"


def _script(samples):
    """Per question, the turns of rollout 0 and rollout 1 (k = 2)."""
    ans = lambda s: f"{R}<answer>{s.ground_truth}</answer>"  # noqa: E731
    wrong = f"{R}<answer>no idea at all</answer>"
    s = samples
    return {
        s[0].id: [[IMG, ans(s[0])], [ans(s[0])]],  # one correct without search -> search_free
        s[1].id: [[IMG, ans(s[1])], [wrong]],  # image_search_required
        s[2].id: [[TXT, ans(s[2])], [TXT, ans(s[2])]],  # text_search_required
        s[3].id: [[IMG, TXT, ans(s[3])], [wrong]],  # mixed (image then text in one rollout)
        s[4].id: [[IMG, ans(s[4])], [TXT, ans(s[4])]],  # mixed (the two types across rollouts)
        s[5].id: [[wrong], [IMG, wrong]],  # never correct -> dropped
        s[6].id: [[ans(s[6])], [ans(s[6])]],  # search_free
    }


class Engine(ScriptedEngine):
    """Scripted by (question, rollout, turn); optionally fails after ``fail_after`` generate calls."""

    def __init__(self, policy, script, fail_after=None):
        super().__init__(lambda r: script[r.key.split("#")[0]][int(r.key.split("#")[1])][r.turn], policy.tokenizer)
        self.fail_after, self.calls = fail_after, 0

    def generate(self, requests, sampling):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("preempted")
        return super().generate(requests, sampling)


def _loop(policy, engine):
    return RolloutLoop(engine, policy, PromptBuilder(), {"image_search": FakeImageSearch(), "text_search": FakeTextSearch()})


def test_labels_and_selection_rules():
    yes, no = Outcome(True, False, False), Outcome(False, False, False)
    assert label([no, no]) is None and label([Outcome(True, True, False), yes]) == "search_free"
    assert label([Outcome(True, False, True), Outcome(False, True, False)]) == "text_search_required"
    labels = {f"f{i}": "search_free" for i in range(5)} | {f"r{i}": "text_search_required" for i in range(20)}
    chosen = select(labels, 0.2)  # free pool 5 -> 25 rows at 20%
    assert len(chosen) == 25 and sum(c.startswith("f") for c in chosen) == 5
    assert sum(c.startswith("f") for c in select(labels, 0.5, size=10, seed=1)) == 5
    assert select(labels, 0.5, size=10, seed=1) == select(labels, 0.5, size=10, seed=1)
    with pytest.raises(ValueError, match="needs 8 search-free"):
        select(labels, 0.5, size=16)


def test_curate_writes_the_mmsearch_r1_schema(tmp_path, tiny_policy, fvqa_samples):
    samples = fvqa_samples[:7]
    engine = Engine(tiny_policy, _script(samples))
    report = curate(samples, _loop(tiny_policy, engine), tmp_path / "c.parquet", k=2, search_free_ratio=0.4, batch_size=3)
    assert report == {"search_free": 2, "image_search_required": 1, "text_search_required": 1,
                      "mixed_search_required": 2, "dropped": 1, "selected": 5}  # fmt: skip
    rows = load_samples(tmp_path / "c.parquet")  # the schema load_samples reads (spec §8)
    assert len(rows) == 5 and sum(r.category == "search_free" for r in rows) == 2
    by_id = {s.id: s for s in samples}
    for r in rows:
        assert (r.question, r.ground_truth, r.candidate_answers) == (by_id[r.id].question, by_id[r.id].ground_truth, by_id[r.id].candidate_answers)
        assert r.image.tobytes() == by_id[r.id].image.tobytes()  # lossless
    assert samples[5].id not in {r.id for r in rows}
    assert {r.category for r in rows if r.id in (samples[3].id, samples[4].id)} <= {"mixed_search_required"}


def test_curate_resumes_after_a_crash(tmp_path, tiny_policy, fvqa_samples):
    samples = fvqa_samples[:7]
    script = _script(samples)
    whole = curate(samples, _loop(tiny_policy, Engine(tiny_policy, script)), tmp_path / "a.parquet", k=2,
                   search_free_ratio=0.4, batch_size=3)  # fmt: skip
    crashing = Engine(tiny_policy, script, fail_after=3)  # the first batch of 3 finishes (3 rounds), then a crash
    with pytest.raises(RuntimeError, match="preempted"):
        curate(samples, _loop(tiny_policy, crashing), tmp_path / "b.parquet", k=2, search_free_ratio=0.4, batch_size=3)
    assert len((tmp_path / "b.parquet.rollouts.jsonl").read_text().splitlines()) == 1 + 3  # the settings, 3 questions
    resumed = Engine(tiny_policy, script)
    again = curate(samples, _loop(tiny_policy, resumed), tmp_path / "b.parquet", k=2, search_free_ratio=0.4, batch_size=3)
    assert {r.key.split("#")[0] for r in resumed.requests} == {s.id for s in samples[3:]}  # only the rest
    assert again == whole
    a, b = load_samples(tmp_path / "a.parquet"), load_samples(tmp_path / "b.parquet")
    assert [(s.id, s.category) for s in a] == [(s.id, s.category) for s in b]


def test_labels_name_other_configured_tools(tmp_path, tiny_policy, fvqa_samples):
    """With a crop tool configured beside the searches, a question answered only after a crop is labelled by
    the tools its correct rollouts used; the work file keeps them, and old three-field rows still read."""
    from mmsr.eval.curate import read_work
    from mmsr.tools.crop import Crop
    from mmsr.tools.spec import ImageSearchTool, TextSearchTool, configured

    assert label([Outcome(True, True, False, ("crop",)), Outcome(True, False, True)]) == "crop+image_search+text_search_required"
    assert label([Outcome(True, False, False, ("crop",))]) == "crop_required"
    assert label([Outcome(True, False, False, ("crop",)), Outcome(True, False, False)]) == "search_free"
    samples = fvqa_samples[:3]
    crop = f"{R}<crop>[0, 0, 20, 20]</crop>"
    ans = lambda s: f"{R}<answer>{s.ground_truth}</answer>"  # noqa: E731
    script = {samples[0].id: [[crop, ans(samples[0])]], samples[1].id: [[crop, IMG, ans(samples[1])]],
              samples[2].id: [[ans(samples[2])]]}  # fmt: skip
    tools = configured([ImageSearchTool(FakeImageSearch()), TextSearchTool(FakeTextSearch()), Crop()])
    loop = RolloutLoop(Engine(tiny_policy, script), tiny_policy, PromptBuilder(), tools)
    out = tmp_path / "c.parquet"
    counts = curate(samples, loop, out, k=1, search_free_ratio=1 / 3)
    assert counts["crop_required"] == counts["crop+image_search_required"] == counts["search_free"] == 1
    assert counts["image_search_required"] == 0 and counts["selected"] == 3
    work = out.with_name(out.name + ".rollouts.jsonl")
    assert read_work(work)[samples[1].id] == [Outcome(True, True, False, ("crop",))]
    work.write_text('{"id": "old", "outcomes": [[true, false, true]]}\n')
    assert read_work(work) == {"old": [Outcome(True, False, True)]}


def test_a_work_file_of_other_settings_is_refused_and_imageless_questions_before_any_rollout(tmp_path, tiny_policy,
                                                                                              fvqa_samples):  # fmt: skip
    """A rerun with another --k reused the first run's outcomes (labels from k=1 in a k=3 curation), and a
    text-only question crashed the parquet write after every rollout had run."""
    from dataclasses import replace

    samples, script = fvqa_samples[:3], _script(fvqa_samples[:7])
    # at k=1 none of the three is search-free: a search-free share of 0 selects them all
    curate(samples, _loop(tiny_policy, Engine(tiny_policy, script)), tmp_path / "c.parquet", k=1,
           search_free_ratio=0.0, run={"ckpt": "a.ckpt"})  # fmt: skip
    engine = Engine(tiny_policy, script)
    with pytest.raises(ValueError, match=r"c.parquet.rollouts.jsonl holds the rollouts of another curation \(--k was 1, now 3\)"):
        curate(samples, _loop(tiny_policy, engine), tmp_path / "c.parquet", k=3, search_free_ratio=0.4, run={"ckpt": "a.ckpt"})
    with pytest.raises(ValueError, match=r"--ckpt was 'a.ckpt', now 'b.ckpt'"):
        curate(samples, _loop(tiny_policy, engine), tmp_path / "c.parquet", k=1, search_free_ratio=0.4, run={"ckpt": "b.ckpt"})
    text_only = [samples[0], replace(samples[1], image=None)]
    with pytest.raises(ValueError, match=f"1 questions have none \\(first: '{samples[1].id}'\\)"):
        curate(text_only, _loop(tiny_policy, engine), tmp_path / "d.parquet", k=1)
    assert engine.requests == []  # refused before any rollout


def test_a_work_line_holding_a_unicode_line_separator_is_read(tmp_path):
    """``str.splitlines`` cut a line at a raw U+2028 (as ``json.dumps(ensure_ascii=False)`` writes it in an id
    or a setting): neither half is JSON, so the question was redone. This writer escapes it; others need not."""
    from mmsr.eval.curate import read_work

    work = tmp_path / "w.jsonl"
    lines = ['{"run": {"k": 1, "tools": "a\u2028b"}}', '{"id": "q\u2029\u0085", "outcomes": [[true, false, true]]}']
    work.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    assert read_work(work, {"k": 1, "tools": "a\u2028b"}) == {"q\u2029\u0085": [Outcome(True, False, True)]}


def test_a_line_cut_by_a_crash_goes_so_the_next_appended_line_stands_alone(tmp_path, tiny_policy, fvqa_samples):
    """Killed before the last row's newline (or mid-row): the resume skipped a cut line but left it, the next
    batch's first line was appended to it, and the following resume lost both questions."""
    from mmsr.eval.curate import read_work, roll_out

    samples, script = fvqa_samples[:7], _script(fvqa_samples[:7])
    work = tmp_path / "w.rollouts.jsonl"
    roll_out(_loop(tiny_policy, Engine(tiny_policy, script)), samples[:2], 2, 1.0, work, batch_size=1)
    for cut, n in ((1, 3), (20, 4)):  # the last row's newline never written; then killed mid-row (it is redone)
        work.write_text(work.read_text()[:-cut])
        assert len(read_work(work)) == 2
        roll_out(_loop(tiny_policy, Engine(tiny_policy, script)), samples[:n], 2, 1.0, work, batch_size=1)
        assert sorted(read_work(work)) == sorted(s.id for s in samples[:n])
        assert work.read_text().endswith("\n") and len(work.read_text().splitlines()) == 1 + n


class SpyEngine(Engine):
    """``Engine`` that notes the temperature of every generate call."""

    def __init__(self, policy, script):
        super().__init__(policy, script)
        self.temperatures = []

    def generate(self, requests, sampling):
        self.temperatures.append(sampling.temperature)
        return super().generate(requests, sampling)


def test_rollouts_sample_at_the_curate_temperature_and_rows_keep_source_url_and_label(tmp_path, tiny_policy, fvqa_samples):
    """Curation samples (greedy rollouts would label each question by one path); a written row keeps its question's
    ``data_source`` and ``image_urls`` (web image search needs the URL) and its label in ``extra_info``."""
    import pyarrow.parquet as pq
    from dataclasses import replace

    samples = [replace(s, data_source=f"src{i % 2}", image_url=f"https://img.example/{s.id}.jpg")
               for i, s in enumerate(fvqa_samples[:7])]  # fmt: skip
    engine = SpyEngine(tiny_policy, _script(samples))
    curate(samples, _loop(tiny_policy, engine), tmp_path / "c.parquet", k=2, temperature=0.7, search_free_ratio=0.4)
    assert engine.temperatures and set(engine.temperatures) == {0.7}
    rows = pq.read_table(tmp_path / "c.parquet").to_pylist()
    by_id, expected = {s.id: s for s in samples}, dict(zip([s.id for s in samples], [
        "search_free", "image_search_required", "text_search_required", "mixed_search_required",
        "mixed_search_required", None, "search_free"]))  # fmt: skip
    assert len(rows) == 5
    for row in rows:
        sample = by_id[row["data_id"]]
        assert (row["data_source"], row["image_urls"]) == (sample.data_source, sample.image_url)
        assert row["extra_info"]["search_label"] == row["category"] == expected[sample.id]


def test_a_selection_of_no_question_is_refused_before_writing_naming_the_pools(tmp_path, tiny_policy, fvqa_samples):
    """One pool empty (no search-required question at a 0.4 search-free share), or ``size=0``: curate wrote a parquet
    without rows and returned, and ``mmsr fit`` refused that file later."""
    s = fvqa_samples[:7]
    samples, script = [s[0], s[5], s[6]], _script(s)  # search_free, dropped, search_free
    out = tmp_path / "c.parquet"
    with pytest.raises(ValueError, match=rf"^curate selected no question, so {out} was not written: "
                                         r"search_free_ratio=0\.4 and size=None select none from 2 search-free and 0 "
                                         r"search-required questions \(search_free 2, image_search_required 0, "
                                         r"text_search_required 0, mixed_search_required 0, dropped 1; k=2 rollouts at "
                                         r"temperature=1\.0\); the rollouts stay in .*c\.parquet\.rollouts\.jsonl, which "
                                         r"a rerun with another --search-free-ratio or --size reuses$"):  # fmt: skip
        curate(samples, _loop(tiny_policy, Engine(tiny_policy, script)), out, k=2, search_free_ratio=0.4)
    assert not out.exists()
    engine = Engine(tiny_policy, script)
    with pytest.raises(ValueError, match=r"search_free_ratio=1\.0 and size=0 select none from 2 search-free"):
        curate(samples, _loop(tiny_policy, engine), out, k=2, search_free_ratio=1.0, size=0)
    assert not out.exists()
    report = curate(samples, _loop(tiny_policy, engine), out, k=2, search_free_ratio=1.0)  # as the error says
    assert report["selected"] == 2 and engine.requests == []  # from the rollouts kept


def test_mmsr_curate_with_every_question_dropped_ends_with_the_error_and_writes_nothing(tmp_path, tiny_policy, monkeypatch,
                                                                                       capsys):  # fmt: skip
    import mmsr.cli as cli
    from mmsr.eval import cli as eval_cli
    from mmsr.eval.load import Loaded
    from mmsr.rollout.loop import RolloutSettings
    from tests.conftest import FVQA

    data = FVQA / "fvqa_dev.jsonl"
    n = len(load_samples(data))
    engine = ScriptedEngine(lambda r: f"{R}<answer>no idea at all</answer>", tiny_policy.tokenizer)
    tools = {"image_search": FakeImageSearch(), "text_search": FakeTextSearch()}
    monkeypatch.setattr(eval_cli, "load_from_args", lambda *a, **k: Loaded(tiny_policy, engine, tools, RolloutSettings()))
    (tmp_path / "tools.yaml").write_text("{}\n")
    out = tmp_path / "c.parquet"
    monkeypatch.setattr(cli.sys, "argv", ["mmsr", "curate", "--policy", "p.yaml", "--tools", str(tmp_path / "tools.yaml"),
                                          "--data", str(data), "--k", "1", "--out", str(out)])  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        cli.console()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 1 and not out.exists()
    assert last.startswith(f"mmsr curate: error: ValueError: curate selected no question, so {out} was not written: "
                           f"none of the {n} questions was answered correctly in k=1 rollouts at temperature=1.0 "
                           f"(search_free 0, image_search_required 0, text_search_required 0, mixed_search_required 0, "
                           f"dropped {n}); the rollouts stay in {out}.rollouts.jsonl"), last  # fmt: skip
