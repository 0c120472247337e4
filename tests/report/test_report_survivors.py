"""What ``mmsr report`` does that a mutation audit found untested: which trajectories it keeps, the plot titles it
reads from a run's config, how it fails on bad files, and how the page lays out observations and held-out kinds."""

import inspect
import re
from dataclasses import replace

import pytest
import yaml

from mmsr.report import cli
from mmsr.report.cli import accuracy_title, write_report
from mmsr.report.html import observation, render_html
from mmsr.report.records import ToolCallRecord, TurnRecord, write_records
from mmsr.reward.judged import JudgedReward
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
