"""Which int8 kernel family torch's fbgemm really runs, found by a probe; and how to ask for the other one.

fbgemm, behind ``torch.ops.quantized.linear`` on the ``fbgemm`` and ``x86`` engines, has two families of
uint8 x int8 -> int32 GEMM micro-kernels, and they give different integers:

    "vnni"  AVX-512 VNNI, ``vpdpbusd``: four u8·s8 products added exactly to an int32 lane.
            refquant: the default, ``saturate_int16_pairs=False`` (refquant.matmul eq. M1)
    "avx2"  AVX2, or AVX-512 without VNNI, ``vpmaddubsw`` + ``vpmaddwd``: each pair of neighbouring products is
            saturated to int16 before it reaches int32.
            refquant: ``QuantizedLinear(..., saturate_int16_pairs=True)`` (refquant.matmul eq. M2)

Which family runs is fixed once per process. ``fbgemmInstructionSet()`` (pytorch/FBGEMM src/Utils.cc) keeps in
function-local statics the ISA cpuinfo detected (AVX-512 VNNI needs ``avx512vnni``; AVX-VNNI alone does not count)
and the one ``FBGEMM_ENABLE_INSTRUCTIONS`` asks for (``AVX2``, ``AVX512``, ``AVX512_E1``, ...: it can only lower the
detected ISA). Both are read on its first call — the first quantized op that packs or multiplies with fbgemm — and
never again, so setting the variable later in the same process does nothing. This module therefore never guesses
from CPU flags what torch runs: :func:`torch_fbgemm_kernel_family` asks torch, with a probe.
Matches: pytorch/FBGEMM src/Utils.cc (fbgemmInstructionSet, fbgemmEnvGetIsa, isaSupportMap).

Why the probe is reliable:

* Every ``quantized::linear`` goes through ``fbgemmPacked`` -> ``ExecuteKernel`` (src/Fbgemm.cc,
  src/ExecuteKernelU8S8.cc), which generates its micro-kernel for ``fbgemmInstructionSet()``. The shape only sets the
  block sizes (MCB, NCB, KCB) and a narrower kernel for the last column block, with the same instructions; so one
  tiny problem tells the family of every shape. (tests/test_crosscheck_isa.py checks that on M = 1..200,
  N = 1..130 with remainders, K = 1..1100 across the KCB block, with and without FBGEMM_ENABLE_INSTRUCTIONS.)
* The probe is a problem on which the two families must disagree, whatever the pairing: one row of four codes 255
  (``x``), weights ``[-128]*4`` and ``[127]*4`` (per tensor, scale 1, zero points 0). The exact sums are
  4·255·(-128) = -130,560 and 4·255·127 = 129,540; saturated pairs give 2·(-32,768) = -65,536 and
  2·32,767 = 65,534 however fbgemm pairs the four equal products (K = 4 is one whole ROW_INTERLEAVE group, no
  padding). With s_y = 2048 (the multiplier 2^-11 is exact) and z_y = 128 the outputs are
  rint(-63.75) + 128 = 64, rint(63.252) + 128 = 191 (exact) against rint(-32) + 128 = 96,
  rint(31.999) + 128 = 160 (saturated): no rounding tie, every float32 step exact, so only the accumulation can
  make the difference. Any other result is an error, never a guess.

``--isa`` of ``python -m crosscheck.linear`` starts the torch worker with the environment of a target CPU
(:func:`worker_environment`) and checks with the probe, in the worker, that torch really runs that family.

The onednn engine has no fixed family: oneDNN picks a matmul kernel for every call (``brg_matmul:<isa>``,
``brg_matmul:<isa>_amx`` for larger M on CPUs with AMX, ``gemm:jit`` on AVX2 CPUs), and says which in its verbose
output (``ONEDNN_VERBOSE``, or ``torch.backends.mkldnn.verbose``): :func:`onednn_family_from_verbose` reads it and
:class:`OnednnVerboseCapture` collects it from the process's stdout, call by call.
Matches: oneapi-src/oneDNN src/common/verbose.cpp (the ``onednn_verbose,...,exec,cpu,matmul,<impl>,...`` line).
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile

FAMILIES = ("vnni", "avx2")
"""The two kernel families of fbgemm's u8 x s8 GEMM: exact int32 sums, or int16-saturated pairs."""

ISAS = ("auto", "vnni", "avx2")
"""Choices of ``--isa``: what this machine runs (the environment as it is), or one family forced."""

ENV_VAR = "FBGEMM_ENABLE_INSTRUCTIONS"

INSTRUCTIONS = {"vnni": "vpdpbusd: exact int32 sums", "avx2": "vpmaddubsw: int16-saturated pairs"}

PROBE_X = (255, 255, 255, 255)
PROBE_W = ((-128, -128, -128, -128), (127, 127, 127, 127))
PROBE_OUTPUT_SCALE, PROBE_OUTPUT_ZERO_POINT = 2048.0, 128
PROBE_CODES = {"vnni": (64, 191), "avx2": (96, 160)}
"""The probe's two output codes under each family (derivation in the module docstring)."""


def saturate_int16_pairs(family: str) -> bool:
    """The refquant option that models ``family``: True for "avx2" (eq. M2), False for "vnni" (eq. M1)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return family == "avx2"


def family_from_probe(codes) -> str:
    """The family whose probe outputs are ``codes`` (a sequence of two ints); RuntimeError if neither."""
    codes = tuple(int(c) for c in codes)
    for family, expected in PROBE_CODES.items():
        if codes == expected:
            return family
    raise RuntimeError(f"torch's fbgemm probe gave codes {codes}: neither the VNNI kernels {PROBE_CODES['vnni']} "
                       f"nor the int16-saturating ones {PROBE_CODES['avx2']} (see crosscheck/isa.py); refquant does "
                       f"not model this torch build")


def run_probe() -> tuple[int, int]:
    """Run the probe through ``torch.ops.quantized.linear`` on the fbgemm engine (restored afterwards); returns the
    two output codes. Imports torch."""
    import warnings

    import torch

    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "fbgemm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.13 deprecates the quantized dtypes
            w = torch._make_per_tensor_quantized_tensor(torch.tensor(PROBE_W, dtype=torch.int8), 1.0, 0)
            packed = torch.ops.quantized.linear_prepack(w, None)
            x = torch._make_per_tensor_quantized_tensor(torch.tensor([PROBE_X], dtype=torch.uint8), 1.0, 0)
            y = torch.ops.quantized.linear(x, packed, PROBE_OUTPUT_SCALE, PROBE_OUTPUT_ZERO_POINT)
        return tuple(int(v) for v in y.int_repr().reshape(-1).tolist())
    finally:
        torch.backends.quantized.engine = previous


@functools.lru_cache(maxsize=None)
def torch_fbgemm_kernel_family() -> str:
    """"vnni" or "avx2": the u8 x s8 kernel family torch's fbgemm runs in this process, found by the probe (once;
    the family cannot change within a process). Imports torch."""
    return family_from_probe(run_probe())


def probe_description(family: str) -> str:
    """How the family was found, for the report and the JSON."""
    other = "avx2" if family == "vnni" else "vnni"
    return (f"probe: torch.ops.quantized.linear of four codes 255 with weights -128 and 127 gave codes "
            f"{PROBE_CODES[family][0]}, {PROBE_CODES[family][1]} ({INSTRUCTIONS[family]}; the {other} kernels give "
            f"{PROBE_CODES[other][0]}, {PROBE_CODES[other][1]})")


def cpu_has_avx512_vnni() -> bool:
    """True if this CPU has AVX-512 VNNI, the feature fbgemm's VNNI kernels need (cpuinfo_has_x86_avx512vnni;
    AVX-VNNI alone does not count). Read from LLVM's host features, without torch."""
    from llvmlite import binding as llvm

    return bool(llvm.get_host_cpu_features().get("avx512vnni", False))


def expected_family(isa: str = "auto") -> str:
    """What the torch side will most likely run, without asking torch (only to warm up the right refquant kernels
    early; the probe decides)."""
    if isa != "auto":
        return isa
    forced = os.environ.get(ENV_VAR, "").upper()
    if forced in ("AVX2", "AVX512", "AVX512_256") or not cpu_has_avx512_vnni():
        return "avx2"
    return "vnni"


def worker_environment(isa: str) -> dict[str, str | None]:
    """The environment changes that make torch's fbgemm run ``isa`` (None: remove the variable).

    "auto": none (what this machine runs). "avx2": FBGEMM_ENABLE_INSTRUCTIONS=AVX2, fbgemm's pre-VNNI kernels.
    "vnni": FBGEMM_ENABLE_INSTRUCTIONS removed, so a CPU with AVX-512 VNNI runs its VNNI kernels (check
    :func:`cpu_has_avx512_vnni` first: fbgemm cannot raise the ISA above the CPU's).
    """
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    return {"auto": {}, "avx2": {ENV_VAR: "AVX2"}, "vnni": {ENV_VAR: None}}[isa]


def apply_environment(changes: dict[str, str | None]) -> None:
    """Set or remove the variables of :func:`worker_environment` in ``os.environ`` (in the torch worker, before
    torch is imported)."""
    for name, value in changes.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# ----------------------------------------------------------------------------------------------------------------
# oneDNN: the matmul kernel of each call, from its verbose output
# ----------------------------------------------------------------------------------------------------------------

ONEDNN_FAMILIES = ("brgemm", "brgemm+pairs", "brgemm_amx", "gemm", "gemm+pairs")
"""What a oneDNN matmul call ran: the kernel (refquant.engines.ONEDNN_KERNELS) and "+pairs" when it sums u8·s8
products in int16-saturated pairs (no VNNI: ``brg_matmul:avx512_core``, ``gemm:jit`` on AVX2)."""

_ONEDNN_CPU_ISA: list[str] = []  # oneDNN prints its "isa:" line once per process, the first time verbose is on


def onednn_family_from_verbose(text: str, cpu_isa: str | None = None) -> str | None:
    """The kernel family of the last matmul in oneDNN verbose output (one of :data:`ONEDNN_FAMILIES`; None: no
    matmul ran). ``cpu_isa``: oneDNN's "isa:" line of another process (a child's); by default the one this process
    printed (recorded when first seen)."""
    impl = None
    for line in text.splitlines():
        if ",info,cpu,isa:" in line:
            if cpu_isa is None:
                _ONEDNN_CPU_ISA.append(line.split("isa:", 1)[1])
            else:
                cpu_isa = line.split("isa:", 1)[1]
        if ",exec,cpu,matmul," in line:
            impl = line.split(",")[6]
    if impl is None:
        return None
    if impl.startswith("brg_matmul:") and "amx" in impl:
        return "brgemm_amx"
    if impl.startswith("brg_matmul:"):
        isa = impl.split(":", 1)[1]
        vnni = "vnni" in isa or isa.startswith("avx10") or isa in ("avx512_core_bf16", "avx512_core_fp16")
        return "brgemm" if vnni else "brgemm+pairs"
    if impl.startswith("gemm:"):  # the ISA is not in the name: take oneDNN's CPU line
        isa_line = cpu_isa if cpu_isa is not None else (_ONEDNN_CPU_ISA[-1] if _ONEDNN_CPU_ISA else None)
        if isa_line is None:  # oneDNN printed it before anyone listened (once per process): the CPU's features,
            from refquant.dynamic import default_onednn_kernel  # capped by ONEDNN_MAX_CPU_ISA, tell the same

            return "gemm+pairs" if default_onednn_kernel() == "gemm_no_vnni" else "gemm"
        return "gemm" if ("DL Boost" in isa_line or "AMX" in isa_line or "AVX10" in isa_line) else "gemm+pairs"
    raise RuntimeError(f"unknown oneDNN matmul implementation {impl!r}: refquant does not model it (extend "
                       f"crosscheck.isa.onednn_family_from_verbose)")


def onednn_kernel_options(family: str) -> tuple[bool, str]:
    """(saturate_int16_pairs, onednn_kernel) that model a oneDNN family (refquant.model.LinearKernel's fields)."""
    if family not in ONEDNN_FAMILIES:
        raise ValueError(f"family must be one of {ONEDNN_FAMILIES}, got {family!r}")
    kernel, _, pairs = family.partition("+")
    return pairs == "pairs", kernel


class OnednnVerboseCapture:
    """``with OnednnVerboseCapture() as cap: ...; text = cap.read()``: oneDNN's verbose mode on, and this process's
    stdout (file descriptor 1, where oneDNN prints) sent to a temporary file for the block; :meth:`read` returns
    what was printed since the previous read. Imports torch. Python's own ``sys.stdout`` is flushed first and
    restored afterwards, so a report printed later is unaffected."""

    def __enter__(self) -> "OnednnVerboseCapture":
        import torch

        sys.stdout.flush()
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved_fd = os.dup(1)
        os.dup2(self._file.fileno(), 1)
        self._pos = 0
        self._verbose = torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON)
        self._verbose.__enter__()
        return self

    def read(self) -> str:
        self._file.flush()
        self._file.seek(self._pos)
        data = self._file.read()
        self._pos += len(data)
        return data.decode(errors="replace")

    def __exit__(self, *exc) -> None:
        try:
            self._verbose.__exit__(*exc)
        finally:
            sys.stdout.flush()
            os.dup2(self._saved_fd, 1)
            os.close(self._saved_fd)
            self._file.close()
