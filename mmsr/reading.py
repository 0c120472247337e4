"""Reading pretraining: language modelling on packed documents, before the supervised warm start.

Real VLMs learned to read on web text before anyone taught them to search: they copy a name they
see in a search result into an answer or a query. A random-weight tiny model cannot, and learning it
from warm-start episodes alone is slow, because only a few answer tokens per episode need copying
(measured on the CPU demo's world: after 500-1,000 imitation steps, teacher-forced name accuracy on
held-out landmarks was still 0%). Next-token prediction over packed pages is a dense copying signal,
provided the copy has to be a lookup by content: when every page put its name at the same distance
from its title, copying did not carry over to episodes (held-out names stayed at 0% in 6 of 7 runs;
presumably the model copied by position). With the distance varied (``mmsr.worlds.shapes`` pads pages with
filler sentences), held-out teacher-forced name accuracy reached 90-100% within 100 imitation steps
in each of 4 runs (``mmsr demo --reading-steps 0`` is the ablation).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from mmsr.algo import logprobs_and_entropy
from mmsr.models.policy import Policy
from mmsr.tools.local import read_jsonl, required_field


class ReadingCorpus:
    """Documents from JSON-lines files (``{"title": str, "text": str}`` per line, the
    ``LocalTextSearch`` corpus schema), served as packed sequences.

    Args:
        files: JSON-lines files; each row becomes ``"title: <title>\\n<text>\\n"``.
        docs_per_sequence: documents packed into one training sequence, so copying must find the
            right document among several.
        sequences_per_step: sequences per optimizer step.
        seed: the packing draws; step ``k`` always gets the same batch (resumable, deterministic).
    """

    def __init__(self, files: list[str], docs_per_sequence: int = 6, sequences_per_step: int = 16, seed: int = 0) -> None:
        if docs_per_sequence < 1 or sequences_per_step < 1:
            raise ValueError("docs_per_sequence and sequences_per_step must be >= 1")
        self.docs = [doc for path in files for doc in _read_documents(Path(path))]
        self.docs_per_sequence, self.sequences_per_step, self.seed = docs_per_sequence, sequences_per_step, seed

    def batch(self, step: int) -> list[str]:
        """The packed texts of training step ``step``."""
        rng = random.Random(self.seed * 1_000_003 + step)
        k = min(self.docs_per_sequence, len(self.docs))
        return ["".join(rng.sample(self.docs, k)) for _ in range(self.sequences_per_step)]


def _read_documents(path: Path) -> list[str]:
    docs = []
    for line_no, row in read_jsonl(path):
        where = f"{path}:{line_no}"
        docs.append(f"title: {required_field(row, 'title', where)}\n{required_field(row, 'text', where)}\n")
    return docs


def lm_loss(policy: Policy, texts: list[str], device: torch.device | str) -> torch.Tensor:
    """Token-mean next-token negative log-likelihood of ``texts`` (text only, right-padded).

    Returns: a scalar tensor; padding (``attention_mask`` 0) is excluded.
    """
    enc = policy.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # [N, T] each
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [N, T]
    if policy.is_vision:
        positions = positions[None].expand(3, -1, -1)  # M-RoPE: text tokens share t = h = w
    out = policy.forward(ids, mask, positions, [])
    logp, _ = logprobs_and_entropy(out.logits[:, :-1], ids[:, 1:], with_entropy=False)  # [N, T-1]
    target = mask[:, 1:].to(logp.dtype)
    return -(logp * target).sum() / target.sum().clamp(min=1)
