"""lmms-eval plugin: evaluate LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL with mrprune pruning their visual tokens.

Registered through lmms-eval's model entry points (group ``lmms_eval.models``, lmms-eval >= 0.6; declared in
mrprune's ``pyproject.toml``), so after ``pip install "mrprune[eval]"`` the models are available by name::

    accelerate launch --num_processes 8 -m lmms_eval \\
        --model mrprune_llava_hf \\
        --model_args pretrained=llava-hf/llama3-llava-next-8b-hf,pruner=mr_pruner,keep_ratio=0.1 \\
        --tasks textvqa_val --batch_size 1

Model ids (each with a chat class, lmms-eval's default, and a simple one, ``--force_simple``):

* ``mrprune_llava_hf`` (aliases ``mrprune_llava``, ``mrprune_llava_next``) wraps lmms-eval's ``llava_hf``
  (``models/chat/llava_hf.py``, ``models/simple/llava_hf.py``): ``llava-hf/llava-1.5-7b-hf``,
  ``llava-hf/llava-v1.6-*-hf``, ``llava-hf/llama3-llava-next-8b-hf``.
* ``mrprune_qwen2_5_vl`` wraps ``qwen2_5_vl``: ``Qwen/Qwen2.5-VL-7B-Instruct`` and the other sizes.

Each class subclasses the stock wrapper and only adds, after the model is loaded, :func:`mrprune.patch` on the
(unwrapped) Hugging Face model, so prompts, chat templates, batching and data parallelism are lmms-eval's own. The
``llava_hf`` wrappers only run ``batch_size=1``; ``qwen2_5_vl`` batches (left padding), and mrprune prunes every
sample of a batch on its own.

``--model_args`` understood on top of the wrapped model's own:

``pruner``
    A :data:`mrprune.PRESETS` name (``mr_pruner_90``, ``g_prune``, ``resprune_128``, ``divprune``, ...) or a method
    name (``mr_pruner`` / ``MRPruner``, ``g_prune`` / ``GPrune``, ``div_prune``, ``random``, ``resprune``,
    ``fastv``, ...; the merging methods ``visionzip`` and ``prumerge`` too: the counts below are then output tokens,
    merged ones included). Required.
pruner keyword arguments
    Any argument of the pruner's constructor (``keep_ratio``, ``official``, ``budget``, ``alpha``, ``iterations``,
    ``seed``, ``layer``, ...), overriding a preset's; ``pruner_<name>=`` forces one to the pruner.
``position_mode``
    ``original`` or ``compact`` (default: the method's own, see :func:`mrprune.patch`).
``prune_log``
    A file to which each process writes one JSON line per pruned batch and a final summary (``.rank<r>`` is
    appended under data parallelism).

Token counts: after every pruned batch the plugin logs (``logging``, logger ``mrprune.integrations.lmms_eval``, INFO)
the visual tokens before / after pruning and the pruning time, and at the end of every ``generate_until`` /
``loglikelihood`` call a cumulative summary of this process. Under ``accelerate launch --num_processes N`` every
process prunes and reports its own shard; nothing here communicates between processes.

Notes (lmms-eval 0.7.3 with transformers 5): in a single process the stock ``llava_hf`` passes ``device_map=""`` to
``from_pretrained``, which transformers 5 rejects; these wrappers pass ``device`` instead. lmms-eval's chat classes
serve generation tasks only (``--force_simple`` for log-likelihood ones), and the simple ``llava_hf``
``loglikelihood`` itself fails under transformers 5 (it calls the processor on text with ``<image>`` but no image).
The wrappers import lmms-eval's model modules, which import ``decord`` (not declared by lmms-eval).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["MODEL_IDS", "PruneStats", "build_pruner", "manifests"]

logger = logging.getLogger(__name__)

#: model id -> (aliases, lmms-eval simple module, class, chat module, class)
MODEL_IDS: dict[str, tuple[tuple[str, ...], str, str, str, str]] = {
    "mrprune_llava_hf": (
        ("mrprune_llava", "mrprune_llava_next"),
        "lmms_eval.models.simple.llava_hf",
        "LlavaHf",
        "lmms_eval.models.chat.llava_hf",
        "LlavaHf",
    ),
    "mrprune_qwen2_5_vl": (
        (),
        "lmms_eval.models.simple.qwen2_5_vl",
        "Qwen2_5_VL",
        "lmms_eval.models.chat.qwen2_5_vl",
        "Qwen2_5_VL",
    ),
}

# our class names, per model id: (simple, chat)
_CLASS_NAMES = {
    "mrprune_llava_hf": ("PrunedLlavaHfSimple", "PrunedLlavaHf"),
    "mrprune_qwen2_5_vl": ("PrunedQwen2_5_VLSimple", "PrunedQwen2_5_VL"),
}


def manifests() -> list[Any]:
    """The entry-point payload: one ``lmms_eval.models.registry_v2.ModelManifest`` per model id (chat and simple
    class). Cheap: the classes are built when lmms-eval first imports them."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            model_id=model_id,
            simple_class_path=f"{__name__}.{_CLASS_NAMES[model_id][0]}",
            chat_class_path=f"{__name__}.{_CLASS_NAMES[model_id][1]}",
            aliases=aliases,
        )
        for model_id, (aliases, *_) in MODEL_IDS.items()
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Pruner construction from --model_args
# ---------------------------------------------------------------------------------------------------------------------


def _method_classes() -> dict[str, type]:
    """Every method :mod:`mrprune.methods` exports, by its normalised class name (``mrpruner``, ``tome``, ...), plus
    ``random`` for :class:`~mrprune.RandomPruner`: a new method is reachable by name without an edit here."""
    from .. import methods
    from ..methods.base import Pruner

    classes = {
        _normalise(name): cls
        for name in methods.__all__
        if isinstance(cls := getattr(methods, name), type) and issubclass(cls, Pruner) and cls is not Pruner
    }
    return {**classes, "random": methods.RandomPruner}


def _normalise(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def _pruner_factory(name: str) -> tuple[Callable[..., Any], dict[str, Any], Callable[..., Any]]:
    """``(constructor, preset arguments, class)`` for a preset or method name."""
    from ..methods import PRESETS

    if name in PRESETS:
        cls, arguments = PRESETS[name]
        return cls, dict(arguments), cls
    classes = _method_classes()
    key = _normalise(name)
    if key not in classes:
        raise ValueError(
            f"mrprune lmms-eval plugin: unknown pruner {name!r}; use a preset ({', '.join(sorted(PRESETS))}) or a "
            f"method ({', '.join(sorted(classes))})"
        )
    return classes[key], {}, classes[key]


def split_arguments(pruner: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``--model_args`` into the pruner's keyword arguments and the wrapped model's.

    A key goes to the pruner when it is ``pruner_<name>`` or a parameter of the pruner's constructor.
    """
    _, _, cls = _pruner_factory(pruner)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    ours, theirs = {}, {}
    for key, value in kwargs.items():
        if key.startswith("pruner_"):
            ours[key[len("pruner_") :]] = value
        elif key in accepted:
            ours[key] = value
        else:
            theirs[key] = value
    return ours, theirs


def build_pruner(name: str, **kwargs: Any) -> Any:
    """A pruner from a preset or method name and keyword overrides (``build_pruner("mr_pruner", keep_ratio=0.3)``)."""
    constructor, arguments, _ = _pruner_factory(name)
    return constructor(**{**arguments, **kwargs})


# ---------------------------------------------------------------------------------------------------------------------
# Token accounting
# ---------------------------------------------------------------------------------------------------------------------


class PruneStats:
    """Per-process counts of what the patched model pruned; fed after every forward call.

    Attributes
    ----------
    batches, samples : int
        Pruned prefills and the samples (rows) they held.
    tokens_before, tokens_after : int
        Visual tokens before and after pruning, summed over samples.
    seconds : float
        Pruning time summed over batches.
    """

    def __init__(self, handle: Any, rank: int = 0, world_size: int = 1, log_path: str | None = None) -> None:
        self.handle = handle
        self.rank, self.world_size = rank, world_size
        self.batches = self.samples = self.tokens_before = self.tokens_after = 0
        self.seconds = 0.0
        self._seen: Any = None
        self.log_path = None
        if log_path:
            self.log_path = f"{log_path}.rank{rank}" if world_size > 1 else str(log_path)
            open(self.log_path, "w").close()

    def observe(self) -> None:
        """Count the handle's last pruned prefill if it is new (called after every forward; cheap otherwise)."""
        records = self.handle.last
        if records is None or records is self._seen:
            return
        self._seen = records
        before = sum(r.tokens_before for r in records)
        after = sum(r.tokens_after for r in records)
        seconds = records[0].seconds if records else 0.0
        self.batches += 1
        self.samples += len(records)
        self.tokens_before += before
        self.tokens_after += after
        self.seconds += seconds
        logger.info(
            "mrprune [rank %d] batch %d: %d sample(s), visual tokens %d -> %d (%s kept) per sample %s, pruning %.2f ms",
            self.rank,
            self.batches,
            len(records),
            before,
            after,
            _percent(after, before),
            [(r.tokens_before, r.tokens_after) for r in records],
            1e3 * seconds,
        )
        self._write(
            {
                "batch": self.batches,
                "samples": len(records),
                "tokens_before": [r.tokens_before for r in records],
                "tokens_after": [r.tokens_after for r in records],
                "seconds": seconds,
            }
        )

    def summary(self) -> dict[str, Any]:
        """The cumulative counts of this process."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "pruner": repr(self.handle.pruner),
            "position_mode": self.handle.position_mode,
            "batches": self.batches,
            "samples": self.samples,
            "tokens_before": self.tokens_before,
            "tokens_after": self.tokens_after,
            "kept_fraction": self.tokens_after / self.tokens_before if self.tokens_before else None,
            "mean_tokens_before": self.tokens_before / self.samples if self.samples else None,
            "mean_tokens_after": self.tokens_after / self.samples if self.samples else None,
            "pruning_seconds": self.seconds,
        }

    def report(self, where: str) -> dict[str, Any]:
        """Log (and write) the summary; returns it."""
        summary = self.summary()
        samples = max(self.samples, 1)
        logger.info(
            "mrprune summary [rank %d/%d] after %s: %r (%s positions) pruned %d samples in %d batches: visual tokens "
            "%d -> %d (%s kept), %.1f -> %.1f per sample, pruning %.2f ms per batch",
            self.rank,
            self.world_size,
            where,
            self.handle.pruner,
            self.handle.position_mode,
            self.samples,
            self.batches,
            self.tokens_before,
            self.tokens_after,
            _percent(self.tokens_after, self.tokens_before),
            self.tokens_before / samples,
            self.tokens_after / samples,
            1e3 * self.seconds / max(self.batches, 1),
        )
        self._write({"summary": where, **summary})
        return summary

    def _write(self, entry: dict[str, Any]) -> None:
        if self.log_path:
            with open(self.log_path, "a") as stream:
                stream.write(json.dumps(entry) + "\n")


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f} %" if whole else "n/a"


def _ensure_visible_logging() -> None:
    """lmms-eval logs through loguru and leaves ``logging`` unconfigured, which would drop our INFO reports: give
    this logger a stderr handler when nothing else handles it."""
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s - %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


# ---------------------------------------------------------------------------------------------------------------------
# The wrappers
# ---------------------------------------------------------------------------------------------------------------------


class _PrunedMixin:
    """Loads the wrapped lmms-eval model, then patches its Hugging Face model with an mrprune pruner."""

    _single_process_device_map = False  # llava_hf: fill in device_map in a single process

    def __init__(
        self,
        *args: Any,
        pruner: str | None = None,
        position_mode: str | None = None,
        prune_log: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not pruner:
            raise ValueError(
                "mrprune lmms-eval plugin: give pruner=<preset or method> in --model_args (e.g. "
                "pruner=mr_pruner,keep_ratio=0.1); use the stock model for unpruned runs"
            )
        pruner_kwargs, model_kwargs = split_arguments(str(pruner), kwargs)
        built = build_pruner(str(pruner), **pruner_kwargs)  # fail fast, before loading weights
        if self._single_process_device_map and not model_kwargs.get("device_map"):
            # llava_hf's default device_map="" means "one device"; transformers 5 rejects "" in from_pretrained, so
            # a single process loads onto `device` instead (several processes keep "": the wrapper pins cuda:<rank>)
            from accelerate import PartialState

            if PartialState().num_processes == 1:
                model_kwargs["device_map"] = str(model_kwargs.get("device", "cuda"))
        super().__init__(*args, **model_kwargs)
        from .. import patch

        _ensure_visible_logging()
        processor = getattr(self, "processor", None) or getattr(self, "_image_processor", None)
        self.mrprune_handle = patch(self.model, built, position_mode=position_mode, processor=processor)
        self.mrprune_stats = PruneStats(self.mrprune_handle, self.rank, self.world_size, prune_log)
        self._install_counter()
        logger.info(
            "mrprune [rank %d]: %s patched with %r (%s positions)",
            self.rank,
            type(self.model).__name__,
            built,
            self.mrprune_handle.position_mode,
        )

    def _install_counter(self) -> None:
        """Count after every forward call of the patched model (prefills update ``handle.last``)."""
        model, stats = self.model, self.mrprune_stats
        patched_forward = model.__dict__["forward"]

        @functools.wraps(patched_forward)  # generate() validates its kwargs against forward's signature
        def forward(*args: Any, **kwargs: Any) -> Any:
            output = patched_forward(*args, **kwargs)
            stats.observe()
            return output

        model.__dict__["forward"] = forward
        self._mrprune_forward = (patched_forward, forward)

    def remove_pruning(self) -> None:
        """Unpatch the model (the counter first, then :meth:`mrprune.PruningHandle.remove`)."""
        patched_forward, counter = self._mrprune_forward
        if self.model.__dict__.get("forward") is counter:
            self.model.__dict__["forward"] = patched_forward
        self.mrprune_handle.remove()

    def generate_until(self, requests: list[Any]) -> list[Any]:
        try:
            return super().generate_until(requests)
        finally:
            self.mrprune_stats.report("generate_until")

    def loglikelihood(self, requests: list[Any]) -> list[Any]:
        try:
            return super().loglikelihood(requests)
        finally:
            self.mrprune_stats.report("loglikelihood")


def _build(name: str) -> type:
    import importlib

    for model_id, (simple_name, chat_name) in _CLASS_NAMES.items():
        if name in (simple_name, chat_name):
            _, simple_module, simple_cls, chat_module, chat_cls = MODEL_IDS[model_id]
            module, cls = (simple_module, simple_cls) if name == simple_name else (chat_module, chat_cls)
            base = getattr(importlib.import_module(module), cls)
            doc = f"lmms-eval ``{module}.{cls}`` with mrprune pruning (model id ``{model_id}``; see the module docs)."
            namespace = {"__doc__": doc, "__module__": __name__, "_single_process_device_map": "llava" in model_id}
            return type(name, (_PrunedMixin, base), namespace)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __getattr__(name: str) -> type:
    """Build the wrapper classes on first use: importing lmms-eval's model modules is slow and needs their
    dependencies (decord, qwen-vl-utils), which listing the entry points must not."""
    cls = _build(name)
    globals()[name] = cls
    return cls
