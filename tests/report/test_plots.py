"""metrics.csv -> curves -> PNG plots."""

import pytest
import yaml
from PIL import Image

from mmsr.report.plots import PLOTS, curves_for, kinds_in, plot_run, read_metrics

# Sparse like CSVLogger output: each row holds only the metrics logged in that call.
CSV = """epoch,reward/mean,reward/accuracy,rollout/search_ratio/any,rollout/search_ratio/any/fvqa,step,train/loss
0,0.5,0.25,,,0,
0,,,0.75,1.0,0,0.3
0,0.7,0.5,0.5,0.5,1,0.2
"""


def test_sparse_rows_become_one_curve_per_metric(tmp_path):
    (tmp_path / "metrics.csv").write_text(CSV)
    curves = read_metrics(tmp_path / "metrics.csv")
    assert set(curves) == {"reward/mean", "reward/accuracy", "rollout/search_ratio/any", "rollout/search_ratio/any/fvqa", "train/loss"}
    assert (curves["reward/mean"].steps, curves["reward/mean"].values) == ([0, 1], [0.5, 0.7])
    assert (curves["train/loss"].steps, curves["train/loss"].values) == ([0, 1], [0.3, 0.2])
    search = next(s for s in PLOTS if s.name == "search_ratio")
    # The per-source curve joins the plot through the prefix; absent image/text curves are skipped.
    assert [c.name for c in curves_for(search, curves)] == ["rollout/search_ratio/any", "rollout/search_ratio/any/fvqa"]


def test_plot_run_writes_only_plots_with_data(tmp_path):
    (tmp_path / "metrics.csv").write_text(CSV)
    pngs = plot_run(tmp_path / "metrics.csv", tmp_path / "out")
    assert set(pngs) == {"reward", "accuracy", "search_ratio"}  # no response-length metric logged
    for path in pngs.values():
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (640, 360)


def test_a_run_with_metrics_per_kind_gets_the_panels_first(tmp_path):
    # The CPU demo's kinds (reward/accuracy/<kind>, rollout/search_ratio/any/<kind>): demo.png's panels.
    (tmp_path / "metrics.csv").write_text(
        "reward/mean,reward/accuracy/search_free,reward/accuracy/text_search,rollout/search_ratio/any/search_free,step\n"
        "0.5,1.0,0.0,1.0,0\n0.7,1.0,0.5,0.0,1\n"
    )
    assert kinds_in(read_metrics(tmp_path / "metrics.csv")) == ("search_free", "text_search")
    pngs = plot_run(tmp_path / "metrics.csv", tmp_path / "out")
    assert list(pngs)[:2] == ["kinds", "reward"]
    with Image.open(pngs["kinds"]) as im:
        assert im.format == "PNG" and im.size == (1430, 396)  # three panels, 13 x 3.6 in at 110 dpi


def test_a_data_source_and_a_category_of_one_name_have_their_own_legend_labels(tmp_path, monkeypatch):
    """Category ``search_free`` and source ``mmsearch_r1/search_free``: both curves were labelled by the key's last
    part, ``search_free``."""
    from mmsr.report import plots

    (tmp_path / "metrics.csv").write_text(
        "reward/mean,reward/accuracy/search_free,reward/accuracy/data_source/mmsearch_r1/search_free,"
        "rollout/search_ratio/any/search_free,rollout/search_ratio/any/data_source/mmsearch_r1/search_free,step\n"
        "0.5,0.9,0.1,0.0,1.0,0\n"
    )
    figures, close = [], plots.plt.close
    monkeypatch.setattr(plots.plt, "close", lambda fig: (figures.append(fig), close(fig)))
    plots.plot_panels(tmp_path / "metrics.csv", tmp_path / "kinds.png", ("search_free", "data_source/mmsearch_r1/search_free"))
    labels = [ax.get_legend_handles_labels()[1] for ax in figures[0].axes]
    assert labels == [["mean"], *[["search_free", "source: mmsearch_r1/search_free"]] * 2]


def test_held_out_columns_get_their_own_plots(tmp_path):
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,val/reward/accuracy,val/reward/accuracy/search_free,val/rollout/search_ratio/any,val/episodes\n"
        "0,0,0.5,1.0,0.2,4\n0,10,0.6,1.0,0.3,4\n"
    )
    pngs = plot_run(tmp_path / "metrics.csv", tmp_path / "out")
    assert set(pngs) == {"val_accuracy", "val_search_ratio"}  # none of the training plots: no training curve
    spec = next(s for s in PLOTS if s.name == "val_accuracy")
    assert [c.name for c in curves_for(spec, read_metrics(tmp_path / "metrics.csv"))] == [
        "val/reward/accuracy", "val/reward/accuracy/search_free"]


def test_bad_metrics_files_name_the_problem(tmp_path):
    (tmp_path / "a.csv").write_text("epoch,reward\n0,1\n")
    with pytest.raises(ValueError, match="no 'step' column"):
        read_metrics(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("step,reward/mean\n0,0.5\n1,oops\n")
    with pytest.raises(ValueError, match=r"b.csv:3: column 'reward/mean' holds 'oops'"):
        read_metrics(tmp_path / "b.csv")
    (tmp_path / "c.csv").write_text("step,reward/mean\n0,0.5\n,0.6\n")  # it blamed column 'reward/mean'
    with pytest.raises(ValueError, match=r"c.csv:3: column 'step' holds '', not a number"):
        read_metrics(tmp_path / "c.csv")


def test_a_step_logged_twice_keeps_its_later_value(tmp_path):
    # E.g. a run directory continued by something other than mmsr's resume, which drops such rows.
    (tmp_path / "metrics.csv").write_text("reward/mean,step\n0.1,0\n0.2,1\n0.9,1\n0.3,2\n")
    curve = read_metrics(tmp_path / "metrics.csv")["reward/mean"]
    assert (curve.steps, curve.values) == ([0, 1, 2], [0.1, 0.9, 0.3])


def test_what_a_kill_mid_write_leaves_is_skipped_with_a_warning(tmp_path):
    """A run killed while CSVLogger wrote: its last line has no newline (here cut before the ``step`` cell, and
    after it, mid-number), or the file is empty. The report read the torn row's ``step`` as float(None)."""
    path = tmp_path / "metrics.csv"
    for torn in ("0,0.9", "0.9,7,0.0"):  # columns: reward/mean, step, train/loss
        path.write_text("reward/mean,step,train/loss\r\n0.1,0,0.3\r\n0.2,1,0.25\r\n" + torn)
        with pytest.warns(UserWarning, match=r"metrics.csv: skipped its last line, torn by a kill"):
            curves = read_metrics(path)
        assert (curves["reward/mean"].steps, curves["reward/mean"].values) == ([0, 1], [0.1, 0.2])
        assert curves["train/loss"].values == [0.3, 0.25]
    path.write_text("reward/mean,step,train/loss\n0.1,0,0.3\n0.9\n0.2,1,0.25\n")  # a row without its step cell
    with pytest.warns(UserWarning, match=r"metrics.csv:3: skipped a row that ends before its 'step' cell"):
        assert read_metrics(path)["reward/mean"].values == [0.1, 0.2]
    path.write_text("")
    with pytest.warns(UserWarning, match="no complete line"):
        assert read_metrics(path) == {} and plot_run(path, tmp_path / "out") == {}


def _config(reward) -> str:
    init = {"policy": {"class_path": "mmsr.models.build.TinyQwen2_5_VL"}} | ({"reward": reward} if reward != "unset" else {})
    return yaml.safe_dump({"model": {"class_path": "mmsr.module.GRPOModule", "init_args": init}})


@pytest.mark.parametrize(("reward", "title"), [
    ("unset", "Accuracy (exact match)"),  # GRPOModule's default MMSearchR1Reward
    ({"class_path": "mmsr.reward.MMSearchR1Reward", "init_args": {"mode": "SubEM"}}, "Accuracy (SubEM: the answer contains a ground truth)"),
    ({"class_path": "mmsr.reward.judged.JudgedReward", "init_args": {"fallback": "SubEM"}},
     "Accuracy (LLM judge; SubEM where it gave no verdict)"),
    ({"class_path": "mmsr.reward.WeightedRewards", "init_args": {"rewards": []}}, "Accuracy (share of episodes the reward counts correct)"),
    (None, "Accuracy (exact match)"),  # reward: null, as LightningCLI writes the default
])  # fmt: skip
def test_the_accuracy_plot_is_titled_by_what_decided_correctness(tmp_path, monkeypatch, reward, title):
    """It said "Accuracy (exact match)" under SubEM and an LLM judge too; the report reads the run's config.yaml."""
    from mmsr.report import plots
    from mmsr.report.cli import write_report

    (tmp_path / "metrics.csv").write_text(CSV)
    (tmp_path / "config.yaml").write_text(_config(reward))
    titles, draw = {}, plots.plot

    def noting_titles(spec, curves, out):
        titles[spec.name] = spec.title
        return draw(spec, curves, out)

    monkeypatch.setattr(plots, "plot", noting_titles)
    write_report(tmp_path)
    assert titles["accuracy"] == title and titles["reward"] == "Reward"


def test_without_a_config_the_accuracy_plot_has_a_neutral_title():
    from mmsr.report.cli import accuracy_title

    neutral = "Accuracy (share of episodes the reward counts correct)"
    assert [accuracy_title(text) for text in (None, "", "model: [", "trainer: {}")] == [neutral] * 4
    assert next(s.title for s in PLOTS if s.name == "accuracy") == neutral  # plot_run's own, without titles
