"""torch.library registration of the fused PEG: fake kernels, autograd, and backend choice.

The ops ``torch.ops.cpvt.peg_forward`` / ``peg_backward`` are declared in C++ (csrc/peg.cpp)
and implemented there for CPU and CUDA tensors; the Triton backend registers its own ops in
``cpvt_kernels.triton_peg``. ``fused_peg`` checks its inputs once (``_checks``), picks a backend
and calls it.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings

import torch

from . import _autograd, _checks, _cpuinfo
from .reference import peg_unchecked

BACKENDS = ("cuda", "triton", "cpu", "reference")
# Preference order of backend="auto" per device type.
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
# Environment override of backend="auto", read once at import.
# "auto" (or unset) leaves backend="auto" to choose.
ENV_BACKEND = os.environ.get("CPVT_PEG_BACKEND", "").strip().lower() or None
if ENV_BACKEND == "auto":
    ENV_BACKEND = None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _build_record(key: str):
    """What setup.py recorded about the build (``_build_info.<key>``), or None: no record (a
    build from before it, or a copy without it) or no such entry."""
    try:
        from . import _build_info
    except ImportError:
        return None
    return getattr(_build_info, key, None)


def _built_for_other_torch() -> str | None:
    """Why the compiled _C must not be loaded into this process: it was built against another
    torch (setup.py records the version in ``_build_info``), or None. An extension is tied to
    the torch it was compiled against: with another one it fails to load on an undefined symbol,
    or loads and misbehaves. This happens when an install step replaces torch after the build
    (pip resolving an extra's pins, such as timm's torchvision, after building the package)."""
    built = _build_record("TORCH_VERSION")
    if built is None or built == str(torch.__version__):
        return None
    return (f"it was built against torch {built}, and this process has torch "
            f"{torch.__version__}; rebuild it against this torch: "
            f"`pip install --no-build-isolation --no-deps -e .` in the source tree")


_cpu_flags = _cpuinfo.cpu_flags


def _built_for_other_cpu() -> str | None:
    """Why the compiled _C must not be loaded on this CPU, or None: its CPU kernels were
    compiled for instruction sets this CPU lacks (setup.py records them, ``CPU_FEATURES``). A
    build for the machine it was made on (CPVT_CPU_ARCH=native, the default) copied to an older
    or another vendor's CPU, with a shared environment or an image, would otherwise kill the
    process with an illegal instruction at its first call, or at import."""
    wanted = _build_record("CPU_FEATURES")
    have = _cpu_flags() if wanted else None
    missing = [f for f in wanted if f not in have] if have is not None else []
    if not missing:
        return None
    arch = _build_record("CPU_ARCH") or "native"
    return (f"its CPU kernels were compiled (CPVT_CPU_ARCH={arch}) for instructions this CPU "
            f"lacks ({', '.join(missing)}); rebuild it on this machine (`pip install "
            f"--no-build-isolation --no-deps -e .` in the source tree), or build one for many "
            f"CPUs with CPVT_CPU_ARCH=x86-64-v3 (any with AVX2) or generic (any)")


_EXT_ERROR: str | None = None
# _C was left unloaded on purpose: built against another torch, or for another CPU
# (_EXT_ERROR says which).
_EXT_STALE = False
if importlib.util.find_spec(f"{__package__}._C") is None:
    _EXT_ERROR = "no compiled cpvt_kernels._C next to the package"
elif (_mismatch := _built_for_other_torch() or _built_for_other_cpu()) is not None:
    _EXT_ERROR, _EXT_STALE = _mismatch, True
else:
    try:
        from . import _C  # loading the library registers torch.ops.cpvt
    except ImportError as e:  # importing the package never fails because a part is missing
        _EXT_ERROR = f"{type(e).__name__}: {e}"


def _has_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
    except RuntimeError:
        return False


HAS_CPU_KERNELS = _EXT_ERROR is None and _has_kernel("cpvt::peg_forward", "CPU")
# The forward op's overload, looked up once: fused_peg calls it directly, or, where no
# __torch_function__ handling is due and nothing traces the call, through _C.peg_forward (the
# same op through the dispatcher without torch.ops' generic binding; csrc/module.cpp).
_PEG_FORWARD = torch.ops.cpvt.peg_forward.default if _EXT_ERROR is None else None
_PEG_FORWARD_EAGER = getattr(_C, "peg_forward", None) if _EXT_ERROR is None else None
_has_torch_function = torch._C._has_torch_function
HAS_CUDA_KERNELS = _EXT_ERROR is None and _has_kernel("cpvt::peg_forward", "CUDA")

_TRITON_ERROR: str | None = None
_triton_peg = None
try:
    _triton_peg = importlib.import_module(".triton_peg", __package__)
except ImportError as e:
    _TRITON_ERROR = f"{type(e).__name__}: {e}"

_NO_GPU = "no CUDA device is available (torch.cuda.is_available() is False)"

_BUILD_HINT = ("reinstall from the source tree with `pip install --no-build-isolation -e .` "
               "(see the README's build and runtime switches)")


def _cuda_build_note() -> str:
    """Why the build left the CUDA kernels out, as setup.py recorded it: " (auto: ...)", or ""."""
    why = _build_record("CUDA_KERNELS_WHY")
    return f" ({why})" if why else ""


def _extension_missing() -> str:
    """Why the C++ backends cannot run, when _EXT_ERROR is set."""
    if _EXT_STALE:
        return f"the C++ extension cpvt_kernels._C was not loaded: {_EXT_ERROR}"
    return f"the C++ extension cpvt_kernels._C is not built or failed to load " \
           f"({_EXT_ERROR}); {_BUILD_HINT}"


def _unavailable_reason(name: str, device_type: str) -> str | None:
    """Why backend ``name`` cannot run on ``device_type`` tensors, or None if it can."""
    if name == "reference":
        return None
    if device_type == "meta" and name in ("cpu", "cuda"):
        # Shapes without data: the op's fake kernel, which needs the extension, not its kernels.
        return _extension_missing() if _EXT_ERROR is not None else None
    if name == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs on CPU tensors, got {device_type} tensors"
        if _EXT_ERROR is not None:
            return _extension_missing()
        if not HAS_CPU_KERNELS:
            return f"the C++ extension has no CPU kernels; {_BUILD_HINT}"
        return None
    if name == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device_type} tensors"
        if _EXT_ERROR is not None:
            return _extension_missing()
        if not torch.cuda.is_available():
            return _NO_GPU
        if not HAS_CUDA_KERNELS:
            return (f"the extension was built without CUDA kernels{_cuda_build_note()}; install "
                    "a CUDA build of torch and the CUDA toolkit of its major version, then "
                    "rebuild with CPVT_BUILD_CUDA=1 and CUDA_HOME set")
        return None
    if name == "triton":
        if _TRITON_ERROR is not None:
            how = "" if "pip install" in _TRITON_ERROR else "; `pip install triton`"
            return f"Triton is missing or failed to load ({_TRITON_ERROR}){how}"
        if device_type == "cuda":
            return None if torch.cuda.is_available() else _NO_GPU
        if device_type == "meta" or (device_type == "cpu" and TRITON_INTERPRET):
            return None
        return (f"the triton backend runs on CUDA tensors (CPU tensors only with "
                f"TRITON_INTERPRET=1 set before triton is imported), got {device_type} tensors")
    raise ValueError(f"fused_peg: backend must be one of {('auto',) + BACKENDS}, got {name!r}")


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can run here, fastest first.

    With ``device`` (``"cpu"``, ``"cuda"``, ``"meta"``), those that run on tensors of that
    device; without, those that run on any device of this machine.

    Example (under ``TRITON_INTERPRET=1``, ``'triton'`` comes last):
        >>> import cpvt_kernels as ck
        >>> ck.available_backends("cpu")  # doctest: +ELLIPSIS
        ['cpu', 'reference'...]
    """
    if device is None:
        types = (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]
    else:
        types = [torch.device(device).type]
    out = []
    for name in BACKENDS:
        if any(_unavailable_reason(name, t) is None for t in types):
            out.append(name)
    # Each backend's place in backend="auto"'s order, on the device type where it ranks best
    # (one in no order, triton on CPU tensors under the interpreter, comes last).
    orders = [AUTO_ORDER.get(t, ()) for t in types]
    return sorted(out, key=lambda name: min((o.index(name) for o in orders if name in o),
                                            default=len(BACKENDS)))


# resolve_backend's answers, by (backend, device type, override): what can run does not change
# within a process, and fused_peg asks on every call (so a fallback's warning is given once).
_RESOLVED: dict[tuple, str] = {}


def resolve_backend(backend: str, device_type: str) -> str:
    """The concrete backend for ``backend`` ("auto" or a name) on ``device_type`` tensors."""
    key = (backend.lower() if isinstance(backend, str) else backend, device_type, ENV_BACKEND)
    if torch.compiler.is_compiling():
        # Neither read nor filled while tracing: a read would be guarded on (the function
        # compiled again once an eager call filled the cache), and the first eager call must
        # still warn.
        return _resolve(backend, device_type)
    name = _RESOLVED.get(key) if isinstance(backend, str) else None
    if name is not None:
        return name
    name = _resolve(backend, device_type)
    if isinstance(backend, str):
        _RESOLVED[key] = name
    return name


def _resolve(backend: str, device_type: str) -> str:
    """resolve_backend's answer."""
    if not isinstance(backend, str):
        raise TypeError(f"fused_peg: backend must be a str, got {type(backend).__name__}")
    backend = backend.lower()
    if backend == "auto":
        if ENV_BACKEND is not None:
            why = _unavailable_reason(ENV_BACKEND, device_type) if ENV_BACKEND in BACKENDS \
                else f"unknown backend name; expected one of {BACKENDS}"
            if why is None:
                return ENV_BACKEND
            if not torch.compiler.is_compiling():  # a warning would break torch.compile's graph
                warnings.warn(f"cpvt_kernels: CPVT_PEG_BACKEND={ENV_BACKEND!r} cannot run here "
                              f"({why}); falling back to backend='auto'",
                              stacklevel=_caller_stacklevel())
        return _auto(device_type)
    if backend not in BACKENDS:
        raise ValueError(f"fused_peg: backend must be one of {('auto',) + BACKENDS}, "
                         f"got {backend!r}")
    why = _unavailable_reason(backend, device_type)
    if why is not None:
        raise RuntimeError(f"fused_peg: backend {backend!r} is unavailable: {why}")
    return backend


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_MODULE_CALL = os.path.join("torch", "nn", "modules", "module.py")


def _caller_stacklevel() -> int:
    """The stacklevel, for a warning given by the function that calls this, of the first frame
    outside this package and torch's module call: the line of the caller's code that called
    fused_peg or a module."""
    frame, level = sys._getframe(2), 2
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE_DIR)
                                 or frame.f_code.co_filename.endswith(_MODULE_CALL)):
        frame, level = frame.f_back, level + 1
    return level


def _auto(device_type: str) -> str:
    reasons = []
    for name in AUTO_ORDER.get(device_type, ("reference",)):
        why = _unavailable_reason(name, device_type)
        if why is None:
            if reasons and name == "reference" and not torch.compiler.is_compiling():
                # The fused kernels were wanted and none can run: say so once (resolve_backend
                # keeps the answer), rather than run several times slower without a word.
                warnings.warn(f"cpvt_kernels: backend='auto' runs the unfused reference "
                              f"(eager PyTorch) on {device_type} tensors: "
                              + " | ".join(f"{n}: {r}" for n, r in reasons),
                              stacklevel=_caller_stacklevel())
            return name
        reasons.append((name, why))
    return "reference"


# ---------------------------------------------------------------------------------------------
# torch.library registration of the C++ ops: fake kernels and autograd.

def _empty_grads_like(x, weight, mask):
    C = x.shape[2]
    return (x.new_empty(x.shape) if mask[0] else x.new_empty(0),
            weight.new_empty(weight.shape) if mask[1] else x.new_empty(0),
            x.new_empty(C) if mask[2] else x.new_empty(0))


if _EXT_ERROR is None:
    @torch.library.register_fake("cpvt::peg_forward")
    def _peg_forward_fake(x, weight, bias, H, W, num_prefix_tokens):
        _checks.check_inputs(x, weight, bias, H, W, num_prefix_tokens)
        return x.new_empty(x.shape)

    @torch.library.register_fake("cpvt::peg_backward")
    def _peg_backward_fake(grad_out, x, weight, H, W, num_prefix_tokens, output_mask):
        _checks.check_backward_inputs(grad_out, x, weight, H, W, num_prefix_tokens)
        return _empty_grads_like(x, weight, output_mask)

    # The extension registers the autograd of peg_forward in C++ (csrc/autograd.cpp); an older
    # build without it gets the same formula from Python.
    if not _has_kernel("cpvt::peg_forward", "Autograd"):
        _autograd.register("cpvt::peg_forward", torch.ops.cpvt.peg_backward)

    _autograd.register_flops(torch.ops.cpvt.peg_forward, torch.ops.cpvt.peg_backward)

    # Under torch.func transforms, which the C++ autograd does not run under.
    _FUNCTORCH_PEG = _autograd.functorch_function(torch.ops.cpvt.peg_forward,
                                                  torch.ops.cpvt.peg_backward)


# ---------------------------------------------------------------------------------------------

_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _run_backend(name, x, weight, bias, H, W, P):
    """The triton and reference backends (fused_peg_hw calls the C++ op itself)."""
    if name == "triton":
        if not torch.compiler.is_compiling():
            _checks.check_no_forward_ad(x, weight, bias)
        try:
            return _triton_peg.peg_triton(x, weight, bias, H, W, P)
        except RuntimeError as e:
            if not torch._C._are_functorch_transforms_active():
                raise
            raise RuntimeError(
                "fused_peg (triton): torch.func's grad, vjp and jacrev are not supported by this "
                "backend, whose autograd torch.library generates (PyTorch issue 170834; vmap of "
                "the forward works); use backend=\"cuda\" or \"reference\"") from e
    if _checks.autocast_enabled(x):
        # fused_peg has cast the tensors to the dtype it returns; the reference computes in it,
        # as the fused backends do, not in the autocast dtype its convolution would take.
        with torch.autocast(x.device.type, enabled=False):
            return _run_reference(x, weight, bias, H, W, P)
    return _run_reference(x, weight, bias, H, W, P)


def _run_reference(x, weight, bias, H, W, P):
    """The reference backend."""
    if x.dtype in (torch.float16, torch.bfloat16):
        # Half types accumulate in float32, for this backend too.
        out = peg_unchecked(x.float(), weight.float(), None if bias is None else bias.float(),
                            H, W, P)
        return out.to(x.dtype)
    return peg_unchecked(x, weight, bias, H, W, P)


def fused_peg(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              size=None, num_prefix_tokens: int = 1, backend: str = "auto") -> torch.Tensor:
    """CPVT's Positional Encoding Generator in one fused pass.

    ``out[:, :P] = x[:, :P]`` and ``out[:, P:] = dwconv(grid(x)) + grid(x)``, where ``grid``
    views the ``H*W`` tokens after the ``P = num_prefix_tokens`` prefix tokens as a row-major
    ``(B, C, H, W)`` grid and ``dwconv`` is a zero-padded, stride-1 depthwise convolution.

    Args:
        x: ``(B, P + H*W, C)`` tokens, float32/float64/float16/bfloat16, any strides.
        weight: ``(C, 1, kh, kw)`` (``nn.Conv2d(C, C, k, groups=C).weight``), kh, kw odd <= 31.
        bias: ``(C,)`` or ``None``.
        size: ``(H, W)``; an int means a square grid; ``None`` infers a square grid.
        num_prefix_tokens: ``P``, the cls/distillation/register tokens before the grid (>= 0).
        backend: ``"auto"`` (fastest for the device; env ``CPVT_PEG_BACKEND`` overrides),
            ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``.
    Returns:
        A new contiguous ``(B, P + H*W, C)`` tensor of ``x``'s dtype. Differentiable in ``x``,
        ``weight`` and ``bias``. Under ``torch.autocast`` it returns the dtype the eager PEG
        returns there, the promotion of ``x``'s dtype and the autocast dtype (float32 tokens
        stay float32), and computes in it.

    Example:
        >>> import torch, cpvt_kernels as ck
        >>> x = torch.randn(8, 1 + 14 * 14, 192)
        >>> conv = torch.nn.Conv2d(192, 192, 3, padding=1, groups=192)
        >>> ck.fused_peg(x, conv.weight, conv.bias, size=(14, 14)).shape
        torch.Size([8, 197, 192])
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fused_peg: x must be a torch.Tensor, got {type(x).__name__}")
    if type(num_prefix_tokens) is not int:  # a numpy integer, as the modules take
        num_prefix_tokens = _checks.as_int(num_prefix_tokens, "fused_peg: num_prefix_tokens")
    if size is None:  # a nested x has no shape to read: its error comes from the checks
        _checks.check_dense("x", x)
    H, W = _checks.parse_size(size, x.shape[1] if size is None and x.dim() == 3 else None,
                              num_prefix_tokens if isinstance(num_prefix_tokens, int) else 0)
    return fused_peg_hw(x, weight, bias, H, W, num_prefix_tokens, backend)


def fused_peg_hw(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, H: int,
                 W: int, num_prefix_tokens: int = 1, backend: str = "auto") -> torch.Tensor:
    """``fused_peg`` with the grid size as ints ``H``, ``W`` (``FusedPEG.forward`` calls it).

    Every Python operation here runs on each call, after a kernel that has evicted the
    interpreter's data from the caches: on a 2-core Xeon a call of the C++ op on a tiny tensor
    takes 5 us with warm caches and 40 us with cold ones, and each layer of Python around it
    adds several more. So the common case (a resolved cpu or cuda backend, tensor arguments) does
    the fewest operations.
    """
    device_type = "cpu" if x.is_cpu else x.device.type
    try:
        autocast = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know ("meta")
        autocast = False
    # Under autocast the eager PEG runs its convolution in the autocast dtype and adds the
    # residual in x's dtype, so its output has the promotion of the two (float32 for float32
    # tokens under bfloat16 autocast). The fused op returns that dtype too, computing in it: a
    # drop-in replacement must not change the dtype of the residual stream after it (which
    # would also move every later block's elementwise work to the half type).
    # Like autocast's own casts, only floating tensors other than float64 are cast: any other
    # weight or bias meets the dtype check below.
    if autocast and x.dtype in _AUTOCAST_ELIGIBLE:
        dtype = torch.promote_types(x.dtype, torch.get_autocast_dtype(device_type))
        x = x.to(dtype)
        if isinstance(weight, torch.Tensor) and weight.dtype in _AUTOCAST_ELIGIBLE:
            weight = weight.to(dtype)
        if isinstance(bias, torch.Tensor) and bias.dtype in _AUTOCAST_ELIGIBLE:
            bias = bias.to(dtype)
    # Traced, the cache is not read: torch.compile would guard on its contents, and compile the
    # function again once an eager call has filled it.
    compiling = torch.compiler.is_compiling()
    name = (_RESOLVED.get((backend, device_type, ENV_BACKEND))
            if type(backend) is str and not compiling else None)
    if name is None:
        name = resolve_backend(backend, device_type)
    if name == "cpu" or name == "cuda":
        # The C++ op checks the tensors itself (csrc/peg.cpp: the same checks, messages and
        # error types as _checks.check_inputs), so only the arguments it cannot take are checked
        # here.
        if not (isinstance(weight, torch.Tensor) and type(num_prefix_tokens) is int
                and (bias is None or isinstance(bias, torch.Tensor))):
            _checks.check_argument_types(x, weight, bias, num_prefix_tokens)
        try:
            if (_PEG_FORWARD_EAGER is not None and type(H) is int and type(W) is int
                    and not compiling
                    and not _has_torch_function((x, weight, bias))):
                return _PEG_FORWARD_EAGER(x, weight, bias, H, W, num_prefix_tokens)
            return _PEG_FORWARD(x, weight, bias, H, W, num_prefix_tokens)
        except (OverflowError, RuntimeError):
            # An int past int64 (H, W, num_prefix_tokens), or a tensor the op has no kernel for
            # (sparse, quantized, nested: the dispatcher's error): the error that names it.
            _checks.check_inputs(x, weight, bias, H, W, num_prefix_tokens)
            # torch.func's grad, vjp, jacrev, ...: the C++ autograd refuses to run under them.
            if torch._C._are_functorch_transforms_active():
                return _FUNCTORCH_PEG.apply(x, weight, bias, H, W, num_prefix_tokens)
            raise
    _checks.check_inputs(x, weight, bias, H, W, num_prefix_tokens)
    return _run_backend(name, x, weight, bias, H, W, num_prefix_tokens)
