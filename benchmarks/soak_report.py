"""What the soak measured, and the checks it must pass (``benchmarks/soak.py`` runs it).

Faults are checked by two identities and one rate:
- every request the fake web answered was one attempt of a server-side ``HTTPClient`` (``requests ==
  calls + retries`` per route; the breaker is off, so no call is refused without a request);
- every injected fault was seen by the client it hit, as exactly one failed attempt of the matching kind:
  retried (``retry_<kind>``) or final (``<kind>``). Hangs are seen as ``timeout``, truncated and HTML bodies
  as ``bad_response`` (thumbnails: ``bad_image``, decoded by the tool, not the client), huge bodies as
  ``too_large``, a quoted key in a 401 as ``http_4xx`` and in a 200 ``error`` field as ``api_error`` (search
  APIs) or ``bad_response`` (reader, summarizer). A good answer quoting the key is no failure: it must come
  back masked (the leak scan). ``unaccounted`` counts the differences (0 required; a deadline that cut an
  attempt would show here, and in ``deadline_cuts``);
- retries turn most faults into successes, so a tool call that reaches the providers ends as a failure
  observation not with the fault rate but with ``n (1 + r + ... + r^R) + r^(R+1)`` for the first stage (Lens,
  Serper), ``r`` and ``n`` being the measured shares of its requests faulted retryably and not and ``R`` the
  retries, plus the small chance that every thumbnail or page fails; a cache hit cannot fail. The failures
  the trainer logged (``tools/failure_rate`` x calls, summed over the steps) must be within 4 standard
  errors of that rate times the calls that reached the providers.
The trainer's logged ``tools/*`` counters are its calls to the search server (no faults on that hop); the
providers' counters are the server's (``GET /v1/metrics``), which also saw the calls of steps a kill undid.
"""

from __future__ import annotations

import csv
import json
import math
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

MB = 2**20
RETRYABLE = {"http_429", "http_5xx", "timeout", "bad_response"}
DIRECT = {"http_429": "http_429", "http_5xx": "http_5xx", "hang": "timeout", "huge": "too_large", "echo_401": "http_4xx"}
SEARCH_APIS = ("serper", "serpapi_google", "serpapi_lens")
EPISODES_PER_STEP = 8  # the smoke config: 2 prompts x 4 generations
CANDIDATES = 5  # results per search in the soak's server config: thumbnails / pages tried before failing
MIN_SLOPE_STEPS = 50  # RSS moves by ~100 MB from step to step (sequence lengths): shorter fits are noise


def client_kind(route: str, fault: str) -> str | None:
    """The failure kind the route's client counts for an injected ``fault`` (None: not a failure)."""
    if fault in DIRECT:
        return DIRECT[fault]
    if fault == "echo_content":
        return None
    if route == "thumbnails":
        return "bad_image"
    return "api_error" if fault == "echo_error" and route in SEARCH_APIS else "bad_response"


def seen(served: dict[str, float], route: str, kind: str) -> int:
    if kind == "bad_image":
        return int(served.get("tools/image_search/thumbnail_bad_image", 0))
    return int(served.get(f"tools/{route}/{kind}", 0) + served.get(f"tools/{route}/retry_{kind}", 0))


def fault_table(stats: dict[str, Any], served: dict[str, float]) -> list[dict[str, Any]]:
    """Per route and client-side kind: faults injected, and failed attempts the client counted."""
    expected: Counter[tuple[str, str]] = Counter()
    for route, kinds in stats["injected"].items():
        for fault, n in kinds.items():
            if kind := client_kind(route, fault):
                expected[route, kind] += n
    for key in served:  # failures nobody injected (a spurious timeout) get a row too
        route, _, kind = key.removeprefix("tools/").partition("/")
        if route in stats["requests"] and kind not in ("calls", "retries"):
            expected[route, kind.removeprefix("retry_")] += 0
    return [{"route": r, "kind": k, "injected": n, "seen": seen(served, r, k)} for (r, k), n in sorted(expected.items())]


def per_route(served: dict[str, float]) -> dict[str, float]:
    """The server's counters without their tool kind (``tools/text_search/jina_reader/timeout`` ->
    ``tools/jina_reader/timeout``): it files each backend's under ``tools/<kind>/`` as the trainer does, and a
    route belongs to one kind."""
    out: dict[str, float] = {}
    for key, value in served.items():
        _, _, rest = key.removeprefix("tools/").partition("/")
        name = f"tools/{rest}" if key.startswith("tools/") and "/" in rest else key
        out[name] = out.get(name, 0.0) + value
    return out


def fault_accounting(stats: dict[str, Any], served: dict[str, float]) -> dict[str, Any]:
    """The two identities of the module docstring, with the figures behind them."""
    served = per_route(served)
    rows, requests = fault_table(stats, served), stats["requests"]
    attempts = {r: int(served.get(f"tools/{r}/calls", 0) + served.get(f"tools/{r}/retries", 0)) for r in requests}
    injected: Counter[str] = Counter()
    for kinds in stats["injected"].values():
        injected.update(kinds)
    total = sum(requests.values())
    return {
        "requests": total, "injected": dict(injected), "injected_rate": sum(injected.values()) / max(total, 1),
        "by_client": rows, "unaccounted": sum(abs(x["injected"] - x["seen"]) for x in rows),
        "requests_by_route": requests, "attempts_by_route": attempts,
        "attempts_unaccounted": sum(abs(attempts[r] - n) for r, n in requests.items()),
        "deadline_cuts": int(sum(v for k, v in served.items() if k.endswith("_deadline"))),
    }  # fmt: skip


def call_failure(r: float, n: float, retries: int) -> float:
    """P(a call fails): a non-retryable fault after 0..R retryable ones, or R+1 retryable ones."""
    return n * sum(r**i for i in range(retries + 1)) + r ** (retries + 1)


def route_failure(stats: dict[str, Any], route: str, retries: int) -> float:
    requests = max(stats["requests"].get(route, 0), 1)
    kinds = [(client_kind(route, f), m) for f, m in stats["injected"].get(route, {}).items()]
    r = sum(m for k, m in kinds if k in RETRYABLE) / requests
    n = sum(m for k, m in kinds if k is not None and k not in RETRYABLE) / requests
    return call_failure(r, n, retries)


def predicted_failure(stats: dict[str, Any], retries: int) -> dict[str, float]:
    """Per tool: the first stage fails, or it succeeds and every candidate thumbnail / page fails."""
    lens, thumb = (route_failure(stats, r, retries) for r in ("serpapi_lens", "thumbnails"))
    serper, read, summary = (route_failure(stats, r, retries) for r in ("serper", "jina_reader", "summarizer"))
    page = 1 - (1 - read) * (1 - summary)
    return {"image_search": lens + (1 - lens) * thumb**CANDIDATES,
            "text_search": serper + (1 - serper) * page**CANDIDATES}  # fmt: skip


def tool_outcomes(records: list[dict]) -> dict[str, Counter]:
    """Calls, cache hits and failure observations per tool, from the trajectory records. A hit is an answer
    that cost nothing: every provider answer, failed or not, costs the provider's ``cost_per_call``."""
    out = {"image_search": Counter(), "text_search": Counter()}
    for rec in records:
        for turn in rec["turns"]:
            if tool := turn.get("tool"):
                out[tool["kind"]].update(calls=1, failures=not tool["ok"], cache_hits=tool["ok"] and not tool["cost"])
    return out


def failure_share(rows: list[dict], records: list[dict], stats: dict[str, Any], retries: int) -> dict[str, Any]:
    """Failure observations the trainer logged and recorded, against the share the injected faults predict for
    the calls that reached the providers (a cache hit cannot fail)."""
    pred, outcomes = predicted_failure(stats, retries), tool_outcomes(records)
    calls = [float(r["tools/image_search_calls"]) + float(r["tools/text_search_calls"]) for r in rows]
    # the logged rate, per step; a step without calls logs none (an empty cell, or no column at all)
    failed = sum(float(r.get("tools/failure_rate") or 0.0) * n for r, n in zip(rows, calls))
    reached = {k: c["calls"] - c["cache_hits"] for k, c in outcomes.items()}
    expected = sum(reached[k] * pred[k] for k in pred)
    sigma = math.sqrt(sum(reached[k] * pred[k] * (1 - pred[k]) for k in pred))
    out: dict[str, Any] = {k: dict(c) | {"share": c["failures"] / max(c["calls"], 1),
                                         "predicted": reached[k] * pred[k] / max(c["calls"], 1),
                                         "predicted_per_provider_call": pred[k]} for k, c in outcomes.items()}  # fmt: skip
    out["logged"] = {"calls": int(sum(calls)), "failures": round(failed), "share": failed / max(sum(calls), 1)}
    return out | {"predicted_share": expected / max(sum(calls), 1), "z": (failed - expected) / max(sigma, 1e-9)}


def logged_counters(rows: list[dict]) -> dict[str, int]:
    """The trainer's ``tools/<kind>/search_server/*`` counters over the whole run: each step's row holds what
    that step added (``mmsr.metrics.ToolCounters``), so the totals are their sums."""
    keys = [k for k in rows[0] if "/search_server/" in k] if rows else []
    return {key: int(sum(float(r[key] or 0) for r in rows)) for key in keys}


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs (0 with fewer than 2 distinct xs)."""
    mx, my = sum(xs) / max(len(xs), 1), sum(ys) / max(len(ys), 1)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def steady(samples: list[dict], warmup_steps: int) -> list[dict]:
    """Per trainer process, its samples from ``warmup_steps`` steps after its first logged step."""
    out = []
    for seg in sorted({s["segment"] for s in samples}):
        mine = [s for s in samples if s["segment"] == seg and s.get("trainer")]
        moved = next((s["steps"] for s in mine if s["steps"] != mine[0]["steps"]), None)
        out += [s for s in mine if moved is not None and s["steps"] >= moved + warmup_steps and s is not mine[-1]]
    return out


def usage(points: list[dict], name: str) -> dict[str, Any]:
    """Start, end and max of RSS (MB), fds and threads of process ``name`` over ``points``."""

    def stat(key: str, scale: float = 1) -> dict[str, float]:
        values = [p[name][key] / scale for p in points]
        return {"start": round(values[0], 1), "end": round(values[-1], 1), "max": round(max(values), 1)}

    fds = [p[name]["fds"] for p in points]
    quarter = max(len(fds) // 4, 1)  # open sockets come and go; a leak raises the floor
    floor = {"fd_floor_growth": min(fds[-quarter:]) - min(fds[:quarter])}
    return {"rss_mb": stat("rss", MB), "fds": stat("fds"), "threads": stat("threads")} | floor


def trainer_usage(samples: list[dict], warmup_steps: int) -> dict[str, Any]:
    """``usage`` of the trainer after each process's warm-up, with RSS growth and fd floor per process."""
    points = steady(samples, warmup_steps) or [s for s in samples if s.get("trainer")]  # short runs: all
    per = {}
    for seg in sorted({s["segment"] for s in points}):
        pts = [s for s in points if s["segment"] == seg]
        growth = 100 * slope([s["steps"] for s in pts], [s["trainer"]["rss"] / MB for s in pts])
        shown = round(growth, 1) if pts[-1]["steps"] - pts[0]["steps"] >= MIN_SLOPE_STEPS else None
        per[seg] = usage(pts, "trainer") | {"steps": [pts[0]["steps"], pts[-1]["steps"]],
                                            "rss_growth_mb_per_100_steps": shown}  # fmt: skip
    growths = [p["rss_growth_mb_per_100_steps"] for p in per.values() if p["rss_growth_mb_per_100_steps"] is not None]
    worst = {"rss_growth_mb_per_100_steps": max(growths, default=None),
             "fd_floor_growth": max(p["fd_floor_growth"] for p in per.values())}  # fmt: skip
    return usage(points, "trainer") | worst | {"processes": per}


def memory(samples: list[dict], warmup_steps: int, seconds_per_step: float) -> dict[str, Any]:
    """RSS, fds and threads of the trainer (per process, after warm-up), the server and the fake web, with RSS
    growth per 100 steps (server, fake: per second of the run times the mean seconds per step)."""
    out = {"trainer": trainer_usage(samples, warmup_steps)}
    trained = steady(samples, warmup_steps)
    since = trained[0]["t"] if trained else 0.0
    for name in ("server", "fake"):
        pts = [s for s in samples if s.get(name) and s["t"] >= since]
        per_s = slope([s["t"] for s in pts], [s[name]["rss"] / MB for s in pts])
        out[name] = usage(pts, name) | {"rss_growth_mb_per_100_steps": round(100 * seconds_per_step * per_s, 1)}
    return out


def text_queries(records: list[dict]) -> tuple[set[str], set[str]]:
    """The text queries the recorded episodes asked, and those answered whole (normalized as the cache keys
    them): a result a transient failure cut short is shown but not cached (``partial``)."""
    asked, answered = set(), set()
    for rec in records:
        for turn in rec["turns"]:
            if (tool := turn.get("tool")) and tool["kind"] == "text_search":
                query = " ".join(tool["query"].lower().split())
                asked.add(query)
                if tool["ok"] and not tool.get("partial", False):
                    answered.add(query)
    return asked, answered


def cache(samples: list[dict], path: Path, records: list[dict], seconds_per_step: float) -> dict[str, Any]:
    """Cache file sizes over the run (database + WAL + shared memory), its rows and their payload, and the
    growth per 100 steps over the second half of the run (once the WAL has reached its checkpoint size)."""
    sizes = [sum(s["cache"].values()) for s in samples]
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    rows = dict(db.execute("SELECT tool, COUNT(*) FROM results GROUP BY tool").fetchall())
    payload = db.execute("SELECT SUM(LENGTH(text) + LENGTH(titles) + LENGTH(images)) FROM results").fetchone()[0]
    db.close()
    asked, answered = text_queries(records)
    late = samples[len(samples) // 2 :]
    per_s = slope([s["t"] for s in late], [sum(s["cache"].values()) for s in late])
    return {"bytes": {"start": sizes[0], "end": sizes[-1], "max": max(sizes)}, "db_bytes_end": samples[-1]["cache"]["db"],
            "wal_max_bytes": max(s["cache"]["wal"] for s in samples), "rows": rows,
            "payload_bytes_per_row": round((payload or 0) / max(sum(rows.values()), 1)),
            "text_queries_asked": len(asked), "text_queries_answered": len(answered),
            "growth_bytes_per_100_steps": round(100 * seconds_per_step * per_s)}  # fmt: skip


def leak_scan(files: list[Path], keys: dict[str, str], window: int = 12) -> dict[str, Any]:
    """Files holding a key, or any ``window`` characters of one (the length the redaction masks)."""
    leaks = []
    for f in files:
        data = f.read_bytes() if f.exists() else b""
        for name, key in keys.items():
            if any(key[i : i + window].encode() in data for i in range(len(key) - window + 1)):
                leaks.append({"file": str(f), "key": name})
    return {"files": [str(f) for f in files if f.exists()], "leaks": leaks}


def read_run(run: Path) -> tuple[list[dict], list[dict]]:
    with (run / "metrics.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    records = [json.loads(line) for line in (run / "trajectories.jsonl").read_text(encoding="utf-8").splitlines()]
    return rows, records


def steps(rows: list[dict], records: list[dict], expected: int) -> dict[str, Any]:
    """Steps logged in ``metrics.csv`` (each of 0..N-1 once) and steps whose trajectories are not all there once."""
    logged = Counter(int(float(r["step"])) for r in rows)
    traj = Counter(rec["step"] for rec in records)
    wrong = sorted(s for s in set(traj) | set(range(expected)) if traj[s] != EPISODES_PER_STEP)
    return {"completed": len(logged), "expected": expected, "missing": [s for s in range(expected) if s not in logged],
            "repeated": sorted(s for s, n in logged.items() if n > 1), "trajectory_steps_wrong": wrong}  # fmt: skip


def step_seconds(samples: list[dict], warmup_steps: int) -> float:
    """Seconds per step once a trainer process is warm (over every process's steady samples)."""
    points, spent, done = steady(samples, warmup_steps), 0.0, 0
    for seg in {s["segment"] for s in points}:
        pts = [s for s in points if s["segment"] == seg]
        spent, done = spent + pts[-1]["t"] - pts[0]["t"], done + pts[-1]["steps"] - pts[0]["steps"]
    return spent / done if done else 0.0


def checks(r: dict[str, Any], o: Any) -> dict[str, bool]:
    """The soak's pass conditions; thresholds are the options' (``--max-*``)."""
    mem, s, c = r["memory"], r["steps"], r["cache"]
    processes = ("trainer", "server")
    return {
        "no_crash": not r["crashes"],
        "kills_done": sum(1 for x in r["trainer_processes"] if "killed_after_step" in x) == o.kills,
        "each_step_once": s["completed"] == s["expected"] and not s["missing"] and not s["repeated"],
        "trajectories_each_step_once": not s["trajectory_steps_wrong"],
        "faults_accounted": r["faults"]["unaccounted"] == 0 and r["faults"]["attempts_unaccounted"] == 0,
        "failure_share_matches": abs(r["tool_calls"]["z"]) <= 4,
        "no_key_leaked": not r["secrets"]["leaks"],
        "fds_bounded": max(mem[p]["fd_floor_growth"] for p in processes) <= o.max_fd_growth,
        "rss_bounded": all((g := mem[p]["rss_growth_mb_per_100_steps"]) is None or g <= o.max_rss_growth_mb
                           for p in processes),  # fmt: skip
        "cache_bounded": c["wal_max_bytes"] <= 16 * MB
        and c["text_queries_answered"] <= sum(c["rows"].values()) <= c["text_queries_asked"],
    }


def report(o: Any, out: Path, segments: list[dict], samples: list[dict], stats: dict, served: dict,
           keys: dict[str, str], codes: dict[str, int], wall_s: float) -> dict[str, Any]:  # fmt: skip
    """The soak's JSON report (module docstring; README "Reliability")."""
    run = next((out / "run" / "csv").glob("version_*"))
    rows, records = read_run(run)
    crashes = [x for x in segments if x["exit"] != 0 and "killed_after_step" not in x]
    crashes += [{"process": p, "exit": c} for p, c in codes.items() if c != 0]
    step_s = step_seconds(samples, o.warmup_steps) or wall_s / o.steps
    logs = [*sorted((out / "logs").glob("trainer-*.log")), out / "logs" / "server.log"]
    secrets = leak_scan([run / "trajectories.jsonl", run / "metrics.csv", *logs, *out.glob("tool_cache.sqlite*")], keys)
    secrets["redacted_in_trajectories"] = (run / "trajectories.jsonl").read_text(encoding="utf-8").count("[redacted ")
    r = {"options": vars(o), "wall_s": round(wall_s), "steady_seconds_per_step": round(step_s, 2),
         "trainer_processes": segments, "crashes": crashes, "steps": steps(rows, records, o.steps),
         "memory": memory(samples, o.warmup_steps, step_s),
         "cache": cache(samples, out / "tool_cache.sqlite", records, step_s),
         "faults": fault_accounting(stats, served),
         "tool_calls": failure_share(rows, records, stats, o.retries) | {"trainer_to_server": logged_counters(rows)},
         "secrets": secrets}  # fmt: skip
    r["checks"] = checks(r, o)
    return r | {"ok": all(r["checks"].values())}
