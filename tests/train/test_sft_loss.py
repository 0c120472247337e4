"""The warm start's loss is the token-mean NLL of the teacher's turns, though the LM head runs only at
the positions whose next token the teacher wrote (``sampled_logprobs``, shared with the GRPO update)."""

import csv

import lightning as L
import torch
from torch.utils.data import DataLoader

from mmsr.algo import logprobs_and_entropy
from mmsr.data.sample import Sample
from mmsr.demo.tokenizer import Scaffold
from mmsr.models.build import TinyQwen2_5_VL
from mmsr.rollout.engine import SamplingParams
from mmsr.sft import SFTModule
from mmsr.train.batch import collate, sampled_logprobs
from tests.conftest import FVQA

ANSWERS = ["Ka Zu", "the old stone tower by the river", "Zu"]  # unequal turns: ragged masks and padding


class Answers:
    """A teacher that answers at once, a different length per sample."""

    def turns(self, sample: Sample) -> list[str]:
        return [f"<reason>It is known.</reason><answer>{sample.ground_truth}</answer>"]


def full_logit_logprobs(policy, batch) -> torch.Tensor:
    """``[n, T-1]`` next-token log-probs from the LM head at every position."""
    out = policy.forward(batch.input_ids, batch.attention_mask, batch.position_ids, batch.vision)
    return logprobs_and_entropy(out.logits[:, :-1], batch.labels, with_entropy=False)[0]


def test_warm_start_loss_is_the_nll_of_the_teacher_turns(fvqa_samples, tmp_path):
    policy = TinyQwen2_5_VL(tokenizer_texts=[str(FVQA / "fvqa_dev.jsonl")], scaffold=Scaffold(), hidden_size=32,
                            num_layers=1, vision_depth=1, seed=0)  # fmt: skip
    module = SFTModule(policy, Answers(), lr=1e-3)
    samples = [Sample(s.id, s.question, s.image, truth, category="search_free") for s, truth in zip(fvqa_samples, ANSWERS)]
    module._turns = {s.id: Answers().turns(s) for s in samples}
    trajs = module.loop.run(samples, 1, SamplingParams(max_tokens=32))
    batch = collate(trajs, range(len(trajs)), module.policy, "cpu")
    assert len({len(t) for t in trajs}) == 3 and batch.vision  # padded rows, images in the context
    with torch.no_grad():
        full, kept = full_logit_logprobs(module.policy, batch), sampled_logprobs(module.policy, batch)[0]
    where = batch.loss_mask.bool()
    torch.testing.assert_close(kept[where], full[where], rtol=1e-5, atol=1e-5)
    unused = ~where.any(0)  # positions where no row's next token is the teacher's: no logits computed
    assert unused.sum() > where.shape[1] / 2 and not kept[:, unused].any()
    expected = float(-(full * batch.loss_mask).sum() / batch.loss_mask.sum())

    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""),
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(module, DataLoader(samples, batch_size=len(samples), collate_fn=list))
    rows = [r for r in csv.DictReader((tmp_path / "metrics.csv").open()) if r.get("sft/loss")]
    assert abs(float(rows[0]["sft/loss"]) - expected) < 1e-5 * max(1.0, abs(expected))
    assert float(rows[0]["sft/tokens"]) == batch.loss_mask.sum()


class Pages:
    """One short page a reading step."""

    def batch(self, step: int) -> list[str]:
        return [f"title: Ka Zu\nThis is Ka Zu, page {step}.\n"]


def test_reading_and_imitation_rows_hold_only_their_own_loss(fvqa_samples, tmp_path):
    """Two reading steps, then two imitation steps, all in one epoch: an imitation step's row has no reading
    loss (Lightning would repeat the last one until the epoch ends), a reading step's row no imitation loss."""
    policy = TinyQwen2_5_VL(tokenizer_texts=[str(FVQA / "fvqa_dev.jsonl")], scaffold=Scaffold(), hidden_size=32,
                            num_layers=1, vision_depth=1, seed=0)  # fmt: skip
    module = SFTModule(policy, Answers(), lr=1e-3, reading=Pages(), reading_steps=2)
    samples = [Sample(s.id, s.question, s.image, "Zu", category="search_free") for s in fvqa_samples[:4]]
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""),
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(module, DataLoader(samples, batch_size=1, collate_fn=list))
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [(r["step"], r["epoch"]) for r in rows] == [(str(i), "0") for i in range(4)]
    assert all(r["reading/loss"] and not r["sft/loss"] for r in rows[:2])
    assert all(r["sft/loss"] and not r["reading/loss"] for r in rows[2:])


class CountedAnswers(Answers):
    """``Answers`` that counts its draws (a stateful teacher, as the demo's seeded ``RAGTeacher``)."""

    def __init__(self) -> None:
        self.calls = 0

    def turns(self, sample: Sample) -> list[str]:
        self.calls += 1
        return super().turns(sample)


def test_validation_logs_the_nll_of_the_teacher_turns_on_held_out_prompts(fvqa_samples, tmp_path):
    """``val/sft_loss`` is the token-mean NLL of the teacher's turns on the held-out prompts under the weights
    of that moment; the turns are drawn once, by a copy of the teacher (the training teacher draws only for
    training prompts, and every validation scores the same targets)."""
    policy = TinyQwen2_5_VL(tokenizer_texts=[str(FVQA / "fvqa_dev.jsonl")], scaffold=Scaffold(), hidden_size=32,
                            num_layers=1, vision_depth=1, seed=0)  # fmt: skip
    module = SFTModule(policy, CountedAnswers(), lr=1e-3, micro_batch_tokens=256)  # a micro-batch per episode
    train = [Sample(s.id, s.question, s.image, "Zu", category="search_free") for s in fvqa_samples[:2]]
    held_out = [Sample(s.id, s.question, s.image, truth, category="search_free") for s, truth in zip(fvqa_samples[2:], ANSWERS)]
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""),
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=1, num_sanity_val_steps=1)  # fmt: skip
    trainer.fit(module, DataLoader(train, batch_size=1, collate_fn=list), DataLoader(held_out, batch_size=2, collate_fn=list))
    assert module.teacher.calls == len(train) * 1 and module._val_teacher.calls == len(held_out)
    rows = [r for r in csv.DictReader((tmp_path / "metrics.csv").open()) if r.get("val/sft_loss")]
    assert [r["step"] for r in rows] == ["0", "1"]  # after each of the two steps, none from the sanity check

    trajs = module._episodes(held_out, module._val_turns)  # the turns validation drew
    batch = collate(trajs, range(len(trajs)), module.policy, "cpu")
    with torch.no_grad():
        full = full_logit_logprobs(module.policy, batch)  # the weights after the last step
    expected = float(-(full * batch.loss_mask).sum() / batch.loss_mask.sum())
    assert abs(float(rows[-1]["val/sft_loss"]) - expected) < 1e-5 * max(1.0, abs(expected))
    assert float(rows[-1]["val/sft_tokens"]) == batch.loss_mask.sum() and rows[0]["val/sft_loss"] != rows[1]["val/sft_loss"]


def test_the_reading_loss_counts_each_texts_own_targets_whatever_the_padding_side(tiny_policy):
    """A left-padding tokenizer made each padded row also score its first token as predicted from a pad."""
    from mmsr.sft import lm_nll

    texts = ["Paris is the capital of France and its largest city.", "Paris"]
    alone = [lm_nll(tiny_policy, [t], "cpu") for t in texts]
    side = tiny_policy.tokenizer.padding_side
    try:
        for tiny_policy.tokenizer.padding_side in ("right", "left"):
            nll, count = lm_nll(tiny_policy, texts, "cpu")
            assert count == sum(c for _, c in alone)
            torch.testing.assert_close(nll, sum(n for n, _ in alone), rtol=1e-5, atol=1e-4)
    finally:
        tiny_policy.tokenizer.padding_side = side
