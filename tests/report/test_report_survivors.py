"""What ``mmsr report`` does that a mutation audit found untested: which trajectories it keeps, the plot titles it
reads from a run's config, how it fails on bad files, how the page lays out observations, steps and held-out kinds,
which points of ``metrics.csv`` are drawn, and what a trajectory record keeps and reads back."""

import inspect
import math
import re
import warnings
from dataclasses import replace

import pytest
import yaml
from matplotlib.axes import Axes

from mmsr.data.sample import Sample
from mmsr.report import cli
from mmsr.report.cli import accuracy_title, write_report
from mmsr.report.html import observation, render_html, stage_names
from mmsr.report.plots import PLOTS, Curve, plot, plot_run, read_metrics
from mmsr.report.records import ToolCallRecord, TurnRecord, read_records, trajectory_record, write_records
from mmsr.reward.judged import JudgedReward
from mmsr.rollout.actions import Answer, TextSearch
from mmsr.rollout.trajectory import ToolCall, Trajectory, Turn
from mmsr.tools.base import ToolResult
from tests.report.browser import Page
from tests.report.test_held_out_kinds import _record as _held_out
from tests.report.test_page_sections import _record, _turn

NEUTRAL = "Accuracy (share of episodes the reward counts correct)"
SUBEM = {"class_path": "mmsr.reward.MMSearchR1Reward", "init_args": {"mode": "SubEM"}}
URI = "data:image/png;base64,AAAA"


def _config(model: dict) -> str:
    return yaml.safe_dump({"model": model})


def test_the_report_keeps_the_newest_trajectories(tmp_path):
    """``--max-trajectories 2`` of three steps' records shows steps 1 and 2: the most recent training, not the
    first records of the file."""
    write_records(tmp_path / "trajectories.jsonl", [replace(_record([_turn(0, None)]), step=s) for s in range(3)])
    page = write_report(tmp_path, max_trajectories=2).read_text()
    assert [a["id"] for a in Page(page).trajectories] == ["step1-traj0", "step2-traj0"]
    assert "(the 1 earliest omitted)" in page


def test_the_held_out_accuracy_plot_is_titled_held_out(tmp_path, monkeypatch):
    """The held-out accuracy plot is told apart from the training one: "Held-out accuracy (...)", lower-cased after
    the prefix, under the same matching rule."""
    titles = {}
    monkeypatch.setattr(cli, "plot_run", lambda metrics, out, given: titles.update(given) or {})
    (tmp_path / "metrics.csv").write_text("step,reward/accuracy\n0,0.5\n")
    config = _config({"class_path": "mmsr.module.GRPOModule", "init_args": {"reward": SUBEM}})
    (tmp_path / "config.yaml").write_text(config)
    write_report(tmp_path)
    assert titles == {"accuracy": "Accuracy (SubEM: the answer contains a ground truth)",
                      "val_accuracy": "Held-out accuracy (SubEM: the answer contains a ground truth)"}


JUDGED = "mmsr.reward.judged.JudgedReward"


@pytest.mark.parametrize("reward", [
    {"class_path": JUDGED}, {"class_path": JUDGED, "init_args": {"search_penalty": 0.2}}, JUDGED,
])  # fmt: skip
def test_a_judged_reward_without_a_fallback_is_titled_by_its_default(reward):
    """A config that leaves ``fallback`` out runs ``JudgedReward``'s default, exact match; the title names that
    default, whatever form the reward was given in."""
    assert inspect.signature(JudgedReward).parameters["fallback"].default == "EM"
    config = _config({"class_path": "mmsr.module.GRPOModule", "init_args": {"reward": reward}})
    assert accuracy_title(config) == "Accuracy (LLM judge; exact match where it gave no verdict)"


@pytest.mark.parametrize(("model", "title"), [
    ({"class_path": "mmsr.module.GRPOModule", "init_args": {"reward": SUBEM}},
     "Accuracy (SubEM: the answer contains a ground truth)"),
    ({"class_path": "my.project.MyModule", "init_args": {"reward": SUBEM}}, NEUTRAL),
    ({"class_path": "my.project.MyModule", "init_args": {}}, NEUTRAL),
])  # fmt: skip
def test_only_a_grpo_modules_reward_titles_the_accuracy_plot(model, title):
    """Another module class may read its reward otherwise and default to another: its config's ``reward`` (or
    the lack of one) says nothing sure of what decided correctness, so the title stays neutral."""
    assert accuracy_title(_config(model)) == title


@pytest.mark.parametrize(("model", "title"), [
    ({"reward": SUBEM}, "Accuracy (SubEM: the answer contains a ground truth)"),
    ({"reward": {"class_path": "mmsr.reward.judged.JudgedReward", "init_args": {"fallback": "SubEM"}}},
     "Accuracy (LLM judge; SubEM where it gave no verdict)"),
    ({"policy": {"class_path": "mmsr.models.build.TinyQwen2_5_VL"}}, "Accuracy (exact match)"),
])  # fmt: skip
def test_init_args_written_bare_are_read(model, title):
    """``mmsr fit`` may write the model's init args without a ``class_path``/``init_args`` wrapper: a
    ``GRPOModule`` (the default class) whose reward, or default reward, is read from them."""
    assert accuracy_title(_config(model)) == title


@pytest.mark.parametrize(("name", "text", "message"), [
    ("metrics.csv", "step,reward/mean\n0,0.5\n1,oops\n", "metrics.csv:3: column 'reward/mean' holds 'oops'"),
    ("trajectories.jsonl", '{"step": 0}\n', "trajectories.jsonl:1: not a trajectory record"),
])  # fmt: skip
def test_bad_run_files_end_the_command_with_a_message_not_a_traceback(tmp_path, capsys, name, text, message):
    """A damaged file is the user's to fix: ``mmsr report`` says which and where on its last line and exits 2,
    as argparse does for a bad argument."""
    (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as exc:
        cli.main([str(tmp_path)])
    assert exc.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("mmsr report: error: ") and message in last


def test_an_observation_with_more_markers_than_images_is_shown_without_them():
    """A record whose images are fewer than its text's markers (a file written by hand or by another version):
    the markers past the last image show nothing, and the page is still written (it raised IndexError)."""
    tool = ToolCallRecord("image_search", "", True, 0.1, 0.0, [], "a<image>b<image>c", [URI])
    assert observation(tool) == [("text", "a"), ("image", URI), ("text", "b"), ("text", "c")]
    turn = TurnRecord(0, "text 0", "image_search", "", (0, 1), False, tool)
    page = Page(render_html("run", [_record([turn])], {}))
    assert [i["src"] for i in page.images if "thumbnail" in i.get("class", "")] == [URI]


def test_whitespace_between_images_is_not_shown_as_text():
    """An image search's results are images with line breaks around them: no empty text block between them."""
    tool = ToolCallRecord("image_search", "", True, 0.1, 0.0, [], "<image>\n <image>\n", [URI, URI])
    assert observation(tool) == [("image", URI), ("image", URI)]


def test_held_out_episodes_are_grouped_by_question_kind_not_data_source():
    """The held-out section compares question kinds (``category``: search-free, search-required): each kind has
    its heading and its questions' rows, in the order first seen, whatever sources they came from; one without a
    category is under "none"."""
    rows = [("a", "free", "s1"), ("b", "required", "s1"), ("c", "free", "s2"), ("d", None, "s2")]
    records = [replace(_held_out(sid, cat), data_source=src, step=step) for step in (0, 5) for sid, cat, src in rows]
    html = render_html("run", [], {}, held_out=records)
    assert re.findall(r'<h3 class="kind" id="held-out-([^"]*)">', html) == ["free", "required", "none"]
    episodes = [(e.attrs["data-sample-id"], e.attrs["data-step"]) for e in Page(html).episodes]
    assert episodes == [("a", "0"), ("a", "5"), ("c", "0"), ("c", "5"), ("b", "0"), ("b", "5"), ("d", "0"), ("d", "5")]


def test_held_out_columns_run_from_before_grpo_to_after_it_in_step_order():
    """Whatever order the file holds them in, the held-out columns are the evaluated steps ascending: the first is
    headed "before GRPO", the last "after GRPO", a step between them by its number; each episode under its own."""
    records = [replace(_held_out("a", "free"), step=step) for step in (10, 0, 5)]
    html = render_html("run", [], {}, held_out=records)
    stages = re.findall(r'<div class="stage">([^<]*)</div>', html)
    assert stages == ["before GRPO (step 0)", "step 5 (step 5)", "after GRPO (step 10)"]
    episodes = [(e.attrs["data-step"], e.attrs["data-stage"]) for e in Page(html).episodes]
    assert episodes == [("0", "before GRPO"), ("5", "step 5"), ("10", "after GRPO")]
    assert "held-out episodes at steps 0, 5, 10." in html


def test_a_held_out_set_evaluated_at_one_step_is_not_called_before_or_after_grpo():
    """One evaluation (a run stopped before its second validation) compares nothing: its column is named by its
    step, not "before GRPO" nor "after GRPO", and the section's heading claims no before/after."""
    assert stage_names([3]) == ["step 3"]
    html = render_html("run", [], {}, held_out=[replace(_held_out("a", "free"), step=3)])
    assert re.findall(r'<div class="stage">([^<]*)</div>', html) == ["step 3 (step 3)"]
    assert [e.attrs["data-stage"] for e in Page(html).episodes] == ["step 3"]
    assert "GRPO" not in html


def test_training_steps_are_shown_in_ascending_order():
    """The page reads as the run went: its steps' sections ascend whatever the order of the records given."""
    records = [replace(_record([_turn(0, None)]), step=s) for s in (2, 0, 1)]
    html = render_html("run", records, {})
    assert re.findall(r'<h2 class="step">Step (\d+)</h2>', html) == ["0", "1", "2"]
    assert [a["id"] for a in Page(html).trajectories] == ["step0-traj0", "step1-traj0", "step2-traj0"]


@pytest.fixture
def drawn(monkeypatch) -> list[tuple[list, list, str]]:
    """What each ``Axes.plot`` call draws: its x values, y values and legend label (drawn as well, unchanged)."""
    calls = []
    draw = Axes.plot

    def record(ax, xs, ys, *args, **kwargs):
        calls.append((list(xs), list(ys), kwargs.get("label")))
        return draw(ax, xs, ys, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", record)
    return calls


def test_non_finite_values_are_left_out_of_a_plot(tmp_path, drawn):
    """A step whose metric is nan or inf (a diverged loss, a ratio of nothing) is not a point: matplotlib would
    break the line there or stretch the axis to infinity; the finite points are drawn, joined."""
    curve = Curve("reward/mean", [0, 1, 2, 3, 4], [0.5, math.nan, math.inf, -math.inf, 0.7])
    plot(PLOTS[0], [curve], tmp_path / "reward.png")
    assert drawn == [([0, 4], [0.5, 0.7], "reward/mean")]


def test_per_source_curves_follow_the_named_ones_sorted_by_name(tmp_path, drawn):
    """The search-ratio plot's legend lists its named curves, then the per-source ones sorted by name, whatever
    the order of the file's columns: the same source keeps its place (and colour) from run to run."""
    any_ = "rollout/search_ratio/any"
    (tmp_path / "metrics.csv").write_text(f"step,{any_}/zeta,{any_}/alpha,{any_}/mid,{any_}\n0,0.1,0.2,0.3,0.4\n")
    plot_run(tmp_path / "metrics.csv", tmp_path / "plots")
    assert [label for _, _, label in drawn] == [any_, f"{any_}/alpha", f"{any_}/mid", f"{any_}/zeta"]


def test_a_row_shorter_than_the_header_gives_no_points_for_its_missing_cells(tmp_path):
    """A row with fewer cells than the header (``csv`` fills the missing ones with ``None``) has points for the
    cells it has, none for those it lacks; it raised TypeError on ``float(None)``."""
    (tmp_path / "metrics.csv").write_text("step,a,b\n0,1.5\n1,2.5,3.5\n")
    curves = read_metrics(tmp_path / "metrics.csv")
    assert curves == {"a": Curve("a", [0, 1], [1.5, 2.5]), "b": Curve("b", [1], [3.5])}


def test_a_torn_metrics_file_keeps_exactly_its_complete_lines(tmp_path):
    """A kill mid-write tears only what follows the last newline: a complete file is read without a warning,
    and a torn one's warning shows the torn text alone (not the newline before it), its complete rows kept."""
    path = tmp_path / "metrics.csv"
    path.write_text("step,a\n0,1.5\n1,2.5\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_metrics(path) == {"a": Curve("a", [0, 1], [1.5, 2.5])}
    path.write_text("step,a\n0,1.5\n1,2.")
    with pytest.warns(UserWarning) as caught:
        assert read_metrics(path) == {"a": Curve("a", [0], [1.5])}
    assert [str(w.message).rsplit(": ", 1)[-1] for w in caught] == ["b'1,2.'"]


def _episode(context: list[str]) -> tuple[Trajectory, Sample]:
    """A two-turn episode, a text search then an answer, and its question."""
    search = Turn("<text_search>capital</text_search>", TextSearch("capital"), (3, 6),
                  tool_call=ToolCall("text_search", "capital", ToolResult("Paris is the capital", titles=("t",))))
    answer = Turn("<answer>Paris</answer>", Answer("Paris"), (9, 12))
    traj = Trajectory("s", 0, list(range(12)), [0] * 12, [0.0] * 12, [], 3, [search, answer], "answer", context=context)
    return traj, Sample("s", "capital of France?", None, "Paris", category="free")  # fmt: skip


def test_a_record_numbers_its_turns_from_0_and_keeps_the_trajectorys_context_notes():
    """``TurnRecord.index`` is the turn's position in ``Trajectory.turns`` (what the page's dropped-observation
    marks count from), and the context budget's notes are recorded: the page shows them with the episode."""
    notes = ["turn 1: text_search observation of 900 tokens, 500 left for it: cut to fit"]
    record = trajectory_record(*_episode(notes), step=0, global_step=0, index=0, reward=1.0, advantage=0.5,
                               reward_terms={"correct": 1.0})  # fmt: skip
    turns = [(t.index, t.action, t.argument) for t in record.turns]
    assert turns == [(0, "text_search", "capital"), (1, "answer", "Paris")]
    assert record.context == notes and record.correct is True


def test_a_reward_without_a_correct_term_records_correctness_as_unknown():
    """A reward that reports no ``correct`` term (no details) did not say the answer was wrong: ``correct`` is
    ``None``, which the page and the wandb table show as unknown, not as a wrong answer."""
    record = trajectory_record(*_episode([]), step=0, global_step=0, index=0, reward=1.0, advantage=0.0,
                               reward_terms={"format": 1.0})  # fmt: skip
    assert record.correct is None


def test_a_record_read_back_equals_the_record_written(tmp_path):
    """What ``mmsr report`` reads is what was written: the turns' spans come back as tuples (JSON has only lists),
    the context notes too; blank lines between records (a file joined or edited by hand) are skipped."""
    record = trajectory_record(*_episode(["a note"]), step=2, global_step=1, index=0, reward=1.0, advantage=0.5,
                               reward_terms={"correct": 1.0})  # fmt: skip
    other = replace(record, index=1)
    (tmp_path / "trajectories.jsonl").write_text(f"\n{record.to_json()}\n  \n{other.to_json()}\n\n")
    read = list(read_records(tmp_path / "trajectories.jsonl"))
    assert read == [record, other]
    assert read[0].turns[0].span == (3, 6) and read[0].context == ["a note"]
