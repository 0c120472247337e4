"""``benchmarks/soak_report.py`` reads the trainer's metrics rows as they are logged: a step without tool calls has
no ``tools/failure_rate`` (an empty cell), and a tool's counters hold what each step added."""

from benchmarks.soak_report import failure_share, logged_counters

NO_FAULTS = {"requests": {}, "injected": {}}


def row(image: int, text: int, rate: str) -> dict[str, str]:
    return {"tools/image_search_calls": str(image), "tools/text_search_calls": str(text), "tools/failure_rate": rate}


def test_a_step_without_calls_adds_no_failures():
    """Step 1 called nothing and logged no rate: ``float("")`` raised after the whole soak had run."""
    logged = failure_share([row(2, 2, "0.25"), row(0, 0, ""), row(1, 1, "0.5")], [], NO_FAULTS, retries=2)["logged"]
    assert logged == {"calls": 6, "failures": 2, "share": 2 / 6}


def test_the_trainers_server_counters_over_a_run_are_the_sum_of_its_steps():
    """Each row holds what its step added (2, 3, then 1 after a restart): taken for running totals, the last value
    before each drop and the final one made 3 + 1."""
    key = "tools/text_search/search_server/calls"
    assert logged_counters([{key: "2"}, {key: "3"}, {key: ""}, {key: "1"}]) == {key: 6}
