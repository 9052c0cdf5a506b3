"""Let go of the ONNX graph onnxscript's rewrite rules keep after an export.

onnxscript's rules are module-level objects; each rule's matcher remembers the last graph it
matched (``_graph``, ``_current_node``, ``_match``), and through its initializers every weight of
the export copy. Instead of scanning every object of the interpreter (``gc.get_objects()``, which
also trips deprecation warnings of unrelated objects), the rules are found where they live: the
module globals of the imported ``onnxscript`` modules (rules, rule sets, and lists/tuples/dicts of
them, one level deep).
"""

from __future__ import annotations

import sys

_MATCHER_STATE = ("_graph", "_current_node", "_match")


def _rules_in(value, seen: set[int]):
    stack = [value]
    depth = 0
    while stack and depth < 3:
        nxt = []
        for v in stack:
            if id(v) in seen:
                continue
            seen.add(id(v))
            if hasattr(v, "_matcher") or hasattr(v, "rules"):
                yield v
                rules = getattr(v, "rules", None)
                if isinstance(rules, (list, tuple)):
                    nxt.extend(rules)
            elif isinstance(v, (list, tuple)):
                nxt.extend(v)
            elif isinstance(v, dict):
                nxt.extend(v.values())
        stack, depth = nxt, depth + 1


def release_rewriter_graphs() -> int:
    """Clear the graph references of every onnxscript rewrite rule's matcher; returns how many were cleared."""
    try:
        from onnxscript.rewriter._matcher import PatternMatcher
    except ImportError:
        return 0
    seen: set[int] = set()
    cleared = 0
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "onnxscript" or name.startswith("onnxscript.")):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, type) or type(value).__module__ == "builtins" and not isinstance(
                    value, (list, tuple, dict)):
                continue
            for rule in _rules_in(value, seen):
                matcher = getattr(rule, "_matcher", None)
                if isinstance(matcher, PatternMatcher):
                    for attr in _MATCHER_STATE:
                        if getattr(matcher, attr, None) is not None:
                            setattr(matcher, attr, None)
                            cleared += 1
    return cleared


__all__ = ["release_rewriter_graphs"]
