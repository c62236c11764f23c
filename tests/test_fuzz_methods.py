"""Property / fuzz suite of the methods and layouts (issue 14): every bad construction argument and every bad call
input is rejected naming the method and the argument; an empty batch gives ``[]``; a padded batch gives what each
image gives alone; NaN in the padding is ignored; exact duplicates tie to the lower index.

Runs under the ``mrprune-ci`` hypothesis profile (tests/fuzz_support.py): derandomized, bounded examples.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import mrprune
from mrprune import DivPrune, GPrune, GridLayout, LlavaNextLayout, MRPruner, Pruner, RandomPruner, ResPrune
from mrprune import methods as methods_module
from tests.fuzz_support import (
    NON_FINITE,
    NOT_BOOL,
    NOT_INT,
    assert_names_cause,
    features_from_seed,
    padded_items,
    raises_naming,
)

#: Valid construction arguments of each method (the ones the fuzz corrupts one at a time).
VALID = {
    MRPruner: dict(
        keep_ratio=0.5, official=False, threshold=0.5, cross_threshold=0.5, temperature=0.03, iterations=1, beta=0.5
    ),
    GPrune: dict(keep_ratio=0.5, official=False, threshold=0.5, temperature=0.03, iterations=5),
    DivPrune: dict(keep_ratio=0.5, official=False),
    RandomPruner: dict(keep_ratio=0.5, seed=0),
    ResPrune: dict(budget=3, alpha=0.75, exhaustion_tol=1e-5, noun_extractor=None),
}
#: Methods that run on features and layouts alone (FastV also needs the LLM's attention scores).
PLAIN = list(VALID)

_values = st.sampled_from
KEEP_RATIO = _values([0, 0.0, -0.1, 1.5, math.nan, math.inf, "0.5", None, True])
REAL = _values([*NON_FINITE, True, None, "0.5"])
TEMPERATURE = st.one_of(
    _values([*NON_FINITE, 0.0, -1.0, True, None]), st.floats(max_value=1e-30, exclude_max=True, allow_nan=False)
)
ITERATIONS = st.one_of(_values(NOT_INT), st.integers(-(2**40), 0))
SEED = st.one_of(
    _values([1.5, True, None, "1", math.nan]), st.integers(2**64, 2**80), st.integers(-(2**80), -(2**63) - 1)
)

CONSTRUCTION = {
    MRPruner: {
        "keep_ratio": KEEP_RATIO,
        "official": _values(NOT_BOOL),
        "threshold": REAL,
        "cross_threshold": REAL,
        "temperature": TEMPERATURE,
        "iterations": ITERATIONS,
        "beta": REAL,
    },
    GPrune: {
        "keep_ratio": KEEP_RATIO,
        "official": _values(NOT_BOOL),
        "threshold": REAL,
        "temperature": TEMPERATURE,
        "iterations": ITERATIONS,
    },
    DivPrune: {"keep_ratio": KEEP_RATIO, "official": _values(NOT_BOOL)},
    RandomPruner: {"keep_ratio": KEEP_RATIO, "seed": SEED},
    ResPrune: {
        "keep_ratio": KEEP_RATIO,
        "budget": st.one_of(_values(NOT_INT), st.integers(-(2**40), 0)),
        "alpha": _values([*NON_FINITE, -0.1, True, None, "gpt"]),
        "exhaustion_tol": _values([*NON_FINITE, 1.0, -0.1, True, None]),
        "noun_extractor": _values([3, "nouns"]),
    },
}
CONSTRUCTION_CASES = [(cls, arg) for cls, args in CONSTRUCTION.items() for arg in args]


@pytest.mark.parametrize(("cls", "arg"), CONSTRUCTION_CASES, ids=[f"{c.__name__}-{a}" for c, a in CONSTRUCTION_CASES])
@given(data=st.data())
def test_bad_construction_argument_is_rejected_naming_it(cls, arg, data):
    kwargs = dict(VALID[cls])
    if cls is ResPrune and arg == "keep_ratio":
        kwargs.pop("budget")
    kwargs[arg] = data.draw(CONSTRUCTION[cls][arg], label=arg)
    raises_naming(lambda: cls(**kwargs), f"mrprune.{cls.__name__}", arg)


# --- call inputs -----------------------------------------------------------------------------------------------

#: Arguments a method cannot be built without (TRIM scores with the user's CLIP model: a stand-in suffices here,
#: every fuzzed input is rejected before the model is used).
REQUIRED = {methods_module.TRIM: {"clip": object(), "clip_tokenizer": lambda text: {"input_ids": [[0]]}}}
#: How to build exported methods that neither ``cls()`` nor ``cls(keep_ratio=0.5)`` constructs.
BUILD = {
    ResPrune: lambda: ResPrune(budget=3),
    methods_module.TRIM: lambda: methods_module.TRIM(keep_ratio=0.5, **REQUIRED[methods_module.TRIM]),
}


def _exported_methods() -> dict:
    """Every Pruner subclass mrprune.methods exports: a new method gets the call-input fuzz below for free."""
    out = {}
    for name in methods_module.__all__:
        cls = getattr(methods_module, name)
        if isinstance(cls, type) and issubclass(cls, Pruner) and cls is not Pruner:
            out[cls] = BUILD.get(cls, functools.partial(_default_build, cls))
    return out


def _default_build(cls):
    """``cls()``, or ``cls(keep_ratio=0.5)`` for methods that need a size."""
    try:
        return cls()
    except ValueError:
        return cls(keep_ratio=0.5)


ALL_METHODS = _exported_methods()


@pytest.mark.parametrize("cls", list(ALL_METHODS), ids=lambda c: c.__name__)
def test_every_exported_method_builds_for_the_fuzz(cls):
    assert isinstance(ALL_METHODS[cls](), cls)


KEEP_RATIO_METHODS = [c for c in ALL_METHODS if "keep_ratio" in inspect.signature(c).parameters]


@pytest.mark.parametrize("cls", KEEP_RATIO_METHODS, ids=lambda c: c.__name__)
@given(value=KEEP_RATIO)
def test_bad_keep_ratio_is_rejected_by_every_method(cls, value):
    # keep_ratio=None is valid where it is the default (TRIM: the IQR rule decides the count)
    assume(not (value is None and inspect.signature(cls).parameters["keep_ratio"].default is None))
    with pytest.raises(Exception) as info:
        cls(keep_ratio=value, **REQUIRED.get(cls, {}))
    assert_names_cause(info.value, "mrprune.", "keep_ratio")


T, DIM = 6, 4
X = features_from_seed(0, (2, T, DIM))
LENGTHS = torch.tensor([T, 4])


def _call_cases():
    """(argument, message regex, select_batch keyword changes)."""
    text = torch.randn(2, DIM)
    cases = {
        "features": [(None,), (X.long(),), (X[0],), (X[None],), (X.tolist(),), (X.bool(),)],
        "layouts": [
            (None,),
            ("ab",),
            ([None],),
            ([(1, T), None],),
            ([T, None],),
            ([{"rows": 1}, None],),
            ([GridLayout(1, 2, 2), None],),
            (X,),
        ],
        "lengths": [
            ([T + 1, 4],),
            ([T, 0],),
            ([T, -1],),
            ([6.0, 4.0],),
            ([True, True],),
            (torch.tensor([6.0, 4.0]),),
            (torch.tensor([True, True]),),
            ([T],),
            (torch.tensor([[T, 4]]),),
            (["6", "4"],),
            (5,),
        ],
        "texts": [([text],), ([text, 3],), ([torch.randn(2, DIM + 1), None],), ([text[0], None],), (text,)],
    }
    for arg, values in cases.items():
        for (value,) in values:
            yield arg, value


CALL_CASES = list(_call_cases())


@pytest.mark.parametrize("cls", list(ALL_METHODS), ids=lambda c: c.__name__)
@given(case=st.sampled_from(CALL_CASES))
def test_bad_call_input_is_rejected_naming_it(cls, case):
    arg, value = case
    pruner = ALL_METHODS[cls]()
    call = dict(features=X, layouts=[None, None], lengths=LENGTHS, texts=None)
    call[arg] = value
    owner = f"mrprune.{cls.__name__}.select_batch"
    with pytest.raises(Exception) as info:
        pruner.select_batch(**call)
    assert_names_cause(info.value, owner, {"layouts": "layout", "texts": "text"}.get(arg, arg))


@pytest.mark.parametrize("cls", PLAIN, ids=lambda c: c.__name__)
def test_bad_select_input_is_rejected_naming_it(cls):
    pruner = cls(**VALID[cls])
    owner = f"mrprune.{cls.__name__}.select"
    for bad in (None, X, X[0, 0], X[0].tolist()):
        raises_naming(lambda bad=bad: pruner.select(bad), owner, r"features")
    raises_naming(lambda: pruner.select(X[0], (1, T)), f"mrprune.{cls.__name__}.select_batch", "layout")
    raises_naming(lambda: pruner.select(X[0], GridLayout(1, 2, 2)), f"mrprune.{cls.__name__}.select_batch", "layout")
    raises_naming(lambda: pruner.select(X[0], text=[1.0, 2.0]), owner, "text")


@pytest.mark.parametrize("cls", list(ALL_METHODS), ids=lambda c: c.__name__)
def test_an_unknown_keyword_is_rejected_naming_it(cls):
    """A misspelt option (or one meant for the constructor) is an error, never silently ignored."""
    pruner = ALL_METHODS[cls]()
    raises_naming(
        lambda: pruner.select_batch(X, [None, None], LENGTHS, keep_ratio=0.3), f"mrprune.{cls.__name__}", "keep_ratio"
    )
    raises_naming(lambda: pruner.select(X[0], atention=X[0, :, 0]), f"mrprune.{cls.__name__}", "atention")


@pytest.mark.parametrize("cls", list(ALL_METHODS), ids=lambda c: c.__name__)
def test_empty_batch_returns_an_empty_list(cls):
    assert ALL_METHODS[cls]().select_batch(torch.zeros(0, T, DIM), [], torch.zeros(0, dtype=torch.int64)) == []
    assert ALL_METHODS[cls]().select_batch(torch.zeros(0, 0, DIM), []) == []


def test_issue_reproducers_name_their_cause():
    """The messages the issue found hiding their cause."""
    zeros = torch.zeros(LlavaNextLayout(2, 3, base_side=2).num_tokens, DIM)
    with pytest.raises(ValueError, match=r"official=True.*mean token norms"):
        MRPruner(0.5, official=True).select(zeros, LlavaNextLayout(2, 3, base_side=2))
    with pytest.raises(ValueError, match="beta"):
        MRPruner(beta=math.nan)
    with pytest.raises(ValueError, match="seed"):
        RandomPruner(seed=2**70)
    with pytest.raises(ValueError, match="temperature"):
        MRPruner(temperature=1e-39)
    with pytest.raises(TypeError, match="seeds"):
        ResPrune(budget=2).select(X[0], seeds=1.5)
    with pytest.raises(ValueError, match="seeds"):
        ResPrune(budget=2).select(X[0], seeds=T)


# --- batch = per image, padding ignored, ties ------------------------------------------------------------------


@st.composite
def images(draw, cls):
    """Ragged images with layouts: LLaVA-NeXT-like (tiny base view, grid, newlines) for the graph methods, flat or
    grid rasters for every method."""
    items = []
    for _ in range(draw(st.integers(1, 3))):
        if cls in (MRPruner, GPrune) and draw(st.booleans()):  # zero rows or columns: extreme aspect ratios
            layout = LlavaNextLayout(draw(st.integers(0, 3)), draw(st.integers(0, 3)), base_side=2)
        else:
            layout = draw(st.sampled_from([None, GridLayout(1, 2, 3), GridLayout(2, 1, 2), GridLayout(1, 1, 5)]))
        n = 6 if layout is None else layout.num_tokens
        items.append((features_from_seed(draw(st.integers(0, 2**20)), (n, 5)), layout))
    return items


@pytest.mark.parametrize("cls", PLAIN, ids=lambda c: c.__name__)
@given(data=st.data(), ratio=st.sampled_from([0.1, 0.3, 0.5, 0.8, 1.0]))
def test_batch_equals_each_image_alone_and_padding_is_ignored(cls, data, ratio):
    items = data.draw(images(cls), label="images")
    kwargs = dict(VALID[cls])
    kwargs.pop("budget", None)
    kwargs["keep_ratio"] = ratio
    pruner = cls(**kwargs)
    features = [f for f, _ in items]
    layouts = [layout for _, layout in items]
    texts = [features_from_seed(i, (2, 5)) if i % 2 else None for i in range(len(items))] if pruner.uses_text else None
    alone = [pruner.select(f, layout, None if texts is None else texts[i]) for i, (f, layout) in enumerate(items)]
    batch, lengths = padded_items(features, 1e4)
    got = pruner.select_batch(batch, layouts, lengths, texts)
    assert [g.tolist() for g in got] == [a.tolist() for a in alone]
    if int(lengths.min()) < batch.shape[1]:  # NaN padding with the finite checks off (issue item 9)
        nan_batch, _ = padded_items(features, math.nan)
        with mock.patch.dict(os.environ, {"MRPRUNE_CHECK_FINITE": "0"}):
            got = pruner.select_batch(nan_batch, layouts, lengths, texts)
        assert [g.tolist() for g in got] == [a.tolist() for a in alone]


@given(seed=st.integers(0, 2**20), n=st.integers(3, 12), data=st.data())
def test_divprune_and_resprune_keep_the_lower_duplicate(seed, n, data):
    """An exact copy of a token placed later never outranks it: among two duplicates, the lower index is kept
    first (both methods keep at most one of a pair before exhausting distinct tokens)."""
    x = features_from_seed(seed, (n, 6))
    source = data.draw(st.integers(0, n - 2), label="source")
    target = data.draw(st.integers(source + 1, n - 1), label="target")
    x[target] = x[source]
    for pruner in (DivPrune(keep_ratio=(n - 1) / n), ResPrune(budget=n - 1)):
        kept = pruner.select(x).tolist()
        assert source in kept, (type(pruner).__name__, kept)


# --- layouts ---------------------------------------------------------------------------------------------------

NOT_COUNT = [1.0, 2.5, True, None, "2", math.nan]


@pytest.mark.parametrize(
    ("cls", "fields"), [(GridLayout, ("frames", "height", "width")), (LlavaNextLayout, ("rows", "cols", "base_side"))]
)
@given(data=st.data())
def test_bad_layout_field_is_rejected_naming_it(cls, fields, data):
    field = data.draw(st.sampled_from(fields), label="field")
    value = data.draw(st.one_of(st.sampled_from(NOT_COUNT), st.integers(-(2**40), -1)), label="value")
    kwargs = {f: 2 for f in fields}
    kwargs[field] = value
    raises_naming(lambda: cls(**kwargs), cls.__name__, field)


def test_layouts_accept_numpy_ints_as_ints():
    assert GridLayout(np.int64(1), np.int32(2), np.int64(3)) == GridLayout(1, 2, 3)
    assert type(GridLayout(np.int64(1), 2, 3).frames) is int
    assert LlavaNextLayout(np.int64(2), np.int64(3), np.int64(2)).num_tokens == LlavaNextLayout(2, 3, 2).num_tokens


def test_layout_constructors_reject_bad_sizes():
    with pytest.raises(ValueError, match="image_size"):
        LlavaNextLayout.from_image_size((0, 10))
    with pytest.raises(ValueError, match="merge"):
        GridLayout.from_grid_thw((1, 3, 4))
    with pytest.raises(TypeError, match="grid_thw"):
        GridLayout.from_grid_thw((1.5, 4, 4))
    with pytest.raises(TypeError, match="grid_thw"):
        GridLayout.from_grid_thw(torch.tensor([1.0, 4.0, 4.0]))
    assert GridLayout.from_grid_thw(torch.tensor([2, 4, 6])) == GridLayout(2, 2, 3)


def test_methods_are_reachable_from_the_package():
    assert mrprune.MRPruner is MRPruner and mrprune.ResPrune is ResPrune


# --- select (one item) against select_batch (a batch of one) --------------------------------------------------------

#: Every exported method whose ``select`` takes a one-item signal keyword (``ITEM_KEYWORDS`` of its needs, or the
#: ``llm`` stage's): a new method with such a need is covered here.
ITEM_SIGNAL_METHODS = [
    cls
    for cls in ALL_METHODS
    if cls.stage is mrprune.Stage.LLM or any(need.value in methods_module.stages.ITEM_KEYWORDS for need in cls.needs)
]
#: a small LLaVA-NeXT image (22 tokens: base view, tiles and newlines)
ITEM_LAYOUT = LlavaNextLayout(2, 2, base_side=4)
ITEM_IMAGE_SIZE = (56, 56)
#: methods whose default budget would keep all of ``ITEM_LAYOUT``'s tokens
ITEM_BUILD = {methods_module.DART: lambda: methods_module.DART(budget=8)}


def _item_signals(pruner, features):
    """``select``'s one-item signals (the stand-ins ``mrprune viz`` draws with) and the batch-of-one form that
    ``select_batch`` takes, written out by hand: a batch dimension in front of every one-item keyword."""
    from mrprune import viz

    one = viz.standin_signals(pruner, features, ITEM_LAYOUT, ITEM_IMAGE_SIZE)
    if mrprune.Need.CLS_SEED in pruner.needs:
        one["seeds"] = 5
    batch = {}
    for key, value in one.items():
        if key == "attention" and isinstance(value, dict):  # vision attention {layer: [N]} -> {layer: [1, N]}
            batch[key] = {layer: scores.unsqueeze(0) for layer, scores in value.items()}
        elif isinstance(value, torch.Tensor):  # attention, crops, groups, clip_image, key_norms, normed, ...
            batch[key] = value.unsqueeze(0)
        elif key in ("original_lengths", "seeds"):
            batch[key] = torch.tensor([value])
        else:  # clip_text, prompt, attention_kind, step, layer: already a batch of one's
            batch[key] = value
    return one, batch


def _same_result(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    fields = ("kept", "tokens", "sources", "weights")
    return type(a) is type(b) and all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields)


@pytest.mark.parametrize("cls", ITEM_SIGNAL_METHODS, ids=lambda c: c.__name__)
def test_select_of_one_item_equals_select_batch_of_one(cls):
    """``select`` takes one item's signals (``attention [N]`` / ``{layer: [N]}``, ``crops [N]``, ...) and gives what
    ``select_batch`` gives on the batch of one."""
    pruner = ITEM_BUILD.get(cls, ALL_METHODS[cls])()
    features = features_from_seed(3, (ITEM_LAYOUT.num_tokens, DIM))
    one, batch = _item_signals(pruner, features)
    assert one, cls  # the method reads some signal
    got = pruner.select(features, ITEM_LAYOUT, **one)
    want = pruner.select_batch(features[None], [ITEM_LAYOUT], **batch)[0]
    assert _same_result(got, want), cls
    assert methods_module.kept_indices(got).numel() < ITEM_LAYOUT.num_tokens, cls  # it prunes: the signals matter


@pytest.mark.parametrize("cls", ITEM_SIGNAL_METHODS, ids=lambda c: c.__name__)
def test_select_rejects_a_signal_of_another_shape_naming_it(cls):
    """A one-item keyword given in the batch's form (``[1, N]``), for another item's ``N``, or not as a tensor is a
    ``ValueError`` naming ``select``, the keyword and its one-item shape."""
    pruner = ALL_METHODS[cls]()
    features = features_from_seed(3, (ITEM_LAYOUT.num_tokens, DIM))
    one, batch = _item_signals(pruner, features)
    forms = {}
    for need in cls.needs:
        forms.update(methods_module.stages.ITEM_KEYWORDS.get(need.value, {}))
    if cls.stage is mrprune.Stage.LLM:
        forms.update(methods_module.stages.LLM_ITEM_KEYWORDS)
    checked = 0
    for key in forms.keys() & one.keys():
        value = one[key]
        if isinstance(value, dict):
            layer = next(iter(value))
            bad = [{**value, layer: value[layer][None]}, {**value, layer: value[layer][:-1]}, value[layer]]
        elif isinstance(value, int):
            bad = [batch[key], float(value)]
        elif forms[key].startswith("[N,") or forms[key] == "[N]":  # N: the item's token count
            bad = [batch[key], value[:-1], value.tolist()]
        else:
            bad = [batch[key], value.tolist()]
        for wrong in bad:
            error = TypeError if isinstance(value, int) and not isinstance(wrong, torch.Tensor) else ValueError
            with pytest.raises(error, match=rf"mrprune\.{cls.__name__}\.select: {key}"):
                pruner.select(features, ITEM_LAYOUT, **{**one, key: wrong})
        checked += 1
    assert checked, cls
