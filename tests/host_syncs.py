"""A test helper that finds host synchronisations on CPU: what would stall a CUDA device.

``HostSyncs`` is a ``TorchDispatchMode`` that records every operator which, on CUDA, makes the host wait for the
device: a scalar read (``_local_scalar_dense``: ``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``), an output whose
size depends on the data (``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``,
indexing by a boolean mask, ...), a comparison answered on the host (``equal``); and, by patching ``Tensor``'s
methods, every copy to the host (``tolist``, ``numpy``, ``cpu``). Each record names the Python line that asked for
it: the innermost frame outside torch's thin wrappers (``torch.nn.functional``, ``Tensor``'s methods, ...), attributed
to our code (``moe_models``) or to a library (deepspeed, transformers, or torch itself, e.g. ``torch.optim``).

On CPU nothing waits, and every tensor is a host tensor, so what is counted is what a GPU run would wait for:
- a read of a tensor that ``.cpu()`` returned (and of its views) is a host read, not counted;
- ``t.to(device)`` is not counted: on CPU ``t.to(x.device)``, a no-op on a GPU run, cannot be told from a copy to
  the host; our code copies to the host by ``.cpu()``;
- tensors a GPU run keeps on the host anyway (torch.optim's step counts, a flag made without a device) are read
  here like device tensors: such records name their line, and the caller judges them;
- some CPU kernels read values their CUDA kernels do not (``F.one_hot`` checks its input on the host on CPU only);
  they show up here too, on the safe side.
"""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operators that make the host wait for a CUDA device (their output size or value is read on the host).
SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.nonzero_static, aten.masked_select, aten._unique,
           aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.unique_dim_consecutive, aten.equal,
           aten.bincount, aten.histc, aten.nonzero_numpy, aten.argwhere}
SYNCING = {op for op in SYNCING if isinstance(op, torch._ops.OpOverloadPacket)}
HOST_COPIES = ("tolist", "numpy", "cpu")
REPO = Path(__file__).resolve().parent.parent
TORCH = Path(torch.__file__).resolve().parent
# torch's thin layers between a caller and the dispatcher: a sync inside them belongs to their caller
THIN = [Path(__file__).resolve(), *(TORCH / name for name in ("_tensor.py", "overrides.py", "functional.py",
        "nn/functional.py", "_ops.py", "utils/_python_dispatch.py", "_jit_internal.py", "_compile.py",
        "_dynamo", "utils/_contextlib.py", "autograd", "nn/modules/module.py", "_tensor_str.py"))]


@dataclass(frozen=True)
class Sync:
    op: str          # the operator or Tensor method, e.g. "_local_scalar_dense", "tolist"
    where: str       # "moe_models/moe/dispatcher.py:88" (the repository's files) or "deepspeed/...py:233"
    ours: bool       # asked for by our code (moe_models), not by a library
    label: str = ""  # what HostSyncs.label said when it happened (e.g. "step 2")


def _syncs(func, args, kwargs) -> bool:
    packet = func.overloadpacket
    if packet in SYNCING:
        return True
    if packet is aten.repeat_interleave:  # the Tensor form sizes its output from the repeats unless told
        return func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None
    if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
    return False


def _caller() -> tuple[str, bool]:
    """The innermost frame outside torch's thin layers: "path:line", and whether it is in moe_models."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if any(path == thin or path.is_relative_to(thin) for thin in THIN):
            continue
        parts = path.parts
        if "site-packages" in parts:  # an installed library, also when the venv lives in the repository (.venv)
            where = Path(*parts[len(parts) - parts[::-1].index("site-packages"):])
        elif path.is_relative_to(REPO):
            where = path.relative_to(REPO)
        elif path.is_relative_to(TORCH.parent):
            where = path.relative_to(TORCH.parent)
        else:
            where = path
        return f"{where}:{frame.lineno}", where.parts[0] == "moe_models"
    return "?", False


class HostSyncs(TorchDispatchMode):
    """``with HostSyncs() as syncs: ...`` records every host sync of the block in ``syncs.found`` (a list of Sync),
    each with the ``label`` the caller last set (to tell the phases of a block apart)."""

    def __init__(self):
        super().__init__()
        self.found: list[Sync] = []
        self.label = ""
        self._inside = 0  # > 0 inside a patched method: what it dispatches is that one copy
        self._saved = {}
        self._host: dict[int, torch.Tensor] = {}  # storage address -> a tensor .cpu() returned (kept alive)

    def _on_host(self, tensor) -> bool:
        return isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() in self._host

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._inside and _syncs(func, args, kwargs) and not self._on_host(args[0] if args else None):
            self._record(func.overloadpacket.__name__)
        return func(*args, **kwargs)

    def _record(self, op: str) -> None:
        where, ours = _caller()
        self.found.append(Sync(op, where, ours, self.label))

    def _patch(self, name: str):
        method = self._saved[name] = getattr(torch.Tensor, name)

        def patched(tensor, *args, **kwargs):
            if not self._inside and not self._on_host(tensor):
                self._record(name)
            self._inside += 1
            try:
                result = method(tensor, *args, **kwargs)
            finally:
                self._inside -= 1
            if name == "cpu":
                self._host[result.untyped_storage().data_ptr()] = result
            return result
        setattr(torch.Tensor, name, patched)

    def __enter__(self):
        for name in HOST_COPIES:
            self._patch(name)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    # -- reading the records ----------------------------------------------------------------------------------

    @property
    def ours(self) -> list[Sync]:
        return [s for s in self.found if s.ours]

    @property
    def libraries(self) -> list[Sync]:
        return [s for s in self.found if not s.ours]

    def labelled(self, label: str) -> list[Sync]:
        return [s for s in self.found if s.label == label]

    def counts(self, ours: bool | None = None, label: str | None = None) -> Counter:
        """(op, where) -> how many times; ``ours`` True / False: only ours / only the libraries'; ``label``: only
        those recorded under it."""
        return Counter((s.op, s.where) for s in self.found
                       if (ours is None or s.ours == ours) and (label is None or s.label == label))

    def report(self, label: str | None = None) -> str:
        return "\n".join(f"{n} x {op} at {where}"
                         for (op, where), n in self.counts(label=label).most_common()) or "none"
