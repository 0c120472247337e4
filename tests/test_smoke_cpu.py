"""A real `mmsr fit -c configs/smoke.yaml` in a subprocess: it trains, logs and checkpoints."""

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmsr.cli import ADVERTS, NOT_APPLICABLE
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_fit_subprocess(tmp_path):
    cmd = [sys.executable, "-m", "mmsr", "fit", "-c", "configs/smoke.yaml", "--trainer.max_steps", "4",
           "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)]  # fmt: skip
    env = subprocess_env()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # none of the Lightning warnings that do not apply to mmsr (all but one are raised here unless silenced)
    assert not [line for line in proc.stderr.splitlines() if any(re.search(m, line) for m in NOT_APPLICABLE)]
    assert not [line for line in (proc.stdout + proc.stderr).splitlines() if any(re.search(m, line) for m in ADVERTS)]
    (metrics_file,) = tmp_path.glob("csv/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics_file.open()))
    assert len(rows) == 4
    for key in ["reward/mean", "reward/format", "rollout/search_ratio/any", "train/grad_norm", "train/kl",
                "train/entropy", "timing/rollout", "timing/train", "timing/sync", "rollout/tokens_per_s", "train/lr",
                "reward/zero_std_groups"]:  # fmt: skip
        assert rows[-1][key] != "", key
    run_dir = metrics_file.parent
    assert (run_dir / "config.yaml").is_file()
    assert len((run_dir / "trajectories.jsonl").read_text().splitlines()) == 4 * 8  # every step, 8 sampled
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4 and ckpt["optimizer_states"]
    # Parameters changed: compare with the identically seeded initial model.
    sys.path.insert(0, str(ROOT))
    from mmsr.demo.tokenizer import Scaffold
    from mmsr.models.build import TinyQwen2_5_VL

    texts = [str(ROOT / "data/fvqa_dev_20/fvqa_dev.jsonl"), str(ROOT / "data/fvqa_dev_20/search/corpus.jsonl")]
    initial = TinyQwen2_5_VL(tokenizer_texts=texts, scaffold=Scaffold(), seed=0).build().model.state_dict()
    trained = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    assert set(trained) == set(initial)
    changed = [k for k in initial if not torch.equal(initial[k], trained[k])]
    assert len(changed) > len(initial) // 2, changed
    # Export the checkpoint to a Hugging Face directory and reload it: same weights, same log-probs.
    from mmsr.export import export
    from mmsr.models.build import PretrainedPolicy

    out = export(run_dir / "checkpoints" / "last.ckpt", tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    assert "chat_template" in (out / "tokenizer_config.json").read_text() or (out / "chat_template.jinja").is_file()
    reloaded = PretrainedPolicy(str(out)).build()
    policy = TinyQwen2_5_VL(tokenizer_texts=texts, scaffold=Scaffold(), seed=0).build()
    policy.model.load_state_dict(trained)
    ids = torch.tensor([reloaded.tokenizer.encode("<|im_start|>user\nWhat is this?<|im_end|>")])
    with torch.no_grad():
        a = policy.forward(ids, torch.ones_like(ids), policy.position_ids(ids[0], [])[:, None], []).logits
        b = reloaded.forward(ids, torch.ones_like(ids), reloaded.position_ids(ids[0], [])[:, None], []).logits
    torch.testing.assert_close(torch.log_softmax(a, -1), torch.log_softmax(b, -1))
