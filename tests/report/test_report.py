"""``mmsr report RUN_DIR`` on a real run: a self-contained page, checked in a headless browser."""

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from mmsr.cli import main
from mmsr.report.cli import write_report
from mmsr.report.records import read_records
from tests.conftest import optional_missing

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


class Page(HTMLParser):
    """The parts of the report page the tests look at."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.trajectories: list[dict[str, str]] = []
        self.images: list[dict[str, str]] = []
        self.urls: list[str] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if "trajectory" in a.get("class", "").split():
            self.trajectories.append(a)
        if tag == "img":
            self.images.append(a)
        self.urls += [v for k, v in a.items() if k in ("src", "href")]

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def report(run_dir) -> Path:
    main(["report", str(run_dir)])
    return run_dir / "report" / "index.html"


def test_report_command_writes_the_page_and_the_plots(report):
    assert report.exists()
    for name in ("reward", "accuracy", "search_ratio", "response_length"):
        with Image.open(report.parent / f"{name}.png") as im:
            assert im.format == "PNG"


def test_page_is_self_contained_and_holds_every_trajectory(report, run_dir):
    records = list(read_records(run_dir / "trajectories.jsonl"))
    page = Page(report.read_text())
    assert [(a["id"], a["data-sample-id"]) for a in page.trajectories] == [(f"step{r.step}-traj{r.index}", r.sample_id) for r in records]
    assert all(u.startswith("data:image/") for u in page.urls)  # nothing to fetch: works offline
    thumbnails = sum(len(t.tool.images) for r in records for t in r.turns if t.tool)
    assert len(page.images) == 4 + len(records) + thumbnails  # plots, question images, tool results
    text = "".join(page.text)
    assert all(r.question in text and r.turns[-1].text in text for r in records)


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


def headless(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}",
    ]  # fmt: skip
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120, check=True)


def test_headless_browser_shows_the_trajectories(report, run_dir, tmp_path):
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        optional_missing("no chromium on PATH (apt-get install -y chromium); CI installs it")
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
