"""Secrets never leave the tool layer: every configured key is masked in any text the tools hand out.

Providers sometimes quote the key they were sent (a 401 saying "invalid key sk-...", a 200 with an ``error``
field, a page that echoes its URL). Such text became the model's observation and went on to
``trajectories.jsonl``, wandb and the logs (issue #18). The values to hide are read from the environment at
each call, so a key set or rotated after start-up is covered too. The variables are:

- ``SECRET_ENVS``: the keys the tools read by default (SerpAPI, Serper, Jina, the OpenAI-compatible
  summarizer and judge, the search server's token);
- any variable registered with ``register_secret_env`` (every component with an ``api_key_env`` or
  ``token_env`` registers its own, so a renamed key is covered) or listed, comma-separated, in
  ``MMSR_SECRET_ENVS``;
- any variable whose name ends in ``_API_KEY``, ``_TOKEN``, ``_SECRET`` or ``_PASSWORD`` (``WANDB_API_KEY``,
  ``HF_TOKEN``: keys of the trainer's own process, which a tool could echo just the same).

What is masked: the value itself, its URL-encoded forms (``quote``, ``quote_plus``), and any run of at
least ``PARTIAL_CHARS`` characters copied from the value (a key cut short: "sk-abc...xyz"). Values shorter than
``MIN_CHARS`` are never masked: short strings would mask ordinary words and numbers. Not covered: other
encodings (base64, JSON escapes of unusual characters), case changes, and runs shorter than ``PARTIAL_CHARS``
(a masked key's last four characters, as OpenAI prints them, are by design not secret).

Where it applies: ``ToolResult`` (text, titles) and ``ToolError`` (reason) at construction; what one service
hands the next (search results' titles, links and snippets before a reader fetches them, page text before a
summarizer sees it); the search server's error answers; log records (``install_log_redaction``); as
defense in depth, the trajectory records the ``TrajectoryLogger`` writes (``redact_all``); and a run's config
wherever it is written (``redact_config``: ``config.yaml``, the report; ``LoggedConfig``: the hyperparameters
the loggers and checkpoints get). Metrics hold only counter names and numbers.

A key pasted where a variable's name goes (``api_key_env: sk-...``) is refused by ``register_secret_env``, which
every ``*_env`` setting passes through: used as a name it would send no key, or an error would quote it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import fields, is_dataclass, replace
from functools import lru_cache
from typing import TypeVar
from urllib.parse import quote, quote_plus

import yaml

SECRET_ENVS: set[str] = {"SERPAPI_API_KEY", "SERPER_API_KEY", "JINA_API_KEY", "OPENAI_API_KEY", "MMSR_SEARCH_TOKEN"}
SECRET_SUFFIXES = ("_API_KEY", "_TOKEN", "_SECRET", "_PASSWORD")
EXTRA_ENVS = "MMSR_SECRET_ENVS"
MIN_CHARS = 8
PARTIAL_CHARS = 12
_ANCHOR = PARTIAL_CHARS // 2  # every run of >= 2*_ANCHOR-1 chars holds one of the value's aligned _ANCHOR-grams
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# a key's random part: 16+ letters and digits with both (jina_..., a 40-hex Serper key); no variable name has one
_KEY_RUN = re.compile(r"(?=[A-Za-z0-9]*[0-9])(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{16,}")

T = TypeVar("T")
PASTED = "pasted key"  # the name a refused variable name is masked under (``register_secret_env``)
_pasted: set[str] = set()


def register_secret_env(name: str | None, setting: str = "an api_key_env / token_env / auth_env setting") -> None:
    """Mask the value of environment variable ``name`` from now on (``None`` or empty: nothing to do).

    Raises ``ValueError`` naming ``setting`` (never ``name``) where ``name`` is not a variable's name, or looks
    like a key and no variable of that name is set: a key pasted there would be sent nowhere, logged with the
    config, or quoted by the next error. Such a ``name`` is masked from then on, as ``[redacted pasted key]``.
    """
    if not name:
        return
    if not ENV_NAME.fullmatch(name):
        why = "is not an environment variable's name ([A-Za-z_][A-Za-z0-9_]*)"
    elif _KEY_RUN.search(name) and name not in os.environ:
        why = "is no variable set in the environment and has a long run of letters and digits, as a key has"
    else:
        SECRET_ENVS.add(name)
        return
    _pasted.add(name.strip())  # masked from now on: jsonargparse's errors quote the whole config given
    raise ValueError(f"{setting}: the value given ({len(name)} characters, not shown) {why}; it looks like a key "
                     "pasted where the variable's name goes: put the key in an environment variable and give that "
                     "variable's name (e.g. SERPER_API_KEY)")


def secret_values() -> dict[str, str]:
    """value -> the name of a variable holding it, for every secret long enough to mask, longest first."""
    names = SECRET_ENVS | {n.strip() for n in os.environ.get(EXTRA_ENVS, "").split(",") if n.strip()}
    names |= {n for n in os.environ if n.endswith(SECRET_SUFFIXES)}
    found = dict.fromkeys(_pasted, PASTED) | {os.environ.get(n, "").strip(): n for n in sorted(names)}
    return {v: found[v] for v in sorted(found, key=len, reverse=True) if len(v) >= MIN_CHARS}


@lru_cache(maxsize=64)
def _forms(value: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys((value, quote(value, safe=""), quote_plus(value))))


def _partial_spans(text: str, value: str) -> list[tuple[int, int]]:
    """Spans of ``text`` that copy at least ``PARTIAL_CHARS`` consecutive characters of ``value``.

    Only the value's ``_ANCHOR``-grams at multiples of ``_ANCHOR`` are searched (``str.find``, fast); each hit is
    grown both ways while text and value agree, so any long enough copy is found whatever its offset.
    """
    spans = []
    for m in range(0, len(value) - _ANCHOR + 1, _ANCHOR):
        pos = text.find(value[m : m + _ANCHOR])
        while pos != -1:
            left = 0
            while pos - left > 0 and m - left > 0 and text[pos - left - 1] == value[m - left - 1]:
                left += 1
            right = pos + _ANCHOR
            while right < len(text) and m + right - pos < len(value) and text[right] == value[m + right - pos]:
                right += 1
            if right - (pos - left) >= PARTIAL_CHARS:
                spans.append((pos - left, right))
            pos = text.find(value[m : m + _ANCHOR], pos + 1)
    return spans


def _mask_spans(text: str, spans: list[tuple[int, int]], mask: str) -> str:
    out, end = [], 0
    for start, stop in sorted(spans):
        if start >= end:  # else it overlaps the span just masked, which then grows
            out.append(text[end:start] + mask)
        end = max(end, stop)
    return "".join(out) + text[end:]


def redact(text: str) -> str:
    """``text`` with every secret (see the module docstring) replaced by ``[redacted NAME]``."""
    if not text:
        return text
    for value, name in secret_values().items():
        mask = f"[redacted {name}]"
        for form in _forms(value):
            if form in text:
                text = text.replace(form, mask)
        if len(value) >= PARTIAL_CHARS and (spans := _partial_spans(text, value)):
            text = _mask_spans(text, spans, mask)
    return text


def redact_all(value: T) -> T:
    """A copy of ``value`` with every string in it redacted: through dataclasses, lists, tuples and dicts."""
    if isinstance(value, str):
        return redact(value)  # type: ignore[return-value]
    if is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{f.name: redact_all(getattr(value, f.name)) for f in fields(value) if f.init})
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple takes its fields one by one
        return type(value)(*(redact_all(v) for v in value))
    if isinstance(value, list | tuple):
        return type(value)(redact_all(v) for v in value)  # type: ignore[return-value]
    if isinstance(value, dict):
        return {k: redact_all(v) for k, v in value.items()}  # type: ignore[return-value]
    return value


def redact_checkpoint_hparams(checkpoint: dict) -> None:
    """Mask, in place, the hyperparameters Lightning copies into a ``checkpoint`` (the module's and the data
    module's): the modules call it from their ``on_save_checkpoint``, which Lightning runs for weights-only
    checkpoints too (callbacks' hooks it skips there)."""
    for key in ("hyper_parameters", "datamodule_hyper_parameters"):  # Lightning's CHECKPOINT_HYPER_PARAMS_KEYs
        if isinstance(checkpoint.get(key), dict):
            checkpoint[key] = redact_all(checkpoint[key])


def redact_config(text: str) -> str:
    """A YAML or JSON config's ``text`` with every secret in it masked, still valid: parsed, ``redact_all``-ed and
    written back (a masked plain scalar ``key: [redacted NAME]`` would read as a list). Unchanged (comments,
    layout) when it holds no secret; text that does not parse, or a secret left in a key, is ``redact``-ed as text.
    """
    if redact(text) == text:
        return text
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return redact(text)
    if text.lstrip().startswith(("{", "[")):
        out = json.dumps(redact_all(data), ensure_ascii=False, indent=2 if "\n" in text.strip() else None) + "\n"
    else:
        out = yaml.safe_dump(redact_all(data), sort_keys=False, allow_unicode=True, default_flow_style=False)
    return redact(out)


class RedactingFilter(logging.Filter):
    """Redacts a log record in place (message, traceback, stack) and lets it through.

    The message is formatted here, early, only when formatting it shows a secret; the traceback is
    pre-formatted (``exc_text``, which handlers then reuse) only in that case too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: leave it to the handler to report
            return True
        if (clean := redact(message)) != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            text = logging.Formatter().formatException(record.exc_info)
            if (clean := redact(text)) != text:
                record.exc_text = clean
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_FILTER = RedactingFilter()
_installed = False


def install_log_redaction() -> None:
    """Redact every log record of this process, once (later calls do nothing).

    A filter on a logger misses records propagated from its children, and handlers are added later by
    Lightning, pytest or ``basicConfig``; so the record factory itself is wrapped (every logger, every
    handler), and the filter is also put on the root and ``mmsr`` loggers' current handlers.
    """
    global _installed
    if _installed:
        return
    _installed = True
    make = logging.getLogRecordFactory()

    def redacted_record(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        _FILTER.filter(record)
        return record

    logging.setLogRecordFactory(redacted_record)
    for logger in (logging.getLogger(), logging.getLogger("mmsr")):
        for handler in (logger, *logger.handlers):
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
