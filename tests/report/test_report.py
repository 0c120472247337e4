"""``mmsr report RUN_DIR`` on a real run: a self-contained page, checked in a headless browser."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from mmsr.cli import main
from mmsr.report.cli import write_report
from mmsr.report.records import HELD_OUT_FILE, read_records, write_records
from tests.report.browser import Page, find_browser, headless


@pytest.fixture(scope="module")
def report(run_dir) -> Path:
    main(["report", str(run_dir)])
    return run_dir / "report" / "index.html"


def test_report_command_writes_the_page_and_the_plots(report):
    assert report.exists()
    for name in ("kinds", "reward", "accuracy", "search_ratio", "response_length"):
        with Image.open(report.parent / f"{name}.png") as im:
            assert im.format == "PNG"


def test_page_is_self_contained_and_holds_every_trajectory(report, run_dir):
    records = list(read_records(run_dir / "trajectories.jsonl"))
    page = Page(report.read_text())
    assert [(a["id"], a["data-sample-id"]) for a in page.trajectories] == [(f"step{r.step}-traj{r.index}", r.sample_id) for r in records]
    assert all(u.startswith("data:image/") for u in page.urls)  # nothing to fetch: works offline
    thumbnails = sum(len(t.tool.images) for r in records for t in r.turns if t.tool)
    assert len(page.images) == 5 + len(records) + thumbnails  # plots, question images, tool results
    text = "".join(page.text)
    assert all(r.question in text and r.turns[-1].text in text for r in records)
    assert "Held-out episodes" not in text  # the section needs held_out.jsonl


def test_model_text_is_escaped_not_rendered(run_dir, tmp_path):
    line = (run_dir / "trajectories.jsonl").read_text().splitlines()[0]
    row = json.loads(line)
    row["turns"][0]["text"] = "<script>alert(1)</script><b>bold</b>"
    (tmp_path / "trajectories.jsonl").write_text(json.dumps(row) + "\n")
    html = write_report(tmp_path).read_text()
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;&lt;b&gt;bold" in html
    assert "No metrics.csv" in html


def test_a_record_logged_twice_is_shown_once(run_dir, tmp_path):
    # A step logged again (a run directory continued other than by mmsr's resume): the later one wins.
    lines = (run_dir / "trajectories.jsonl").read_text().splitlines()
    again = [json.dumps({**json.loads(line), "reward": -1.0}) for line in lines[-2:]]
    (tmp_path / "trajectories.jsonl").write_text("\n".join(lines + again) + "\n")
    shown = Page(write_report(tmp_path).read_text()).trajectories
    assert [a["id"] for a in shown] == [f"step{r.step}-traj{r.index}" for r in read_records(run_dir / "trajectories.jsonl")]
    assert [float(a["data-reward"]) for a in shown[-2:]] == [-1.0, -1.0]


def test_bad_run_directories_are_reported_clearly(tmp_path, capsys):
    (tmp_path / "csv" / "version_0").mkdir(parents=True)
    (tmp_path / "csv" / "version_0" / "trajectories.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path)])
    assert exc.value.code == 2
    assert f"run directories below it: {tmp_path / 'csv' / 'version_0'}" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"trajectories.jsonl:1: not a trajectory record"):
        write_report(tmp_path / "csv" / "version_0")


def test_headless_browser_shows_the_trajectories(report, run_dir, tmp_path):
    browser = find_browser()
    records = list(read_records(run_dir / "trajectories.jsonl"))
    dom = headless(browser, tmp_path / "profile", "--dump-dom", report.as_uri()).stdout
    page = Page(dom)
    assert len(page.trajectories) == len(records) == 12  # 3 steps x 4 trajectories
    text = " ".join(page.text)
    for r in records:
        assert r.sample_id in text and r.question in text and f"{r.reward:.3f}" in text
    assert text.count("image_search") >= sum(t.action == "image_search" for r in records for t in r.turns)
    shot = tmp_path / "shot.png"
    headless(browser, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,2000", report.as_uri())
    with Image.open(shot) as im:  # the rendered page, not a blank or error page: plots and photos
        assert im.size == (1200, 2000) and len(im.convert("RGB").getcolors(1 << 24)) > 1000


def held_out_run(run_dir: Path, out: Path) -> list:
    """A copy of ``run_dir`` with ``held_out.jsonl``: its step-0 episodes as held-out questions of two
    kinds, evaluated before (step 0) and after (step 3, reward 0.5); the last question only before."""
    for name in ("metrics.csv", "trajectories.jsonl"):
        shutil.copy(run_dir / name, out / name)
    first = [r for r in read_records(run_dir / "trajectories.jsonl") if r.step == 0]
    before = [replace(r, sample_id=f"q{i}", category=("search_free", "image_search")[i % 2]) for i, r in enumerate(first)]
    after = [replace(r, step=3, reward=0.5) for r in before[:-1]]
    write_records(out / HELD_OUT_FILE, before + after)
    return before + after


def test_headless_browser_shows_held_out_episodes_before_and_after(run_dir, tmp_path):
    """Each kind gets a heading and a grid, one row per question: its episode before GRPO, then after
    (or a placeholder), each with its turns, search calls, result thumbnails and reward."""
    records = held_out_run(run_dir, tmp_path)
    dom = headless(find_browser(), tmp_path / "profile", "--dump-dom", write_report(tmp_path).as_uri()).stdout
    page = Page(dom)
    held = [e for e in page.episodes if e.held_out]
    stages = [(e.attrs["data-kind"], e.attrs["data-sample-id"], e.attrs["data-stage"]) for e in held]
    assert stages == [("search_free", "q0", "before GRPO"), ("search_free", "q0", "after GRPO"),
                      ("search_free", "q2", "before GRPO"), ("search_free", "q2", "after GRPO"),
                      ("image_search", "q1", "before GRPO"), ("image_search", "q1", "after GRPO"),
                      ("image_search", "q3", "before GRPO")]  # fmt: skip
    assert "not evaluated at this step" in "".join(page.text)  # q3 after GRPO
    by_key = {(r.sample_id, r.step): r for r in records}
    for e in held:
        r = by_key[(e.attrs["data-sample-id"], int(e.attrs["data-step"]))]
        assert len(e.turn_classes) == len(r.turns) and f"{r.reward:.3f}" in e.text
        assert sum(i.get("class") == "thumbnail" for i in e.images) == sum(len(t.tool.images) for t in r.turns if t.tool)
        assert all(i["src"].startswith("data:image/") for i in e.images)
    searched = [e for e in held if any("action-image_search" in c for c in e.turn_classes)]
    assert searched and all(any(i.get("class") == "thumbnail" for i in e.images) for e in searched)
    assert "7 held-out episodes at steps 0, 3" in " ".join(page.text)


def test_a_run_killed_mid_write_gets_its_report(run_dir, tmp_path, recwarn):
    """A kill tears the last line of ``trajectories.jsonl`` and of ``metrics.csv``: the report shows the complete
    records and curves (it refused the whole run directory); a bad line with its newline is still refused."""
    lines = (run_dir / "trajectories.jsonl").read_text(encoding="utf-8").splitlines()
    (tmp_path / "trajectories.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:100], encoding="utf-8")
    metrics = (run_dir / "metrics.csv").read_text()
    (tmp_path / "metrics.csv").write_text(metrics + metrics.splitlines()[-1][:7])
    assert main(["report", str(tmp_path)]) is None
    assert len(Page((tmp_path / "report" / "index.html").read_text()).trajectories) == len(lines)
    assert (tmp_path / "report" / "reward.png").exists()
    torn = sorted(str(w.message).split(":", 1)[0] for w in recwarn if "torn by a kill" in str(w.message))
    assert torn == [str(tmp_path / "metrics.csv"), str(tmp_path / "trajectories.jsonl")]
    (tmp_path / "trajectories.jsonl").write_text("\n".join([lines[0], lines[0][:100], lines[1]]) + "\n")
    with pytest.raises(ValueError, match=r"trajectories.jsonl:2: not a trajectory record"):
        write_report(tmp_path)
