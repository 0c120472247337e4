"""Reading pretraining: packed documents, the LM loss ``SFTModule`` trains them with (checked against
transformers' own loss), and the scripted teacher whose spacing makes names copyable."""

import json

import pytest
import torch

from mmsr.data.sample import Sample
from mmsr.demo.reading import ReadingCorpus
from mmsr.demo.teacher import RAGTeacher
from mmsr.demo.tokenizer import Scaffold
from mmsr.models.build import TinyQwen2_5_VL
from mmsr.sft import lm_loss


@pytest.fixture
def corpus_file(tmp_path):
    rows = [{"id": str(i), "title": f"Page {i}", "text": f"Page {i} stands in town {i}."} for i in range(10)]
    path = tmp_path / "pages.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_batches_pack_documents_and_repeat_per_step(corpus_file):
    corpus = ReadingCorpus([str(corpus_file)], docs_per_sequence=3, sequences_per_step=4, seed=1)
    batch = corpus.batch(5)
    assert len(batch) == 4 and all(t.count("title: Page ") == 3 for t in batch)
    assert "title: Page 3\nPage 3 stands in town 3.\n" in "".join(corpus.docs)
    assert corpus.batch(5) == batch and corpus.batch(6) != batch
    assert ReadingCorpus([str(corpus_file)], 3, 4, seed=2).batch(5) != batch


def test_the_first_single_page_steps_pack_one_page_and_later_steps_as_before(corpus_file):
    corpus = ReadingCorpus([str(corpus_file)], docs_per_sequence=3, sequences_per_step=4, seed=1, single_page_steps=2)
    assert [[t.count("title: Page ") for t in corpus.batch(step)] for step in (0, 1)] == [[1] * 4] * 2
    assert corpus.batch(2) == ReadingCorpus([str(corpus_file)], 3, 4, seed=1).batch(2)  # the same draws from step 2
    with pytest.raises(ValueError, match="single_page_steps >= 0"):
        ReadingCorpus([str(corpus_file)], single_page_steps=-1)


def test_bad_rows_name_file_and_line(tmp_path, corpus_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "a", "text": "b"}\n{"title": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'text'"):
        ReadingCorpus([str(corpus_file), str(bad)])
    with pytest.raises(FileNotFoundError, match="missing.jsonl not found"):
        ReadingCorpus([str(tmp_path / "missing.jsonl")])


def _reference_loss(policy, text: str) -> tuple[torch.Tensor, int]:
    """Summed NLL and count of one unpadded text, positions from transformers itself, banned ids masked
    as the policy masks them for every log-prob."""
    ids = policy.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    logits = policy.mask_banned(policy.model(input_ids=ids)).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"), ids.shape[1] - 1


def test_lm_loss_is_the_token_mean_nll_without_padding(corpus_file):
    policy = TinyQwen2_5_VL(tokenizer_texts=[str(corpus_file)], scaffold=Scaffold(), hidden_size=32, num_layers=1, seed=0).build()
    texts = ["title: Page 1\nPage 1 stands in town 1.\n", "title: Page 2\n"]  # unequal: padding is excluded
    (a, n_a), (b, n_b) = (_reference_loss(policy, t) for t in texts)
    torch.testing.assert_close(lm_loss(policy, texts, "cpu"), (a + b) / (n_a + n_b), rtol=1e-5, atol=1e-5)


def _sample(category, entity="Ka Zu", truth="Ka Zu"):
    return Sample(id="s", question="Q?", image=None, ground_truth=truth, category=category, extra={"entity": entity})


def test_teacher_searches_as_the_question_needs():
    teacher = RAGTeacher()
    free, image, text = (teacher.turns(_sample(c)) for c in ("search_free", "image_search", "text_search"))
    assert [len(free), len(image), len(text)] == [2, 2, 3]
    assert all("<search><img></search>" in t[0] for t in (free, image, text))
    assert text[1].endswith("<text_search> Ka Zu</text_search>") and image[1].endswith("<answer> Ka Zu</answer>")
    assert RAGTeacher(direct_answer_rate=1.0).turns(_sample("image_search"))[0].endswith("<answer> Ka Zu</answer>")
    rates = [len(RAGTeacher(direct_answer_rate=0.3, seed=s).turns(_sample("text_search"))) == 1 for s in range(200)]
    assert 0.2 < sum(rates) / len(rates) < 0.4


def test_teacher_direct_answer_rates_per_category():
    def direct(category, seed, **kw):
        return len(RAGTeacher(seed=seed, **kw).turns(_sample(category))) == 1

    rates = {"direct_answer_rate": 0.2, "direct_answer_rates": {"search_free": 0.4}}
    colour = [direct("search_free", s, **rates) for s in range(400)]
    city = [direct("text_search", s, **rates) for s in range(400)]
    assert 0.33 < sum(colour) / 400 < 0.47 and 0.14 < sum(city) / 400 < 0.26
    # one draw per sample whatever its rate: the categories left alone keep a single rate's episodes
    mixed = RAGTeacher(direct_answer_rate=0.2, direct_answer_rates={"search_free": 1.0}, seed=3)
    plain = RAGTeacher(direct_answer_rate=0.2, seed=3)
    kinds = ["text_search", "search_free", "image_search"] * 30
    pairs = [(mixed.turns(_sample(k)), plain.turns(_sample(k))) for k in kinds]
    assert all(len(m) == 1 for (m, _), k in zip(pairs, kinds) if k == "search_free")
    assert all(m == p for (m, p), k in zip(pairs, kinds) if k != "search_free")
    with pytest.raises(ValueError, match=r"direct_answer_rates\['search_free'\] = 1.5"):
        RAGTeacher(direct_answer_rates={"search_free": 1.5})


def test_teacher_states_the_evidence_before_the_answer_when_configured():
    teacher = RAGTeacher(answer_reasons={"text_search": "It stands in the city of {answer}."})
    city = teacher.turns(_sample("text_search", truth="Harlow"))[-1]
    assert city == "<reason>It stands in the city of Harlow.</reason><answer> Harlow</answer>"
    assert teacher.turns(_sample("image_search"))[-1] == "<reason>The results show what it is.</reason><answer> Ka Zu</answer>"


def test_teacher_opens_its_first_turn_with_the_question_note():
    notes = {"search_free": "It asks for a colour.", "image_search": "It asks for a name."}
    teacher = RAGTeacher(question_notes=notes)
    assert teacher.turns(_sample("search_free"))[0] == (
        "<reason>It asks for a colour. I do not know this for sure, so I search the image.</reason><search><img></search>")
    assert teacher.turns(_sample("text_search"))[0].startswith("<reason>I do not know")  # no note: as before
    direct = RAGTeacher(question_notes=notes, direct_answer_rate=1.0).turns(_sample("image_search"))
    assert direct == ["<reason>It asks for a name. I can answer this from the image.</reason><answer> Ka Zu</answer>"]
