"""One line for jsonargparse's nested parse errors (``parse_error_line``): the key at fault as a config file writes
it, then the value given and the type expected, or the reason. ``model`` is ``LightningModule | None``, so every
error under it comes wrapped in a union's alternatives and ends with a dump of the value given, not the key.

The nested errors are text, not chained exceptions, so this reads jsonargparse's wording; a wording it does not
know gives ``None`` and the message is shown as jsonargparse wrote it.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

# jsonargparse's nested parse errors: a key or a class_path opens a block of the lines indented under it
_KEY = re.compile(r'(?:- )?Parser key "([^"]+)":$')
_CLASS = re.compile(r"(?:- )?Problem with given class_path '([^']+)':$")
_GOT = re.compile(r"(?:- )?Expected an? (.+?)\. Got value: (.*)$")
_NOT_TAKEN = re.compile(r"Option '([^']+)' is not accepted$|Group '([^']+)' does not accept option '([^']+)'$")
# jsonargparse's (libyaml's where installed): its wording of a syntax error, not the pure-Python parser's
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_error_line(message: str) -> str | None:
    """One line for a nested jsonargparse parse error: its innermost key as a config file writes it (``model.
    init_args.rollout.image_search_limit``), then the value given and the type expected, or the reason; None
    for a message that is one line already, or not such an error."""
    lines = [(len(line) - len(line.lstrip()), line.strip()) for line in message.splitlines() if line.strip()]
    path, at = _innermost(lines)
    if len(lines) < 2 or not path:
        return None
    block = _block(lines, at)
    keys = [_entry(lines, i, name) if is_class else name for is_class, name, i in path]
    is_class, name, _ = path[-1]
    if not is_class:
        return f"{_dotted(keys)}: {_reason(block)}"
    wrong = _NOT_TAKEN.match(block[0]) if block else None
    if wrong:  # a misspelled argument of the class, or a field of a dataclass argument of it
        where = name if wrong[1] else f"{wrong[2]} (an argument of {name})"
        return f"{_dotted([*keys, wrong[1] or f'{wrong[2]}.{wrong[3]}'])}: not an argument of {where}"
    if block[:1] == ["'NoneType' object has no attribute 'keys'"]:  # ``init_args:`` with nothing under it: null
        return f"{_dotted(keys)} is empty: remove it or give arguments"
    keys[-1] = keys[-1].removesuffix("init_args") + "class_path"  # the class itself: not found, or not a subclass
    return f"{_dotted(keys)}: {name}: {block[0] if block else 'not accepted'}"


def _dotted(keys: list[str]) -> str:
    return ".".join(keys).replace(".[", "[")  # a list's item: ``trainer.callbacks[1]``


def _innermost(lines: list[tuple[int, str]]) -> tuple[list[tuple[bool, str, int]], int]:
    """The chain of keys and class_paths down to the most deeply nested one, ``(is_class, name, line)`` each,
    and that one's line."""
    stack: list[tuple[int, bool, str, int]] = []
    best: tuple[list, int] = ([], -1)
    for i, (indent, text) in enumerate(lines):
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if match := _KEY.match(text) or _CLASS.match(text):
            stack.append((indent, match.re is _CLASS, match[1], i))
            if len(stack) > len(best[0]):
                best = ([entry[1:] for entry in stack], i)
    return best


def _entry(lines: list[tuple[int, str]], at: int, class_path: str) -> str:
    """The key of the class on line ``at`` under its parent's: ``init_args``, or ``[i].init_args`` for a list's
    item, found by its class_path in the list given (``[?]`` unless exactly one item has it)."""
    after = [text for indent, text in lines[at + 1 :] if indent < lines[at][0]]
    if "Given value type: <class 'list'>" not in after[:1]:
        return "init_args"
    given = next((t[len("Given value: [") : -1] for t in after if t.startswith("Given value: [")), "")
    # items are dicts or Namespaces (a list merged from two configs): its first class_path is the item's own
    first = [re.search(r"class_path(?:': |=)'([^']+)'", item) for item in _split_top(given)]
    found = [i for i, match in enumerate(first) if match and match[1] == class_path]
    return f"[{found[0] if len(found) == 1 else '?'}].init_args"


def _block(lines: list[tuple[int, str]], at: int) -> list[str]:
    """The lines indented under line ``at``."""
    block = []
    for indent, text in lines[at + 1 :]:
        if indent <= lines[at][0]:
            break
        block.append(text)
    return block


def _reason(block: list[str]) -> str:
    """What a key's block says: a type's ``Expected a <class 'int'>. Got value: abc``; a union's ``Subtypes``
    and ``Given value``, or the one alternative that says more than a type mismatch (a class that is not one)."""
    if block and (got := _GOT.match(block[0])):
        return f"expected {_type_name(got[1])}, given {got[2]}"
    alternatives = [t[2:] for t in block if t.startswith("- ") and not t.startswith("- Expected a")]
    if len(alternatives) == 1:
        return alternatives[0]
    types = next((t[len("Subtypes: ") :] for t in block if t.startswith("Subtypes: [")), None)
    given = next((t[len("Given value: ") :] for t in block if t.startswith("Given value: ")), None)
    if types and given is not None:
        return f"expected {' | '.join(map(_type_name, _split_top(types[1:-1])))}, given {given}"
    return block[0] if block else "not accepted"


def _type_name(text: str) -> str:
    """``<class 'int'>`` -> ``int``, ``<class 'NoneType'>`` -> ``None``, ``typing.Literal[...]`` -> ``Literal[...]``."""
    text = re.sub(r"<class '(?:builtins\.)?([^']+)'>", r"\1", text).replace("typing.", "")
    return "None" if text == "NoneType" else text


def _split_top(text: str) -> list[str]:
    """``a, b[c, d]`` -> ``["a", "b[c, d]"]``: split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "[({") - (char in "])}")
        if char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return [*parts, text[start:].strip()]


def config_syntax_line(message: str, args: list[str], cwd: str) -> str | None:
    """``FILE:LINE:COLUMN: YAML syntax: problem`` for jsonargparse's ``Problems parsing config``, which says
    ``in "<unicode string>"``, never the file (``-c recipe -c snippet``: which one?): the first ``-c`` /
    ``--config`` file in ``args`` (relative to ``cwd``: jsonargparse is in a config's folder by now) that PyYAML
    cannot read, read again here; None when none is such a file."""
    if not message.startswith("Problems parsing config"):
        return None
    for path in config_files(args):
        try:
            yaml.load((Path(cwd) / path).read_text(), Loader=LOADER)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
            opened = exc.context_mark if exc.context and exc.context_mark else None
            context = f" ({exc.context} at {opened.line + 1}:{opened.column + 1})" if opened else ""
            return f"{where}: YAML syntax: {exc.problem or exc.context}{context}"
        except (OSError, yaml.YAMLError):  # jsonargparse reports a missing file itself
            continue
    return None


def config_files(args: list[str]) -> list[str]:
    """The files given to ``-c`` / ``--config`` (``--config=FILE`` too), in order."""
    files = []
    for flag, value in zip(args, [*args[1:], None]):
        if flag in ("-c", "--config") and value is not None:
            files.append(value)
        elif flag.startswith("--config="):
            files.append(flag.split("=", 1)[1])
    return files
