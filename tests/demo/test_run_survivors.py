"""What ``mmsr demo`` does that a mutation audit of ``mmsr/demo/run.py`` found untested, without a whole demo: the
claims at their exact thresholds, the warm start's step overrides, the seed reaching the world and both stages, the
held-out questions taken in turn, the greedy evaluation's per-kind numbers and the held-out records, the summary
table and files. The stages are stubs: what is checked is what the demo hands them and makes of what they return."""

import csv
from types import SimpleNamespace

import pytest
import torch
import yaml

import mmsr.cli
import mmsr.demo.run as demo
from mmsr.data.sample import Sample
from mmsr.report.records import HELD_OUT_FILE, read_records
from mmsr.rollout.actions import Answer, ImageSearch, TextSearch
from mmsr.rollout.loop import RolloutSettings
from mmsr.rollout.trajectory import ToolCall, Trajectory, Turn
from mmsr.tools.base import ToolResult
from tests.demo.test_run import KIND, OVERALL, WARM, _earlier_run, _summary, stage_args

DROP, REQUIRED = "search-free search ratio drops >= 50 points", "search-required search ratio >= 90%"


def _unmet(summary: dict) -> list[str]:
    return [name for name, ok, _ in demo.checks(summary) if not ok]


def _counted(warm: dict | None = None, after: dict | None = None) -> dict:
    """``_summary`` with every claim met, then ``warm``/``after`` as {(kind, metric): (count, of)}: ratios of counts,
    as the evaluation computes them (``a / n``), not decimal literals."""
    summary = _summary(1.0, 0.0)
    for stage, given in (("warm_start", warm or {}), ("grpo", after or {})):
        for (kind, metric), (count, of) in given.items():
            summary[stage][kind][metric] = count / of
    return summary


@pytest.mark.parametrize(("warm", "after", "unmet"), [
    # the search-free ratio drops by exactly 50 points: in floats 0.95 - 0.45 is 0.49999999999999994
    ({("search_free", "search_ratio"): (38, 40)}, {("search_free", "search_ratio"): (18, 40)}, []),
    ({("search_free", "search_ratio"): (23, 40)}, {("search_free", "search_ratio"): (3, 40)}, []),
    ({("search_free", "search_ratio"): (38, 40)}, {("search_free", "search_ratio"): (19, 40)}, [DROP]),
    # exactly 5 points below the warm start (0.525 - 0.05 is 0.47500000000000003 in floats), then 7.5
    ({("all", "accuracy"): (21, 40)}, {("all", "accuracy"): (19, 40)}, [OVERALL]),
    ({("all", "accuracy"): (21, 40)}, {("all", "accuracy"): (18, 40)}, [OVERALL, WARM]),
    (None, {("image_search", "search_ratio"): (36, 40)}, []), (None, {("text_search", "search_ratio"): (36, 40)}, []),
    (None, {("image_search", "search_ratio"): (35, 40)}, [REQUIRED]),
    (None, {("text_search", "search_ratio"): (35, 40)}, [REQUIRED]),
    ({("all", "accuracy"): (32, 40)}, {("all", "accuracy"): (32, 40)}, []),  # 80%, no drop
    ({("all", "accuracy"): (32, 40)}, {("all", "accuracy"): (31, 40)}, [OVERALL]),
    (None, {("search_free", "accuracy"): (30, 40)}, []), (None, {("search_free", "accuracy"): (29, 40)}, [KIND]),
], ids=["drop 50 of 95", "drop 50 of 57.5", "drop 47.5", "5 below", "7.5 below", "image 90", "text 90", "image 87.5",
        "text 87.5", "overall 80", "overall 77.5", "kind 75", "kind 72.5"])  # fmt: skip
def test_a_claim_met_exactly_passes_and_one_just_short_fails(warm, after, unmet):
    """Each claim at its threshold in exact counts (n = 40) is met, one question short of it is not: a drop of
    exactly 50 points was reported "+50.0 points" and NO, the float difference falling short by 1e-16."""
    assert _unmet(_counted(warm, after)) == unmet


def test_the_summary_table_shows_both_stages_overall_and_an_unmet_claim(tmp_path):
    """The table (printed, and ``summary.md``) has the overall row of both evaluations, and says NO where a
    claim is unmet; ``metrics.csv`` holds both stages under its header."""
    summary = _summary(0.7, 0.0) | {"grpo_metrics": str(tmp_path / "none.csv")}
    table = demo.table(summary)
    rows = table.splitlines()
    assert "| warm_start | all | 100.0% | 100.0% | 100.0% | 100.0% | 40 |" in rows
    assert "| grpo | all | 70.0% | 100.0% | 100.0% | 100.0% | 40 |" in rows
    assert "| warm_start | search_free | 100.0% | 100.0% | 100.0% | 100.0% | 40 |" in rows
    assert "| accuracy after GRPO >= 80% | NO | 70.0% |" in rows
    assert f"| {DROP} | yes | +100.0 points |" in rows
    demo.write_outputs(tmp_path, summary)
    assert (tmp_path / "summary.md").read_text() == table + "\n"
    exactly = _counted({("search_free", "search_ratio"): (38, 40)}, {("search_free", "search_ratio"): (18, 40)})
    assert f"| {DROP} | yes | +50.0 points |" in demo.table(exactly).splitlines()  # was NO beside +50.0
    metrics = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert {"stage": "warm_start", "kind": "all", "metric": "accuracy", "value": "1.0"} in metrics
    assert {"stage": "grpo", "kind": "all", "metric": "accuracy", "value": "0.7"} in metrics


SFT = yaml.safe_load((demo.CONFIGS / "sft.yaml").read_text())
READING = SFT["model"]["init_args"]["reading_steps"]
IMITATION = SFT["trainer"]["max_steps"] - READING  # the config's imitation steps


@pytest.mark.parametrize(("reading_steps", "sft_steps", "reading", "total"), [
    (3, None, 3, 3 + IMITATION), (None, 5, READING, READING + 5), (4, 6, 4, 10),
])  # fmt: skip
def test_one_warm_start_step_count_given_keeps_the_configs_other(tmp_path, reading_steps, sft_steps, reading, total):
    """``--reading-steps`` alone keeps sft.yaml's imitation steps and ``--sft-steps`` alone its reading steps; the
    stage's ``max_steps`` and ``total_steps`` (the schedule) both count the two together."""
    args = demo.sft_overrides(tmp_path, reading_steps, sft_steps)

    def value(flag: str) -> str:
        (i,) = [i for i, a in enumerate(args) if a == flag]
        return args[i + 1]

    assert value("--model.init_args.reading_steps") == str(reading)
    assert value("--trainer.max_steps") == value("--model.init_args.total_steps") == str(total)
    assert value("--model.init_args.export_dir") == str(tmp_path / "sft" / "policy")
    assert value("--trainer.logger.init_args.save_dir") == value("--trainer.default_root_dir") == str(tmp_path / "sft")
    assert "--trainer.max_steps" not in demo.sft_overrides(tmp_path, None, None)  # the config's own


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.mark.parametrize(("seed", "used"), [(["--seed", "0"], "0"), (["--seed", "5"], "5"), ([], "3")])
def test_the_grpo_stage_gets_the_seed_given_else_the_warm_starts(monkeypatch, tmp_path, seed, used):
    """``--seed`` seeds the GRPO stage and its data order, 0 included (not the warm start's 3); without it the
    warm start's seed; the stage searches the warm start's world."""
    source = _earlier_run(tmp_path / "earlier")
    (source / "sft" / "csv" / "config.yaml").write_text("seed_everything: 3\n")
    (args,) = stage_args(monkeypatch, ["--out", str(tmp_path / "out"), "--warm-start", str(source), *seed])
    assert _flag(args, "--seed_everything") == _flag(args, "--data.seed") == used
    world = source / "world"
    assert _flag(args, "--model.init_args.image_search.init_args.index") == str(world / "image_index.jsonl")
    assert _flag(args, "--model.init_args.text_search.init_args.corpus") == str(world / "corpus.jsonl")


def test_a_new_run_builds_its_world_and_warm_start_with_the_seed_given(monkeypatch, tmp_path):
    """``--seed 5``: the world is drawn from seed 5 (another world, README), and the warm start is seeded with it;
    ``--reading-steps`` reaches the warm start."""
    import mmsr.demo.world

    worlds = []
    monkeypatch.setattr(mmsr.demo.world, "build_world", lambda root, seed: worlds.append((root, seed)))
    (args,) = stage_args(monkeypatch, ["--out", str(tmp_path), "--seed", "5", "--reading-steps", "2"])
    assert worlds == [(tmp_path / "world", 5)]
    assert args[0] == "fit" and _flag(args, "--seed_everything") == _flag(args, "--data.seed") == "5"
    assert _flag(args, "--model.init_args.reading_steps") == "2"


@pytest.mark.parametrize("shaping", [["--reading-steps", "3"], ["--sft-steps", "3"], ["--reading-steps", "0"]])
def test_warm_start_options_beside_warm_start_are_refused(monkeypatch, tmp_path, capsys, shaping):
    """``--warm-start DIR`` reuses DIR's warm start: a step count for it would be ignored silently, so it is refused
    before anything runs, naming both options."""
    source = _earlier_run(tmp_path / "earlier")
    monkeypatch.setattr(demo, "run", lambda *a: pytest.fail("the demo started"))
    with pytest.raises(SystemExit) as exc:
        demo.main(["--out", str(tmp_path / "out"), "--warm-start", str(source), *shaping])
    assert exc.value.code == 2
    assert "--reading-steps and --sft-steps shape the warm start, which --warm-start reuses" in capsys.readouterr().err


def test_held_out_questions_take_the_kinds_in_turn():
    """``--eval-limit N`` keeps every kind measured: the first questions of each kind in turn, a kind that runs out
    skipped; no limit keeps all, in their order."""
    kinds = ["search_free", "search_free", "search_free", "image_search", "text_search", "text_search"]
    samples = [SimpleNamespace(category=k, name=i) for i, k in enumerate(kinds)]
    names = lambda limit: [s.name for s in demo.first_of_each_kind(samples, limit)]  # noqa: E731
    assert names(5) == [0, 3, 4, 1, 5]
    assert names(6) == [0, 3, 4, 1, 5, 2] and names(3) == [0, 3, 4]
    assert names(0) == [] and demo.first_of_each_kind(samples, None) is samples


# Seven held-out questions and the episodes a stub policy plays on them, listed out of the questions' order
# (``samples[t.group_id]`` is an episode's question): (kind, ground truth, tools called, answer given).
QUESTIONS = [("search_free", "a", (), "a"), ("image_search", "b", ("image_search", "text_search"), "b"),
             ("search_free", "c", ("text_search",), "x"), ("text_search", "d", ("text_search",), "d"),
             ("search_free", "e", (), "e"), ("image_search", "f", ("image_search",), "y"),
             ("search_free", "g", (), "g")]  # fmt: skip
ORDER = [1, 0, 3, 2, 5, 4, 6]  # the group ids of the episodes in the order the loop returns them


def _episode(group_id: int, tools: tuple[str, ...], answer: str) -> Trajectory:
    turns = [Turn(f"<{tool}>", ImageSearch() if tool == "image_search" else TextSearch("q"), (i, i + 1),
                  tool_call=ToolCall(tool, "q", ToolResult("found"))) for i, tool in enumerate(tools)]  # fmt: skip
    turns.append(Turn(f"<answer>{answer}</answer>", Answer(answer), (len(tools), len(tools) + 1)))
    n = len(turns) + 1
    return Trajectory(f"s{group_id}", group_id, [0] * n, [0] + [1] * len(turns), [0.0] * n, [], 1, turns, "answer")


def _correct(trajectory: Trajectory, sample: Sample) -> float:
    return float(trajectory.turns[-1].action.text == sample.ground_truth)


class StubModule:
    """What ``evaluate`` and ``held_out_records`` use of a GRPO module: a loop that plays the given episodes
    (recording what it was asked and whether the model was in train mode), a reward that scores an answer 1 if it
    is the ground truth, and rewards of that minus 0.25 a search (distinct episodes, distinct rewards)."""

    def __init__(self, episodes: list[Trajectory]):
        self.model, self.episodes, self.requests = torch.nn.Linear(1, 1), episodes, []
        self.loop = SimpleNamespace(run=self.run, settings=RolloutSettings())
        self.reward = SimpleNamespace(details=lambda t, s: {"correct": _correct(t, s)})

    def run(self, samples, n, params):
        self.requests.append((samples, n, params, self.model.training))
        return self.episodes

    def compute_rewards(self, trajectories, samples):
        return torch.tensor([_correct(t, samples[t.group_id]) - 0.25 * t.num_tool_calls for t in trajectories])


def _held_out() -> tuple[list[Sample], list[Trajectory]]:
    samples = [Sample(f"s{i}", f"q{i}?", None, truth, category=kind) for i, (kind, truth, _, _) in enumerate(QUESTIONS)]
    return samples, [_episode(g, *QUESTIONS[g][2:]) for g in ORDER]


@pytest.mark.parametrize("training", [True, False])
def test_the_evaluation_is_greedy_and_measures_each_kind_over_its_own_episodes(training):
    """One greedy episode a question (temperature 0, the turn budget given), the model in eval mode for it and
    back in the mode it was in; each kind's accuracy over that kind's episodes, its search ratio the share of them
    that searched at all, the image and text ratios each its own tool's, and ``all`` over every episode."""
    samples, episodes = _held_out()
    module = StubModule(episodes)
    module.model.train(training)
    result, trajectories = demo.evaluate(module, samples, 7)
    ((asked, n, params, was_training),) = module.requests
    assert asked == samples and n == 1 and (params.temperature, params.max_tokens) == (0.0, 7)
    assert not was_training and module.model.training is training and trajectories is episodes
    metrics = ("accuracy", "search_ratio", "image_search_ratio", "text_search_ratio", "n")
    expected = {"search_free": (3 / 4, 1 / 4, 0.0, 1 / 4, 4), "image_search": (1 / 2, 1.0, 1.0, 1 / 2, 2),
                "text_search": (1.0, 1.0, 0.0, 1.0, 1), "all": (5 / 7, 4 / 7, 2 / 7, 3 / 7, 7)}  # fmt: skip
    assert result == {kind: pytest.approx(dict(zip(metrics, values))) for kind, values in expected.items()}


def test_held_out_records_are_the_first_episodes_of_each_kind_with_their_own_rewards():
    """The first three episodes of each kind (fewer where a kind has fewer), each with its own reward, its position
    among the episodes as index, advantage 0 (no group) and the reward's terms."""
    samples, episodes = _held_out()
    records = demo.held_out_records(StubModule(episodes), samples, episodes, 5, 20)
    got = [(r.sample_id, r.index, r.reward, r.advantage, r.correct, r.category, r.step, r.global_step) for r in records]
    assert got == [("s0", 1, 1.0, 0.0, True, "search_free", 5, 20), ("s2", 3, -0.25, 0.0, False, "search_free", 5, 20),
                   ("s4", 5, 1.0, 0.0, True, "search_free", 5, 20), ("s1", 0, 0.5, 0.0, True, "image_search", 5, 20),
                   ("s5", 4, -0.25, 0.0, False, "image_search", 5, 20),
                   ("s3", 2, 0.75, 0.0, True, "text_search", 5, 20)]  # fmt: skip
    assert [r.reward_terms for r in records] == [{"correct": float(r.correct)} for r in records]


def test_a_warm_started_run_records_both_evaluations_episodes(monkeypatch, tmp_path):
    """``run`` with a stub GRPO stage: the held-out records after GRPO are the final evaluation's episodes, numbered
    by training steps (not optimizer updates); a reused warm start is named and its seconds not counted again."""
    source = _earlier_run(tmp_path / "earlier")
    samples, warm = _held_out()
    final = [_episode(g, (), QUESTIONS[g][1]) for g in ORDER]  # after GRPO: every answer right, no search
    module = StubModule(warm)
    module.start_engine = lambda: None
    logs = tmp_path / "logs"
    logs.mkdir()

    def fit(model, datamodule):
        module.episodes = final

    trainer = SimpleNamespace(fit=fit, fit_loop=SimpleNamespace(total_batch_idx=4), global_step=20,
                              logger=SimpleNamespace(log_dir=str(logs)))  # fmt: skip
    monkeypatch.setattr(mmsr.cli, "lightning_cli", lambda *a, **k: SimpleNamespace(model=module, trainer=trainer,
                                                                                    datamodule=None))  # fmt: skip
    monkeypatch.setattr(demo, "load_samples", lambda path: samples)
    summary = demo.run(tmp_path / "out", 0, None, None, warm_start=source)
    assert summary["warm_start"]["all"]["accuracy"] == pytest.approx(5 / 7) and summary["grpo"]["all"]["accuracy"] == 1
    assert summary["warm_start_from"] == str(source) and set(summary["seconds"]) == {"grpo_and_eval", "total"}
    records = list(read_records(logs / HELD_OUT_FILE))
    assert [(r.step, r.global_step) for r in records] == [(0, 0)] * 6 + [(5, 20)] * 6
    assert [r.correct for r in records[6:]] == [True] * 6 and [r.reward for r in records[6:]] == [1.0] * 6
    assert [r.correct for r in records[:6]] == [True, False, True, True, False, True]


def test_run_checks_a_warm_start_folder_itself(monkeypatch, tmp_path):
    """``run`` called directly (not through ``main``) names a warm-start folder that lacks the warm start."""
    monkeypatch.setattr(mmsr.cli, "lightning_cli", lambda *a, **k: pytest.fail("the GRPO stage was built"))
    with pytest.raises(FileNotFoundError, match="is not a demo run folder"):
        demo.run(tmp_path / "out", 0, None, None, warm_start=tmp_path / "missing")


def test_a_folder_in_place_of_a_warm_start_file_is_named(tmp_path):
    """A directory where the policy's weights should be is no warm start: it is named as missing."""
    source = _earlier_run(tmp_path / "earlier")
    weights = source / "sft" / "policy" / "model.safetensors"
    weights.unlink()
    weights.mkdir()
    with pytest.raises(FileNotFoundError, match=f"no {weights}\\)"):
        demo.reused(source)


def test_a_yaml_error_without_a_position_is_named_in_one_line():
    """An error yaml raises without a mark (a reader's, an emitter's) is given by its first line."""
    assert demo.yaml_problem(yaml.YAMLError("cannot read\nmore detail")) == "cannot read"
    assert demo.yaml_problem(yaml.YAMLError()) == "YAMLError"
