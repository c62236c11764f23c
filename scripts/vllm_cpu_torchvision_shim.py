"""Let the CUDA build of torchvision import on a CPU-only torch (test environments only).

PyPI ships torchvision for Linux only as CUDA builds. On the CPU wheel of torch their C++ extension fails to load;
torchvision tolerates that (its kernels are then missing, which transformers' image processors do not use), except
that it registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms`` unconditionally, which raises when
the operators were never defined. vLLM's LLaVA and Qwen2.5-VL modules import transformers' torchvision-based image
processors, so without this the vLLM tests cannot run on a CPU machine.

``scripts/ci_vllm.sh`` copies this file into the test venv's site-packages with a ``.pth`` line that calls
:func:`install`: an import hook that, the first time ``torchvision`` is imported, defines the two operator schemas
(when the extension did not) so that the import succeeds. It changes nothing when torchvision's extension loads.
"""

from __future__ import annotations

import importlib.abc
import sys


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        try:
            from torch.ops import load_library  # noqa: F401

            torch.ops.torchvision.nms.default  # noqa: B018  (defined: nothing to do)
        except (AttributeError, RuntimeError):
            library = torch.library.Library("torchvision", "FRAGMENT")  # kept alive on the module
            library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            library.define(
                "qnms(Tensor dets, Tensor scores, float iou_threshold, float scale, int zero_point) -> Tensor"
            )
            sys.modules[__name__]._library = library
        return None


def install() -> None:
    """Add the import hook (idempotent)."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
