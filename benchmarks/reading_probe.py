"""Reading alone: the CPU demo's reading steps (``mmsr.demo.reading``) trained by themselves, then a probe of the
exported policy -- how often it copies a page's name and city answers, teacher-forced, on fresh pages, each page
alone and three packed to a sequence as the reading steps pack them. It measures a reading recipe in minutes
instead of a full demo (README, Performance): a recipe that copies as well in fewer seconds is then worth the five
seeds' demos.

    PYTHONPATH=tests/cpu_shim .venv/bin/python benchmarks/reading_probe.py --out runs/reading   # the demo's recipe
    PYTHONPATH=tests/cpu_shim .venv/bin/python benchmarks/reading_probe.py --out runs/reading_3p --steps 500 \\
        -- --model.init_args.reading.init_args.single_page_steps 0         # the previous one: three pages a sequence
    PYTHONPATH=tests/cpu_shim .venv/bin/python benchmarks/reading_probe.py --policy runs/reading/sft/policy \\
        --out runs/reading                         # probe an exported policy again (the world of --out), no training

Arguments after ``--`` go to the warm start's LightningCLI (``mmsr/demo/configs/sft.yaml``). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from mmsr.demo.reading import ReadingCorpus
from mmsr.demo.world import READING_TITLE_SUFFIX, write_reading_corpus

NAME = re.compile(r"Question: What is the name of this landmark\? Answer: ([^.]+)\.")
CITY = re.compile(r"Answer: It stands in the city of (\w+)\.")


def train(out: Path, world: Path, seed: int, steps: int | None, extra: list[str]) -> dict:
    """``steps`` reading steps (None: sft.yaml's) and nothing else into ``out/sft`` (the policy exported to
    ``out/sft/policy``), seeded as ``mmsr demo --seed`` seeds its warm start; their seconds and the mean reading loss of
    every 50 steps' first 25."""
    from mmsr.cli import lightning_cli
    from mmsr.demo.run import CONFIGS, overrides, sft_overrides

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "world").exists():
        (out / "world").symlink_to(world.resolve())
    start = time.perf_counter()
    config = ["-c", str(CONFIGS / "sft.yaml"), *overrides(out, seed, None), *sft_overrides(out, steps, 0)]
    lightning_cli(["fit", *config, *extra])
    with open(out / "sft" / "csv" / "metrics.csv", newline="") as f:
        losses = [float(row["reading/loss"]) for row in csv.DictReader(f) if row.get("reading/loss")]
    means = {i: round(sum(losses[i:i + 25]) / len(losses[i:i + 25]), 3) for i in range(0, len(losses), 50)}
    return {"seconds": round(time.perf_counter() - start, 1), "reading_loss": means}


def fresh_pages(world: Path, n: int, seed: int) -> list[str]:
    """``n`` reading pages (as the reading steps read them: ``write_reading_corpus``'s rows, ``ReadingCorpus``'s
    layout) about landmarks in neither the world nor its reading corpus: a name or city the policy saw with its page
    cannot be recalled instead of copied."""
    landmarks = json.loads((world / "world.json").read_text(encoding="utf-8"))
    reading = (world / "reading.jsonl").read_text(encoding="utf-8").splitlines()
    seen = {json.loads(line)["title"].removesuffix(READING_TITLE_SUFFIX) for line in reading}
    seen |= {row["name"] for row in landmarks}
    with tempfile.TemporaryDirectory() as tmp:
        write_reading_corpus(seen, n, seed, sorted({row["city"] for row in landmarks}), Path(tmp))
        return ReadingCorpus([str(Path(tmp) / "reading.jsonl")]).docs


def load_policy(policy_dir: Path) -> tuple:
    """(tokenizer, model) of an exported policy, the model in eval mode."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    return AutoTokenizer.from_pretrained(policy_dir), AutoModelForImageTextToText.from_pretrained(policy_dir).eval()


def copy_rates(tokenizer, model, pages: list[str], per_sequence: int) -> dict[str, float]:
    """Share of pages whose name (city) answer ``model`` predicts token by token (argmax, teacher-forced), the
    pages packed ``per_sequence`` to a sequence in order."""
    right = {"name": 0, "city": 0}
    packs = [pages[i:i + per_sequence] for i in range(0, len(pages) - per_sequence + 1, per_sequence)]
    for pack in packs:
        text = "".join(pack)
        enc = tokenizer(text, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])  # [1, T]
        with torch.no_grad():
            predicted = model(input_ids=ids).logits[0].argmax(-1).tolist()  # [T]: the next token after each
        spans = [(kind, m.span(1)) for kind, rx in (("name", NAME), ("city", CITY)) for m in rx.finditer(text)]
        for kind, (a, b) in spans:
            at = [j for j, (s, e) in enumerate(enc["offset_mapping"]) if s < b and e > a and j > 0]
            right[kind] += all(predicted[j - 1] == enc["input_ids"][j] for j in at)
    n = len(packs) * per_sequence
    return {kind: round(hits / n, 3) for kind, hits in right.items()}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    epilog = ("SFT_ARGS after -- go to the warm start's LightningCLI (mmsr/demo/configs/sft.yaml), e.g. "
              "-- --model.init_args.reading.init_args.single_page_steps 0")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage="%(prog)s [options] [-- SFT_ARGS ...]",
                                 epilog=epilog)  # fmt: skip
    ap.add_argument("--out", type=Path, default=Path("runs/reading_probe"), help="the run's folder (world, sft/)")
    ap.add_argument("--world", type=Path, default=None,
                    help="an existing demo world (default: --out's world, built with --seed if missing)")
    ap.add_argument("--seed", type=int, default=0, help="the warm start's seed, and the world's when one is built")
    ap.add_argument("--steps", type=int, default=None, help="reading steps (default: sft.yaml's reading_steps)")
    ap.add_argument("--policy", type=Path, default=None, help="probe this exported policy instead of training one")
    ap.add_argument("--pages", type=int, default=201, help="fresh pages probed (a multiple of 3 probes each)")
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    world = args.world or args.out / "world"
    if args.world is None and not (world / "world.json").exists():
        from mmsr.demo.world import build_world

        build_world(world, seed=args.seed)
    report = {} if args.policy else train(args.out, world, args.seed, args.steps, extra)
    pages = fresh_pages(world, args.pages, seed=10_007)
    tokenizer, model = load_policy(args.policy or args.out / "sft" / "policy")
    report |= {packing: copy_rates(tokenizer, model, pages, n) for packing, n in (("one_page", 1), ("three_pages", 3))}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
