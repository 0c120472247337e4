"""Reading pretraining: packed documents for language modelling (``SFTModule(reading=...)``, whose
``lm_loss`` trains on them), before the supervised warm start.

Real VLMs learned to read on web text before anyone taught them to search: they copy a name they
see in a search result into an answer or a query. A random-weight tiny model cannot, and learning it
from warm-start episodes alone is slow, because only a few answer tokens per episode need copying
(measured on the CPU demo's world: after 500-1,000 imitation steps, teacher-forced name accuracy on
held-out landmarks was still 0%). Next-token prediction over packed pages is a dense copying signal,
provided the copy has to be a lookup by content: when every page put its name at the same distance
from its title, copying did not carry over to episodes (held-out names stayed at 0% in 6 of 7 runs;
presumably the model copied by position). With the distance varied (``mmsr.demo.world`` pads pages with
filler sentences), held-out teacher-forced name accuracy reached 90-100% within 100 imitation steps
in each of 4 runs (``mmsr demo --reading-steps 0`` is the ablation).
"""

from __future__ import annotations

import random
from pathlib import Path

from mmsr.data.jsonl import read_jsonl, required_field


class ReadingCorpus:
    """Documents from JSON-lines files (``{"title": str, "text": str}`` per line, the
    ``LocalTextSearch`` corpus schema), served as packed sequences.

    Args:
        files: JSON-lines files; each row becomes ``"title: <title>\\n<text>\\n"``.
        docs_per_sequence: documents packed into one training sequence, so copying must find the
            right document among several.
        sequences_per_step: sequences per optimizer step.
        seed: the packing draws; step ``k`` always gets the same batch (resumable, deterministic).
        single_page_steps: the first steps pack one document a sequence, a third of the tokens of three. On the
            CPU demo's pages copying within a page comes ~50 steps later that way (of ~400; README,
            Performance) at a third of the cost a step; finding the right page among several is learned only
            in the packed steps after them.
    """

    def __init__(self, files: list[str], docs_per_sequence: int = 6, sequences_per_step: int = 16, seed: int = 0,
                 single_page_steps: int = 0) -> None:  # fmt: skip
        if docs_per_sequence < 1 or sequences_per_step < 1 or single_page_steps < 0:
            raise ValueError("docs_per_sequence and sequences_per_step must be >= 1, single_page_steps >= 0")
        self.docs = [doc for path in files for doc in _read_documents(Path(path))]
        self.docs_per_sequence, self.sequences_per_step, self.seed = docs_per_sequence, sequences_per_step, seed
        self.single_page_steps = single_page_steps

    def batch(self, step: int) -> list[str]:
        """The packed texts of training step ``step``."""
        rng = random.Random(self.seed * 1_000_003 + step)
        k = 1 if step < self.single_page_steps else min(self.docs_per_sequence, len(self.docs))
        return ["".join(rng.sample(self.docs, k)) for _ in range(self.sequences_per_step)]


def _read_documents(path: Path) -> list[str]:
    docs = []
    for line_no, row in read_jsonl(path):
        where = f"{path}:{line_no}"
        docs.append(f"title: {required_field(row, 'title', where)}\n{required_field(row, 'text', where)}\n")
    return docs
