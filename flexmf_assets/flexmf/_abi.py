"""The Python side of ``_kernels.h``: each kernel's argument struct as a ``ctypes.Structure``, the enums,
the scratch a table needs, and :func:`call`, which runs a kernel and turns a bad status into an error.

Every struct names its C typedef in ``C_NAME``; tests/test_native.py compiles a program against the
header and checks every size, offset and value here against it. A struct field holding a tensor takes
:func:`ptr` of it (the tensor must stay referenced until the call returns).
"""

from __future__ import annotations

import ctypes

import torch

_P, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double

#: enum flexmf_status
OK, UNKNOWN_LOSS, UNKNOWN_OPTIMIZER, BAD_NEGATIVES, BAD_SIZE = 0, 1, 2, 3, 4
STATUS = {
    BAD_SIZE: "k or width below 1, n_items outside 1..2^32-1, or unknown_row outside the user table",
    UNKNOWN_LOSS: "unknown loss kind",
    UNKNOWN_OPTIMIZER: "unknown optimizer",
    BAD_NEGATIVES: "negatives per positive outside 1..MAX_NEGATIVES (WARP: not 1)",
}
#: enum flexmf_optimizer
SGD, ADAM = 0, 1
#: FLEXMF_MAX_NEGATIVES
MAX_NEGATIVES = 64
#: most threads the kernels use (bounds the scratch's per-thread padding)
MAX_THREADS = 64
#: FLEXMF_TOPN_PANEL, FLEXMF_TOPN_USERS: the top-N kernel's item panel and user block
TOPN_PANEL, TOPN_USERS = 16, 192
#: FLEXMF_ALS_LANES: implicit ALS rows solved together
ALS_LANES = 4


def als_work(k: int, max_count: int) -> int:
    """FLEXMF_ALS_WORK: the ALS kernels' scratch doubles per thread."""
    return (k + 1) * (k + 4) + 3 * ALS_LANES * k + ALS_LANES * max_count


class Table(ctypes.Structure):
    C_NAME = "flexmf_table"
    _fields_ = [("rows", _P), ("last", _P), ("n_rows", _I), ("const_col", _I),
                ("grad", _P), ("count", _P), ("touched", _P), ("slot", _P)]


class Train(ctypes.Structure):
    C_NAME = "flexmf_train"
    _fields_ = [("user", Table), ("item", Table), ("width", _I), ("optimizer", _I), ("lr", _D), ("l2", _D),
                ("decay", _D), ("step", _I), ("threads", _I), ("loss", _D)]


class ExplicitArgs(ctypes.Structure):
    C_NAME = "flexmf_explicit_args"
    _fields_ = [("train", Train), ("users", _P), ("items", _P), ("resid", _P), ("n", _I), ("batch", _I),
                ("err", _P)]


class ImplicitArgs(ctypes.Structure):
    C_NAME = "flexmf_implicit_args"
    _fields_ = [("train", Train), ("loss_kind", _I), ("k", _I), ("negatives", _I), ("users", _P), ("pos", _P),
                ("neg", _P), ("valid", _P), ("weight", _P), ("n", _I), ("batch", _I), ("positive_weight", _D),
                ("ds", _P)]


class ContainsArgs(ctypes.Structure):
    C_NAME = "flexmf_contains_args"
    _fields_ = [("bits", _P), ("cells", _I), ("keys", _P), ("n_keys", _I), ("n_items", _I), ("users", _P),
                ("items", _P), ("n", _I), ("c", _I), ("out", _P)]


class TopNArgs(ctypes.Structure):
    C_NAME = "flexmf_topn_args"
    _fields_ = [("users", _P), ("n_user_rows", _I), ("unknown_row", _I), ("items", _P), ("n_items", _I),
                ("width", _I), ("rows", _P), ("m", _I), ("seen_indptr", _P), ("seen_indices", _P),
                ("n_seen_users", _I), ("offset", _D), ("k", _I), ("threads", _I), ("packed", _P), ("upack", _P),
                ("out_scores", _P), ("out_items", _P), ("out_count", _P)]


class ALSLoss(ctypes.Structure):
    C_NAME = "flexmf_als_loss"
    _fields_ = [("row_loss", _P), ("data", _D), ("penalty", _D), ("failed", _I)]


class ALSExplicitArgs(ctypes.Structure):
    C_NAME = "flexmf_als_explicit_args"
    _fields_ = [("X", _P), ("ldx", _I), ("xb", _P), ("sxb", _I), ("Y", _P), ("ldy", _I), ("yb", _P), ("syb", _I),
                ("indptr", _P), ("indices", _P), ("values", _P), ("n_rows", _I), ("k", _I), ("learn_bias", _I),
                ("nthreads", _I), ("reg", _D), ("reg_exponent", _D), ("bias_reg", _D), ("work", _P),
                ("loss", ALSLoss)]


class ALSImplicitArgs(ctypes.Structure):
    C_NAME = "flexmf_als_implicit_args"
    _fields_ = [("X", _P), ("ldx", _I), ("Y", _P), ("ldy", _I), ("indptr", _P), ("indices", _P), ("conf", _P),
                ("gram", _P), ("n_rows", _I), ("k", _I), ("cg_steps", _I), ("nthreads", _I), ("max_count", _I),
                ("reg", _D), ("work", _P), ("loss", ALSLoss)]


STRUCTS = (Table, Train, ExplicitArgs, ImplicitArgs, ContainsArgs, TopNArgs, ALSLoss, ALSExplicitArgs,
           ALSImplicitArgs)
#: every entry point: name -> its argument struct (each kernel returns an enum flexmf_status)
KERNELS: dict[str, type[ctypes.Structure]] = {
    "flexmf_explicit_epoch": ExplicitArgs,
    "flexmf_implicit_batches": ImplicitArgs,
    "flexmf_contains": ContainsArgs,
    "flexmf_adam_flush": Train,
    "flexmf_topn": TopNArgs,
    "flexmf_als_explicit_half": ALSExplicitArgs,
    "flexmf_als_implicit_half": ALSImplicitArgs,
}


def declare(lib: ctypes.CDLL) -> None:
    """Set every entry point's signature (AttributeError naming the first one missing)."""
    for name, struct in KERNELS.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int64, [ctypes.POINTER(struct)]


def call(lib: ctypes.CDLL, name: str, args: ctypes.Structure) -> None:
    """Run kernel ``name`` on ``args``; a status other than OK is a RuntimeError naming it."""
    status = getattr(lib, name)(ctypes.byref(args))
    if status != OK:
        raise RuntimeError(f"{name}: {STATUS.get(status, f'status {status}')}")


def ptr(t: torch.Tensor | None, *, strided: bool = False) -> int | None:
    """Address of a contiguous CPU tensor's first element (None passes NULL); ``strided``: the rows of a
    table (or the values of a vector) may be apart, the kernel taking the stride (the ALS kernels)."""
    if t is None:
        return None
    dense = (t.ndim < 2 or t.stride(-1) == 1) if strided else t.is_contiguous()
    if t.device.type != "cpu" or not dense:
        raise ValueError("native kernels need contiguous CPU tensors" + (" (rows may be strided)" if strided else ""))
    return t.data_ptr()


class Scratch:
    """Per-table scratch of the kernels: gradient slots, their counts and rows, and the row -> slot map
    (all -1 between calls)."""

    def __init__(self, rows: int, width: int):
        slots = rows + 16 * (MAX_THREADS + 2)  # per-thread stretches are rounded up to 16 rows
        self.grad = torch.empty(slots, width)
        self.count = torch.empty(slots)
        self.touched = torch.empty(slots, dtype=torch.int64)
        self.slot = torch.full((rows,), -1, dtype=torch.int32)


def table(rows: torch.Tensor, scratch: Scratch, const_col: int | None, last: torch.Tensor | None = None) -> Table:
    """The :class:`Table` of parameter rows ``rows`` (``[n, w]`` or Adam's ``[n, 3, w]``)."""
    return Table(rows=ptr(rows), last=ptr(last), n_rows=rows.shape[0], const_col=-1 if const_col is None else const_col,
                 grad=ptr(scratch.grad), count=ptr(scratch.count), touched=ptr(scratch.touched),
                 slot=ptr(scratch.slot))


__all__ = ["ALSExplicitArgs", "ALSImplicitArgs", "ALSLoss", "ContainsArgs", "ExplicitArgs", "ImplicitArgs", "KERNELS",
           "Scratch", "Table", "TopNArgs", "Train", "als_work", "call", "declare", "ptr", "table"]
