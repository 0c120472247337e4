"""The benchmarks keep working: each runs once on its smallest setting (timings are not tested)."""

import importlib
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT, import_optional, subprocess_env

BEFORE = "7653dff"  # README's generation_ab.py --before: the commit that added vs_trl.py, before issue #15's speed work


def benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the scripts import their siblings from their own folder)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_vs_trl_runs_both_trainers_for_one_step_alternated_twice():
    import_optional("trl", 'pip install -e ".[bench]" to run the TRL comparison')
    proc = subprocess.run([sys.executable, "benchmarks/vs_trl.py", "--steps", "1", "--rounds", "2"], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.rindex("{\n  \"workload\""):])  # after the trainers' own logs
    assert out["trl_s_per_step"] > 0 and out["mmsr_s_per_step"] > 0
    assert out["steps_timed"] == {"trl": 2, "mmsr": 2}  # one step of each in each of the two rounds
    # the same fp32 workload for both: TRL's configs default to bf16 autocast (5x slower a step on an AVX2-only CPU)
    assert out["trl_mixed_precision"] == "no"
    # and the same passes at the same lr: TRL 1.16 defaults to gradient checkpointing and a linear lr decay
    assert out["trl_gradient_checkpointing"] is False and out["trl_lr_scheduler"] == "constant"
    assert out["trl_over_mmsr"] == pytest.approx(out["trl_s_per_step"] / out["mmsr_s_per_step"])
    assert set(out["mmsr_stages_s"]) == {"rollout", "generate", "reward", "train", "sync"}
    bound = out["lower_bound"]
    assert 0 < bound["seconds"] < out["mmsr_s_per_step"] and bound["params"] > 500_000
    # the same sampled work for both: 1,997 tokens each here; mmsr stopped at </answer> and the tools' closing
    # tags, tokens a random policy samples (1,940: 2.9% fewer, ~7% over more steps)
    assert out["mmsr_sampled_tokens"] == pytest.approx(out["trl_sampled_tokens"], rel=0.02)
    assert bound["sampled_per_step"] <= 32 * 64


def test_vs_trl_mmsr_samples_each_completion_to_eos_or_64_tokens_as_trl_does(tmp_path):
    """TRL stops a completion only at eos; mmsr's loop adds the MMSearch-R1 stop strings to any sampling
    (``</answer>``, ``</search>``, ``</text_search>``: single tokens of the workload's BPE). One rollout of
    the first step's 8 x 4 rows: none may end before 64 tokens but on eos (3 ended on a stop string)."""
    import torch

    vs_trl = benchmark("vs_trl")
    torch.manual_seed(0)
    policy, prompts, samples = vs_trl.workload(tmp_path)
    module = vs_trl.mmsr_module(policy, prompts)
    module.start_engine()
    trajs = module.loop.run(vs_trl.batches(samples, 1), vs_trl.GENERATIONS, module.sampling)
    eos = module.policy.stop_token_ids()
    early = [t.turns[0].text[-16:] for t in trajs if t.num_sampled_tokens < vs_trl.MAX_TOKENS and t.input_ids[-1] not in eos]
    assert len(trajs) == 32 and early == []


def test_vs_trl_configures_trl_as_mmsr_trains(tmp_path):
    """No gradient checkpointing and a constant lr, as ``GRPOModule`` trains by default (TRL 1.16's
    ``GRPOConfig`` defaults to checkpointing and a linear decay to 0)."""
    import inspect

    from mmsr.module import GRPOModule

    import_optional("trl", 'pip install -e ".[bench]" to run the TRL comparison')
    vs_trl = benchmark("vs_trl")
    config = vs_trl.trl_config(tmp_path, steps=3)
    mmsr = inspect.signature(GRPOModule.__init__).parameters
    assert config.gradient_checkpointing is False and mmsr["gradient_checkpointing"].default is False
    assert config.lr_scheduler_type == "constant" == mmsr["lr_schedule"].default
    assert (config.bf16, config.learning_rate, config.max_steps, config.beta) == (False, vs_trl.LR, 3, 0.0)


def test_vs_trl_lower_bound_counts_the_least_work_either_trainer_must_do():
    """A hand count on a 2-layer Qwen2 of hidden 8 (2 heads of 4, 1 KV head), FFN 16, a tied 10-token head."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vs_trl = benchmark("vs_trl")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    model = Qwen2ForCausalLM(config)
    # a layer's matrices: q and o 8 x 8, k and v 8 x 4, gate, up and down 8 x 16: 576 (biases and norms are
    # not matmuls, the embedding is a lookup); the head (the tied embedding) 10 x 8
    assert vs_trl.matmul_params(model) == (2 * 576, 80)
    # 8 prompts x 4 rows (vs_trl's workload), each 6 prompt tokens + 4 sampled: through the layers go the 8
    # prompts once (48) and each row's sampled tokens but its last (32 x 3 = 96), 144 tokens; logits at
    # the 96 and after each prompt (8: a group's rows share them), 104 positions
    forward = 2 * (1152 * 144 + 80 * 104)  # 348,416 FLOPs: generation's; training's is 3x (forward, backward)
    steps = [{"rollout/length": 10.0, "rollout/response_tokens": 4.0},
             {"rollout/length": 9.0, "rollout/response_tokens": 3.0},  # fewer: 2 x (1152 x 112 + 80 x 72)
             {"rollout/length": 12.0, "rollout/response_tokens": 6.0}]  # fmt: skip
    bound = vs_trl.lower_bound_s(SimpleNamespace(model=model), steps, rate=1e6)  # the median step's
    assert (bound["generate_flops"], bound["train_flops"], bound["step_flops"]) == (forward, 3 * forward, 4 * forward)
    assert bound["seconds"] == pytest.approx(4 * forward / 1e6)  # the old count, 8 x 1,304 params x 10 x 32: 2.4x


def test_vs_trl_times_generation_alone_without_trl():
    proc = subprocess.run([sys.executable, "benchmarks/vs_trl.py", "--generation", "1"], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["requests"] == 32 and 32 <= out["tokens"] <= 32 * 64
    assert 0 < out["wall_s"]["min"] <= out["wall_s"]["median"] and len(out["digest"]) == 16


def test_rollout_engines_syncs_the_policy_into_vllm_before_timing_it(monkeypatch):
    """vLLM starts from dummy weights: timed before a sync it would sample from random weights, not the
    policy HF samples from. A stand-in engine records the order (no vLLM run here)."""
    rollout_engines = benchmark("rollout_engines")
    calls = []

    class Recorder:
        def __init__(self, **kwargs) -> None:
            self.llm = SimpleNamespace(reset_prefix_cache=lambda: None)

        def bind(self, policy) -> None:
            calls.append("bind")

        def update_weights(self, named_tensors) -> None:
            calls.append(f"sync {len(list(named_tensors))} tensors")

        def generate(self, requests, sampling):
            calls.append("generate")
            return [SimpleNamespace(token_ids=[0])] * len(requests)

    monkeypatch.setattr(rollout_engines, "VLLMEngine", Recorder)
    monkeypatch.setattr(rollout_engines, "bare_vllm", lambda llm, requests, max_tokens: lambda: len(requests))
    rollout_engines.main(["--prompts", "1", "--n", "1", "--max-tokens", "2", "--hidden", "64", "--layers", "1",
                          "--repeats", "1"])  # fmt: skip
    # the whole policy: the tied embedding once, the layer's 12 (q, k, v with biases, o, MLP, 2 norms), the norm
    assert calls[:3] == ["bind", "sync 14 tensors", "generate"]


PACKED = ["--route", "packed", "--checkpointed", "--device", "cpu", "--hidden", "256", "--layers", "2"]


@pytest.mark.parametrize("route", [[], PACKED], ids=["cache", "packed"])
def test_shared_prefix_benchmark_runs_both_ways_and_they_agree(route):
    cmd = [sys.executable, "benchmarks/shared_prefix.py", "--repeats", "1", "--groups", "2", "--generations", "3", *route]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    tokens = out["tokens"]
    assert out["episodes"] == 6 and tokens["shared"] < tokens["real"] <= tokens["whole"]
    assert out["max_logprob_diff"] < 1e-4 and out["whole_s"] > 0 and out["shared_s"] > 0
    assert out["whole_over_shared"] == pytest.approx(out["whole_s"] / out["shared_s"])
    assert (out["route"], out["checkpointed"]) == (("packed", True) if route else ("cache", False))
    assert out["device"] == "cpu"  # --device (cuda where a GPU is lent) moves the passes, not the scripting
    assert out["decoder"] == ({"hidden": 256, "layers": 2} if route else {"hidden": 128, "layers": 4})
    assert 0 < out["paper_7b_tflops"]["shared"] < out["paper_7b_tflops"]["whole"]


def test_shared_prefix_benchmark_bf16_runs_the_forwards_in_bf16():
    """``--bf16`` (the recipes' bf16-mixed, as timed on the GPU): the two ways then round differently, by bf16's
    steps rather than fp32's (~1e-6 above)."""
    cmd = [sys.executable, "benchmarks/shared_prefix.py", "--repeats", "1", "--groups", "1", "--generations", "3",
           "--route", "packed", "--checkpointed", "--bf16", "--hidden", "128", "--layers", "1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["bf16"] is True and 1e-5 < out["max_logprob_diff"] < 0.1


def test_distinct_images_benchmark_runs_both_ways_and_they_agree():
    cmd = [sys.executable, "benchmarks/distinct_images.py", "--repeats", "1", "--groups", "2", "--generations", "3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["episodes"] == 6 and 0 < out["patches_distinct"] < out["patches_every_copy"] and 0 < out["vision_share"] < 1
    assert out["max_logprob_diff"] < 1e-4 and out["every_copy_s"] > 0 and out["distinct_s"] > 0
    assert out["every_over_distinct"] == pytest.approx(out["every_copy_s"] / out["distinct_s"])


def device_check_rows(*args: str) -> tuple[int, dict[str, dict]]:
    proc = subprocess.run([sys.executable, "benchmarks/device_checks.py", "--device", "cpu", *args], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, {r["check"]: r for r in rows}


def test_the_prepared_gpu_checks_pass_on_the_cpu():
    code, rows = device_check_rows("--steps", "2")
    assert code == 0 and list(rows) == ["environment", "engine_parity", "bf16_mixed", "plan"]
    assert rows["engine_parity"]["tokens"] > 0 and rows["engine_parity"]["max_abs_diff"] < 1e-5
    bf16 = rows["bf16_mixed"]
    assert bf16["param_dtypes"] == ["torch.float32"] and bf16["matmul_outputs"] == ["torch.bfloat16"]
    assert bf16["steps"] == 2 and bf16["share_of_weights_moved"] > 0.5
    assert rows["plan"]["peak"] >= rows["plan"]["training"] > 0 and rows["plan"]["measured_peak_allocated"] is None


def test_the_gpu_checks_take_the_largest_peak_the_run_logged(tmp_path):
    """The module resets CUDA's peak at each step's reading: the plan check compares the largest logged one
    (here as Lightning's CSVLogger writes it, beside rows without it), not what followed the last reset."""
    from lightning.pytorch.loggers import CSVLogger

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from device_checks import logged_peak
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert logged_peak(tmp_path) == 0
    logger = CSVLogger(tmp_path / "run", name="csv")
    for step, metrics in enumerate([{"memory/cuda_peak_gb": 1.5}, {"train/loss": 0.1}, {"memory/cuda_peak_gb": 7.25},
                                    {"memory/cuda_peak_gb": 2.0}]):  # fmt: skip
        logger.log_metrics(metrics, step=step)
    logger.save()
    assert logged_peak(tmp_path / "run") == 7.25 * 2**30


def test_the_plan_check_on_a_gpu_fails_with_nothing_measured(monkeypatch, capsys):
    """On CUDA the plan check compares the plan with bf16_mixed's measured peak: run without it (here
    alone; a stand-in plan, no GPU needed) it has nothing to compare and must not report ok."""
    import mmsr.plan

    device_checks = benchmark("device_checks")
    monkeypatch.setattr(device_checks, "run_args", lambda device, args, tmp: [])
    planned = {"peak": 100, "memory": {"training": {"total": 100}, "rollout": {"total": 10}}}
    monkeypatch.setattr(mmsr.plan, "main", lambda argv: planned)
    with pytest.raises(SystemExit) as exit_:
        device_checks.main(["--device", "cuda", "--checks", "plan"])
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert exit_.value.code == 1 and not row["ok"] and "bf16_mixed" in row["error"]


def test_a_failing_gpu_check_is_reported_and_the_others_still_run():
    # 60 / 4 heads: a head size of 15, which the model's M-RoPE cannot split (the plan, on paper, runs)
    code, rows = device_check_rows("--hidden", "60", "--checks", "environment", "engine_parity", "plan")
    assert code == 1 and list(rows) == ["environment", "engine_parity", "plan"]
    assert rows["environment"]["ok"] and rows["plan"]["ok"] and rows["plan"]["peak"] > 0
    assert not rows["engine_parity"]["ok"] and "split_sizes" in rows["engine_parity"]["error"]


def test_generation_ab_times_a_revision_and_this_checkout_on_one_workload():
    """HEAD against this checkout (the same code in a CI clone): the same sampled work, both timed."""
    def worktrees() -> str:
        return subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout

    there = worktrees()
    cmd = [sys.executable, "benchmarks/generation_ab.py", "--before", "HEAD", "--rounds", "1", "--steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    before, after = out["before_s"], out["after_s"]
    assert before["length"] == after["length"] > 32 and before["first_step"] == after["first_step"]
    assert all(before[k] > 0 and after[k] > 0 for k in ("step", "generate", "train"))
    assert out["before_over_after"]["generate"] == pytest.approx(before["generate"] / after["generate"])
    assert worktrees() == there  # the temporary one is gone


def test_the_revision_the_readme_times_generation_against_imports_in_this_environment():
    """README's ``generation_ab.py --before 7653dff`` runs that commit's mmsr in this virtualenv: every package it
    required must be installed here at a version it accepts (it needed aiolimiter, which mmsr later dropped, and
    the command failed on import; the ``bench`` extra pins it)."""
    import configparser
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    if subprocess.run(["git", "cat-file", "-e", f"{BEFORE}^{{commit}}"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip(f"a clone without {BEFORE} (shallow): generation_ab.py --before {BEFORE} cannot run here either")
    shown = subprocess.run(["git", "show", f"{BEFORE}:setup.cfg"], cwd=ROOT, capture_output=True, text=True, check=True)
    cfg = configparser.ConfigParser()
    cfg.read_string(shown.stdout)
    missing = []
    for line in filter(None, cfg["options"]["install_requires"].splitlines()):
        req = Requirement(line)
        try:
            if not req.specifier.contains(version(req.name), prereleases=True):
                missing.append(f"{line} (installed {version(req.name)})")
        except PackageNotFoundError:
            missing.append(line)
    assert not missing and BEFORE in (ROOT / "README.md").read_text()


def test_the_share_of_weights_moved_counts_weights_not_tensors():
    """A 1-weight tensor that moved beside a 9-weight one that did not: a tenth of the weights moved (a mean of
    per-tensor shares said half)."""
    import torch

    device_checks = benchmark("device_checks")
    initial = {"norm": torch.zeros(1), "embed": torch.zeros(3, 3)}
    after = {"norm": torch.ones(1), "embed": torch.zeros(3, 3)}
    assert device_checks.share_moved(initial, after.items()) == pytest.approx(0.1)
    after["embed"][0] = 1.0  # 3 of its 9 weights too: 4 of 10
    assert device_checks.share_moved(initial, after.items()) == pytest.approx(0.4)


def test_alternated_warms_both_ways_up_before_timing_either():
    """A stand-in for the passes whose first call of each way is cold (100 s, then 1 s): neither way's median
    may hold a cold call, and each way runs once before the timed turns."""
    import torch

    shared_prefix = benchmark("shared_prefix")
    calls: list[bool] = []

    def passes(policy, batches, shared):
        calls.append(shared)
        return (1.0 if calls.count(shared) > 1 else 100.0), [torch.zeros(2)]

    whole, shared, diff = shared_prefix.alternated(passes, None, None, repeats=2)
    assert (whole, shared, diff) == (1.0, 1.0, 0.0)
    assert calls == [False, True] * 3  # the warm-up of each way, then 2 timed turns


def test_grpo_step_medians_leave_the_warm_up_step_out():
    """The first step (compiles, allocates, fills caches) is 10x slower here: the medians are the other steps'."""
    grpo_step = benchmark("grpo_step")
    timings = ("timing/rollout", "timing/generate", "timing/tools", "timing/reward", "timing/train", "timing/sync")

    def step(seconds: float, tokens_per_s: float) -> dict[str, float]:
        return {**dict.fromkeys(timings, seconds), "rollout/tokens_per_s": tokens_per_s, "rollout/length": 20.0}

    out = grpo_step.summary([step(10.0, 5.0), step(1.0, 50.0), step(2.0, 40.0)], episodes=4)
    assert out["steps_timed"] == 2 and out["seconds_per_step"]["train"] == 1.5  # not 2.0, the median of all 3
    assert set(out["seconds_per_step"]) == {"rollout", "generate", "tools", "reward", "train", "sync"}
    assert out["rollout_tokens_per_s"] == 45.0 and out["train_tokens_per_s"] == (80 / 1.0 + 80 / 2.0) / 2
    one = grpo_step.summary([step(10.0, 5.0)], episodes=4)  # a 1-step run: that step, as nothing else is timed
    assert one["steps_timed"] == 1 and one["seconds_per_step"]["train"] == 10.0


def test_the_gpu_checks_refuse_to_pass_on_the_cpu_unless_asked(capsys, monkeypatch):
    """Run as the README says on a node whose CUDA is not visible, the checks fell back to the CPU and passed,
    checking nothing they exist for; ``--device cpu`` (the tests') still runs them there."""
    device_checks = benchmark("device_checks")
    monkeypatch.setattr(device_checks.torch.cuda, "is_available", lambda: False)  # as here, also where a GPU is visible
    with pytest.raises(SystemExit) as exit_:
        device_checks.main(["--checks", "environment"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and "no CUDA device is visible" in last and "--device cpu" in last


def test_reading_probe_trains_reading_alone_and_probes_fresh_pages(tmp_path):
    """Two reading steps on a small world, then the probe: the JSON's keys, rates in [0, 1], the loss logged."""
    from mmsr.demo.world import build_world

    world = build_world(tmp_path / "world", seed=0, train_landmarks=12, eval_landmarks=3, reading_pages=30, cities=20)
    args = ["--world", str(world), "--out", str(tmp_path / "r"), "--steps", "2", "--pages", "6"]
    proc = subprocess.run([sys.executable, "benchmarks/reading_probe.py", *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.rindex('{\n "seconds"'):])
    assert list(out["reading_loss"]) == ["0"] and out["reading_loss"]["0"] > 0 and out["seconds"] > 0
    rates = [out[packing][kind] for packing in ("one_page", "three_pages") for kind in ("name", "city")]
    assert all(0.0 <= r <= 1.0 for r in rates)


def test_reading_probe_pages_are_new_and_their_answers_are_the_landmarks(tmp_path):
    """Probe pages name no landmark of the world or of its reading pages, and the probe's patterns find exactly
    each page's own name and city (what ``copy_rates`` scores)."""
    from mmsr.demo.world import build_world

    probe = benchmark("reading_probe")
    world = build_world(tmp_path / "world", seed=0, train_landmarks=12, eval_landmarks=3, reading_pages=30, cities=20)
    reading = [json.loads(line)["title"].removesuffix(" - photo gallery") for line in (world / "reading.jsonl").open()]
    seen = {row["name"] for row in json.loads((world / "world.json").read_text())} | set(reading)
    # seed 0 draws the world's landmarks first, seed 3 the reading pages' (``build_world``): both must be skipped
    pages = probe.fresh_pages(world, 40, seed=0) + probe.fresh_pages(world, 40, seed=3)
    names = [page.split("\n")[0].removeprefix("title: ").removesuffix(" - photo gallery") for page in pages]
    assert len(set(names[:40])) == len(set(names[40:])) == 40 and not set(names) & seen and len(reading) == 30
    for page, name in zip(pages, names):
        assert [m.group(1) for m in probe.NAME.finditer(page)] == [name]
        (city,) = [m.group(1) for m in probe.CITY.finditer(page)]
        assert f"{name} stands in the city of {city}." in page  # the fact the answer copies



class CharTokenizer:
    """One token a character (its code point), with offsets, as a fast tokenizer gives them."""

    def __call__(self, text: str, return_offsets_mapping: bool) -> dict:
        return {"input_ids": [ord(c) for c in text], "offset_mapping": [(i, i + 1) for i in range(len(text))]}


class Reader:
    """Predicts each next character of its input (teacher-forced copying at 100%), but the first character of each
    mention of ``wrong``."""

    def __init__(self, wrong: str = "") -> None:
        self.wrong = wrong

    def __call__(self, input_ids):
        import torch

        ids = input_ids[0].tolist()  # [T]
        text = "".join(map(chr, ids))
        missed = [bool(self.wrong) and text.startswith(self.wrong, j + 1) for j in range(len(ids) - 1)]
        nxt = [ids[j + 1] + miss for j, miss in enumerate(missed)] + [0]
        return SimpleNamespace(logits=torch.nn.functional.one_hot(torch.tensor([nxt]), 256).float())  # [1, T, 256]


def test_reading_probe_scores_an_answer_right_only_when_every_token_is_predicted(tmp_path):
    """A reader that copies every token scores 1.0; one wrong character of a page's city makes that city wrong and
    leaves its name right, each page alone and three packed alike."""
    from mmsr.demo.world import build_world

    probe = benchmark("reading_probe")
    world = build_world(tmp_path / "world", seed=0, train_landmarks=12, eval_landmarks=3, reading_pages=30, cities=20)
    pages = probe.fresh_pages(world, 6, seed=5)
    cities = [probe.CITY.search(page).group(1) for page in pages]
    wrong = round(1 - cities.count(cities[1]) / 6, 3)  # the pages in that city (a small world's 20 cities repeat)
    assert wrong < 1 and not any(cities[1] in probe.NAME.search(page).group(1) for page in pages)
    for per_sequence in (1, 3):
        assert probe.copy_rates(CharTokenizer(), Reader(), pages, per_sequence) == {"name": 1.0, "city": 1.0}
        assert probe.copy_rates(CharTokenizer(), Reader(cities[1]), pages, per_sequence) == {"name": 1.0, "city": wrong}


def test_reading_probe_of_a_policy_reuses_the_world_in_its_out_folder(tmp_path, monkeypatch, capsys):
    """``--policy`` again on a run's folder probes against the world already there (building one is ~a minute of
    the demo's and, with another ``--seed``, would exclude another world's names)."""
    import mmsr.demo.world as world_module

    probe = benchmark("reading_probe")
    world = world_module.build_world(tmp_path / "r" / "world", seed=0, train_landmarks=12, eval_landmarks=3,
                                     reading_pages=30, cities=20)  # fmt: skip
    monkeypatch.setattr(world_module, "build_world", lambda *a, **k: pytest.fail("the world was built again"))
    monkeypatch.setattr(probe, "load_policy", lambda path: (CharTokenizer(), Reader()))
    out = probe.main(["--out", str(tmp_path / "r"), "--policy", str(tmp_path / "policy"), "--pages", "6"])
    assert out == {"one_page": {"name": 1.0, "city": 1.0}, "three_pages": {"name": 1.0, "city": 1.0}}
    assert json.loads(capsys.readouterr().out) == out and (world / "world.json").exists()


def test_reading_probe_trains_the_demo_recipes_reading_steps_by_default(tmp_path, monkeypatch):
    """Without ``--steps`` the probe trains as many reading steps as sft.yaml's (a fixed 500 would now stop 150
    steps short of the demo's reading, within its three-page steps)."""
    import yaml

    import mmsr.cli
    from mmsr.demo.run import CONFIGS

    probe, seen = benchmark("reading_probe"), []
    monkeypatch.setattr(mmsr.cli, "lightning_cli", lambda args: (seen.append(args), pytest.fail("stop here"))[1])
    with pytest.raises(pytest.fail.Exception, match="stop here"):
        probe.main(["--out", str(tmp_path / "r"), "--world", str(tmp_path / "world")])
    init_args = yaml.safe_load((CONFIGS / "sft.yaml").read_text())["model"]["init_args"]
    args = seen[0]
    assert args[args.index("--model.init_args.reading_steps") + 1] == str(init_args["reading_steps"])
    assert args[args.index("--trainer.max_steps") + 1] == str(init_args["reading_steps"])  # no imitation step
