"""A scripted RAG-like policy: the teacher whose episodes warm-start the policy (``SFTModule(teacher=...)``).

It always searches (unless ``direct_answer_rate`` says otherwise): image search first, then a text
search when the question asks for a fact about the identified entity, then the ground-truth answer.
Its turns run through the real ``RolloutLoop`` with the real tools, so the warm-start data has
exactly the contexts, tool observations and loss masks that GRPO later trains on.
"""

from __future__ import annotations

import random

from mmsr.data.sample import Sample

DEFAULT_REASONS = ("The results show what it is.", "The page states it.")  # after image / text search
SEARCH_DECISION = "I do not know this for sure, so I search the image."
DIRECT_DECISION = "I can answer this from the image."


class RAGTeacher:
    """Writes the turn texts of one scripted episode per sample.

    Args:
        text_search_categories: categories whose answer needs a text search after the image search.
        direct_answer_rate: probability of answering at once without any search (0 = always search).
        direct_answer_rates: per category, a probability replacing ``direct_answer_rate`` (the shipped demo
            sets none: its teacher decides alike for every kind; README, Performance, records a shorter
            recipe that answered colours at once twice as often). Each sample draws once whatever its
            rate, so the categories left alone get the episodes of ``direct_answer_rate`` alone.
        seed: seeds the direct-answer draws (their position is ``state_dict()``, which ``SFTModule``
            checkpoints: a resumed warm start draws on as an uninterrupted one).
        answer_reasons: per category, the reasoning of the answering turn after a search, with
            ``{answer}`` for the ground truth (default: ``DEFAULT_REASONS``). Stating the evidence
            before the answer ("...stands in the city of Harlow.") lets a small model copy the fact
            out of the results with the context it has there (induction), then repeat it.
        question_notes: per category, a sentence the first turn's reasoning opens with, saying what
            the question asks for ("It asks for a colour."), before the decision to search or answer.
            The teacher decides alike for every category; the note only puts what the question needs
            right before the decision, where a small policy can learn under RL to decide by it (without
            it, the search rewards of name questions and the direct-answer rewards of colour questions
            pulled on one shared decision, and GRPO made the demo's policy search everywhere).
    The entity name used as the text query comes from ``sample.extra["entity"]`` when present, else
    from the question. Answers and queries start with a space: byte-level BPE gives a word after a
    space (" Ka", as in "title: Ka Zu") another id than the same word after a tag ("<answer>Ka"), and
    a small model copies a name from the results far more easily when the ids are the same. Rewards
    and tools strip the space.
    """

    def __init__(self, text_search_categories: list[str] | None = None, direct_answer_rate: float = 0.0,
                 seed: int = 0, answer_reasons: dict[str, str] | None = None,
                 question_notes: dict[str, str] | None = None,
                 direct_answer_rates: dict[str, float] | None = None) -> None:  # fmt: skip
        rates = {"direct_answer_rate": direct_answer_rate} | {
            f"direct_answer_rates[{c!r}]": r for c, r in (direct_answer_rates or {}).items()}
        for name, rate in rates.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"RAGTeacher {name} = {rate} must be a probability in [0, 1]")
        self.direct_answer_rates = direct_answer_rates or {}
        self.text_categories = set(text_search_categories or ["text_search"])
        self.answer_reasons = answer_reasons or {}
        self.question_notes = question_notes or {}
        self.direct_answer_rate = direct_answer_rate
        self.rng = random.Random(seed)

    def state_dict(self) -> dict[str, tuple]:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, tuple]) -> None:
        self.rng.setstate(state["rng"])

    def turns(self, sample: Sample) -> list[str]:
        answer = f"<answer> {sample.ground_truth}</answer>"
        note = self.question_notes.get(sample.category)
        opening = f"{note} " if note else ""
        if self.rng.random() < self.direct_answer_rates.get(sample.category, self.direct_answer_rate):
            return [f"<reason>{opening}{DIRECT_DECISION}</reason>{answer}"]
        default = DEFAULT_REASONS[sample.category in self.text_categories]
        reason = self.answer_reasons.get(sample.category, default).format(answer=sample.ground_truth)
        final = f"<reason>{reason}</reason>{answer}"
        image_turn = f"<reason>{opening}{SEARCH_DECISION}</reason><search><img></search>"
        if sample.category not in self.text_categories:
            return [image_turn, final]
        entity = sample.extra.get("entity") or sample.question
        query = f"<reason>It is {entity}. I search the web for the fact.</reason><text_search> {entity}</text_search>"
        return [image_turn, query, final]
