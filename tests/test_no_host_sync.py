"""The CUDA route of every op never synchronises with the host (CUDA-graph capturable), proven on the CPU.

Each op runs end to end through the Python code it runs for CUDA tensors (validation, dispatch, the Triton launchers'
host code with their GPU tile and launch choices, the canonical conversion for the CUDA C++ kernels, the batched
``"torch"`` backend) on *fake* CUDA tensors (``FakeTensorMode``: shapes and devices, no data). Reading a value on the
host (``.item()``, ``.tolist()``, ``int(t)``, ``bool(t)``, ``nonzero``) or copying between host and device raises
there. Kernel launches are recorded instead of run: every tensor a kernel receives must be a fake CUDA tensor (no table
built on the host), every scalar a Python number.
"""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import mrprune
from mrprune import _library, backends

aten = torch.ops.aten


class HostSync(AssertionError):
    pass


class NoHostSync(TorchDispatchMode):
    """Fails on every aten op that makes the host wait for the device or moves data between them."""

    SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.item.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SYNCING:
            raise HostSync(f"{func} reads a device value on the host")
        devices = {a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
        target = kwargs.get("device")
        if func in (aten._to_copy.default, aten.copy_.default) and (
            len(devices) > 1 or (target is not None and torch.device(target).type not in devices)
        ):
            raise HostSync(f"{func} copies between {devices} and {target}")
        return func(*args, **kwargs)


class Launches:
    """Records Triton kernel launches (the fake tensors cannot run) and checks their arguments."""

    def __init__(self):
        self.kernels: list[str] = []
        self.persistent: list[bool] = []  # each launch's PERSISTENT constexpr (False where the kernel has none)

    def run(self, kernel, *args, grid, warmup=False, **kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                assert isinstance(value, FakeTensor) and value.device.type == "cuda", (kernel, value)
        for dim in grid if isinstance(grid, tuple) else ():
            assert isinstance(dim, int), (kernel, grid)
        self.kernels.append(getattr(kernel, "__name__", str(kernel)))
        self.persistent.append(bool(kwargs.get("PERSISTENT", False)))


def _basic_index(t: torch.Tensor, index) -> torch.Tensor:
    """``t[index]`` for slices, ints, ``None`` and ``...`` through tensor methods."""
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        fill = t.dim() - sum(i is not None for i in index if i is not Ellipsis)
        index = index[:at] + (slice(None),) * fill + index[at + 1 :]
    dim = 0
    for i in index:
        if i is None:
            t = t.unsqueeze(dim)
            dim += 1
        elif isinstance(i, int):
            t = t.select(dim, i)
        else:
            t = torch.ops.aten.slice.Tensor(t, dim, i.start, i.stop, 1 if i.step is None else i.step)
            dim += 1
    return t


def _fake_cuda_python_ops(monkeypatch):
    """CPU-only torch cannot run some Python bindings on fake CUDA tensors (indexing, ``~``, ``copy_``, ``torch.where``
    with Python scalars: they open a CUDA device guard): route them through aten ops, which fake mode handles (tensor
    indices still fail); and make every host read of a fake CUDA tensor raise :class:`HostSync`."""
    getitem = FakeTensor.__getitem__

    def basic(i) -> bool:
        return i is None or i is Ellipsis or isinstance(i, slice) or (isinstance(i, int) and not isinstance(i, bool))

    def patched(self, index):
        if isinstance(self, FakeTensor) and all(basic(i) for i in (index if isinstance(index, tuple) else (index,))):
            return _basic_index(self, index)
        return getitem(self, index)

    # on FakeTensor, never on torch.Tensor: defining __getitem__ on torch.Tensor gives it a sequence slot that
    # survives the undo, after which torch.tensor([0-d tensors]) calls len() on them and fails in later tests
    monkeypatch.setattr(FakeTensor, "__getitem__", patched)
    monkeypatch.setattr(torch.Tensor, "__invert__", lambda self: torch.bitwise_not(self))
    where = torch.where

    def where_with_scalars(cond, *values, **kwargs):  # Python scalars: made 0-d tensors on the condition's device
        if values and isinstance(cond, FakeTensor) and cond.device.type == "cuda":
            like = next((v for v in values if isinstance(v, torch.Tensor)), None)
            dtype = like.dtype if like is not None else torch.get_default_dtype()
            values = [
                v if isinstance(v, torch.Tensor) else torch.full((), v, dtype=dtype, device=cond.device) for v in values
            ]
        return where(cond, *values, **kwargs)

    monkeypatch.setattr(torch, "where", where_with_scalars)
    copy = torch.Tensor.copy_

    def copy_(self, src, non_blocking=False):
        if isinstance(self, FakeTensor) and self.device.type == "cuda":
            return torch.ops.aten.copy_.default(self, src, non_blocking)  # still seen by NoHostSync
        return copy(self, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    for name in ("__int__", "__index__", "__bool__", "__float__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def read(self, *args, _name=name, _original=original):
            if isinstance(self, FakeTensor) and self.device.type == "cuda":
                raise HostSync(f"Tensor.{_name} reads a device value on the host")
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, read)


def _cuda_route(monkeypatch):
    """The CUDA code paths on this CPU-only machine: Triton's GPU branches (not the interpreter's), no device
    queries, and the CUDA C++ backends stood in by their canonical conversion plus a fake of the private op."""
    launches = Launches()
    _fake_cuda_python_ops(monkeypatch)
    if mrprune.HAS_TRITON:
        import triton

        from mrprune import triton_kernels

        modules = [
            getattr(triton_kernels, n) for n in dir(triton_kernels) if inspect.ismodule(getattr(triton_kernels, n))
        ]
        for module in modules:
            for name, value in vars(module).items():
                if name == "interpreting":
                    monkeypatch.setattr(module, name, lambda: False)
                if name == "device_guard":
                    monkeypatch.setattr(module, name, lambda t: contextlib.nullcontext())
                if isinstance(value, torch._library.custom_ops.CustomOpDef):
                    # the custom op's body, not its fake (fake mode would dispatch a custom op to its fake)
                    monkeypatch.setattr(torch.ops.mrprune, value._name, value._init_fn)
        monkeypatch.setattr(triton_kernels._common, "_sm_count", lambda index: 132)
        kinds = {
            type(v) for m in modules for v in vars(m).values() if isinstance(v, triton.runtime.jit.KernelInterface)
        }
        for kind in kinds:

            def run(self, *args, grid, warmup=False, **kwargs):
                return launches.run(self.fn if hasattr(self, "fn") else self, *args, grid=grid, **kwargs)

            monkeypatch.setattr(kind, "run", run)
    lib = torch.library.Library("mrprune", "FRAGMENT")
    for name in _library.CUDA_OPS:
        fake = torch._library.simple_registry.singleton.find(f"mrprune::{name}").fake_impl.kernel
        torch.library.register_fake(f"mrprune::_{name}_cuda", fake.func if hasattr(fake, "func") else fake, lib=lib)
        monkeypatch.setitem(
            backends._registry, name, {**backends._registry[name], "cuda": _library._private_op(name, "cuda")}
        )
    return launches, lib


def _inputs(name: str, dtype: torch.dtype):
    b, n, m, d, k = 2, 300, 130, 64, 20
    x = torch.randn(b, n, d, dtype=dtype, device="cuda")
    lens = torch.tensor([n, 211], device="cuda")
    if name in ("cosine_graph", "graph_scores"):
        return (x, lens)
    if name == "graph_propagate":
        g = torch.rand(b, n, n, device="cuda")
        return (g, torch.ones(b, n, device="cuda"), torch.rand(b, n, device="cuda"), lens, 5)
    if name == "transfer_scores":
        q = torch.randn(b, m, d, dtype=dtype, device="cuda")
        return (q, torch.tensor([m, 77], device="cuda"), x, torch.rand(b, n, device="cuda") > 0.3)
    if name == "greedy_residual_select":
        return (x, lens, k, torch.rand(b, n, device="cuda"), torch.tensor([3, -1], device="cuda"))
    if name in ("diversity_select", "coverage_select", "bipartite_dedup"):
        return (x, lens, k)
    if name == "max_cosine":
        keys = torch.randn(b, 40, d, dtype=dtype, device="cuda")
        return (x, lens, keys, torch.tensor([40, 0], device="cuda"))
    if name == "topk_indices":
        return (torch.randn(b, n, device="cuda"), lens, k)
    if name == "received_attention":
        q = torch.randn(b, 4, n, 32, dtype=dtype, device="cuda")
        return (q, torch.randn_like(q), lens)
    raise AssertionError(name)


#: The ops _inputs knows (the others are marked xfail until their inputs are added).
INPUTS = (
    "cosine_graph",
    "graph_scores",
    "graph_propagate",
    "transfer_scores",
    "greedy_residual_select",
    "diversity_select",
    "coverage_select",
    "bipartite_dedup",
    "max_cosine",
    "topk_indices",
    "received_attention",
)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("name", sorted(_library.SCHEMAS))
def test_cuda_route_never_syncs(name, dtype, monkeypatch):
    if name not in INPUTS:
        pytest.xfail(f"{name}: no fake inputs for this op yet (add them to _inputs)")
    _route_without_sync(name, dtype, monkeypatch)


@pytest.mark.skipif(not mrprune.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("name", ["cosine_graph", "graph_scores"])
def test_persistent_launches_never_sync(name, monkeypatch):
    """The symmetric tile kernels' persistent launch shape (auto takes it at video sizes, far beyond these fakes; forced
    here) reads nothing on the host either."""
    monkeypatch.setenv("MRPRUNE_TRITON_PERSISTENT", "1")
    launches = _route_without_sync(name, torch.float16, monkeypatch)
    assert any(launches.persistent), launches.kernels


def _route_without_sync(name: str, dtype: torch.dtype, monkeypatch) -> Launches:
    """Runs op ``name`` on fake CUDA inputs through its router under :class:`NoHostSync`; returns its launches."""
    monkeypatch.setenv("MRPRUNE_TRITON_AUTOTUNE", "0")  # the capturable launch path (tuning benchmarks sync)
    launches, lib = _cuda_route(monkeypatch)
    try:
        with FakeTensorMode():
            args = _inputs(name, dtype)  # (making them copies host data to the device: not part of the op)
            backend = backends.available(name, "cuda")[0]
            with NoHostSync():
                out = _library._make_router(name)(*args)
        outs = out if isinstance(out, tuple) else (out,)
        assert all(isinstance(o, FakeTensor) and o.device.type == "cuda" for o in outs)
        if backend == "triton":
            assert launches.kernels, "the Triton route launched nothing"
    finally:
        lib._destroy()
    return launches


def test_the_guard_catches_host_reads():
    """The harness itself: each kind of host synchronisation raises under it."""
    with FakeTensorMode():
        lens = torch.tensor([3, 4], device="cuda")
        for sync in (
            lambda: int(lens.max()),
            lambda: lens.tolist(),
            lambda: bool((lens > 0).all()),
            lambda: lens.cpu(),
            lambda: lens.nonzero(),
            lambda: torch.zeros(2).to("cuda"),
        ):
            with NoHostSync(), pytest.raises(Exception):  # noqa: B017,PT011  (HostSync or fake mode's error)
                sync()


def test_autotune_is_not_started_under_capture(monkeypatch):
    """While a CUDA graph is being captured, an untuned launch takes the fixed config (the autotuner benchmarks with
    synchronisations); outside capture the tuned launcher runs."""
    pytest.importorskip("triton")
    from mrprune.triton_kernels import _common, graph_scores

    launcher = graph_scores._stream_stats
    calls = []
    monkeypatch.setattr(_common, "autotune_enabled", lambda t: True)
    monkeypatch.setattr(
        launcher, "_tuned", type("T", (), {"__getitem__": lambda s, g: lambda *a, **k: calls.append("tuned")})()
    )
    monkeypatch.setattr(
        launcher,
        "kernel",
        type(
            "K",
            (),
            {
                "__getitem__": lambda s, g: lambda *a, **k: calls.append(("fixed", k["BLOCK_D"])),
                "arg_names": launcher.kernel.arg_names,
            },
        )(),
    )
    args = [0] * (len(launcher.kernel.arg_names) - 3)
    like = torch.empty(1)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    launcher((1,), *args, like=like, block_d=None, BLOCK=128, UPCAST=True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    launcher((1,), *args, like=like, block_d=None, BLOCK=128, UPCAST=True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    launcher((1,), *args, like=like, block_d=None, BLOCK=128, UPCAST=True)  # tuned now: capturable
    assert calls == [("fixed", launcher.fixed({"BLOCK": 128, "UPCAST": True})[0]), "tuned", "tuned"]
