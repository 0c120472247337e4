"""A warm start resumed from a checkpoint writes and trains on the teacher turns an uninterrupted one does:
checkpoints keep the teacher's draws (before, a resumed ``RAGTeacher`` redrew its direct answers from the seed),
and the held-out turns are drawn by a copy of the teacher as configured (before, a copy made at the first
validation, which a resume made later)."""

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from mmsr.demo.teacher import RAGTeacher
from mmsr.demo.tokenizer import Scaffold
from mmsr.models.build import TinyQwen2_5_VL
from mmsr.rollout.loop import RolloutSettings
from mmsr.sft import SFTModule
from mmsr.tools.local import LocalImageSearch
from tests.conftest import FVQA

STEPS, RESUME_AT = 4, 2


def warm_start(seen: list) -> SFTModule:
    """A tiny warm start whose teacher answers half the rows at once; ``seen`` gets, in order, every episode
    batch's turns (by sample id) and every step's (loss, token count)."""
    policy = TinyQwen2_5_VL(tokenizer_texts=[str(FVQA / "fvqa_dev.jsonl")], scaffold=Scaffold(), hidden_size=32,
                            num_layers=1, vision_depth=1, seed=0)  # fmt: skip
    module = SFTModule(policy, RAGTeacher(direct_answer_rate=0.5, seed=0), total_steps=STEPS,
                       image_search=LocalImageSearch(str(FVQA / "search" / "image_index.jsonl"), top_k=1),
                       rollout=RolloutSettings(max_rounds=2, max_tokens_per_turn=16, max_context_tokens=512))  # fmt: skip
    episodes, imitate = module._episodes, module._imitate
    module._episodes = lambda samples, turns: seen.append(sorted(turns.items())) or episodes(samples, turns)
    module._imitate = lambda trajs: seen.append(out := imitate(trajs)) or out
    return module


def fit(module: SFTModule, samples, tmp_path, ckpt_path=None) -> None:
    trainer = L.Trainer(accelerator="cpu", max_steps=STEPS, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=1, num_sanity_val_steps=0,
                        callbacks=[ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=1, save_top_k=-1)])  # fmt: skip
    # one batch an epoch: a checkpoint ends an epoch, so the resumed run starts on the next batch
    trainer.fit(module, DataLoader(samples[:4], batch_size=4, collate_fn=list),
                DataLoader(samples[4:6], batch_size=2, collate_fn=list), ckpt_path=ckpt_path)  # fmt: skip


def test_a_resumed_warm_start_trains_on_the_teacher_turns_of_an_uninterrupted_one(fvqa_samples, tmp_path):
    uninterrupted, resumed = [], []
    fit(warm_start(uninterrupted), fvqa_samples, tmp_path / "a")
    fit(warm_start(resumed), fvqa_samples, tmp_path / "b", ckpt_path=tmp_path / "a" / f"step={RESUME_AT}.ckpt")
    # per step: the training turns, (loss, tokens), the held-out turns
    assert len(uninterrupted) == 3 * STEPS and len(resumed) == 3 * (STEPS - RESUME_AT)
    assert resumed == uninterrupted[3 * RESUME_AT :]
