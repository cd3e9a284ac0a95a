"""The documented signatures of the public API (``docs/api.md``) are the code's: every
``name(...)`` written there for a name ``megatron_channel`` exports has the same parameters,
in the same order and kinds, with the same defaults."""

from __future__ import annotations

import ast
import inspect
import os
import re

import pytest

import megatron_channel

API_DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "api.md")
# Functions and classes whose signatures the API page must show.
SHOWN = ("ChannelConfig", "BatchLayout", "channel_loss_func", "make_forward_step", "reduce_channel_metrics",
         "install_channel_logging", "uninstall_channel_logging", "sft_dataset_class")


def documented_signatures(text: str) -> dict[str, list[str]]:
    """name -> the parameter lists written in backticks as ``name(...)`` for exported names."""
    found: dict[str, list[str]] = {}
    for span in re.findall(r"`([^`]+)`", text):
        for name, params in re.findall(r"\b([A-Za-z_]\w*)\(((?:[^()]|\([^()]*\))*)\)", span):
            if name in megatron_channel.__all__:
                found.setdefault(name, []).append(params)
    return found


def parameters_of(params: str) -> list[tuple[str, str, object]]:
    """(name, kind, default) of a written parameter list, read as a ``def``'s."""
    args = ast.parse(f"def f({params}): pass").body[0].args
    positional = args.posonlyargs + args.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(args.defaults)) + [
        ast.literal_eval(d) for d in args.defaults]
    out = [(a.arg, "positional", d) for a, d in zip(positional, defaults)]
    out += [(a.arg, "keyword", inspect.Parameter.empty if d is None else ast.literal_eval(d))
            for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    return out


def code_parameters(obj) -> list[tuple[str, str, object]]:
    signature = inspect.signature(obj)
    kinds = {inspect.Parameter.KEYWORD_ONLY: "keyword"}
    return [(p.name, kinds.get(p.kind, "positional"), p.default) for p in signature.parameters.values()
            if not p.name.startswith("_")]


@pytest.mark.timeout(30)
def test_documented_api_signatures_match_the_code():
    documented = documented_signatures(open(API_DOC).read())
    missing = [name for name in SHOWN if name not in documented]
    assert not missing, f"docs/api.md shows no signature for {missing}"
    for name, variants in documented.items():
        want = code_parameters(getattr(megatron_channel, name))
        for params in variants:
            assert parameters_of(params) == want, f"docs/api.md: {name}({params}) but the code has {want}"
