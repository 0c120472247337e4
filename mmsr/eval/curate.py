"""``mmsr curate``: the paper's search-balancing of training data (spec §7, data balancing).

1. ``k`` on-demand rollouts per question with the current model (sampled, default temperature 1);
2. questions never answered correctly are dropped;
3. a question with a correct rollout that called no tool is ``search_free``; otherwise it is
   labelled by the tools the correct rollouts used, taken together: only image search ->
   ``image_search_required``, only text search -> ``text_search_required``, both ->
   ``mixed_search_required``; with other configured tools (crop, ...) among them, their names and the
   searches', sorted and joined by ``+``, then ``_required`` (``crop+image_search_required``);
4. a subset is sampled (seeded) at the target search-free share: the largest one the pools allow,
   or ``size`` rows; a subset of none (every question dropped, or a pool the share needs empty) is an
   error naming the pools and the settings, and nothing is written;
5. it is written in the MMSearch-R1 parquet schema (readable by ``load_samples``); the label is the
   ``category`` column (per-category metrics) and ``extra_info.search_label``.

Resumable: each question's outcomes are appended to a work file (``<out>.rollouts.jsonl``) as soon
as its batch finishes; a rerun skips the questions already there. The file's first line records the
settings that decide the outcomes (k, temperature, the model and its tools and limits, with a fingerprint of
the files they name): a rerun with other ones, or after such a file changed, is refused, naming the file; a
line cut by a crash goes from the file. Steps 2-5 are deterministic. Questions need an image (the rows written
carry it): one without is refused before any rollout. So is curation without a search tool (``--tools``, or a
checkpoint's run's own): every search would fail, and questions answered without it would be labelled search_free.

    mmsr curate --ckpt runs/x/checkpoints/last.ckpt --data fvqa_train.parquet --k 8 --size 5000 --out curated.parquet
"""

from __future__ import annotations

import argparse
import io
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmsr.data.sample import Sample
from mmsr.eval.work import CONTENTS, read_rows, same_run
from mmsr.rollout.loop import RolloutLoop
from mmsr.rollout.trajectory import Trajectory

# ``add_model_args``' arguments that decide a rollout's outcome (the work file records them)
MODEL_ARGS = ("ckpt", "model_dir", "policy", "run_config", "weights", "tools", "min_pixels", "max_pixels", "max_rounds",
              "max_tokens_per_turn", "max_context_tokens")

Label = str  # one of PAIR_LABELS, or the "<tool>+<tool>_required" label of other configured tools
PAIR_LABELS = ("search_free", "image_search_required", "text_search_required", "mixed_search_required")


@dataclass(frozen=True)
class Outcome:
    """One rollout of a question: answered correctly, which searches it made, and which other configured
    tools it called (names, sorted)."""

    correct: bool
    image: bool
    text: bool
    others: tuple[str, ...] = ()

    @property
    def used(self) -> set[str]:
        return {*self.others} | {n for n, u in (("image_search", self.image), ("text_search", self.text)) if u}


def label(outcomes: Sequence[Outcome]) -> Label | None:
    """The question's label, or None when no rollout was correct (the question is dropped)."""
    correct = [o for o in outcomes if o.correct]
    if not correct:
        return None
    if any(not o.used for o in correct):
        return "search_free"
    used = set().union(*(o.used for o in correct))
    if used == {"image_search", "text_search"}:
        return "mixed_search_required"
    return "+".join(sorted(used)) + "_required"


def read_work(path: Path, run: Mapping[str, object] | None = None) -> dict[str, list[Outcome]]:
    """The outcomes ``path`` holds, by question id. Its ``{"run": ...}`` line names the settings that decided
    them (``k``, temperature, the model): another ``run`` is refused rather than its outcomes reused."""
    if not path.is_file():
        return {}
    done = {}
    for row in read_rows(path):  # without a line cut by a crash (that question is redone), which goes from the file
        if "run" in row:
            if run is not None:
                same_run(path, row["run"], run, "the rollouts of another curation", "give another --work")
            continue
        done[row["id"]] = [Outcome(*o[:3], tuple(o[3]) if len(o) > 3 else ()) for o in row["outcomes"]]
    return done


def roll_out(loop: RolloutLoop, samples: Sequence[Sample], k: int, temperature: float, work: Path,
             batch_size: int = 8, mode: str = "EM", run: Mapping[str, object] | None = None) -> dict[str, list[Outcome]]:  # fmt: skip
    """``k`` rollouts of every question not yet in ``work``; appends each finished batch to it. ``run``: the
    settings that decide the outcomes besides ``k`` and ``temperature`` (the model, tools, limits)."""
    from mmsr.reward.mmsearch_r1 import is_correct
    from mmsr.rollout.engine import SamplingParams

    run = {"k": k, "temperature": temperature, "mode": mode} | dict(run or {})
    done = read_work(work, run)
    todo = [s for s in samples if s.id not in done]
    sampling = SamplingParams(temperature=temperature, max_tokens=loop.settings.max_tokens_per_turn)
    work.parent.mkdir(parents=True, exist_ok=True)
    if not work.is_file() or work.stat().st_size == 0:
        work.write_text(json.dumps({"run": run}) + "\n", encoding="utf-8")
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        trajs = loop.run(batch, k, sampling)
        with work.open("a", encoding="utf-8") as f:
            for i, s in enumerate(batch):
                group = [t for t in trajs if t.group_id == i]
                outs = [outcome(t, is_correct(t.assistant_texts, s.ground_truth, s.candidate_answers, mode)) for t in group]
                done[s.id] = outs
                f.write(json.dumps({"id": s.id, "outcomes": [[o.correct, o.image, o.text, list(o.others)] for o in outs]}) + "\n")
    return done


def outcome(t: Trajectory, correct: bool) -> Outcome:
    """``t``'s outcome: the searches it made, and the other declared tools it called."""
    others = tuple(sorted(spec.name for spec in t.tools
                          if spec.name not in ("image_search", "text_search") and t.num_calls(spec.name)))  # fmt: skip
    return Outcome(correct, t.num_image_searches > 0, t.num_text_searches > 0, others)


def select(labels: dict[str, Label], search_free_ratio: float, size: int | None = None, seed: int = 0) -> list[str]:
    """Ids of a subset with ``round(n * search_free_ratio)`` search-free rows (n = ``size`` or the most
    the pools allow at that share); raises if ``size`` is more than the pools hold."""
    if not 0.0 <= search_free_ratio <= 1.0:
        raise ValueError(f"search_free_ratio must be in [0, 1], got {search_free_ratio}")
    free = sorted(i for i, lab in labels.items() if lab == "search_free")
    required = sorted(i for i, lab in labels.items() if lab != "search_free")
    if size is None:
        limits = [len(free) / search_free_ratio if search_free_ratio > 0 else float("inf"),
                  len(required) / (1 - search_free_ratio) if search_free_ratio < 1 else float("inf")]  # fmt: skip
        size = int(min(limits) + 1e-9)
    n_free = round(size * search_free_ratio)
    if n_free > len(free) or size - n_free > len(required):
        raise ValueError(f"size {size} at search-free share {search_free_ratio} needs {n_free} search-free and "
                         f"{size - n_free} search-required questions; there are {len(free)} and {len(required)}")  # fmt: skip
    rng = random.Random(seed)
    return sorted(rng.sample(free, n_free) + rng.sample(required, size - n_free))


def write_parquet(samples: Sequence[Sample], labels: dict[str, Label], outcomes: dict[str, list[Outcome]], path: Path) -> None:
    """The MMSearch-R1 / verl schema (spec §8) plus ``data_id`` and ``category`` columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for index, s in enumerate(samples):
        png = io.BytesIO()
        s.image.save(png, format="PNG")  # lossless: the pixels the model was evaluated on
        outs = outcomes[s.id]
        rows.append({
            "prompt": [{"content": s.question, "role": "user"}],
            "images": [{"bytes": png.getvalue(), "path": None}],
            "reward_model": {"candidate_answers": json.dumps(list(s.candidate_answers)), "ground_truth": s.ground_truth, "style": "rule"},
            "data_source": s.data_source,
            "image_urls": s.image_url,
            "extra_info": {"index": index, "data_id": s.id, "search_label": labels[s.id],
                           "correct_rollouts": sum(o.correct for o in outs), "rollouts": len(outs)},
            "data_id": s.id,
            "category": labels[s.id],
        })  # fmt: skip
    schema = pa.schema([
        ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("reward_model", pa.struct([("candidate_answers", pa.string()), ("ground_truth", pa.string()), ("style", pa.string())])),
        ("data_source", pa.string()), ("image_urls", pa.string()),
        ("extra_info", pa.struct([("index", pa.int64()), ("data_id", pa.string()), ("search_label", pa.string()),
                                  ("correct_rollouts", pa.int64()), ("rollouts", pa.int64())])),
        ("data_id", pa.string()), ("category", pa.string()),
    ])  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def curate(samples: Sequence[Sample], loop: RolloutLoop, out: str | Path, k: int = 8, temperature: float = 1.0,
           search_free_ratio: float = 0.32, size: int | None = None, seed: int = 0, batch_size: int = 8,
           work: str | Path | None = None, run: Mapping[str, object] | None = None) -> dict[str, int]:  # fmt: skip
    """Steps 1-5 of the module docstring; returns the count of each label, ``dropped`` and ``selected``. ``run``:
    what else decides the outcomes, recorded in the work file (``mmsr curate`` passes its model arguments)."""
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids repeat; curation keys its resumable work file on Sample.id")
    imageless = [s.id for s in samples if s.stored_image is None]
    if imageless:  # before any rollout: the rows written carry the question's image (spec §8)
        raise ValueError(f"curate writes MMSearch-R1 rows, which carry the question's image: {len(imageless)} questions "
                         f"have none (first: {imageless[0]!r})")  # fmt: skip
    out = Path(out)
    work = Path(work) if work else out.with_name(out.name + ".rollouts.jsonl")
    outcomes = roll_out(loop, samples, k, temperature, work, batch_size, run=run)
    labels = {s.id: lab for s in samples if (lab := label(outcomes[s.id])) is not None}
    chosen = set(select(labels, search_free_ratio, size, seed))
    counts = {name: sum(v == name for v in labels.values()) for name in PAIR_LABELS + tuple(sorted(set(labels.values())))}
    counts |= {"dropped": len(samples) - len(labels)}
    if not chosen:  # before writing: a parquet without rows exited 0, and ``mmsr fit`` refused it later
        settings = {"k": k, "temperature": temperature, "search_free_ratio": search_free_ratio, "size": size}
        raise ValueError(nothing_selected(counts, settings, out, work))
    write_parquet([s for s in samples if s.id in chosen], labels, outcomes, out)
    return counts | {"selected": len(chosen)}


def nothing_selected(counts: Mapping[str, int], settings: Mapping[str, object], out: Path, work: Path) -> str:
    """Why curation selected no question, in one line: every question was dropped, or the search-free share and
    ``size`` of ``settings`` select none from the pools ``counts`` (each label's, and ``dropped``) hold."""
    free, dropped = counts["search_free"], counts["dropped"]
    required = sum(n for name, n in counts.items() if name not in ("search_free", "dropped"))
    pools = ", ".join(f"{name} {n}" for name, n in counts.items())
    rollouts = f"k={settings['k']} rollouts at temperature={settings['temperature']}"
    head = f"curate selected no question, so {out} was not written: "
    if free + required == 0:
        return (f"{head}none of the {dropped} questions was answered correctly in {rollouts} ({pools}); the rollouts "
                f"stay in {work}")
    return (f"{head}search_free_ratio={settings['search_free_ratio']} and size={settings['size']} select none from "
            f"{free} search-free and {required} search-required questions ({pools}; {rollouts}); the rollouts stay "
            f"in {work}, which a rerun with another --search-free-ratio or --size reuses")


GIVE_TOOLS = ("give them with --tools TOOLS.yaml (image_search / text_search entries, e.g. configs/tools/): without "
              "tools every search fails, and a question the model answers correctly is labelled search_free")  # fmt: skip


def refuse_without_tools(workflows: Sequence[str], tools: Mapping[str, object], where: str) -> None:
    """Stop before any rollout when no search tool is configured (``mmsr.eval.cli.missing_tools``): the on-demand
    rollouts would search in vain, and curation would label search-required questions search_free."""
    from mmsr.eval.cli import missing_tools

    if missing_tools(workflows, tools) is not None:
        raise SystemExit(f"mmsr curate: error: curation's rollouts search, but no tool is configured ({where}): {GIVE_TOOLS}")


def share(text: str) -> float:
    """``type`` of ``--search-free-ratio``: a share in [0, 1] (NaN is none)."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def main(argv: list[str]) -> dict[str, int]:
    from mmsr.eval.cli import add_model_args, input_contents, load_from_args, positive_int, refuse_unread

    p = argparse.ArgumentParser(prog="mmsr curate", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--data", nargs="+", required=True, help="question pool: parquet / jsonl / datasets dirs")
    p.add_argument("--out", required=True, help="output parquet (MMSearch-R1 schema)")
    p.add_argument("--k", type=positive_int, default=8, help="rollouts per question")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--search-free-ratio", type=share, default=0.32, help="paper: 1.6k of 5k")
    # checked here: ``select`` refused either only after every rollout ran (a --size below 1 in ``random.sample``)
    p.add_argument("--size", type=positive_int, help="rows to select (default: the most the pools allow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="resumable work file (default: <out>.rollouts.jsonl)")
    args = p.parse_args(argv)
    refuse_unread(p, args)
    if not args.tools and not args.ckpt:  # a checkpoint's run names its own tools (refused below if it has none)
        p.error(f"curation's rollouts search, and --{'model-dir' if args.model_dir else 'policy'} brings no tools: {GIVE_TOOLS}")
    from mmsr.data.loaders import load_samples

    samples = [s for path in args.data for s in load_samples(path, args.skip_invalid)]
    loaded = load_from_args(args, ["on-demand"], refuse_without_tools)
    loop = RolloutLoop(loaded.engine, loaded.policy, loaded.prompts or _default_prompts(), loaded.tools, loaded.settings)
    # what decides the outcomes besides k and the temperature: the model, tools and episode limits, and what their
    # files hold (a checkpoint overwritten since is another model); not --data: outcomes are kept by question id
    outputs = [args.out, args.work or f"{args.out}.rollouts.jsonl"]
    run = {k: v for k, v in sorted(vars(args).items()) if k in MODEL_ARGS} | {CONTENTS: input_contents(args, outputs=outputs)}
    report = curate(samples, loop, args.out, args.k, args.temperature, args.search_free_ratio, args.size, args.seed,
                    args.batch_size, args.work, run)  # fmt: skip
    print(json.dumps(report))
    return report


def _default_prompts():
    from mmsr.prompt.render import PromptBuilder

    return PromptBuilder()
