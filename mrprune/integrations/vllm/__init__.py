"""vLLM plugin: prune the visual tokens of LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL (images and videos) in vLLM.

Installed with ``pip install "mrprune[vllm]"``; vLLM loads it through the ``vllm.general_plugins`` entry point,
whose :func:`register` replaces vLLM's ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration`` and
``Qwen2_5_VLForConditionalGeneration`` by subclasses that prune when switched on (see :mod:`.config`):

* ``LLM(model, hf_overrides={"mrprune": {"method": "mr_pruner", "keep_ratio": 0.25}})`` or
  ``vllm serve MODEL --hf-overrides '{"mrprune": {"method": "mr_pruner", "keep_ratio": 0.25}}'``;
* or ``MRPRUNE_VLLM=mr_pruner:0.25`` in the environment.

Without either, the subclasses behave exactly as vLLM's own classes. The vLLM modules are imported only by
:func:`register`, so importing this package never initialises vLLM (or CUDA).
"""

from __future__ import annotations

import logging

from .config import ENV_VAR, METHODS, PruneConfig, kept_count

__all__ = ["ENV_VAR", "METHODS", "PruneConfig", "SUPPORTED_VLLM", "kept_count", "register"]

logger = logging.getLogger(__name__)

#: The vLLM release the plugin is tested with (its model classes' internals are not a stable API).
SUPPORTED_VLLM = "0.32.0"

_MODELS = {
    "LlavaForConditionalGeneration": "mrprune.integrations.vllm.llava:PrunedLlava",
    "LlavaNextForConditionalGeneration": "mrprune.integrations.vllm.llava:PrunedLlavaNext",
    "Qwen2_5_VLForConditionalGeneration": "mrprune.integrations.vllm.qwen2_5_vl:PrunedQwen2_5_VL",
}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the pruning model classes (lazily, by name)."""
    import vllm
    from vllm import ModelRegistry

    if vllm.__version__.split("+")[0] != SUPPORTED_VLLM:
        logger.warning("mrprune vLLM plugin is tested with vLLM %s, running on %s", SUPPORTED_VLLM, vllm.__version__)
    for architecture, target in _MODELS.items():
        ModelRegistry.register_model(architecture, target)
    _patch_cpu_runner()


def _patch_cpu_runner() -> None:
    """vLLM 0.32's CPU model runner never turns on its multimodal-pruning path (``GPUModelRunner.load_model`` sets
    ``is_multimodal_pruning_enabled``, ``CPUModelRunner.load_model`` replaces it without doing so; vLLM's EVS has the
    same gap on CPUs), so Qwen2.5-VL's kept tokens would never get their positions. Set the flag after loading one of
    the plugin's models with pruning on (nothing changes for any other model)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    original = CPUModelRunner.load_model
    if getattr(original, "_mrprune", False):
        return

    def load_model(self: CPUModelRunner, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        if getattr(self.get_model(), "mrprune", None) is not None and self.uses_mrope:
            self.is_multimodal_pruning_enabled = True

    load_model._mrprune = True  # type: ignore[attr-defined]
    CPUModelRunner.load_model = load_model
