"""Reading YAML with bounds: the one loader for configs, run files, overrides and sweep axes.

YAML aliases let a few hundred bytes describe a value of billions of nodes ("billion laughs":
`a: &a [x, x, ...]`, `b: &b [*a, *a, ...]`, ... nine levels of ten). PyYAML builds such a value
with shared references, cheaply, but everything that walks it afterwards (merging, type checks,
`repr` in an error message, saving the resolved config) expands it: a 324-byte file hung
`tinylm train` with its memory growing to the limit. `load(text, source)` counts the nodes of
the document as its aliases expand it, on the node graph before anything is built (memoized, so
counting a bomb costs as much as its few hundred distinct nodes), and refuses a document over
`MAX_NODES` expanded nodes, a recursive alias, or text over `MAX_BYTES`, with a `YAMLTooLarge`
(a `yaml.YAMLError`, so callers that already report malformed YAML report it too).

`shorten(value)` is a value's `repr` cut to a length an error message can carry.
"""

from __future__ import annotations

import reprlib
from typing import Any

import yaml

# The largest config we ship expands to ~150 nodes; a sweep or a data mix of thousands of sources
# stays far below this. A bomb of nine levels of ten expands to 10^9.
MAX_NODES = 100_000
# Configs are a few KiB; a 16 MiB YAML file is not a config (a data file given by mistake).
MAX_BYTES = 16 << 20


class YAMLTooLarge(yaml.YAMLError):
    """A YAML document whose aliases expand beyond `MAX_NODES` nodes, or that is too long."""


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Nodes of `root` with every alias expanded (each alias counts its target's whole size),
    stopping once past `limit`; a node that contains itself raises YAMLTooLarge."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            raise YAMLTooLarge("a recursive alias (a value that contains itself)")
        in_progress.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children: list[yaml.Node] = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > limit:
                break
        in_progress.discard(key)
        sizes[key] = total
        return total

    return size(root)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that measures each document's expanded size before constructing it."""

    def construct_document(self, node: yaml.Node) -> Any:
        n = _expanded_size(node, MAX_NODES)
        if n > MAX_NODES:
            raise YAMLTooLarge(
                f"its aliases (*name) expand it to more than {MAX_NODES:,} values "
                "(an alias bomb?); write the values out, or use fewer aliases"
            )
        return super().construct_document(node)


class _AnyTagLoader(_BoundedLoader):
    """Also reads other programs' YAML (lm-eval tasks tag values `!function module.name`): an
    application tag is read as null instead of refused; the syntax is still checked."""


_AnyTagLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def load(text: str, source: str = "YAML", *, any_tags: bool = False) -> Any:
    """`yaml.safe_load(text)` within the bounds above; YAMLTooLarge names `source`.

    Malformed YAML raises `yaml.YAMLError` as `yaml.safe_load` does. `any_tags` reads
    application tags (`!name value`) as null (to check a file another program reads).
    """
    if len(text) > MAX_BYTES:
        raise YAMLTooLarge(
            f"{source}: {len(text):,} characters, more than a config can be ({MAX_BYTES:,})"
        )
    try:
        # SafeLoader subclasses: no arbitrary objects are ever built.
        return yaml.load(text, Loader=_AnyTagLoader if any_tags else _BoundedLoader)
    except YAMLTooLarge as e:
        raise YAMLTooLarge(f"{source}: {e}") from None
    except RecursionError:  # nesting thousands deep: no config looks like that
        raise YAMLTooLarge(f"{source}: nested too deeply to be a config") from None


_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlist = _short.maxdict = _short.maxtuple = _short.maxset = 6
_short.maxlevel = 3


def shorten(value: Any, limit: int = 120) -> str:
    """`repr(value)` bounded in depth, items and length (`[1, 2, ...]`), for error messages."""
    text = _short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
