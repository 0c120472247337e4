"""A seeded offline world of landmarks: each has a look (a coloured shape on a textured ground), a
name, and a home city. Three kinds of questions, as in FVQA:

- ``search_free``: the answer is in the pixels (the shape's colour);
- ``image_search``: "what is this landmark called?" -- only the image search (whose index pages are
  titled with the name) tells;
- ``text_search``: "which city is it in?" -- the name comes from image search, the city only from
  a text search for that name (the corpus pages state it).

``build_world`` writes everything the real tools and the loader read: question parquet files in the
MMSearch-R1 schema (train mix and held-out eval on unseen landmarks), the image-search index
(``LocalImageSearch``) and the text corpus (``LocalTextSearch``).
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from mmsr.data.threads import in_order

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (140, 50, 180), "orange": (245, 140, 30)}  # fmt: skip
SHAPES = ("circle", "square", "triangle", "diamond")
# A name is two syllables ("Ka Zu") from 83 consonant-vowel syllables (English stopwords, which the
# text search drops, left out): 3,486 names, so over a thousand landmarks keep them unique while every
# syllable recurs across many landmarks: a held-out name is a new combination of familiar tokens, and
# recalling a name from the picture alone (memorizing) is much harder than reading it from the results.
SYLLABLES = tuple(c + v for c in "BDFGHJKLMNPRSTVWYZ" for v in "aeiou" if c + v not in ("Be", "Do", "Go", "Me", "No", "So", "To"))
# Sentences without a name that put a varying distance between a reading page's title and the first
# mention of its name: copying at a fixed offset (easy, but useless in an episode) does not pay there.
FILLER = ("The photos on this page were taken by visitors.", "Many people come here every year.",
          "The view is best in the early morning.", "There is a small park next to it.",
          "Guides tell old stories about the place.", "It was built a long time ago.",
          "You can reach it on foot from the station.", "Entry is free on most days.")  # fmt: skip
# A city is one word ("Kazuton"): two syllables and an ending. A world draws ``cities`` of them, so
# that, like a name, a city cannot be guessed. With 10 cities the tiny model settled on the 10-way
# prior (its city distribution was the same whatever the page said) and never learned to read the
# city (chance after reading and imitation); with 400, a reading page's city answer is copied right in
# 92% of probes after the previous recipe's 500 packed reading steps, and held-out cities teacher-forced in
# 95% of episodes after 300 imitation steps (seed 0).
CITY_ENDINGS = ("ton", "ford", "burg", "dale", "mere", "wick", "port", "field")
QUESTIONS = {
    "color": "What color is the shape in this picture?",
    "name": "What is the name of the landmark in this picture?",
    "city": "In which city is the landmark in this picture?",
}
FAQ = {"name": "What is the name of this landmark?", "city": "In which city is this landmark?"}
CITY_ANSWER = "It stands in the city of {city}"  # a reading page's answer to the city question
CATEGORY = {"color": "search_free", "name": "image_search", "city": "text_search"}


@dataclass(frozen=True)
class Landmark:
    """One entity of the world."""

    id: int
    name: str
    color: str
    shape: str
    city: str
    texture: tuple[int, ...]  # 16 grey levels of a 4x4 ground pattern: makes every look distinct

    def answer(self, kind: str) -> str:
        return {"color": self.color, "shape": self.shape, "name": self.name, "city": self.city}[kind]


def make_cities(n: int, seed: int) -> list[str]:
    """``n`` distinct city names."""
    rng = random.Random(seed)
    cities: dict[str, None] = {}
    while len(cities) < n:
        a, b = rng.choice(SYLLABLES), rng.choice(SYLLABLES)
        cities[a + b.lower() + rng.choice(CITY_ENDINGS)] = None
    return list(cities)


def make_landmarks(n: int, seed: int, cities: list[str], exclude: set[str] = frozenset()) -> list[Landmark]:
    """``n`` landmarks with unique names (none in ``exclude``) and unique (colour, shape, texture) looks,
    each in one of ``cities``.

    Names are unique as sets of syllables: the text search ranks by bag of words (BM25), so "Ka Zu"
    and "Zu Ka" would find each other's page.
    """
    rng = random.Random(seed)
    taken = {frozenset(name.split()) for name in exclude}
    if len(taken) + n > len(SYLLABLES) * (len(SYLLABLES) + 1) // 2:
        raise ValueError(f"cannot draw {n} more unique names: {len(taken)} of the names are taken")
    out = []
    while len(out) < n:
        syllables = (rng.choice(SYLLABLES), rng.choice(SYLLABLES))
        if frozenset(syllables) in taken:
            continue
        taken.add(frozenset(syllables))
        name = " ".join(syllables)
        texture = tuple(rng.randrange(60, 200) for _ in range(16))
        out.append(Landmark(len(out), name, rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(cities), texture))
    return out


def draw(landmark: Landmark, size: int = 112, jitter: random.Random | None = None) -> Image.Image:
    """The landmark's picture; ``jitter`` shifts the shape and adds noise (a different photo of it)."""
    ground = np.array(landmark.texture, dtype=np.uint8).reshape(4, 4)
    image = Image.fromarray(ground).resize((size, size), Image.NEAREST).convert("RGB")
    dx, dy = (jitter.randint(-3, 3), jitter.randint(-3, 3)) if jitter else (0, 0)
    c, r = size // 2, size // 3
    box = (c - r + dx, c - r + dy, c + r + dx, c + r + dy)
    pen, fill = ImageDraw.Draw(image), COLORS[landmark.color]
    if landmark.shape == "circle":
        pen.ellipse(box, fill=fill)
    elif landmark.shape == "square":
        pen.rectangle(box, fill=fill)
    elif landmark.shape == "triangle":
        pen.polygon([(c + dx, c - r + dy), (c - r + dx, c + r + dy), (c + r + dx, c + r + dy)], fill=fill)
    else:
        pen.polygon([(c + dx, c - r + dy), (c + r + dx, c + dy), (c + dx, c + r + dy), (c - r + dx, c + dy)], fill=fill)
    if jitter:
        noise = np.random.default_rng(jitter.randrange(2**31)).integers(-8, 9, (size, size, 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
    return image


def page_text(landmark: Landmark) -> str:
    return (f"This is {landmark.name}, a {landmark.shape} shaped {landmark.color} landmark. "
            f"{landmark.name} stands in the city of {landmark.city}.")  # fmt: skip


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def encode_pngs(images: Iterable[Image.Image]) -> Iterator[bytes]:
    """The PNG bytes of ``images``, in order, encoded on every core (zlib was ~2/3 of building a world on
    one); ``images`` is drawn lazily and in order, so seeded draws stay in sequence."""
    return (png.result() for png in in_order(_png, images))


def question_rows(landmarks: list[Landmark], mix: dict[str, int], seed: int, split: str) -> list[dict]:
    """Parquet rows in the MMSearch-R1 schema; ``mix`` gives questions per landmark for each kind."""
    rng = random.Random(seed)
    asked = [(lm, kind) for lm in landmarks for kind, count in mix.items() for _ in range(count)]
    pngs = encode_pngs(draw(lm, jitter=rng) for lm, _ in asked)  # zipped first: its pool closes as it ends
    rows = [{
        "data_id": f"{split}-{lm.id}-{kind}-{i}",
        "prompt": [{"role": "user", "content": QUESTIONS[kind]}],
        "images": [{"bytes": png, "path": None}],
        "reward_model": {"ground_truth": lm.answer(kind), "candidate_answers": "[]", "style": "rule"},
        "data_source": f"mmsearch_r1/shapes_world_{split}",
        "image_urls": None,
        "category": CATEGORY[kind],
        "extra_info": {"index": i, "entity": lm.name, "kind": kind},
    } for i, (png, (lm, kind)) in enumerate(zip(pngs, asked))]  # fmt: skip
    rng.shuffle(rows)  # after every draw: the same state as drawing row by row
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


READING_TITLE_SUFFIX = " - photo gallery"  # a reading page's title is its landmark's name and this


def reading_text(landmark: Landmark, rng: random.Random) -> str:
    """``page_text`` between filler sentences, closing on two visitors' questions and their answers, the
    name and the city in a random order: which fact to look up depends on the question, and both sit at a
    varying distance, as in an episode's results. A city is answered as ``CITY_ANSWER`` (the demo
    teacher's words), so it can only be predicted by finding the page's own "city of <city>" (induction).
    The title does not name the city: as on an episode's text-search page, the sentence is the only
    source. Every page asks for its city: with one question a page (the name or the city), the warm start
    of seed 2 copied the first piece of a held-out city and continued it as a training city's
    ("Pepaport" -> "Pedaford"), reading 50% of them."""
    n_before, n_after = rng.randint(0, 5), rng.randint(0, 2)
    filler = rng.sample(FILLER, n_before + n_after)  # no sentence twice on a page
    before, after = filler[:n_before], filler[n_before:]
    kinds = rng.sample(("name", "city"), 2)
    answers = {"name": landmark.name, "city": CITY_ANSWER.format(city=landmark.city)}
    faq = [f"Question: {FAQ[kind]} Answer: {answers[kind]}." for kind in kinds]
    return " ".join([*before, page_text(landmark), *after, *faq])


def write_reading_corpus(exclude: set[str], n: int, seed: int, cities: list[str], out: Path) -> None:
    """``reading.jsonl``: pages (search-corpus schema) about ``n`` other landmarks, none named in ``exclude`` (the
    world's names; ``benchmarks/reading_probe.py`` also excludes the reading pages' own).

    A random-weight model cannot read yet; real VLMs learned to on web text. These pages are the tiny
    model's stand-in for that pretraining (``mmsr.demo.reading``): they teach finding a name or a city in a
    page and copying it, and, holding no world landmark, leak no answer.
    """
    others = make_landmarks(n, seed, cities, exclude=exclude)
    rng = random.Random(seed)
    rows = [{"id": f"r{lm.id}", "title": f"{lm.name}{READING_TITLE_SUFFIX}",
             "text": reading_text(lm, rng)} for lm in others]  # fmt: skip
    _write_jsonl(out / "reading.jsonl", rows)


def write_search_backends(landmarks: list[Landmark], out: Path) -> None:
    """Image index (one canonical picture per landmark, titled with its name) and text corpus."""
    (out / "pages").mkdir(parents=True, exist_ok=True)
    index, corpus = [], []
    for png, lm in zip(encode_pngs(draw(lm) for lm in landmarks), landmarks):  # the encoder first, as above
        (out / "pages" / f"{lm.id}.png").write_bytes(png)
        index.append({"image": f"pages/{lm.id}.png", "title": f"{lm.name} - photo gallery"})
        corpus.append({"id": str(lm.id), "title": lm.name, "text": page_text(lm)})
    for name, rows in (("image_index.jsonl", index), ("corpus.jsonl", corpus)):
        _write_jsonl(out / name, rows)


def build_world(out: str | Path, seed: int = 0, train_landmarks: int = 1200, eval_landmarks: int = 40,
                train_mix: dict[str, int] | None = None, eval_mix: dict[str, int] | None = None,
                reading_pages: int = 1500, cities: int = 400) -> Path:  # fmt: skip
    """Write a world to ``out`` (deterministic for a seed); returns ``out``.

    Files: ``train.parquet``, ``eval.parquet`` (held-out landmarks), ``image_index.jsonl`` +
    ``pages/``, ``corpus.jsonl`` (every landmark, train and held-out, is searchable), ``reading.jsonl``
    (``reading_pages`` pages about other landmarks, to pretrain reading) and ``world.json`` (the
    landmarks, for inspection).
    Default mix is search-balanced: per landmark 2 search-free, 1 image-search and 1 text-search
    question in training; 1 of each kind in evaluation. Many landmarks make recalling a name from
    the picture alone (memorizing) harder than reading it from the search results.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    city_names = make_cities(cities, seed + 4)
    landmarks = make_landmarks(train_landmarks + eval_landmarks, seed, city_names)
    train, held_out = landmarks[:train_landmarks], landmarks[train_landmarks:]
    train_mix = train_mix or {"color": 2, "name": 1, "city": 1}
    eval_mix = eval_mix or {"color": 1, "name": 1, "city": 1}
    for split, lms, mix, offset in (("train", train, train_mix, 1), ("eval", held_out, eval_mix, 2)):
        # row groups of 256 rows: a reader holds one group's images at a time, not the file's
        pq.write_table(pa.Table.from_pylist(question_rows(lms, mix, seed + offset, split)), out / f"{split}.parquet",
                       row_group_size=256)  # fmt: skip
    pa.default_memory_pool().release_unused()  # Arrow's allocator would keep the tables' ~200 MB
    write_search_backends(landmarks, out)
    write_reading_corpus({lm.name for lm in landmarks}, reading_pages, seed + 3, city_names, out)
    world = [{**lm.__dict__, "split": "train" if i < train_landmarks else "eval"} for i, lm in enumerate(landmarks)]
    (out / "world.json").write_text(json.dumps(world, indent=1), encoding="utf-8")
    return out
