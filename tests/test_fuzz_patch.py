"""Fuzz of ``mrprune.patch`` / ``mrprune.patched`` arguments (issue 14): every bad argument is rejected naming it,
before the model is touched (a valid ``patch`` still works afterwards and ``remove`` restores the model).

Runs under the ``mrprune-ci`` hypothesis profile (tests/fuzz_support.py).
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mrprune
from tests.fuzz_support import assert_names_cause

pytest.importorskip("transformers")
from mrprune.integrations.testing import tiny_llava  # noqa: E402


@functools.cache
def _model():
    return tiny_llava(layers=1)


class _NotATokenizer:
    pass


#: (argument, message regex, bad value, pruner the call uses)
BAD = [
    *[("pruner", "pruner", v, None) for v in (None, "MRPruner", mrprune.MRPruner, 3, torch.nn.Identity())],
    *[("position_mode", "position_mode", v, "mr") for v in ("", "Original", "positions", 1, True)],
    *[("padding_side", "padding_side", v, "mr") for v in (None, "up", "LEFT", 0, True)],
    *[("processor", "processor", v, "res") for v in (3, "tokenizer", _NotATokenizer(), [1, 2])],
    *[("instructions", "instructions", v, "res") for v in ("What is in the image?", [1, 2], 3, [["a"]], b"x")],
    *[("texts", "texts", v, "res") for v in (torch.randn(2, 8), ["cat"], 3, [torch.randn(2, 3, 4)], [None, 1])],
]
PRUNERS = {"mr": lambda: mrprune.MRPruner(0.5), "res": lambda: mrprune.ResPrune(keep_ratio=0.5)}


def _call(arg, value, pruner_name):
    model = _model()
    kwargs = {"pruner": PRUNERS.get(pruner_name, PRUNERS["mr"])()}
    if pruner_name == "res" and arg not in ("processor", "texts", "instructions"):
        kwargs["texts"] = [torch.randn(2, 8)]
    if arg == "instructions":
        kwargs["texts"] = None
        kwargs["processor"] = None
    kwargs[arg] = value
    return mrprune.patch(model, **kwargs)


@given(case=st.sampled_from(BAD), use_context=st.booleans())
def test_bad_patch_argument_is_rejected_naming_it_and_leaves_the_model_alone(case, use_context):
    arg, pattern, value, pruner_name = case
    model = _model()
    forward = model.forward
    try:
        if use_context:
            kwargs = {"pruner": PRUNERS.get(pruner_name, PRUNERS["mr"])(), arg: value}
            with mrprune.patched(model, **kwargs):
                pass
        else:
            _call(arg, value, pruner_name).remove()
    except Exception as error:  # noqa: BLE001  (the type is what is checked)
        assert_names_cause(error, "mrprune.patch", pattern)
    else:
        pytest.fail(f"mrprune.patch accepted {arg}={value!r}")
    assert model.forward == forward  # untouched: patching again works
    handle = mrprune.patch(model, mrprune.MRPruner(0.5))
    handle.remove()


@pytest.mark.parametrize("model", [None, 3, torch.nn.Linear(2, 2)], ids=["none", "int", "linear"])
def test_unsupported_model_is_rejected_naming_what_is_supported(model):
    with pytest.raises(TypeError, match="mrprune.patch supports"):
        mrprune.patch(model, mrprune.MRPruner(0.5))


@pytest.mark.parametrize(("arg", "value"), [("instructions", "What is it?"), ("texts", torch.randn(2, 8))])
def test_handle_setters_reject_what_patch_rejects(arg, value):
    handle = mrprune.patch(_model(), mrprune.ResPrune(keep_ratio=0.5), texts=[torch.randn(2, 8)])
    try:
        with pytest.raises(TypeError, match=arg):
            setattr(handle, arg, value)
    finally:
        handle.remove()
