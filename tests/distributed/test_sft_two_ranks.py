"""The warm start on two CPU processes (gloo, plain DDP: no find_unused_parameters) trains what one process trains
on the same prompts: reading steps split over the ranks (3 texts: one rank reads two, the other one; 1 text: one
rank reruns it at zero weight; text-only, they run the vision tower at zero weight, so DDP gets every gradient),
then the token-mean over both ranks' teacher tokens, with as many passes on each rank although one rank's episodes
pack into more micro-batches than the other's (unequal passes hang DDP's all-reduce)."""

import csv
import json
import subprocess
from pathlib import Path

import pytest

from mmsr.data.jsonl import read_jsonl
from mmsr.data.loaders import load_samples
from mmsr.data.sample import Sample
from tests.distributed.runs import ROOT, assert_same_weights, fit

DATA = "data/fvqa_dev_20/fvqa_dev.jsonl"
CORPUS = "data/fvqa_dev_20/search/corpus.jsonl"


class LongFor:
    """A teacher that answers at once, with a ~300-token reason for the samples ``long_ids``."""

    def __init__(self, long_ids: list[str]) -> None:
        self.long_ids = set(long_ids)

    def turns(self, sample: Sample) -> list[str]:
        reason = " ".join(["the photo shows it"] * 75) if sample.id in self.long_ids else "It is known."
        return [f"<reason>{reason}</reason><answer>{sample.ground_truth}</answer>"]


class Pages:
    """Reading batches of 3 pages, then of 1 (a rank left without a page, on 2 ranks)."""

    def __init__(self, files: list[str]) -> None:
        self.pages = [f"title: {r['title']}\n{r['text'][:400]}\n" for _, r in read_jsonl(ROOT / files[0])]

    def batch(self, step: int) -> list[str]:
        return self.pages[:3] if step == 0 else self.pages[3:4]


def held_out(tmp: Path, rows: int = 5) -> Path:
    """The last ``rows`` dev prompts as a held-out file (images by absolute path): 5 split 3 / 2 over two
    ranks, so one rank validates two batches, the other one."""
    lines = (ROOT / DATA).read_text().splitlines()[-rows:]
    records = [json.loads(line) | {"image": str((ROOT / DATA).parent / json.loads(line)["image"])} for line in lines]
    path = tmp / "held_out.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run(tmp: Path, devices: int, strategy: str | None = None) -> subprocess.CompletedProcess:
    # steps 0 and 1 read; unshuffled, rank r takes prompts r, r + 2, ...: step 2 gives rank 0 prompts 8 and 10
    # (short: one micro-batch), rank 1 prompts 9 and 11 (11 long: two); one process takes all four. Held-out
    # prompts are validated after step 2 (and in the sanity check before step 0).
    long_id = load_samples(ROOT / DATA)[11].id
    policy = {"class_path": "mmsr.models.build.TinyQwen2_5_VL", "init_args": {
        "tokenizer_texts": [DATA], "scaffold": {"class_path": "mmsr.demo.tokenizer.Scaffold"}, "hidden_size": 32,
        "num_layers": 1, "vision_depth": 1, "seed": 0}}  # fmt: skip
    strategy = strategy or ("ddp" if devices > 1 else "auto")  # plain DDP: find_unused_parameters off
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": devices, "strategy": strategy, "max_steps": 3,
                    "log_every_n_steps": 1, "enable_model_summary": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "use_distributed_sampler": False, "default_root_dir": str(tmp),
                    "val_check_interval": 3,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp), "name": "csv", "version": ""}}},
        "model": {"class_path": "mmsr.sft.SFTModule", "init_args": {
            "policy": policy, "teacher": {"class_path": f"{__name__}.LongFor", "init_args": {"long_ids": [long_id]}},
            "rollout": {"max_tokens_per_turn": 1024, "max_context_tokens": 4096}, "micro_batch_tokens": 4096,
            "lr": 1e-3, "export_dir": str(tmp / "hf"), "reading_steps": 2,
            "reading": {"class_path": f"{__name__}.Pages", "init_args": {"files": [CORPUS]}}}},
        "data": {"train_files": [DATA], "val_files": [str(held_out(tmp))], "prompts_per_step": 4 // devices, "shuffle": False},
    }  # fmt: skip
    return fit(tmp, cfg, timeout=300)


def trained(tmp: Path, devices: int) -> Path:
    proc = run(tmp, devices)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp


def logged(run_dir: Path, key: str) -> list[float]:
    return [float(r[key]) for r in csv.DictReader((run_dir / "csv" / "metrics.csv").open()) if r.get(key)]


@pytest.mark.slow
def test_two_rank_warm_start_equals_one(tmp_path):
    one, two = trained(tmp_path / "one", 1), trained(tmp_path / "two", 2)
    reading = [logged(r, "reading/loss")[:2] for r in (one, two)]  # Lightning repeats the last value at step 2
    assert reading[1] == pytest.approx(reading[0], abs=1e-5) and reading[0][0] != reading[0][1]
    assert logged(two, "sft/tokens") == logged(one, "sft/tokens")  # every rank's tokens in the mean
    assert logged(two, "sft/loss") == pytest.approx(logged(one, "sft/loss"), abs=1e-5)
    assert_same_weights(one, two)
    # the held-out NLL of both ranks' episodes after step 2, as one process computes it
    assert len(logged(one, "val/sft_loss")) == 1 and logged(two, "val/sft_tokens") == logged(one, "val/sft_tokens")
    assert logged(two, "val/sft_loss") == pytest.approx(logged(one, "val/sft_loss"), abs=1e-5)


@pytest.mark.slow
def test_reading_under_ddp_on_one_rank_is_refused_at_start(tmp_path):
    """Alone, a text-only forward leaves the vision tower out (no rank waits for it): plain DDP on one device would
    fail at the next step's forward with a message naming neither reading nor the key; the warm start refuses it
    before its first step, naming the strategies to set."""
    proc = run(tmp_path, 1, strategy="ddp")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].endswith("set trainer.strategy: auto or ddp_find_unused_parameters_true")
    assert not (tmp_path / "csv" / "metrics.csv").exists() or not logged(tmp_path, "reading/loss")


class CutAndSearch:
    """Answers at once, but with a ~300-token reason for row ``long_id`` (cut at the turn budget) and after a web search
    for row ``search_id`` (two turns)."""

    def __init__(self, long_id: str, search_id: str) -> None:
        self.long_id, self.search_id = long_id, search_id

    def turns(self, sample: Sample) -> list[str]:
        reason = " ".join(["the photo shows it"] * 75) if sample.id == self.long_id else "It is known."
        answer = f"<reason>{reason}</reason><answer>{sample.ground_truth}</answer>"
        search = "<reason>I search.</reason><text_search> the tower</text_search>"
        return [search, answer] if sample.id == self.search_id else [answer]


def counted(tmp: Path, devices: int) -> subprocess.CompletedProcess:
    # step 0 reads the 3 pages (249, 287 and 273 tokens): one process splits them into 3 passes of the 500-token
    # budget, rank 0 its two into 2, rank 1 its one into 1 (and reruns it at zero weight). Step 1, unshuffled, gives
    # rank 0 prompts 4 and 6 (one turn each), rank 1 prompts 5 (cut at 64 tokens) and 7 (two turns); one process
    # takes all four.
    rows = load_samples(ROOT / DATA)
    policy = {"class_path": "mmsr.models.build.TinyQwen2_5_VL", "init_args": {
        "tokenizer_texts": [DATA], "scaffold": {"class_path": "mmsr.demo.tokenizer.Scaffold"}, "hidden_size": 32,
        "num_layers": 1, "vision_depth": 1, "seed": 0}}  # fmt: skip
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto", "max_steps": 2,
                    "log_every_n_steps": 1, "enable_model_summary": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "use_distributed_sampler": False, "default_root_dir": str(tmp),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp), "name": "csv", "version": ""}}},
        "model": {"class_path": "mmsr.sft.SFTModule", "init_args": {
            "policy": policy, "teacher": {"class_path": f"{__name__}.CutAndSearch",
                                          "init_args": {"long_id": rows[5].id, "search_id": rows[7].id}},
            "rollout": {"max_tokens_per_turn": 64, "max_context_tokens": 4096}, "micro_batch_tokens": 500,
            "reading_steps": 1, "reading": {"class_path": f"{__name__}.Pages", "init_args": {"files": [CORPUS]}}}},
        "data": {"train_files": [DATA], "prompts_per_step": 4 // devices, "shuffle": False},
    }  # fmt: skip
    proc = fit(tmp, cfg, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_two_rank_episode_counts_and_warnings_are_every_ranks(tmp_path):
    """``rollout/turns``, ``sft/truncated_episodes`` and ``sft/unfinished_episodes`` were rank 0's alone, and so was the
    warning of a cut teacher turn: a cut on rank 1 was neither counted nor warned. They are over every rank's
    episodes now, warned by the rank that saw it; a reading step's texts over ``micro_batch_tokens`` split into as
    many passes on each rank (unequal passes hang DDP), for the loss one process computes."""
    one, two = counted(tmp_path / "one", 1), counted(tmp_path / "two", 2)
    for key, value in {"rollout/turns": 1.25, "sft/truncated_episodes": 0.25, "sft/unfinished_episodes": 0.25}.items():
        assert logged(tmp_path / "two", key) == logged(tmp_path / "one", key) == [value], key
    assert logged(tmp_path / "two", "reading/loss")[:1] == pytest.approx(logged(tmp_path / "one", "reading/loss")[:1], abs=1e-5)
    for proc in (one, two):
        assert "was cut at rollout.max_tokens_per_turn=64" in proc.stderr
