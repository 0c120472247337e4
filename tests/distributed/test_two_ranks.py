"""Two CPU processes (gloo) under DDP and under ModelParallelStrategy (FSDP2) compute the same
updates as one process on the same data: same per-step loss, same final weights. The sharded
checkpoints of a 2-rank FSDP2 run resume on one rank and export / evaluate in one process."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

import mmsr.train.batch
import mmsr.train.update
from mmsr.checkpoint import load_weights
from mmsr.data.loaders import load_samples
from tests.conftest import subprocess_env
from tests.distributed.runs import ROOT, assert_same_weights, fitted

FVQA = ROOT / "data" / "fvqa_dev_20"
R = "<reason>r</reason>"
# the padded-token budget of a forward/backward, for 2 ranks cutting their episodes into unequal numbers of
# micro-batches (a rank pads with empty passes: ``rank_micro_batches``): 3 and 2 in DDP's first step (whole rows),
# 2 and 1, then 1 and 2 under FSDP2 (packed rows); the 1-rank run takes the same budget, its gradients summed alike
MICRO_BATCH_TOKENS = 2300


def script() -> dict[str, list[str]]:
    """Episode k of each prompt: right, wrong, image search then right, garbage (rewards differ)."""
    out = {}
    for s in load_samples(FVQA / "fvqa_dev.jsonl"):
        right, wrong = f"{R}<answer>{s.ground_truth}</answer>", f"{R}<answer>no idea</answer>"
        turns = [[right], [wrong], [f"{R}<search><img></search>", right], ["zzz"]]
        out |= {f"{s.id}#{k}": t for k, t in enumerate(turns)}
    return out


class CountRoutes(Callback):
    """Counts this rank's passes that share prefixes through the KV cache and through packed rows
    (``mmsr.train.batch``'s two routes), and records each cut of episodes into micro-batches as
    ``[packed, run]`` (``pack_by_tokens``' micro-batches, those ``rank_micro_batches`` runs after padding);
    writes them to ``out/routes_<rank>.json`` when the fit ends."""

    def __init__(self, out: str) -> None:
        self.out, self.counts = Path(out), {"cache": 0, "packed": 0}
        self.cuts: list[list[int]] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        for route, name in (("cache", "shared_logprobs"), ("packed", "packed_logprobs")):
            setattr(mmsr.train.batch, name, self._counted(route, getattr(mmsr.train.batch, name)))
        pack, ranked = mmsr.train.batch.pack_by_tokens, mmsr.train.update.rank_micro_batches

        def packed(*args, **kwargs):
            micros = pack(*args, **kwargs)
            self.cuts.append([len(micros)])
            return micros

        def padded(*args, **kwargs):
            micros = ranked(*args, **kwargs)
            self.cuts[-1].append(len(micros))
            return micros

        mmsr.train.batch.pack_by_tokens, mmsr.train.update.rank_micro_batches = packed, padded

    def _counted(self, route: str, fn):
        def counted(*args, **kwargs):
            self.counts[route] += 1
            return fn(*args, **kwargs)

        return counted

    def on_fit_end(self, trainer, pl_module) -> None:
        (self.out / f"routes_{trainer.global_rank}.json").write_text(json.dumps(self.counts | {"cuts": self.cuts}))


class RecordStart(Callback):
    """Writes what this rank starts training from to ``out/start_<rank>.pt`` (``on_train_start``: after a resume
    restored the checkpoint): the LightningModule's full weights (FSDP2's DTensor shards gathered) and the AdamW
    state of each parameter, keyed by the state-dict names a checkpoint stores them under."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_start(self, trainer, pl_module) -> None:
        full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
        names = {p: n for n, p in pl_module.named_parameters()}
        (optimizer,) = trainer.optimizers
        adam = {names[p]: {k: full(v).detach().clone() for k, v in s.items()} for p, s in optimizer.state.items()}
        weights = {k: full(v).detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"weights": weights, "adam": adam}, self.out / f"start_{trainer.global_rank}.pt")


def checkpoint_adam(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The AdamW state a ``ModelParallelStrategy`` distributed checkpoint holds (its ``optimizer_0``), per
    parameter name, read in this process without a process group (as ``mmsr.checkpoint.load_weights`` reads
    the weights)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    planner = _EmptyStateDictLoadPlanner(keys={"optimizer_0"})
    _load_state_dict(state, storage_reader=FileSystemReader(ckpt), planner=planner, no_dist=True)
    return state["optimizer_0"]["state"]


def routes(run_dir: Path, devices: int) -> list[dict]:
    return [json.loads((run_dir / f"routes_{r}.json").read_text()) for r in range(devices)]


def with_text_only_rank(tmp: Path, seed: int) -> Path:
    """FVQA dev as ``tmp/train.jsonl``, without the images of the two prompts rank 1 of 2 (2 prompts a rank,
    data ``seed``) rolls out in the first step: that rank's forwards have no image while rank 0's have, and
    the vision tower runs on both (``mmsr.models.policy.idle_vision_tower``; DDP failed the step, FSDP2 hung)."""
    from mmsr.data.datamodule import WholeBatchSampler

    rows = [json.loads(line) for line in (FVQA / "fvqa_dev.jsonl").read_text().splitlines()]
    text_only = WholeBatchSampler(2, len(rows), True, seed, 2, 1).order(0)[:2]
    for i, row in enumerate(rows):
        row["image"] = None if i in text_only else str(FVQA / row["image"])
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tmp / "train.jsonl"


def run(tmp: Path, devices: int, strategy, checkpoint: bool = False, max_steps: int = 2, extra: list[str] = (),
        count_routes: bool = False) -> Path:  # fmt: skip
    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    cfg["trainer"].update(max_steps=max_steps, devices=devices, strategy=strategy, default_root_dir=str(tmp),
                          use_distributed_sampler=False, enable_checkpointing=checkpoint, enable_progress_bar=False,
                          plugins=None, callbacks=[{"class_path": "mmsr.callbacks.trajectory_logger.TrajectoryLogger",
                                                    "init_args": {"every_n_steps": 1, "max_trajectories": 16}}])  # fmt: skip
    if count_routes:
        cfg["trainer"]["callbacks"].append({"class_path": f"{__name__}.CountRoutes", "init_args": {"out": str(tmp)}})
    if checkpoint:
        cfg["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
            "dirpath": str(tmp / "ckpt"), "every_n_train_steps": 1, "save_top_k": -1, "filename": "{step}",
            "save_last": True}})  # fmt: skip
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp)
    init = cfg["model"]["init_args"]
    init["engine"] = {"class_path": "mmsr.rollout.engine.ScriptedEngine", "init_args": {"script": script()}}
    init.update(export_dir=str(tmp / "hf"), entropy_coef=0.0, lr=1e-3, micro_batch_tokens=MICRO_BATCH_TOKENS)
    cfg["data"].update(prompts_per_step=4 // devices, train_files=[str(with_text_only_rank(tmp, cfg["data"].get("seed", cfg["seed_everything"])))])
    return fitted(tmp, cfg, extra=extra)


def losses(run_dir: Path, key: str = "train/policy_loss") -> list[float]:
    (f,) = run_dir.glob("csv/version_*/metrics.csv")
    return [float(r[key]) for r in csv.DictReader(f.open())]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    """The 1-rank run both strategies are compared with (the same for each: run once)."""
    return run(tmp_path_factory.mktemp("one"), 1, "auto", count_routes=True)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_equal_one(tmp_path, one_rank, strategy, request):
    """One process shares each group's prompt through the KV cache; FSDP2 ranks, where the cache cannot carry
    gradients, share it in packed rows (``mmsr.train.packed``), DDP ranks through the cache. The FSDP2 run
    is the recipes' (``sharded_run``: its sharded checkpoints change nothing it computes). In the first step
    rank 1's prompts are text-only (``with_text_only_rank``). The ranks cut their episodes into unequal numbers of
    micro-batches (``MICRO_BATCH_TOKENS``) and pad to as many passes: unpadded, DDP failed the step."""
    one = one_rank
    two = run(tmp_path / "two", 2, "ddp", count_routes=True) if strategy == "ddp" else request.getfixturevalue("sharded_run")
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    # counts are the step's totals and ratios over every rank's calls (a mean over ranks halved the counts)
    for key in ("tools/image_search_calls", "tools/text_search_calls", "tools/failure_rate", "reward/accuracy"):
        assert losses(two, key) == pytest.approx(losses(one, key)), key
    assert_same_weights(one, two)
    (alone,) = routes(one, 1)
    assert alone["cache"] > 0 and alone["packed"] == 0
    route = "cache" if strategy == "ddp" else "packed"
    assert all(r[route] > 0 and r["cache"] + r["packed"] == r[route] for r in routes(two, 2))
    cuts = [r["cuts"] for r in routes(two, 2)]
    assert [n for _, n in cuts[0]] == [n for _, n in cuts[1]]  # every rank runs as many passes
    assert any(a != b for (a, _), (b, _) in zip(*cuts))  # though some cut packed fewer micro-batches on a rank


def fsdp(n: int, strategy: str = "lightning.pytorch.strategies.ModelParallelStrategy") -> dict:
    return {"class_path": strategy, "init_args": {"data_parallel_size": n, "tensor_parallel_size": 1}}


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """A 2-rank FSDP2 run with the recipes' atomic strategy: a sharded checkpoint after every step,
    and ``last.ckpt`` saved again every step (the old directory replaced by the new one)."""
    return run(tmp_path_factory.mktemp("two"), 2, fsdp(2, "mmsr.checkpoint.AtomicModelParallelStrategy"), checkpoint=True,
               count_routes=True)  # fmt: skip


@pytest.mark.slow
def test_sharded_checkpoint_resumes_on_one_rank(tmp_path, sharded_run):
    """An FSDP2 run on 2 ranks writes a sharded (distributed) checkpoint; a 1-rank run resumes from it: it starts
    from the checkpoint's weights and AdamW state (two updates' moments), not fresh ones, at step 3."""
    two = sharded_run
    (ckpt,) = (two / "ckpt").glob("step=2*")
    assert ckpt.is_dir()  # a distributed checkpoint: one shard file per rank plus metadata
    record = {"class_path": f"{__name__}.RecordStart", "init_args": {"out": str(tmp_path / "one")}}
    one = run(tmp_path / "one", 1, fsdp(1), max_steps=3, extra=["--ckpt_path", str(ckpt), "--trainer.callbacks+",
                                                                json.dumps(record)])  # fmt: skip
    assert len(losses(one)) == 1  # resumed at step 2, trained step 3 only
    start, saved, adam = torch.load(one / "start_0.pt"), load_weights(ckpt), checkpoint_adam(ckpt)
    off = [k for k in saved if not torch.equal(start["weights"][k], saved[k])]
    assert start["weights"].keys() == saved.keys() and not off, off  # the step-2 weights, gathered from 2 shards
    assert start["adam"].keys() == adam.keys() == saved.keys() - {"model.lm_head.weight"}  # tied to the embeddings
    for name, state in adam.items():  # a fresh AdamW has no state at all; a reset one, step 0 and zero moments
        assert start["adam"][name].keys() == state.keys() and float(state["step"]) == 2, name
        assert all(torch.equal(start["adam"][name][k], v) for k, v in state.items()), name
    # rank 0's prompts of steps 1-2 (only rank 0 logs): the sampler's position counted one rank's share, and
    # the one rank went on from the 5th index of its own order, rolling out 4 prompts trained in this epoch
    seen, resumed = ({json.loads(line)["sample_id"] for line in next(d.glob("csv/version_*/trajectories.jsonl")).open()}
                     for d in (two, one))  # fmt: skip
    assert len(seen) == len(resumed) == 4 and not seen & resumed
    a, b = load_file(two / "hf" / "model.safetensors"), load_file(one / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # it went on training


@pytest.mark.slow
def test_sharded_checkpoint_exports_and_evaluates_in_one_process(tmp_path, sharded_run, monkeypatch):
    """``mmsr export`` reads the 2-rank sharded ``last.ckpt`` directory without a process group: the
    exported policy's weights and log-probs equal those of the run's own export at train end (the
    same weights, gathered by FSDP2 there); ``mmsr eval --ckpt DIR`` runs on it."""
    from mmsr.eval.cli import main as evaluate
    from mmsr.models.build import PretrainedPolicy

    ckpt = sharded_run / "ckpt" / "last.ckpt"
    names = sorted(p.name for p in ckpt.parent.iterdir())  # last.ckpt replaced whole, no temporaries left
    assert (ckpt / "meta.pt").is_file() and names == ["last.ckpt", "step=1.ckpt", "step=2.ckpt"]
    proc = subprocess.run([sys.executable, "-m", "mmsr", "export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    mine, theirs = load_file(tmp_path / "hf" / "model.safetensors"), load_file(sharded_run / "hf" / "model.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    a, b = PretrainedPolicy(str(tmp_path / "hf")).build(), PretrainedPolicy(str(sharded_run / "hf")).build()
    ids = torch.tensor([a.tokenizer.encode("<|im_start|>user\nWhere is this?<|im_end|>\n<|im_start|>assistant\n")])
    with torch.no_grad():
        la, lb = (torch.log_softmax(p.forward(ids, torch.ones_like(ids), p.position_ids(ids[0], [])[:, None], []).logits, -1)
                  for p in (a, b))  # fmt: skip
    torch.testing.assert_close(la, lb, atol=1e-6, rtol=0)
    monkeypatch.chdir(ROOT)  # the run's config names data and tokenizer texts relative to the repository
    summary = evaluate(["--ckpt", str(ckpt), "--data", str(FVQA / "fvqa_dev.jsonl"), "--limit", "2", "--out", str(tmp_path / "eval")])
    assert summary["fvqa_dev"]["on-demand"]["all"]["n"] == 2
