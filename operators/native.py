"""The lean operator's compiled CPU kernels (``lean_kernels.c``), built on first use with the C compiler.

``y = P x + S x`` in one pass over ``x`` and ``y``, and its backward (the input gradient and the weight
gradients of ``P`` and ``S``) in one pass over the output gradient and ``x``, for float32 channels-last tensors
on the CPU (see the C file for the mathematics and the layout). The library is compiled once per machine with
``cc -O3 -march=native -fopenmp`` (``$CC`` overrides the compiler) into ``$PDENET_CACHE_DIR`` (default
``~/.cache/pdenet``), named by a hash of the source, the flags and the processor, and checked against a numpy
reference on small problems before its first use. Without a compiler, or with ``PDENET_NATIVE=0``,
``available()`` is false, ``status()`` says why, and the lean operator runs on PyTorch's convolutions instead.
The kernels use the OpenMP runtime PyTorch already loaded and ``torch.get_num_threads()`` threads.
``compile_library`` and ``CompiledLibrary`` build, load and check another C file of kernels the same way; their
users take ``available()`` as the switch for all of them.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).with_name("lean_kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=gnu11", "-shared", "-fPIC")
_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
# lean_forward and lean_backward share the trailing geometry arguments
_GEOMETRY = [_I64] * 8 + [_INT, _INT]

_disabled = threading.local()


def cache_dir() -> Path:
    """Where the compiled library lives: ``$PDENET_CACHE_DIR``, else ``$XDG_CACHE_HOME/pdenet``, else
    ``~/.cache/pdenet``."""
    if os.environ.get("PDENET_CACHE_DIR"):
        return Path(os.environ["PDENET_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pdenet"


def _processor() -> str:
    """The processor model and its instruction-set flags (``-march=native`` makes the library specific to
    them)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _build(compiler: str, source_file: Path = SOURCE) -> Path:
    """Compile ``source_file`` (once per source, flags and processor) and return the library's path."""
    source = source_file.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(),
                                     platform.machine().encode(), _processor().encode()])).hexdigest()[:16]
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        directory = Path(tempfile.gettempdir()) / "pdenet"
        directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{source_file.stem}-{key}.so"
    if target.exists():
        return target
    fd, partial = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", partial, str(source_file)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(partial, target)  # atomic: a concurrent build writes the same file
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def compile_library(source_file: Path) -> tuple[ctypes.CDLL, Path]:
    """Build the C file ``source_file`` with ``FLAGS`` into ``cache_dir()`` (once per source, flags and
    processor; ``$CC`` overrides the compiler) and load it. Raises ``RuntimeError`` naming why not: disabled
    by ``PDENET_NATIVE=0``, no compiler, or the failed build."""
    if os.environ.get("PDENET_NATIVE", "1") == "0":
        raise RuntimeError("disabled by PDENET_NATIVE=0")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler found (set CC)")
    try:
        path = _build(compiler, source_file)
        return ctypes.CDLL(str(path)), path
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"build failed: {err}") from err


class CompiledLibrary:
    """The C file ``source`` of kernels, built and loaded by ``compile_library`` on its first ``get()`` (once per
    process, thread-safe). ``configure(lib)`` sets the functions' argument types and returns what the users read
    once (``constants``); ``self_check(lib)`` then compares the kernels with a reference (the first mismatch as
    text, or ``""``). ``get()`` returns the library, or ``None`` with ``status`` saying why; the first time it
    cannot be used it warns, naming the ``kernels`` and what runs ``instead``."""

    def __init__(self, source: Path, configure, self_check, kernels: str, instead: str):
        self.source, self.kernels, self.instead = source, kernels, instead
        self._configure, self._self_check = configure, self_check
        self.lib, self.constants, self.status, self._tried = None, None, "not loaded yet", False
        self._lock = threading.Lock()

    def _load(self) -> None:
        try:
            lib, path = compile_library(self.source)
        except RuntimeError as err:
            self.status = str(err)
            return
        self.constants = self._configure(lib)
        mismatch = self._self_check(lib)
        if mismatch:
            self.status = f"self-check failed: {mismatch}"
        else:
            self.lib, self.status = lib, f"compiled kernels loaded from {path}"

    def get(self):
        if not self._tried:
            with self._lock:
                if not self._tried:
                    self._load()
                    self._tried = True
                    if self.lib is None and not self.status.startswith("disabled"):
                        warnings.warn(f"pdenet: the {self.kernels} are unavailable ({self.status}); {self.instead}",
                                      RuntimeWarning, stacklevel=4)
        return self.lib


def _configure(lib) -> int:
    """Argument types of the lean kernels; returns the block width (``block_channels``)."""
    lib.lean_forward.argtypes = [_PTR] * 4 + [_INT] + [_PTR] * 3 + _GEOMETRY
    gradients = [_PTR, _PTR, _PTR, _I64, _PTR, _PTR]  # dx, dx_add, add_mask, add_pitch, gp, gs
    lib.lean_backward.argtypes = [_PTR] * 5 + [_INT] + gradients + _GEOMETRY
    lib.lean_backward_bn.argtypes = [_PTR] * 3 + [_INT] + [_PTR] * 5 + [_INT] + gradients + _GEOMETRY
    for kernel in (lib.lean_forward, lib.lean_backward, lib.lean_backward_bn, lib.lean_block_channels):
        kernel.restype = _INT
    return lib.lean_block_channels()


def _library():
    lib = LEAN_KERNELS.get()
    return None if getattr(_disabled, "on", False) else lib


def available() -> bool:
    """Whether the compiled kernels are built, loaded, self-checked and not disabled."""
    return _library() is not None


def status() -> str:
    """One line: where the kernels were loaded from, or why they are not in use."""
    _library()
    return "disabled in this thread by native.disabled()" if getattr(_disabled, "on", False) else LEAN_KERNELS.status


@contextlib.contextmanager
def disabled():
    """Within this block (this thread), ``available()`` is false: the PyTorch paths run instead (of every
    compiled kernel whose user checks ``available()``)."""
    before = getattr(_disabled, "on", False)
    _disabled.on = True
    try:
        yield
    finally:
        _disabled.on = before


def _kernels():
    """The loaded library; a clear error if it is unavailable."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the compiled lean kernels are unavailable: {status()}")
    return lib


def block_channels() -> int:
    """Channels of the kernels' narrowest register block, one vector (8 with AVX2, 16 with AVX-512); the
    full block is two vectors wide."""
    _kernels()
    return LEAN_KERNELS.constants


def supports(t: torch.Tensor, c_out: int, groups: int) -> bool:
    """Whether the kernels run for tensors like ``t`` (float32, CPU) with ``c_out`` outputs in ``groups``
    groups: ``groups == 1`` or whole register blocks per group (other group widths would run the kernels'
    scalar path, slower than oneDNN)."""
    return (t.device.type == "cpu" and t.dtype == torch.float32 and available()
            and (groups == 1 or (c_out // groups) % block_channels() == 0))


def applies(x: torch.Tensor, c_out: int, groups: int) -> bool:
    """Whether the kernels take the input ``x``: ``supports`` it and it is 4-D channels-last."""
    return (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and supports(x, c_out, groups))


def _geometry(x: torch.Tensor, c_out: int, m: int, k: int, groups: int, circular: bool) -> list:
    b, c_in, n1, n2 = x.shape
    return [b, n1, n2, c_in, c_out, m, k, groups, int(circular), torch.get_num_threads()]


def _contiguous_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a contiguous ``dtype`` tensor outside autograd: ``t`` itself where it is one (a call each way is
    a few microseconds, and a layer makes several)."""
    if t.dtype == dtype and t.is_contiguous() and not t.requires_grad:
        return t
    return t.detach().to(dtype).contiguous()


def lean_forward(x: torch.Tensor, pointwise: torch.Tensor, stencil: torch.Tensor, taps: torch.Tensor, k: int,
                 circular: bool, groups: int, moments_about: torch.Tensor | None = None):
    """``P x + S x`` for channels-last float32 ``x`` (B, c_in, n1, n2); ``pointwise`` (c_out, c_in/g, 1, 1),
    ``stencil`` (m, ntaps): the weights of the ``k x k`` stencil at the flat indices ``taps``. Returns
    (B, c_out, n1, n2) in channels-last layout; with ``moments_about`` (a shift ``k``, (c_out,) float32) also
    the output's moments about it, summed as the kernel writes the output: float64 (2, c_out) with
    ``[0, j] = Σ_n (y_j(n) − k_j)`` and ``[1, j] = Σ_n (y_j(n) − k_j)²`` over the batch and the pixels. Not
    differentiable itself (the caller's autograd Function is)."""
    c_out, m = pointwise.shape[0], stencil.shape[0]
    p, s, taps = pointwise.contiguous(), stencil.contiguous(), _contiguous_as(taps, torch.int64)
    y = torch.empty((x.shape[0], c_out, *x.shape[2:]), dtype=x.dtype, memory_format=torch.channels_last)
    shift = out = None
    if moments_about is not None:
        if moments_about.shape != (c_out,):
            raise ValueError(f"moments_about must have shape ({c_out},), got {tuple(moments_about.shape)}")
        shift = _contiguous_as(moments_about, torch.float32)
        out = torch.empty(2, c_out, dtype=torch.float64)
    ok = _kernels().lean_forward(x.data_ptr(), p.data_ptr(), s.data_ptr(), taps.data_ptr(), len(taps),
                                 y.data_ptr(), None if shift is None else shift.data_ptr(),
                                 None if out is None else out.data_ptr(), *_geometry(x, c_out, m, k, groups, circular))
    if not ok:
        raise ValueError(f"lean kernel: unsupported arguments (x {tuple(x.shape)}, pointwise "
                         f"{tuple(pointwise.shape)}, stencil {tuple(stencil.shape)}, k {k}, groups {groups})")
    return y if moments_about is None else (y, out)


def lean_backward(grad: torch.Tensor, x: torch.Tensor, pointwise: torch.Tensor, stencil: torch.Tensor,
                  taps: torch.Tensor, k: int, circular: bool, groups: int, input_grad: bool = True,
                  bn_gradient: tuple[torch.Tensor, torch.Tensor, bool | torch.Tensor] | None = None,
                  input_grad_addend: torch.Tensor | None = None, addend_mask: torch.Tensor | None = None):
    """The backward of ``y = P x + S x`` (arguments as in ``lean_forward``) for the output gradient ``grad``, in one
    pass: ``(∂x, ∂P, ∂s)`` with ``∂x = P^T g + S^T g`` (``None`` unless ``input_grad``),
    ``∂P[o, i] = Σ_n g_o(n) x_{G(o) c_in/g + i}(n)`` in the shape of ``pointwise`` and ``∂s_j[t] = Σ_n g_j(n)
    x_j(n + t)`` in the shape of ``stencil``. ``grad`` and ``x`` channels-last float32.

    With ``bn_gradient = (z, coefficients, mask)`` the output gradient is not ``grad`` itself but what batch
    norm's backward makes of it, ``g = a ⊙ gm + e ⊙ z + f`` per channel (``coefficients`` (4, c_out): ``a, b, e,
    f``; ``gm = grad`` if ``mask`` is ``True``, ``grad ⊙ [a z + b > 0]`` if ``False``, ``z`` the operator's output,
    and ``grad ⊙ mask`` for an int8 tensor of -1 or 0 like ``grad``: the forward's ReLU mask), computed tile by
    tile in the kernel instead of stored (zero boundary only).

    With ``input_grad_addend`` (B, c >= c_in, n1, n2), channels-last, its first ``c_in`` channels are added to
    ``∂x`` as the kernel stores it: ``∂x = P^T g + S^T g + addend[:, :c_in]`` (a shortcut's gradient, without a
    pass of its own), only where ``addend_mask`` (int8 of -1 or 0 like the addend) is set, unless it is ``None``."""
    c_out, m = pointwise.shape[0], stencil.shape[0]
    p, s, taps = pointwise.contiguous(), stencil.contiguous(), _contiguous_as(taps, torch.int64)
    gx = torch.empty_like(x, memory_format=torch.channels_last) if input_grad else None
    gp, gs = torch.empty(pointwise.shape, dtype=x.dtype), torch.empty(m, len(taps), dtype=x.dtype)
    addend = input_grad_addend
    if addend is not None and not (
            input_grad and addend.dim() == 4 and addend.shape[0] == x.shape[0] and addend.shape[1] >= x.shape[1]
            and addend.shape[2:] == x.shape[2:] and addend.dtype == x.dtype and addend.device == x.device
            and addend.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"lean kernel: input_grad_addend must be a channels-last {x.dtype} tensor of shape "
                         f"({x.shape[0]}, >= {x.shape[1]}, {x.shape[2]}, {x.shape[3]}) on {x.device}, with input_grad; "
                         f"got {tuple(addend.shape)} {addend.dtype} on {addend.device} (input_grad={input_grad})")
    if addend_mask is not None:
        _check_mask(addend_mask, addend, "addend_mask")
    rest = (x.data_ptr(), p.data_ptr(), s.data_ptr(), taps.data_ptr(), len(taps), gx.data_ptr() if input_grad else None,
            None if addend is None else addend.data_ptr(), None if addend_mask is None else addend_mask.data_ptr(),
            0 if addend is None else addend.shape[1],
            gp.data_ptr(), gs.data_ptr(), *_geometry(x, c_out, m, k, groups, circular))
    if bn_gradient is None:
        ok = _kernels().lean_backward(grad.data_ptr(), *rest)
    else:
        z, coefficients, mask = bn_gradient
        if circular or coefficients.shape != (4, c_out) or z.shape != grad.shape:
            raise ValueError(f"lean kernel: the batch-norm gradient needs the zero boundary, coefficients (4, {c_out}) "
                             f"and z like grad {tuple(grad.shape)}; got circular={circular}, "
                             f"{tuple(coefficients.shape)}, {tuple(z.shape)}")
        coefficients = _contiguous_as(coefficients, torch.float32)
        mask_bytes = mask if isinstance(mask, torch.Tensor) else None
        if mask_bytes is not None:
            _check_mask(mask_bytes, grad, "the batch-norm gradient's mask")
        ok = _kernels().lean_backward_bn(grad.data_ptr(), z.data_ptr(), coefficients.data_ptr(),
                                         int(mask_bytes is None and bool(mask)),
                                         None if mask_bytes is None else mask_bytes.data_ptr(), *rest)
    if not ok:
        raise ValueError(f"lean kernel: unsupported arguments (x {tuple(x.shape)}, pointwise "
                         f"{tuple(pointwise.shape)}, stencil {tuple(stencil.shape)}, k {k}, groups {groups})")
    return gx, gp, gs


def _check_mask(mask: torch.Tensor, like: torch.Tensor | None, name: str) -> None:
    """A ReLU mask for the kernels: int8 (-1 or 0), channels-last, of ``like``'s shape (``like`` not ``None``)."""
    if like is None or not (mask.dtype == torch.int8 and mask.shape == like.shape and mask.device == like.device
                            and mask.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"lean kernel: {name} must be a channels-last int8 tensor like "
                         f"{None if like is None else tuple(like.shape)}, got {mask.dtype} {tuple(mask.shape)}")


def _shifted(x: np.ndarray, dy: int, dx: int, circular: bool) -> np.ndarray:
    """``x(n + (dy, dx))`` for ``x`` of shape (B, H, W, c): periodic, or zero outside the grid."""
    if circular:
        return np.roll(x, (-dy, -dx), axis=(1, 2))
    _, h, w, _ = x.shape
    out = np.zeros_like(x)
    out[:, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
        x[:, max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]
    return out


def _self_check(lib) -> str:
    """The forward and backward kernels of ``lib`` against a numpy reference on small problems (odd sizes, channel
    mismatch, groups, both boundaries, the batch-norm output gradient in its three mask modes with a shortcut's
    masked gradient added); the first mismatch as text, or ``""``. Numpy, not torch: the check may run inside a
    user's FLOP counter or inference mode, which must not see it."""
    nr = lib.lean_block_channels()
    rng = np.random.default_rng(0)
    taps = np.array([1, 3, 4, 5, 7], dtype=np.int64)  # the 3x3 cross
    for c_in, c_out, groups, circular in [(5, 7, 1, True), (nr + 3, nr + 1, 1, False), (2 * nr, 2 * nr, 2, True),
                                          (3 * nr + 1, 3 * nr + 1, 1, False), (3, 2, 1, False)]:
        m, cig, cog = min(c_in, c_out), c_in // groups, c_out // groups
        x = rng.standard_normal((2, 5, 7, c_in), dtype=np.float32)
        d = rng.standard_normal((2, 5, 7, c_out), dtype=np.float32)
        p = rng.standard_normal((c_out, cig), dtype=np.float32)  # P and s in PyTorch's layouts
        s = rng.standard_normal((m, len(taps)), dtype=np.float32)
        shift = rng.standard_normal(c_out, dtype=np.float32)
        shifted = [_shifted(x[..., :m], t // 3 - 1, t % 3 - 1, circular) for t in taps]
        rows = [(slice(G * cig, (G + 1) * cig), slice(G * cog, (G + 1) * cog)) for G in range(groups)]

        def input_grad(dd):  # P^T dd + S^T dd
            out = np.concatenate([dd[..., o] @ p[o] for _, o in rows], -1)
            out[..., :m] += sum(w * _shifted(dd[..., :m], 1 - t // 3, 1 - t % 3, circular) for w, t in zip(s.T, taps))
            return out

        def pointwise_grad(dd):
            return np.concatenate([np.einsum("bhwj,bhwc->jc", dd[..., o], x[..., i]) for i, o in rows])

        ref = np.concatenate([x[..., i] @ p[o].T for i, o in rows], -1)
        ref[..., :m] += sum(w * sx for w, sx in zip(s.T, shifted))
        expected = {"forward": ref, "input gradient": input_grad(d), "pointwise gradient": pointwise_grad(d),
                    "stencil gradient": np.stack([np.einsum("bhwj,bhwj->j", d[..., :m], sx) for sx in shifted], 1),
                    "output moments": np.stack([(ref - shift).sum((0, 1, 2)), ((ref - shift) ** 2).sum((0, 1, 2))])}
        got = {"forward": np.empty_like(d), "input gradient": np.empty_like(x), "pointwise gradient": np.empty_like(p),
               "stencil gradient": np.empty_like(s), "output moments": np.empty((2, c_out))}
        geometry = [2, 5, 7, c_in, c_out, m, 3, groups, int(circular), 1]
        weights = (x.ctypes.data, p.ctypes.data, s.ctypes.data, taps.ctypes.data, len(taps))
        ok = lib.lean_forward(*weights, got["forward"].ctypes.data, shift.ctypes.data,
                              got["output moments"].ctypes.data, *geometry)
        grads = [got[k].ctypes.data for k in ("input gradient", "pointwise gradient", "stencil gradient")]
        ok = ok and lib.lean_backward(d.ctypes.data, *weights, grads[0], None, None, 0, *grads[1:], *geometry)
        if not circular:  # the output gradient of batch norm's backward, a gm + e z + f, from (d, z = forward)
            coef, mode, z = rng.standard_normal((4, c_out), dtype=np.float32), c_in % 3, got["forward"]
            relu_mask = np.where(rng.random(d.shape) < 0.5, -1, 0).astype(np.int8)  # mode 2: the forward's mask
            keep = [z * coef[0] + coef[1] > 0, True, relu_mask != 0][mode]  # mode 1: d masked already
            d_bn = d * keep * coef[0] + z * coef[2] + coef[3]
            addend = rng.standard_normal((2, 5, 7, c_in + 2), dtype=np.float32)  # and a shortcut's masked gradient
            addend_mask = np.where(rng.random(addend.shape) < 0.5, -1, 0).astype(np.int8)
            expected["batch-norm input gradient"] = input_grad(d_bn) + (addend * (addend_mask != 0))[..., :c_in]
            expected["batch-norm pointwise gradient"] = pointwise_grad(d_bn)
            expected["batch-norm stencil gradient"] = np.stack([np.einsum("bhwj,bhwj->j", d_bn[..., :m], sx)
                                                                for sx in shifted], 1)
            names = ("batch-norm input gradient", "batch-norm pointwise gradient", "batch-norm stencil gradient")
            got.update({name: np.empty_like(like) for name, like in zip(names, (x, p, s))})
            grads = [got[name].ctypes.data for name in names]
            ok = ok and lib.lean_backward_bn(d.ctypes.data, z.ctypes.data, coef.ctypes.data, int(mode == 1),
                                             relu_mask.ctypes.data if mode == 2 else None, *weights, grads[0],
                                             addend.ctypes.data, addend_mask.ctypes.data, c_in + 2, *grads[1:],
                                             *geometry)
        if not ok:
            return f"the kernels refused c_in={c_in}, c_out={c_out}, groups={groups}"
        for name, want in expected.items():
            if not np.allclose(got[name], want, rtol=1e-4, atol=1e-3 if name.startswith("batch-norm") else 1e-4):
                return f"{name} differs from numpy for c_in={c_in}, c_out={c_out}, groups={groups}"
    return ""


LEAN_KERNELS = CompiledLibrary(SOURCE, _configure, _self_check, "compiled lean kernels",
                               "the lean operator runs on PyTorch's convolutions")
