"""The scaffold of the tiny tokenizers: text every episode carries, weighted in BPE training.

``TinyQwen2_5_VL(scaffold=Scaffold())`` (``class_path: mmsr.demo.tokenizer.Scaffold`` in a config)
trains its few-hundred-token BPE on these texts, ``weight`` times each, before the data files: a few
hundred merges then go to whole scaffold words first, which shortens every sequence (a 512-token BPE
trained on the world's pages alone spells the prompt letter by letter: ~1.8x longer episodes). The
demo's warm start, the smoke configs and the tests use it.
"""

from __future__ import annotations

from pathlib import Path

from mmsr.prompt.render import TEMPLATES, ChatFormat
from mmsr.tools import format as fmt

DEMO_TEMPLATES = Path(__file__).parent / "templates"
# The templates the scaffold holds, in this order: a fixed list, so adding a template never changes the
# vocabulary of an existing run (its reference model and checkpoints are rebuilt from it).
SCAFFOLD_TEMPLATES = (TEMPLATES / "round1.txt", TEMPLATES / "after_image_search.txt", TEMPLATES / "after_text_search.txt",
                      DEMO_TEMPLATES / "round1.txt", DEMO_TEMPLATES / "after_image_search.txt",
                      DEMO_TEMPLATES / "after_text_search.txt")  # fmt: skip


def scaffold_texts() -> list[str]:
    """Chat frame, observation wrapper and headers, and the templates, once each."""
    chat = ChatFormat()
    texts = [chat.first_prompt("") + chat.observation(""), "Searched results: <information></information>",
             fmt.IMAGE_HEADER, fmt.IMAGE_NONE, fmt.TEXT_HEADER, fmt.WEB_TEXT_HEADER, fmt.TEXT_NONE, "1. image: \ntitle: "]  # fmt: skip
    return texts + [path.read_text(encoding="utf-8") for path in SCAFFOLD_TEMPLATES]


class Scaffold:
    """``scaffold_texts()``, each counted ``weight`` times (a ``TokenizerCorpus``).

    Args:
        weight: how many times every scaffold text counts in BPE training.
    """

    def __init__(self, weight: int = 50) -> None:
        if weight < 1:
            raise ValueError(f"weight must be >= 1, got {weight}")
        self.weight = weight

    def texts(self) -> list[str]:
        return scaffold_texts() * self.weight
