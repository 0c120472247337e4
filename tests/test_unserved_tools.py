"""A tool the prompt offers that no backend serves is warned of at fit start (``mmsr.module_checks.warn_unserved_tools``).

The MMSearch-R1 recipes leave ``text_search`` to a snippet (``-c configs/tools/web_text_search.yaml``); launched
without it, every text search came back "The search failed (no text_search tool is configured)" and the run
trained on that without a word. It is a warning, not a refusal: tests and ablations train without a tool on purpose.
"""

import re
from types import SimpleNamespace

import pytest

from mmsr.module_checks import unserved_tools, warn_unserved_tools
from mmsr.rollout.loop import RolloutSettings
from mmsr.tools.crop import Crop
from mmsr.tools.spec import ImageSearchTool, TextSearchTool, configured, declared
from tests.rollout.test_loop import FakeImageSearch
from tests.test_module import fit_one_step, make_module

RECIPE_FIX = "set model.text_search (e.g. -c configs/tools/web_text_search.yaml), or model.rollout.text_search_limit: 0"


def loop_of(tools=None, image_search=None, text_search=None, **limits):
    """What the check reads of a ``RolloutLoop``: its tools, their declarations and the episode limits."""
    mapping = configured(tools, image_search, text_search)
    return SimpleNamespace(tools=mapping, specs=declared(mapping), settings=RolloutSettings(**limits))


def test_the_recipes_pair_without_text_search_is_unserved():
    assert unserved_tools(loop_of(image_search=FakeImageSearch())) == ["text_search"]
    assert unserved_tools(loop_of()) == ["image_search", "text_search"]
    assert unserved_tools(loop_of(image_search=FakeImageSearch(), text_search=FakeImageSearch())) == []


def test_a_tool_limited_to_zero_calls_is_not_warned_of():
    # the prompt still offers it, but a call ends the episode (search_limit) before any backend is asked
    assert unserved_tools(loop_of(image_search=FakeImageSearch(), text_search_limit=0)) == []
    assert unserved_tools(loop_of(tools=[TextSearchTool()], tool_limits={"text_search": 0})) == []


def test_a_tools_entry_without_a_backend_is_unserved_but_a_tool_answering_itself_is_not():
    loop = loop_of(tools=[Crop(), TextSearchTool(), ImageSearchTool(FakeImageSearch())])
    assert unserved_tools(loop) == ["text_search"]
    with pytest.warns(UserWarning, match=re.escape("give its model.tools entry a backend, or set "
                                                   "model.rollout.tool_limits: {text_search: 0}")):  # fmt: skip
        warn_unserved_tools(loop)


def test_the_warning_names_the_setting_to_add():
    with pytest.warns(UserWarning) as caught:
        warn_unserved_tools(loop_of(image_search=FakeImageSearch()))
    (warning,) = caught
    assert str(warning.message).startswith("GRPOModule: the prompt offers text_search, but no backend serves it")
    assert str(warning.message).endswith(RECIPE_FIX)


def test_a_fit_without_text_search_warns_once_at_start(fvqa_samples, monkeypatch):
    sample = [s for s in fvqa_samples if s.ground_truth == "musketeers"][0]
    warned: list[str] = []
    monkeypatch.setattr("mmsr.module_checks.rank_zero_warn", warned.append)  # what the fit warns, whatever the filters
    fit_one_step(make_module(), [sample], max_steps=2)  # image search only: text search offered, unserved
    assert len(warned) == 1 and warned[0].endswith(RECIPE_FIX)
    warned.clear()
    fit_one_step(make_module(text_search=FakeImageSearch()), [sample])
    assert warned == []
