"""Web text search: query -> top results -> read each page -> summarize it -> k summaries (spec §6).

Pages are processed concurrently, at most ``top_k`` at a time. When a page fails (unreadable, refused, empty,
summarizer error, too slow) the next result in the list takes its place, until ``top_k`` summaries exist, the
list runs out or the call's deadline comes; the summaries keep the search ranking. Every failure is counted;
the model only sees the summaries, or one failure observation when there are none.

The call runs against the deadline the caller sets (``ToolRequest.budget_s``, see ``mmsr.tools.budget``): the
search may use what is left after one reader and one summarizer attempt, a page read what is left after one
summarizer attempt, a summary the rest. A slow page is thus dropped while there is still time to summarize
another, and the tool answers with what it has before the caller gives up.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from mmsr.tools.base import ToolRequest, ToolResult, changed_settings, failure, part_settings
from mmsr.tools.budget import Deadline, Stage, check_stages
from mmsr.tools.format import WEB_TEXT_HEADER, page_entry, text_results
from mmsr.tools.web.http import ToolError, transient
from mmsr.tools.web.providers import TextSearchProvider, WebResult
from mmsr.tools.web.reader import PageReader
from mmsr.tools.web.summarizer import OpenAISummarizer

Summaries = list[tuple[WebResult, str]]


class WebTextSearch:
    """``SearchTool`` for ``<text_search>``: a search provider, a page reader and a summarizer.

    Args:
        provider: ``SerpAPIGoogle`` or ``Serper`` (interchangeable).
        reader: ``JinaReader`` or ``DirectReader``.
        summarizer: an ``OpenAISummarizer``.
        top_k: summaries wanted (MMSearch-R1: 5).
        max_candidates: results tried at most (the provider may return more).
        max_chars: each summary is cut to this many characters in the observation.
        reserve_s: seconds of the caller's budget kept back to build the answer and return it in time.
    """

    question_focused = True  # its summaries are written for the request's question: a cache keys on it too

    def __init__(self, provider: TextSearchProvider, reader: PageReader, summarizer: OpenAISummarizer,
                 top_k: int = 5, max_candidates: int = 10, max_chars: int = 1500,
                 reserve_s: float = 1.0) -> None:  # fmt: skip
        if top_k < 1 or max_candidates < top_k:
            raise ValueError(f"need 1 <= top_k <= max_candidates, got top_k={top_k}, max_candidates={max_candidates}")
        self.provider, self.reader, self.summarizer = provider, reader, summarizer
        self.top_k, self.max_candidates, self.max_chars, self.reserve_s = top_k, max_candidates, max_chars, reserve_s
        self.provider_name = f"{provider.name}+{reader.name}+{summarizer.model}"
        self.counts: Counter[str] = Counter()

    def stages(self) -> list[Stage]:
        """The nested steps of one call, in order, with their limits."""
        return [Stage(c.name, c.client.limits) for c in (self.provider, self.reader, self.summarizer)]

    def cache_settings(self) -> dict[str, Any]:
        """Its settings and its parts' that shape its answers, where not the default: a ``CachedTool`` keys on them
        (``mmsr.tools.cache.settings_version``), so a run asking for ``top_k=2`` is never served 5 recorded results."""
        return changed_settings(self, top_k=self.top_k, max_candidates=self.max_candidates, max_chars=self.max_chars,
                                provider=part_settings(self.provider), reader=part_settings(self.reader),
                                summarizer=part_settings(self.summarizer))  # fmt: skip

    def check_budget(self, cap_s: float) -> None:
        """``BudgetError`` unless one search, one page read and one summary attempt fit in ``cap_s``."""
        check_stages("WebTextSearch", self.stages(), self.reserve_s, cap_s)

    async def __call__(self, request: ToolRequest) -> ToolResult:
        start = time.perf_counter()
        deadline = Deadline.after(request.budget_s, self.reserve_s)
        query = " ".join(request.query.split())
        if not query:
            return failure("text_search", "the query was empty", sent=False)
        read_s, summary_s = (s.limits.timeout_s for s in self.stages()[1:])
        try:
            found = await deadline.run(self.provider.search(query), "the search", keep_s=read_s + summary_s)
        except ToolError as exc:
            self.counts["search_failed"] += 1
            if exc.kind == "deadline":
                self.counts["search_deadline"] += 1
            # A call that never went out (open circuit, no time left) was not billed: charging it would let a
            # dead provider use up the run's dollar budget.
            return self._failed(exc.reason, self.provider.cost_per_call if exc.sent else 0.0, start, exc.sent)
        results, cost = found[: self.max_candidates], self.provider.cost_per_call
        if not results:  # an answer, not a failure: the web has nothing for this query
            return ToolResult(text_results([]), cost=cost, latency_s=time.perf_counter() - start)
        # The summarizer focuses on the user's question (spec §5); the query says what "this" refers to.
        focus = f"{request.question} (search query: {query})" if request.question else query
        summaries, page_cost, late, partial = await self._summaries(results, focus, deadline)
        cost += page_cost
        if not summaries:
            within = f" within the {request.budget_s:g} s time limit" if late else ""
            return self._failed(f"none of the {len(results)} result pages could be read{within}", cost, start)
        entries = [page_entry(r.title, r.url, s, self.max_chars) for r, s in summaries]
        return ToolResult(
            text=text_results(entries, WEB_TEXT_HEADER),
            titles=tuple(r.title for r, _ in summaries),
            cost=cost,
            latency_s=time.perf_counter() - start,
            partial=partial,
        )

    def _failed(self, reason: str, cost: float, start: float, sent: bool = True) -> ToolResult:
        result = failure("text_search", reason, time.perf_counter() - start)
        return ToolResult(result.text, ok=False, cost=cost, latency_s=result.latency_s, sent=sent)

    async def _summaries(
        self, results: list[WebResult], query: str, deadline: Deadline
    ) -> tuple[Summaries, float, int, bool]:
        """Up to ``top_k`` (result, summary) in ranking order, refilling from the list as pages fail, while a
        page still has time; also the cost, how many pages the deadline cut or never started, and whether a
        transient failure cut the answer short (a page it skipped would have been shown: not to be cached)."""
        done: dict[int, str] = {}
        cost, late, partial = 0.0, 0, False
        queue = iter(enumerate(results))
        running: set[asyncio.Task] = set()
        summary_s = self.summarizer.client.limits.timeout_s

        def refill() -> None:
            while len(done) + len(running) < self.top_k and deadline.left(summary_s) > 0:
                if (nxt := next(queue, None)) is None:
                    return
                running.add(asyncio.create_task(self._one(*nxt, query, deadline)))

        try:
            refill()
            while running:
                finished, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                # Several pages may meet the same refused key at once: retrieve every error, raise the first.
                raised = [exc for task in finished if (exc := task.exception()) is not None]
                if raised:
                    raise raised[0]
                for task in finished:
                    rank, summary, spent, error = task.result()
                    cost += spent
                    if error is not None:
                        late, partial = late + (error.kind == "deadline"), partial or transient(error)
                    if summary is not None:
                        done[rank] = summary
                refill()
        finally:  # the caller gave up (cancelled) or a page raised: stop the other pages too
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)  # each error retrieved, no task left behind
        untried = len(done) < self.top_k and next(queue, None) is not None  # pages left untried for lack of time
        late += untried
        return [(results[rank], done[rank]) for rank in sorted(done)], cost, late, partial or untried

    async def _one(
        self, rank: int, result: WebResult, query: str, deadline: Deadline
    ) -> tuple[int, str | None, float, ToolError | None]:
        """(rank, summary or None, cost, why it failed) of one result page; failures are counted, never raised.
        The read must end while one summary attempt still fits; the summary may use the rest."""
        cost, page = self.reader.cost_per_call, None
        try:
            summary_s = self.summarizer.client.limits.timeout_s
            page = await deadline.run(self.reader.read(result.url), "the page read", keep_s=summary_s)
            summary, spent = await deadline.run(self.summarizer.summarize(page.text, query), "the summary")
            return rank, summary, cost + spent, None
        except ToolError as exc:
            self.counts[f"page_{exc.kind}"] += 1
            paid = page is not None or exc.sent  # a read refused or never started was not billed
            return rank, None, (cost if paid else 0.0) + exc.cost, exc  # exc.cost: an unusable summary's tokens

    def metrics(self) -> dict[str, float]:
        """The pipeline's own failure counts and those of its provider, reader and summarizer."""
        own = {f"tools/text_search/{k}": float(v) for k, v in sorted(self.counts.items())}
        return own | self.provider.metrics() | self.reader.metrics() | self.summarizer.metrics()
