"""Fused C passes for the elementwise merges, used only where they give the eager pass's bits.

Eager torch needs one call per operation per chunk (six to ten for linear and task arithmetic),
each a pass over the chunk; the C functions in native.c do all of a candidate's operations in one
pass over the inputs, which is what takes these merges to their memory-bandwidth floor. They are
compiled on first use with the system's C compiler (x86-64 with AVX2, FMA and F16C; about a
second, cached under ~/.cache/merge-search/native) and each (pass, dtype) is checked against the
eager pass on probe data before it is used: where a compiler, the CPU features or that check are
missing, or MERGE_SEARCH_NATIVE=0 is set, the methods run their eager passes, with the same bits.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-shared", "-fPIC"]
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
MAX_INPUTS = 16  # the C tail buffers
# below this many elements a second thread costs more than it saves
SPLIT_ELEMENTS = 1 << 20

_lock = threading.RLock()
_library: ctypes.CDLL | None | bool = False  # False: not tried yet
_checked: dict[tuple, object] = {}  # (pass, dtype) -> its verified variant, or None
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (the process it belongs to, the pool)


def enabled() -> bool:
    """Whether the native passes may be used here at all (the per-pass checks come on top)."""
    return _load() is not None


def _cpu_supports() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {"avx2", "fma", "f16c"} <= set(flags)


def _cache_dir() -> Path:
    root = os.environ.get("MERGE_SEARCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "merge-search")
    return Path(root) / "native"


def _compile(compiler: str) -> Path | None:
    """The shared library for native.c, built once per source and flags; None when it cannot be."""
    try:
        source = SOURCE.read_bytes()
    except OSError:  # an installation without the C source: the eager passes run
        return None
    digest = hashlib.sha256(source + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"merge-search-native-{os.getuid()}"):
        target = folder / f"merge_native_{digest}.so"
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not _private(folder) or (target.exists() and not _private(target)):
                continue  # a library another user could have written is never loaded
            if target.exists():
                return target
            with tempfile.TemporaryDirectory(dir=folder) as work:
                built = Path(work) / target.name
                result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)],
                                        capture_output=True, text=True, timeout=120)
                if result.returncode != 0:
                    log.info("native passes not built (%s): %s", compiler, result.stderr.strip()[:500])
                    return None
                os.replace(built, target)  # atomic: a concurrent process sees all of it or none
            return target
        except OSError:
            continue
    return None


def _private(path: Path) -> bool:
    """Owned by this user and writable by no one else."""
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _load() -> ctypes.CDLL | None:
    global _library
    if _library is not False:
        return _library
    with _lock:
        if _library is not False:
            return _library
        _library = None
        if os.environ.get("MERGE_SEARCH_NATIVE", "1") == "0" or not _cpu_supports():
            return None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not compiler:
            return None
        path = _compile(compiler)
        if path is None:
            return None
        try:
            library = ctypes.CDLL(str(path))
        except OSError as error:  # e.g. a cache on a noexec mount
            log.info("native passes not loaded from %s: %s", path, error)
            return None
        library.linear_pass.restype = None
        library.linear_pass.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                        ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                        ctypes.c_void_p, ctypes.c_int64]
        library.delta_sum_pass.restype = None
        library.delta_sum_pass.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                           ctypes.c_void_p, ctypes.POINTER(DeltaSumOptions), ctypes.c_void_p,
                                           ctypes.c_int64]
        library.nearswap_pass.restype = None
        library.nearswap_pass.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float,
                                          ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                          ctypes.c_void_p, ctypes.c_int64]
        library.multislerp_pass.restype = None
        library.multislerp_pass.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(MultiSlerpOptions),
                                            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        library.karcher_pass.restype = None
        library.karcher_pass.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(KarcherOptions), ctypes.c_void_p,
                                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        library.sce_pass.restype = None
        library.sce_pass.argtypes = [ctypes.c_int, ctypes.POINTER(SceOptions), ctypes.c_void_p, ctypes.c_int64]
        _library = library
        return library


def usable(out: torch.Tensor, tensors: list[torch.Tensor]) -> bool:
    """Whether a native pass can take these: the library is here, and CPU, contiguous tensors of one
    supported dtype, few enough inputs."""
    dtype = out.dtype
    return (dtype in DTYPE_CODES and len(tensors) <= MAX_INPUTS and out.device.type == "cpu"
            and out.is_contiguous() and all(t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
                                            for t in tensors) and enabled())


def verified(key: tuple, variants: list, run_native, run_eager, specials: bool = True):
    """The first of `variants` whose native pass gives the eager pass's bits on probe data, or None.

    run_native(variant, inputs, out) and run_eager(inputs, out) fill `out`; the probe holds values of
    mixed sign and magnitude, subnormals, zeros of both signs, infinities, and a partial last step.
    """
    if key in _checked:
        return _checked[key]
    with _lock:
        if key in _checked:
            return _checked[key]
        dtype = key[1]
        inputs = _probe(dtype, 4, specials)
        expected = torch.empty(inputs[0].shape, dtype=dtype)
        run_eager(inputs, expected)
        found = None
        for variant in variants:
            got = torch.empty_like(expected)
            run_native(variant, inputs, got)
            if _same_bits(got, expected):
                found = variant
                break
        if found is None:
            log.warning("native %s pass for %s does not match the eager pass here; using the eager pass",
                        key[0], dtype)
        _checked[key] = found
        return found


@lru_cache(maxsize=8)
def _probe(dtype: torch.dtype, count: int, specials: bool = True) -> tuple[torch.Tensor, ...]:
    """Probe inputs: the first a base, the others near it on every third element; with `specials`,
    zeros of both signs, infinities and NaNs at fixed places in each. Made once per process (the
    passes only read them)."""
    generator = torch.Generator().manual_seed(1234)
    numel = 8 * 131072 + 5  # large enough that every variant differs from the others somewhere
    tensors = []
    for i in range(count):
        scale = torch.exp2(torch.randint(-30, 12, (numel,), generator=generator).float())
        x = torch.randn(numel, generator=generator) * scale
        if i == 0:
            x = x * 1e-2 + 0.02 * torch.randn(numel, generator=generator)  # a base near the others
        x[i::97] = 0.0
        x[i + 1::101] = -0.0
        if specials:
            x[i + 2::499] = float("inf") if i % 2 else float("-inf")
            x[i + 3::1009] = float("nan")
        tensors.append(x.to(dtype))
    for x in tensors[1:]:  # children close to the base, so deltas cancel in their low bits
        x[::3] = (tensors[0][::3].float() + torch.randn(x[::3].shape, generator=generator) * 1e-3).to(dtype)
    return tuple(tensors)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, except that any NaN matches any NaN: which input's NaN payload an x86
    add passes on depends on its operand order, which the compiler of torch's kernels chooses."""
    bits = torch.int32 if a.dtype == torch.float32 else torch.int16
    same = a.view(bits) == b.view(bits)
    return bool((same | (a.isnan() & b.isnan())).all())


def _pointers(tensors: list[torch.Tensor]):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _floats(values) -> ctypes.Array:
    return (ctypes.c_float * len(values))(*values)


def run_split(numel: int, call) -> None:
    """call(start, stop) over [0, numel), split between torch's intra-op threads for large tensors
    (the C passes release the GIL: ctypes drops it for the call)."""
    threads = torch.get_num_threads()
    if threads <= 1 or numel < SPLIT_ELEMENTS:
        call(0, numel)
        return
    global _pool
    # a new pool in a forked child (the parent's threads are not there) or for more threads
    if _pool is None or _pool[0] != os.getpid() or _pool[1]._max_workers < threads:
        _pool = (os.getpid(), ThreadPoolExecutor(max_workers=threads, thread_name_prefix="merge-native"))
    step = -(-numel // threads)
    step += -step % 64
    futures = [_pool[1].submit(call, start, min(numel, start + step)) for start in range(0, numel, step)]
    for future in futures:
        future.result()


# linear's variants: whether each product after the first is added as a fused multiply-add (torch's
# addcmul_ on CPUs with FMA) or rounded first (slerp's mul and add); the other passes have one.
LINEAR_VARIANTS = [1, 0]
ONE_VARIANT = [0]

_nan_rule: tuple[int, int, int] | None = None


def bfloat16_nans(total: int, start: int) -> tuple[int, int, int]:
    """(vector NaN, scalar NaN, first scalar element relative to `start`) of bfloat16 rounding in an
    elementwise torch operation over `total` elements: its vector loop writes one NaN pattern and
    its scalar loop over the last total % vector-size elements another (measured once here)."""
    global _nan_rule
    if _nan_rule is None:
        probe = torch.full((1023,), float("inf"), dtype=torch.bfloat16) * 0.0
        bits = probe.view(torch.int16).to(torch.int32) & 0xFFFF
        last = int(bits[-1])
        scalar = (bits == last).nonzero().flatten()
        first_scalar = int(scalar[0]) if len(scalar) else 1023
        # no vector loop at all: every element scalar; else the vector size is the power of two
        # just above the scalar tail's length
        step = 0 if first_scalar == 0 else 1 << (1023 - first_scalar).bit_length()
        _nan_rule = (int(bits[0]), last, step)
    vector, scalar, step = _nan_rule
    tail = 0 if step == 0 else total - total % step
    return vector, scalar, max(0, tail - start)


def linear(variant, out: torch.Tensor, tensors: list[torch.Tensor], coefficients: list[float],
           denominator: float | None) -> None:
    """out = (sum of x_i * c_i) / denominator, rounded once to out's dtype (see native.c).

    variant: 1 when each product after the first is added as a fused multiply-add, as torch's
    addcmul_ does on CPUs with FMA, else 0.
    """
    library = _load()
    code = DTYPE_CODES[out.dtype]
    size = out.element_size()
    flat_out = out.view(-1)
    flats = [t.reshape(-1) for t in tensors]
    c = _floats(coefficients)
    normalize = denominator is not None

    def call(start: int, stop: int) -> None:
        xs = _pointers([x[start:stop] for x in flats])
        library.linear_pass(code, xs, len(flats), c, variant, int(normalize),
                            float(denominator) if normalize else 1.0,
                            *bfloat16_nans(flat_out.numel(), start), flat_out.data_ptr() + start * size, stop - start)

    run_split(flat_out.numel(), call)


class DeltaSumOptions(ctypes.Structure):
    """native.c's DeltaSumOptions."""

    _fields_ = [("has_base", ctypes.c_int), ("plus_zero", ctypes.c_int), ("normalize", ctypes.c_int),
                ("scale", ctypes.c_int), ("divisor", ctypes.c_float), ("lam", ctypes.c_float),
                ("nan_bits", ctypes.c_int), ("tail_nan_bits", ctypes.c_int), ("tail_start", ctypes.c_int64)]


def delta_sum(variant, out: torch.Tensor, tensors: list[torch.Tensor], base: torch.Tensor | None,
              weights: list[float], divisor: float | None = None, lam: float | None = None,
              plus_zero: bool = True) -> None:
    """out = [base +] lambda * (sum of ([x_i - base]) * w_i [+ 0]) / divisor, each operation rounded to
    the dtype as torch's are (see native.c): task arithmetic, and nuslerp's flattened pass.
    """
    library = _load()
    code = DTYPE_CODES[out.dtype]
    size = out.element_size()
    flat_out = out.view(-1)
    flat_base = base.reshape(-1) if base is not None else None
    flats = [t.reshape(-1) for t in tensors]
    w = _floats(weights)

    def call(start: int, stop: int) -> None:
        options = DeltaSumOptions(
            int(base is not None), int(plus_zero), int(divisor is not None), int(lam is not None),
            float(divisor if divisor is not None else 1.0), float(lam if lam is not None else 1.0),
            *bfloat16_nans(flat_out.numel(), start))
        xs = _pointers([x[start:stop] for x in flats])
        base_pointer = flat_base[start:stop].data_ptr() if flat_base is not None else None
        library.delta_sum_pass(code, xs, base_pointer, len(flats), w, ctypes.byref(options),
                               flat_out.data_ptr() + start * size, stop - start)

    run_split(flat_out.numel(), call)


def nearswap(variant, out: torch.Tensor, base: torch.Tensor, other: torch.Tensor, t: float) -> None:
    """out = w * other + (1 - w) * base, w = clamp(t / max(|base - other|, 1e-6), 0, 1), each operation
    rounded to the dtype as torch's are (see native.c)."""
    library = _load()
    code = DTYPE_CODES[out.dtype]
    size = out.element_size()
    flat_out, flat_base, flat_other = out.view(-1), base.reshape(-1), other.reshape(-1)
    floor = torch.tensor(1e-6, dtype=out.dtype).item()  # torch's clamp compares in the tensor's dtype

    def call(start: int, stop: int) -> None:
        library.nearswap_pass(code, flat_base[start:stop].data_ptr(), flat_other[start:stop].data_ptr(), t, floor,
                              *bfloat16_nans(flat_out.numel(), start), flat_out.data_ptr() + start * size,
                              stop - start)

    run_split(flat_out.numel(), call)


class SceOptions(ctypes.Structure):
    """native.c's SceOptions."""

    _fields_ = [("xs", ctypes.c_void_p), ("base", ctypes.c_void_p), ("n", ctypes.c_int),
                ("weights", ctypes.c_void_p), ("floor", ctypes.c_float), ("nan_bits", ctypes.c_int),
                ("tail_nan_bits", ctypes.c_int), ("tail_start", ctypes.c_int64)]


def sce(variant, out: torch.Tensor, children: list[torch.Tensor], base: torch.Tensor, shares: list[float]) -> None:
    """out = base + sum(d_i * e_i) / max(sum(e_i), 1e-6), d_i = x_i - base, e_i = share_i where d_i has the
    majority sign, each operation rounded to the dtype as torch's are (see native.c): sce without selection."""
    library = _load()
    code = DTYPE_CODES[out.dtype]
    size = out.element_size()
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flats = [t.reshape(-1) for t in children]
    weights = _floats(shares)
    floor = torch.tensor(1e-6, dtype=out.dtype).item()  # torch's clamp compares in the tensor's dtype

    def call(start: int, stop: int) -> None:
        xs = _pointers([x[start:stop] for x in flats])
        options = SceOptions(ctypes.cast(xs, ctypes.c_void_p), flat_base[start:stop].data_ptr(), len(flats),
                             ctypes.cast(weights, ctypes.c_void_p), floor, *bfloat16_nans(flat_out.numel(), start))
        library.sce_pass(code, ctypes.byref(options), flat_out.data_ptr() + start * size, stop - start)

    run_split(flat_out.numel(), call)


class MultiSlerpOptions(ctypes.Structure):
    """native.c's MultiSlerpOptions."""

    _fields_ = [("xs", ctypes.c_void_p), ("base", ctypes.c_void_p), ("n", ctypes.c_int),
                ("scales", ctypes.c_void_p), ("weights", ctypes.c_void_p), ("dots", ctypes.c_void_p),
                ("mean_norm", ctypes.c_float), ("cos", ctypes.c_float), ("sin_over", ctypes.c_float),
                ("mean_input_norm", ctypes.c_float), ("row", ctypes.c_int), ("nan_bits", ctypes.c_int),
                ("tail_nan_bits", ctypes.c_int), ("tail_start", ctypes.c_int64)]


def multislerp(variant, which: int, flats: list[torch.Tensor], base: torch.Tensor | None, mean: torch.Tensor,
               vector: torch.Tensor, out: torch.Tensor | None, scales: list[float], weights: list[float],
               dots: list[float] | None = None, mean_norm: float = 1.0, row: int = 0,
               cos: float = 1.0, sin_over: float = 1.0, mean_input_norm: float = 1.0) -> None:
    """One of multislerp's four passes over flat vectors of one dtype (native.c): 1 the mean,
    2 one row's products with the mean (normalising the mean on row 0), 3 the tangent, 4 the result."""
    library = _load()
    code = DTYPE_CODES[mean.dtype]
    size = mean.element_size()
    scale_values, weight_values = _floats(scales), _floats(weights)
    dot_values = _floats(dots) if dots is not None else None

    def call(start: int, stop: int) -> None:
        xs = _pointers([x[start:stop] for x in flats])
        options = MultiSlerpOptions(
            ctypes.cast(xs, ctypes.c_void_p), base[start:stop].data_ptr() if base is not None else None, len(flats),
            ctypes.cast(scale_values, ctypes.c_void_p), ctypes.cast(weight_values, ctypes.c_void_p),
            ctypes.cast(dot_values, ctypes.c_void_p) if dot_values is not None else None,
            mean_norm, cos, sin_over, mean_input_norm, row, *bfloat16_nans(mean.numel(), start))
        library.multislerp_pass(code, which, ctypes.byref(options), mean.data_ptr() + start * size,
                                vector.data_ptr() + start * size,
                                out.data_ptr() + start * size if out is not None else None, stop - start)

    run_split(mean.numel(), call)


class KarcherOptions(ctypes.Structure):
    """native.c's KarcherOptions."""

    _fields_ = [("units", ctypes.c_void_p), ("n", ctypes.c_int), ("dots", ctypes.c_void_p),
                ("coefs", ctypes.c_void_p), ("cos", ctypes.c_float), ("sin", ctypes.c_float),
                ("norm", ctypes.c_float), ("reciprocal", ctypes.c_int), ("nan_bits", ctypes.c_int),
                ("tail_nan_bits", ctypes.c_int), ("tail_start", ctypes.c_int64)]


# karcher's variants: (tangent / norm as a division 0 or times the reciprocal 1, whether torch rounds
# the float32 0-dim factor of `mul(cos, mean)` and `mul(sin, tangent)` to the dtype, whether it rounds
# the float32 0-dim divisor of `div(tangent, norm)`); torch 2.x: the first
KARCHER_VARIANTS = [(0, True, False), (0, False, False), (1, False, False), (0, True, True)]


def karcher(variant, which: int, mean: torch.Tensor, tangent: torch.Tensor, widened: torch.Tensor | None,
            units: list[torch.Tensor] = (), dots: list[float] = (), coefs: list[float] = (),
            cos: float = 1.0, sin: float = 0.0, norm: float = 1.0) -> None:
    """One of karcher's two passes over flat vectors of one dtype (native.c): 1 the tangent from the
    units taking part, 2 the mean's update along it; `widened` gets a float32 copy of the result."""
    library = _load()
    code = DTYPE_CODES[mean.dtype]
    size = mean.element_size()
    flats = [u.view(-1) for u in units]
    dot_values, coef_values = _floats(dots), _floats(coefs)

    def call(start: int, stop: int) -> None:
        pointers = _pointers([u[start:stop] for u in flats])
        options = KarcherOptions(
            ctypes.cast(pointers, ctypes.c_void_p), len(flats), ctypes.cast(dot_values, ctypes.c_void_p),
            ctypes.cast(coef_values, ctypes.c_void_p), cos, sin, norm, variant,
            *bfloat16_nans(mean.numel(), start))
        library.karcher_pass(code, which, ctypes.byref(options), mean.data_ptr() + start * size,
                             tangent.data_ptr() + start * size,
                             widened.data_ptr() + start * 4 if widened is not None else None, stop - start)

    run_split(mean.numel(), call)
