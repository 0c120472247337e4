"""The demo world: deterministic, search-balanced, and each answer derivable only via its intended
source (pixels, image search, image search then text search)."""

import asyncio
import json
import random
import re

import numpy as np
import pytest

from mmsr.data.loaders import load_samples
from mmsr.tools.base import ToolRequest
from mmsr.tools.local import LocalImageSearch, LocalTextSearch
from mmsr.demo.world import COLORS, _png, build_world, draw, encode_pngs, make_cities, make_landmarks, question_rows
from tests.demo.conftest import SMALL


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = build_world(tmp_path_factory.mktemp("w") / "world", seed=3, **SMALL)
    train, held_out = load_samples(out / "train.parquet"), load_samples(out / "eval.parquet")
    return out, train, held_out


def test_deterministic_for_a_seed(world, tmp_path):
    out, train, _ = world
    again = build_world(tmp_path / "again", seed=3, **SMALL)
    assert (again / "world.json").read_text() == (out / "world.json").read_text()
    twin = load_samples(again / "train.parquet")
    assert [(s.id, s.question, s.ground_truth) for s in twin] == [(s.id, s.question, s.ground_truth) for s in train]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(twin, train))
    other = build_world(tmp_path / "other", seed=4, **SMALL)
    assert (other / "world.json").read_text() != (out / "world.json").read_text()


def test_rows_are_the_row_by_row_draws_encoded_on_several_threads():
    """Encoding on a thread pool keeps the seeded draws in sequence and the bytes in row order: the rows
    equal those drawn and encoded one after the other (``rng`` shuffles them after the last draw)."""
    landmarks = make_landmarks(12, 5, make_cities(8, 9))
    mix = {"color": 2, "name": 1}
    rng, expected = random.Random(7), []
    for lm in landmarks:
        for kind, count in mix.items():
            for _ in range(count):
                expected.append((f"train-{lm.id}-{kind}-{len(expected)}", _png(draw(lm, jitter=rng))))
    rng.shuffle(expected)
    rows = question_rows(landmarks, mix, 7, "train")
    assert [(r["data_id"], r["images"][0]["bytes"]) for r in rows] == expected
    images = [draw(lm) for lm in landmarks]
    assert list(encode_pngs(iter(images))) == [_png(im) for im in images]


def test_search_balanced_mix_and_unseen_held_out_landmarks(world):
    out, train, held_out = world
    kinds = [s.category for s in train]
    assert kinds.count("search_free") == kinds.count("image_search") + kinds.count("text_search")
    assert {s.extra["entity"] for s in train}.isdisjoint({s.extra["entity"] for s in held_out})
    assert {s.category for s in held_out} == {"search_free", "image_search", "text_search"}


def test_colour_is_in_the_pixels(world):
    _, train, held_out = world
    for s in [s for s in train + held_out if s.category == "search_free"]:
        pixel = np.asarray(s.image)[56, 56].astype(int)  # the shape covers the centre
        nearest = min(COLORS, key=lambda c: np.abs(pixel - COLORS[c]).sum())
        assert nearest == s.ground_truth


def test_names_need_image_search_and_cities_need_text_search(world):
    out, train, held_out = world
    images, texts = LocalImageSearch(str(out / "image_index.jsonl"), top_k=1), LocalTextSearch(str(out / "corpus.jsonl"), top_k=1)
    cities = {lm["city"] for lm in json.loads((out / "world.json").read_text())}
    found = 0
    for s in train + held_out:
        assert s.extra["entity"] not in s.question  # the question never names the landmark
        hit = asyncio.run(images(ToolRequest("image_search", image=s.image)))
        found += hit.titles[0].startswith(s.extra["entity"] + " ")
        assert not any(c in hit.text for c in cities)  # image search never tells the city
        if s.category == "text_search":
            page = asyncio.run(texts(ToolRequest("text_search", query=s.extra["entity"])))
            assert s.ground_truth in page.text  # ... a text search for the name does
    # a different photo of the landmark (shifted, noisy) is found first almost always -- like a real
    # reverse image search, it sometimes ranks a look-alike first
    assert found / len(train + held_out) >= 0.95


def test_a_city_cannot_be_guessed(world):
    """With a few cities a model answers the most common one (or settles on the prior) instead of
    reading the page; here the best guess is right for at most 2% of the city questions."""
    _, train, held_out = world
    answers = [s.ground_truth for s in train + held_out if s.category == "text_search"]
    assert max(map(answers.count, set(answers))) / len(answers) <= 0.02


def test_reading_pages_are_about_other_landmarks(world):
    out, _, _ = world
    names = {lm["name"] for lm in json.loads((out / "world.json").read_text())}
    pages = [json.loads(line) for line in (out / "reading.jsonl").read_text().splitlines()]
    assert len(pages) == SMALL["reading_pages"]
    assert len({p["title"] for p in pages}) == len(pages)
    assert not any(n in p["title"] or n in p["text"] for p in pages for n in names)  # no world answer leaks


def test_reading_pages_ask_for_the_name_and_the_city_at_varying_distances(world):
    """Copying must be a lookup by content: at a fixed offset a model could copy by position, which
    does not carry over to an episode's answer slot."""
    out, _, _ = world
    pages = [json.loads(line) for line in (out / "reading.jsonl").read_text().splitlines()]
    offsets, orders = set(), set()
    for p in pages:
        name = re.fullmatch(r"(.*) - photo gallery", p["title"]).group(1)
        text = p["text"]
        city = re.search(rf"{name} stands in the city of (\w+)\.", text).group(1)
        assert city not in p["title"]  # only the page's own sentence tells the city (no shortcut)
        assert f" {name}," in text  # after a space: the token ids the name has in a title and an answer
        asked = re.findall(r"Question: ([^?]*\?) Answer: ([^.]*)\.", text)
        assert text.endswith(". ".join(f"Question: {q} Answer: {a}" for q, a in asked) + ".")  # they close the page
        assert sorted(asked) == [("In which city is this landmark?", f"It stands in the city of {city}"),
                                 ("What is the name of this landmark?", name)]  # fmt: skip
        offsets.add(text.index(name))
        orders.add(asked[0][0])
    assert len(offsets) >= 5 and len(orders) == 2  # the name asked first on some pages, the city on others
