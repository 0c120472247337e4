"""The soak benchmark, short (issue #18 "Soak"): ``mmsr fit`` through ``mmsr serve-search`` against a web that
faults 30% of its requests, killed with -9 once and resumed: no crash, every step logged once, every injected
fault seen by the client it hit, the failure share the faults predict, no key in any file, bounded fds."""

import pytest

from benchmarks.soak import options, run

STEPS = 12  # crosses an epoch of the smoke data (10 steps)


@pytest.mark.slow
def test_short_soak(tmp_path):
    o = options(["--steps", str(STEPS), "--kills", "1", "--seed", "1", "--warmup-steps", "2",
                 "--out", str(tmp_path / "soak")])  # fmt: skip
    r = run(o)
    assert r["crashes"] == [] and r["checks"]["kills_done"], r["trainer_processes"]
    assert r["steps"] == {"completed": STEPS, "expected": STEPS, "missing": [], "repeated": [], "trajectory_steps_wrong": []}
    faults = r["faults"]
    assert sum(faults["injected"].values()) > 100 and 0.2 < faults["injected_rate"] < 0.4  # the faults happened
    assert faults["unaccounted"] == 0, [x for x in faults["by_client"] if x["injected"] != x["seen"]]
    assert faults["attempts_unaccounted"] == 0 and faults["deadline_cuts"] == 0
    calls = r["tool_calls"]
    assert calls["logged"]["calls"] == 2 * 8 * STEPS and abs(calls["z"]) <= 4, calls  # one image + one text search each
    assert calls["trainer_to_server"] == {f"tools/{k}/search_server/calls": 8 * STEPS for k in ("image_search", "text_search")}
    assert r["secrets"]["leaks"] == [] and r["secrets"]["redacted_in_trajectories"] > 0  # echoes came back masked
    assert r["checks"]["fds_bounded"] and r["memory"]["server"]["fds"]["max"] < 256
    assert r["checks"]["cache_bounded"] and r["cache"]["rows"]["text_search"] == r["cache"]["text_queries_answered"]
