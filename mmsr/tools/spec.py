"""Tools as data: what a tool declares (``ToolSpec``) and the configurable ``Tool`` that carries it.

The rollout parser, the loop, the prompt, the format reward and the metrics read these declarations
instead of fixed tool names, so a new tool is one ``Tool`` subclass and one YAML entry under the
module's ``tools``. MMSearch-R1's image and text search are two such declarations
(``MMSEARCH_R1_TOOLS``), and their old module arguments (``image_search:`` / ``text_search:``) still
name their backends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

from mmsr.tools.base import SearchTool, ToolRequest, ToolResult, failure

Argument = Literal["image", "text"]


@dataclass(frozen=True)
class ToolSpec:
    """One tool's declaration.

    Attributes:
        name: the tool's name: ``ToolRequest.kind``, trajectory and metric keys (``tools/<name>_calls``).
        tag: its action tag: the policy writes ``<tag>argument</tag>``; generation stops at ``</tag>``.
        argument: ``"image"``: the tag holds exactly ``<img>`` (whitespace allowed) and the request carries the
            question's image; ``"text"``: the tag holds a non-empty text (stripped, whitespace runs collapsed),
            sent as ``ToolRequest.query``.
        limit: most calls per episode (``RolloutSettings.tool_limits`` overrides it by name).
        instruction: prompt template appended after a successful result (``mmsr.prompt.render.template_path``);
            ``None``: none.
        description: prompt template telling the policy about the tool in the first user message (one
            bullet line, say when to call it and how to write the call): a round-1 template's ``{tools}`` line
            becomes the descriptions of the configured tools whose ``<tag>`` it does not mention itself
            (``mmsr.prompt.render.PromptBuilder.for_tools``); ``None``: the tool is undescribed, an error there.
        metric: short name in the search-ratio metrics (``rollout/search_ratio/<metric>``).
        format_max: most calls a well-formed trajectory makes (the format reward; MMSearch-R1 allows each
            search once, whatever the rollout's limit).
        with_image: the request carries the question's image and its size as the policy sees it (a text
            argument may then address it, e.g. a crop box); ``None``: only for an ``"image"`` argument.
        penalized: a call counts as a search for the reward's search penalty (``mmsr.reward.format.penalized_count``):
            MMSearch-R1 penalizes a correct answer reached by searching, to price search (each call an API fee)
            and keep the policy from searching when it need not. A local, free call (a crop) may set it
            ``False``; the search-ratio metrics count every tool whatever it says.
        placeholder: the argument as a prompt writes a call (``call``), e.g. ``[x1, y1, x2, y2]``; ``""``: ``<img>``
            for an ``"image"`` argument, ``query`` for a ``"text"`` one.
        region_images: the result's images are regions of the question image (a crop): the loop processes them
            within the question image's pixel bounds, so a zoom shows at least the detail of the question image.
            ``False``: they are thumbnails (search results), within the tool images' bounds
            (``Policy.tool_image_processor``, a few dozen tokens each).
    """

    name: str
    tag: str
    argument: Argument = "text"
    limit: int = 1
    instruction: str | None = None
    metric: str = ""
    with_image: bool | None = None
    format_max: int = 1
    description: str | None = None
    penalized: bool = True
    placeholder: str = ""
    region_images: bool = False

    def __post_init__(self) -> None:
        if self.argument not in ("image", "text"):
            raise ValueError(f"tool {self.name!r}: argument must be 'image' or 'text', got {self.argument!r}")
        # <image> is the image marker (IMAGE_MARKER): a prompt writing the tool's call would hold one image too many
        if not self.tag.replace("_", "").isalnum() or self.tag in ("answer", "reason", "img", "information", "image"):
            raise ValueError(f"tool {self.name!r}: tag {self.tag!r} must be a word that is not "
                             "answer/reason/img/information/image")  # fmt: skip
        if not self.metric:
            object.__setattr__(self, "metric", self.name)  # frozen: default the metric to the name
        if self.with_image is None:
            object.__setattr__(self, "with_image", self.argument == "image")

    @property
    def stop(self) -> str:
        """The string generation stops at."""
        return f"</{self.tag}>"

    @property
    def call(self) -> str:
        """A call as prompts write it, ``<tag>placeholder</tag>``: a template's ``{actions}`` lists the configured
        tools' (``mmsr.prompt.render.list_actions``)."""
        return f"<{self.tag}>{self.placeholder or ('<img>' if self.argument == 'image' else 'query')}{self.stop}"


IMAGE_SEARCH = ToolSpec("image_search", "search", "image", 1, "after_image_search.txt", "image",
                        description="describe_image_search.txt")  # fmt: skip
TEXT_SEARCH = ToolSpec("text_search", "text_search", "text", 2, "after_text_search.txt", "text",
                       description="describe_text_search.txt")  # fmt: skip
MMSEARCH_R1_TOOLS: tuple[ToolSpec, ...] = (IMAGE_SEARCH, TEXT_SEARCH)


class Tool:
    """A configured tool: its ``spec`` (a class attribute a subclass sets) and how it answers.

    Subclasses either override ``__call__`` (a tool that computes its own result) or get a ``backend``
    (any ``SearchTool``). Calls must not raise for ordinary failures: return ``failure(...)``.

    Args:
        backend: the ``SearchTool`` that answers (``None``: the subclass's own ``__call__``, or a failure).
        limit: overrides the spec's per-episode limit.
        format_max: overrides the spec's most calls in a well-formed trajectory (long horizons).
    """

    spec: ClassVar[ToolSpec]

    def __init__(self, backend: SearchTool | None = None, limit: int | None = None,
                 format_max: int | None = None) -> None:  # fmt: skip
        self.backend = backend
        self.limit_given = limit  # the rollout's pair limits must not override it unseen (RolloutSettings)
        given = {k: v for k, v in (("limit", limit), ("format_max", format_max)) if v is not None}
        if given:
            self.spec = replace(type(self).spec, **given)  # instance attribute shadows the class's

    async def __call__(self, request: ToolRequest) -> ToolResult:
        if self.backend is None:
            return failure(request.kind, f"no {request.kind} backend is configured")
        return await self.backend(request)

    def metrics(self) -> dict[str, float]:
        """The backend's own counters (API calls, cache hits), when it keeps some."""
        return self.backend.metrics() if hasattr(self.backend, "metrics") else {}

    def check_budget(self, cap_s: float) -> None:
        """The backend's own check that its nested timeouts fit ``cap_s`` (``mmsr.tools.budget``)."""
        check = getattr(self.backend, "check_budget", None)
        if check is not None:
            check(cap_s)

    def check_ready(self) -> None:
        """The backend's own start-up check (``mmsr.tools.base.check_ready``)."""
        if hasattr(self.backend, "check_ready"):
            self.backend.check_ready()


class ImageSearchTool(Tool):
    """MMSearch-R1's image search, ``<search><img></search>``, answered by ``backend``."""

    spec = IMAGE_SEARCH


class TextSearchTool(Tool):
    """MMSearch-R1's text search, ``<text_search>query</text_search>``, answered by ``backend``."""

    spec = TEXT_SEARCH


def declared(tools: dict[str, object]) -> tuple[ToolSpec, ...]:
    """The specs of a ``{name: tool}`` mapping: a ``Tool``'s own, else the MMSearch-R1 spec of that name.

    A mapping of plain backends (no ``Tool``) declares both MMSearch-R1 tools, configured or not, so a call
    of a missing one is a failure observation as before. Two tools with one tag are refused (``_distinct_tags``).
    """
    if not any(isinstance(t, Tool) for t in tools.values()):
        unknown = sorted(set(tools) - {s.name for s in MMSEARCH_R1_TOOLS})
        if unknown:
            raise ValueError(f"tools {unknown} are not declared: configure them as Tool subclasses (mmsr.tools.spec.Tool) "
                             "with a spec, or use the names image_search / text_search")  # fmt: skip
        return MMSEARCH_R1_TOOLS
    specs = []
    for name, tool in tools.items():
        if not isinstance(tool, Tool):
            raise ValueError(f"tool {name!r} is a plain backend among Tool entries: wrap it, e.g. "
                             f"{{class_path: mmsr.tools.spec.ImageSearchTool, init_args: {{backend: ...}}}}")  # fmt: skip
        if tool.spec.name != name:
            raise ValueError(f"tool entry {name!r} holds a tool whose spec is named {tool.spec.name!r}")
        specs.append(tool.spec)
    return _distinct_tags(specs)


def _distinct_tags(specs: list[ToolSpec]) -> tuple[ToolSpec, ...]:
    """``specs``, refused when two share a tag: every call would parse as the first's and the other never run."""
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.tag in seen:
            raise ValueError(f"tools {seen[spec.tag]!r} and {spec.name!r} both declare the tag <{spec.tag}>: "
                             "give one of them a tag of its own")  # fmt: skip
        seen[spec.tag] = spec.name
    return tuple(specs)


def configured(tools: Sequence[Tool] | None, image_search: SearchTool | None = None,
               text_search: SearchTool | None = None) -> dict[str, SearchTool | None]:  # fmt: skip
    """The ``{name: tool}`` mapping of a module's arguments: without ``tools``, MMSearch-R1's pair from the
    old ``image_search`` / ``text_search`` arguments (backends, as before); with ``tools``, those (in order),
    after the pair's backends wrapped as ``ImageSearchTool`` / ``TextSearchTool`` when they are given."""
    if tools is None:
        return {"image_search": image_search, "text_search": text_search}
    pair = [cls(backend) for cls, backend in ((ImageSearchTool, image_search), (TextSearchTool, text_search)) if backend is not None]
    out: dict[str, SearchTool | None] = {}
    for tool in [*pair, *tools]:
        if not isinstance(tool, Tool):
            raise TypeError(f"tools entries must be mmsr.tools.spec.Tool subclasses, got {type(tool).__name__}")
        if tool.spec.name in out:
            raise ValueError(f"tool {tool.spec.name!r} is configured twice (in tools and as its own argument?)")
        out[tool.spec.name] = tool
    return out
