"""Soak: ``mmsr fit`` for hundreds of steps against a faulty web, killed with -9 and resumed.

    PYTHONPATH=tests/cpu_shim .venv/bin/python benchmarks/soak.py --steps 300 --kills 2 --out runs/soak

Three processes, as in a real deployment: ``FakeWeb`` (``mmsr.tools.web.fake``: every provider on 127.0.0.1,
``--fault-rate`` of its requests faulted), ``mmsr serve-search`` with the web backends pointed at it, and
``mmsr fit`` on the smoke config with both tools asking the server (``HTTPSearchTool``) and the soak's engine
forcing an image and a text search into every episode (``benchmarks/soak_engine.py``: a random-weight policy
would search never). The trainer checkpoints every step and is killed with SIGKILL ``--kills`` times, at
steps and delays drawn from ``--seed``, then resumed from ``last.ckpt``. Every second the soak samples RSS,
open fds and threads of each process (``/proc``) and the cache file's size.

Cache: image search goes through ``CachedTool`` in mode ``off`` (the smoke data has 20 images: a cache would
answer every image search after the first epoch and the Lens faults would stop); text search is
``read_write``, and half its queries repeat (hits) while half are new on every call (misses that reach the
provider at every step; the cache grows by one row per new query that succeeded).

Provider keys exist only in the server's environment; the trainer holds the server token. The soak prints one
JSON object (``benchmarks/soak_report.py`` says what each figure means) and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.soak_monitor import Monitor  # noqa: E402 - after the path insert, for `python benchmarks/soak.py`
from benchmarks.soak_report import report  # noqa: E402

PROVIDER_KEYS = ("SERPAPI_API_KEY", "SERPER_API_KEY", "JINA_API_KEY", "OPENAI_API_KEY")
TOKEN_ENV = "MMSR_SEARCH_TOKEN"


def options(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--kills", type=int, default=2, help="SIGKILLs of the trainer, each followed by a resume")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill times, the faults and the keys")
    p.add_argument("--fault-rate", type=float, default=0.3)
    p.add_argument("--attempt-timeout-s", type=float, default=1.0, help="one provider attempt (hangs last longer)")
    p.add_argument("--hang-s", type=float, default=3.0)
    p.add_argument("--retries", type=int, default=2, help="provider retries after a retryable failure")
    p.add_argument("--tool-timeout-s", type=float, default=60.0, help="rollout.tool_timeout_s")
    p.add_argument("--warmup-steps", type=int, default=20, help="steps of each trainer process before RSS counts")
    p.add_argument("--max-rss-growth-mb", type=float, default=64.0, help="check: RSS growth per 100 steps")
    p.add_argument("--max-fd-growth", type=int, default=8, help="check: rise of the open-fd floor of a process")
    p.add_argument("--stall-s", type=float, default=600.0, help="a trainer without a new step this long is a crash")
    p.add_argument("--out", default="runs/soak")
    p.add_argument("--reanalyse", action="store_true", help="report on the soak already in --out, run nothing")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_keys(seed: int) -> dict[str, str]:
    """One long, distinct key per variable, so a leak names where it came from."""
    rng = random.Random(seed)
    keys = {name: f"soak-{name.split('_')[0].lower()}-{rng.getrandbits(96):024x}" for name in PROVIDER_KEYS}
    return keys | {TOKEN_ENV: f"soak-token-{rng.getrandbits(96):024x}"}


def limits(o: argparse.Namespace) -> dict[str, Any]:
    """Every provider's ``Limits``: short timeouts, no breaker (the soak measures steady fault handling)."""
    return {"timeout_s": o.attempt_timeout_s, "retries": o.retries, "backoff_s": 0.05, "backoff_max_s": 0.2,
            "concurrency": 64, "breaker_failures": 0, "max_bytes": 1_000_000}  # fmt: skip


def server_config(o: argparse.Namespace, out: Path, fake: str, port: int) -> dict[str, Any]:
    """``mmsr serve-search`` with SerpAPI Lens and Serper -> Jina -> summarizer, all at the fake."""
    lim, cache = limits(o), str(out / "tool_cache.sqlite")  # the dump writes the shared `lim` once, as a YAML alias
    lens = {"class_path": "mmsr.tools.web.providers.SerpAPILens",
            "init_args": {"endpoint": f"{fake}/serpapi/search.json", "limits": lim}}  # fmt: skip
    host = {"class_path": "mmsr.tools.web.image_search.URLTemplateHost",
            "init_args": {"template": f"{fake}/images/{{sample_id}}.jpg"}}  # fmt: skip
    image = {"class_path": "mmsr.tools.web.image_search.WebImageSearch",
             "init_args": {"provider": lens, "image_host": host, "top_k": 3, "max_candidates": 5,
                           "allow_private": True, "thumbnail_limits": lim}}  # fmt: skip
    text = {"class_path": "mmsr.tools.web.text_search.WebTextSearch", "init_args": {
        "provider": {"class_path": "mmsr.tools.web.providers.Serper",
                     "init_args": {"endpoint": f"{fake}/serper/search", "limits": lim}},
        "reader": {"class_path": "mmsr.tools.web.reader.JinaReader",
                   "init_args": {"endpoint": f"{fake}/jina/", "allow_private": True, "limits": lim}},
        "summarizer": {"class_path": "mmsr.tools.web.summarizer.OpenAISummarizer",
                       "init_args": {"base_url": f"{fake}/v1", "model": "fake-summarizer", "limits": lim}},
        "top_k": 3, "max_candidates": 5}}  # fmt: skip

    def cached(tool: dict, mode: str) -> dict:
        return {"class_path": "mmsr.tools.cache.CachedTool",
                "init_args": {"tool": tool, "path": cache, "mode": mode, "run_id": "soak"}}  # fmt: skip

    return {"server": {"host": "127.0.0.1", "port": port, "token_env": TOKEN_ENV, "shutdown_timeout_s": 5.0,
                       "image_search": cached(image, "off"), "text_search": cached(text, "read_write")}}  # fmt: skip


def trainer_config(o: argparse.Namespace, out: Path, server: str) -> dict[str, Any]:
    """The smoke config: ``--steps`` steps, a checkpoint after each, both tools asking the server."""
    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text(encoding="utf-8"))
    run = str(out / "run")
    cfg["trainer"].update(max_steps=o.steps, default_root_dir=run, enable_progress_bar=False)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = run
    cfg["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(out / "ckpt"), "save_top_k": 0, "save_last": True, "every_n_train_steps": 1}},
        {"class_path": "mmsr.callbacks.trajectory_logger.TrajectoryLogger",
         "init_args": {"every_n_steps": 1, "max_trajectories": 8}},
    ]  # fmt: skip
    model = cfg["model"]["init_args"]
    inner = {"class_path": "mmsr.rollout.hf_engine.HFEngine", "init_args": {"seed": 0}}
    model["engine"] = {"class_path": "benchmarks.soak_engine.AlwaysSearch", "init_args": {"inner": inner}}
    for kind in ("image_search", "text_search"):  # one dict each: a shared one would be dumped as a YAML alias
        args = {"url": server, "token_env": TOKEN_ENV, "kind": kind}
        model[kind] = {"class_path": "mmsr.tools.server.HTTPSearchTool", "init_args": args}
    model["rollout"].update(tool_timeout_s=o.tool_timeout_s, max_tokens_per_turn=48)  # forced queries: <= 30 tokens
    return cfg


def environment(keys: dict[str, str], names: tuple[str, ...]) -> dict[str, str]:
    """This environment without any provider key, plus ``names`` from ``keys`` and the repository on the path."""
    env = {k: v for k, v in os.environ.items() if k not in keys}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env | {n: keys[n] for n in names}


def spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def get_json(url: str, token: str | None = None, timeout_s: float = 5.0) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as r:
        return json.load(r)


def wait_until(ready, proc: subprocess.Popen, what: str, timeout_s: float = 120.0) -> Any:
    """Poll ``ready()`` until it returns something truthy; ``RuntimeError`` if ``proc`` dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        try:
            if value := ready():
                return value
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} was not ready after {timeout_s:g} s")


def start_fake(o: argparse.Namespace, out: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    log = out / "logs" / "fake.log"
    cmd = [sys.executable, "-m", "mmsr.tools.web.fake", "--fault-rate", str(o.fault_rate), "--seed", str(o.seed),
           "--hang-s", str(o.hang_s), "--huge-bytes", "2000000"]  # fmt: skip
    proc = spawn(cmd, log, env)

    def url() -> str | None:
        lines = log.read_text().splitlines()
        return next((s.removeprefix("fake web on ") for s in lines if s.startswith("fake web on ")), None)

    return proc, wait_until(url, proc, "the fake web")


def start_server(o: argparse.Namespace, out: Path, fake: str, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    path = out / "server.yaml"
    path.write_text(yaml.safe_dump(server_config(o, out, fake, port)), encoding="utf-8")
    proc = spawn([sys.executable, "-m", "mmsr", "serve-search", "-c", str(path)], out / "logs" / "server.log", env)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: get_json(url + "/health"), proc, "the search server")
    return proc, url


def kill_plan(o: argparse.Namespace) -> list[tuple[int, float]]:
    """(steps done, then seconds) before each SIGKILL: distinct steps in the middle 80% of the run."""
    rng = random.Random(o.seed)
    lo, hi = max(1, o.steps // 10), max(2, o.steps * 9 // 10)
    steps = sorted(rng.sample(range(lo, hi), min(o.kills, hi - lo)))
    return [(s, round(rng.uniform(0.0, 3.0), 2)) for s in steps]


def run_trainer(cmd: list[str], log: Path, env: dict[str, str], monitor: Monitor,
                kill: tuple[int, float] | None, stall_s: float) -> dict[str, Any]:  # fmt: skip
    """One trainer process until it exits, is killed as planned, or stalls; what happened to it."""
    proc = spawn(cmd, log, env)
    segment = monitor.watch_trainer(proc.pid)
    started, last_step, last_change = time.monotonic(), monitor.steps_done(), time.monotonic()
    while proc.poll() is None:
        time.sleep(0.2)
        if (done := monitor.steps_done()) != last_step:
            last_step, last_change = done, time.monotonic()
        if kill is not None and done >= kill[0]:
            time.sleep(kill[1])
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return {"segment": segment, "exit": proc.returncode, "killed_after_step": kill[0], "delay_s": kill[1],
                    "steps_done": monitor.steps_done(), "wall_s": time.monotonic() - started}  # fmt: skip
        if time.monotonic() - last_change > stall_s:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return {"segment": segment, "exit": "stalled", "steps_done": done, "wall_s": time.monotonic() - started}
    return {"segment": segment, "exit": proc.returncode, "steps_done": monitor.steps_done(),
            "wall_s": time.monotonic() - started}  # fmt: skip


def train(o: argparse.Namespace, out: Path, server: str, env: dict[str, str], monitor: Monitor) -> list[dict]:
    """The trainer, killed and resumed per ``kill_plan``; one record per process."""
    path = out / "trainer.yaml"
    path.write_text(yaml.safe_dump(trainer_config(o, out, server)), encoding="utf-8")
    base = [sys.executable, "-m", "mmsr", "fit", "-c", str(path)]
    plan, segments = kill_plan(o), []
    while True:
        i = len(segments)
        resume = ["--ckpt_path", str(out / "ckpt" / "last.ckpt")] if i else []
        kill = plan[i] if i < len(plan) else None
        segments.append(run_trainer(base + resume, out / "logs" / f"trainer-{i}.log", env, monitor, kill, o.stall_s))
        if segments[-1]["exit"] != -signal.SIGKILL or "killed_after_step" not in segments[-1]:
            return segments


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def run(o: argparse.Namespace) -> dict[str, Any]:
    """The whole soak; the report (``soak_report.report``)."""
    out = Path(o.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    keys, started = fake_keys(o.seed), time.monotonic()
    fake, fake_url = start_fake(o, out, environment(keys, ()))
    server, server_url = start_server(o, out, fake_url, environment(keys, (*PROVIDER_KEYS, TOKEN_ENV)))
    monitor = Monitor(out, {"server": server.pid, "fake": fake.pid})
    try:
        monitor.start()
        segments = train(o, out, server_url, environment(keys, (TOKEN_ENV,)), monitor)
        time.sleep(2.0)  # let the server finish what killed trainers left in flight
        stats, served = get_json(fake_url + "/_stats"), get_json(server_url + "/v1/metrics", keys[TOKEN_ENV])
    finally:
        monitor.stop()
        codes = {"server": stop(server), "fake": stop(fake)}
    wall_s = time.monotonic() - started
    raw = {"segments": segments, "fake_stats": stats, "server_metrics": served, "exit_codes": codes, "wall_s": wall_s}
    (out / "raw.json").write_text(json.dumps(raw, indent=1), encoding="utf-8")  # with monitor.jsonl: re-analysable
    return report(o, out, segments, monitor.samples, stats, served, keys, codes, wall_s)


def reanalyse(o: argparse.Namespace) -> dict[str, Any]:
    """The report of the soak in ``--out`` (its ``raw.json`` and ``monitor.jsonl``), e.g. with another warm-up."""
    out = Path(o.out).resolve()
    raw = json.loads((out / "raw.json").read_text(encoding="utf-8"))
    samples = [json.loads(line) for line in (out / "monitor.jsonl").read_text(encoding="utf-8").splitlines()]
    return report(o, out, raw["segments"], samples, raw["fake_stats"], raw["server_metrics"], fake_keys(o.seed),
                  raw["exit_codes"], raw["wall_s"])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    o = options(argv)
    result = reanalyse(o) if o.reanalyse else run(o)
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
