"""How much work one training step launches, counted on the CPU with ``torch.profiler``, and how
many times an epoch waits on the device (host syncs).

An *operator* is one ATen call made by the step's Python code or by autograd's backward (a
``conv2d`` counts once, whatever it calls inside); calls that only make views or read metadata
(``view``, ``t``, ``expand``, ``detach``, ...) launch no kernel on a GPU and are left out. On a
GPU each operator is roughly one kernel launch (a ``torch._foreach_*`` call one multi-tensor
kernel), which is what a CUDA graph replays, so the count tracks the step's fixed cost per batch.
As a cross-check, *kernels* counts the innermost ATen calls that do work (a ``_foreach_*`` call
once): closer to what runs, but it sees the CPU's own implementations (a convolution there is
unfold plus matrix products), which a GPU does not share.

Compared: ``hpo.training.stacked_step.StackedStep`` (10 of hpo's LeNet-5, batch 64 each) and the reference
step of ``../shared/anchors/gpu_limit.py`` (``graphed_vmap``: 10 LeNet-5 vmapped with
``torch.func.vmap(grad(...))`` and ``torch.optim.Adam`` over the stacked tensors). On the CPU the
reference's Adam runs ``foreach=True`` without ``capturable`` (capturable needs CUDA): its
capturable form on a GPU adds nine ``_foreach_*`` operators that compute the bias corrections on
the device.
"""

from __future__ import annotations

import collections
import contextlib
import sys
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

# Calls that make views, read metadata or allocate without writing: no kernel on a GPU.
VIEW_OPS = frozenset("""
    alias as_strided chunk contiguous detach detach_ empty empty_like empty_strided expand expand_as
    flatten is_nonzero item _local_scalar_dense lift_fresh narrow permute reshape _reshape_alias
    resolve_conj resolve_neg result_type select size slice split split_with_sizes squeeze stride t to transpose
    unbind unflatten unsqueeze _unsafe_view view view_as
""".split())

# Innermost calls that restride or allocate without writing.
NO_KERNEL_OPS = VIEW_OPS | {"movedim", "as_strided_", "resize_", "new_empty"}

# The anchors' LeNet-5 and its settings (../shared/anchors/gpu_anchor.py), so the numbers compare:
# dropout after the conv stack and after fc 120 only, as in the seed.
LENET5 = {"n_conv": 2, "filters": [6, 16], "kernel_size": 5, "padding": 2, "pooling": "max", "n_dense": 2,
          "dense_width": [120, 84], "conv_dropout": 0.41, "dropout": [0.24, 0.0], "optimizer": "Adam", "lr": 2.14e-3,
          "weight_decay": 5.5e-5}


def _launches_work(event) -> bool:
    if event.name.startswith("aten::") and event.name[6:] not in VIEW_OPS:
        return True
    return any(_launches_work(child) for child in event.cpu_children)


def _top_level(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return event.name.startswith("aten::")


def _kernels(event, out: list[str]) -> bool:
    """Append the innermost working calls under ``event``; whether there was any."""
    if event.name.startswith("aten::_foreach_"):
        out.append(event.name)
        return True
    found = False
    for child in event.cpu_children:
        found |= _kernels(child, out)
    if not found and event.name.startswith("aten::") and event.name[6:] not in NO_KERNEL_OPS:
        out.append(event.name)
        return True
    return found


def count_operators(fn: Callable[[], object], *, warmup: int = 2) -> collections.Counter:
    """The operators one call of ``fn`` runs (see the module docstring), by name.

    ``fn`` is called ``warmup`` times first so that lazily created state (optimizer moments) is
    not counted.
    """
    return count_work(fn, warmup=warmup)[0]


def count_work(fn: Callable[[], object], *, warmup: int = 2) -> tuple[collections.Counter, collections.Counter]:
    """The operators and the kernels (see the module docstring) of one call of ``fn``, by name."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.events()
    kernels: list[str] = []
    for e in events:
        if e.cpu_parent is None:
            _kernels(e, kernels)
    return (collections.Counter(e.name for e in events if _top_level(e) and _launches_work(e)),
            collections.Counter(kernels))


def _lenet5_models(k: int) -> list[nn.Module]:
    from hpo.nn.models import build_model
    from hpo.spec.hyperparams import resolve

    hp = resolve(LENET5)
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(build_model("cnn", hp, in_shape=(1, 28, 28), out_features=10))
    return models


def stacked_step_work(*, k: int = 10, batch: int = 64) -> tuple[collections.Counter, collections.Counter]:
    """Operators of one step of ``hpo.training.stacked_step.StackedStep``: K LeNet-5 (hpo's, with the
    anchors' layers, dropout and Adam settings), each on its own batch, on the CPU. A step on a batch
    without padding, as every batch of an epoch but the last is. On a GPU the captured graph is
    fed by one more operator per step (the copy of the batch indices into its input buffer)."""
    from hpo.data.dataset import Dataset
    from hpo.spec.hyperparams import resolve
    from hpo.training.stacked_step import StackedStep

    g = torch.Generator().manual_seed(0)
    n = 4 * batch
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    idx = torch.arange(n)
    data = Dataset(task="classification", x=x, y=y, train_idx=idx, val_idx=idx, x_test=x, y_test=y,
                   in_shape=(1, 28, 28), out_features=10)
    step = StackedStep(_lenet5_models(k), data, resolve(LENET5))
    batch_idx = torch.randint(0, n, (k, batch), generator=g)
    return count_work(lambda: step(batch_idx))


def stacked_step_operators(*, k: int = 10, batch: int = 64) -> collections.Counter:
    """The operators of ``stacked_step_work``."""
    return stacked_step_work(k=k, batch=batch)[0]


def reference_step_work(*, k: int = 10, batch: int = 64) -> tuple[collections.Counter, collections.Counter]:
    """Operators of the anchors' ``graphed_vmap`` step (gpu_limit.py) on the CPU, with the
    anchors' own LeNet-5, plus the two copies that feed its graph."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    class LeNet5(nn.Module):  # ../shared/anchors/gpu_anchor.py
        def __init__(self, p1=0.41, p2=0.24):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
            self.f1, self.f2, self.f3 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84), nn.Linear(84, 10)
            self.d1, self.d2 = nn.Dropout(p1), nn.Dropout(p2)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.c1(x)), 2)
            x = F.max_pool2d(F.relu(self.c2(x)), 2)
            x = self.d1(torch.flatten(x, 1))
            x = self.d2(F.relu(self.f1(x)))
            return self.f3(F.relu(self.f2(x)))

    torch.manual_seed(0)
    params, buffers = stack_module_state([LeNet5() for _ in range(k)])
    base = LeNet5().to("meta")

    def loss_fn(p, b, xb, yb):
        return F.cross_entropy(functional_call(base, (p, b), (xb,)), yb)

    gfn = vmap(grad(loss_fn), in_dims=(0, 0, 0, 0), randomness="different")
    opt = torch.optim.Adam(list(params.values()), lr=2.14e-3, foreach=True)
    x_epoch, y_epoch = torch.randn(k, 4 * batch, 1, 28, 28), torch.randint(0, 10, (k, 4 * batch))
    sx, sy = torch.empty(k, batch, 1, 28, 28), torch.empty(k, batch, dtype=torch.long)

    def step():
        sx.copy_(x_epoch[:, :batch])
        sy.copy_(y_epoch[:, :batch])
        grads = gfn(params, buffers, sx, sy)
        for name, p in params.items():
            p.grad = grads[name]
        opt.step()

    return count_work(step)


def reference_step_operators(*, k: int = 10, batch: int = 64) -> collections.Counter:
    """The operators of ``reference_step_work``."""
    return reference_step_work(k=k, batch=batch)[0]


_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def counting_host_reads() -> Iterator[list[str]]:
    """Count reads of tensor values on the host (``item``, ``tolist``, ``cpu``, ``numpy``,
    ``bool()``/``int()``/``float()``): each is a host sync when the tensor lives on a GPU.
    Reads made by torch.optim itself are left out (see below). Yields the list the reads' names
    are appended to."""
    calls: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in _READS}

    def wrap(name, method):
        def counted(self, *args, **kwargs):
            # torch.optim reads its step counters on the host: CPU tensors even when the model is
            # on a GPU (or, capturable, not read at all), so no device sync.
            if not sys._getframe(1).f_globals.get("__name__", "").startswith("torch.optim"):
                calls.append(name)
            return method(self, *args, **kwargs)
        return counted

    for name, method in saved.items():
        setattr(torch.Tensor, name, wrap(name, method))
    try:
        yield calls
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def host_syncs_per_epoch(*, k: int = 10) -> dict[str, int]:
    """Host reads per epoch of K folds: the stacked path (``train_stacked``) and the sequential one
    (``train`` per fold), counted on the CPU as the difference between a 3- and a 2-epoch run (so
    one-off reads at the start and end drop out)."""
    from hpo.data.dataset import Dataset
    from hpo.spec.hyperparams import resolve
    from hpo.training.stacked import Fold, train_stacked
    from hpo.training.trainer import train

    g = torch.Generator().manual_seed(0)
    n = 8 * k
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    idx = torch.arange(n)
    data = Dataset(task="classification", x=x, y=y, train_idx=idx, val_idx=idx, x_test=x, y_test=y,
                   in_shape=(4,), out_features=3)
    chunks = torch.tensor_split(idx, k)
    folds = [Fold(train_idx=torch.cat([c for j, c in enumerate(chunks) if j != i]), val_idx=chunks[i], seed=i)
             for i in range(k)]

    def reads(epochs: int, stacked: bool) -> int:
        from hpo.nn.models import build_model

        hp = resolve({"n_layers": 1, "width": 8, "batch_size": 16, "epochs": epochs})
        models = [build_model("mlp", hp, in_shape=(4,), out_features=3) for _ in range(k)]
        with counting_host_reads() as calls:
            if stacked:
                train_stacked(models, data, hp, folds=folds)
            else:
                for m, f in zip(models, folds):
                    train(m, data, hp, seed=f.seed, train_idx=f.train_idx, val_idx=f.val_idx)
        return len(calls)

    return {"stacked": reads(3, True) - reads(2, True), "sequential": reads(3, False) - reads(2, False)}


def step_report(*, k: int = 10, batch: int = 64) -> dict:
    """Both operator counts and the host syncs per epoch, as ``hpo bench`` and the README give them."""
    stacked, stacked_k = stacked_step_work(k=k, batch=batch)
    reference, reference_k = reference_step_work(k=k, batch=batch)
    return {"models": k, "batch": batch, "stacked_step_operators": sum(stacked.values()),
            "reference_step_operators": sum(reference.values()),
            "stacked_step_kernels": sum(stacked_k.values()), "reference_step_kernels": sum(reference_k.values()),
            "stacked_by_name": dict(stacked.most_common()), "reference_by_name": dict(reference.most_common()),
            "host_syncs_per_epoch": host_syncs_per_epoch(k=k)}
