"""The integer product at the heart of a quantized Linear: uint8 activations times int8 weights, int32 sums.

    acc_i32[m, n] = sum_k x_u8[m, k] * w_i8[n, k]                                            (eq. M1)

Every product fits in 16 bits (255 * -128 .. 255 * 127) and fbgemm sums them in int32, which wraps on
overflow (only possible for K > 65,793 at full range).

Matches: pytorch/FBGEMM src/RefImplementations.cc (matmul_u8i8acc32_ref).

CPUs without VNNI (plain AVX2 / AVX-512) multiply with ``vpmaddubsw``, which adds each pair of neighbouring
products (k = 2j, 2j + 1) and saturates that pair sum to int16 before it reaches the int32 accumulator:

    acc_i32[m, n] = sum_j sat16(x[m, 2j] * w[n, 2j] + x[m, 2j+1] * w[n, 2j+1])               (eq. M2)

Matches: pytorch/FBGEMM src/GenerateKernelU8S8S32ACC32.cc (vpmaddubsw, then vpmaddwd with ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PackedWeightS8:
    """An (N, K) int8 weight prepared once for repeated products (the analogue of fbgemm's PackBMatrix)."""

    w_i8: np.ndarray  # (N, K) int8, C-contiguous

    @property
    def shape(self) -> tuple[int, int]:
        return self.w_i8.shape


def pack_weight_s8(w_i8: np.ndarray) -> PackedWeightS8:
    """Prepare an (N, K) int8 weight for :func:`matmul_u8s8_acc32`."""
    return PackedWeightS8(np.ascontiguousarray(w_i8, dtype=np.int8))


def matmul_u8s8_acc32_ref(x_u8: np.ndarray, w_i8: np.ndarray) -> np.ndarray:
    """Readable reference of eq. M1: (M, K) uint8 x (N, K) int8 -> (M, N) int32, wrapping like int32."""
    x_i64 = x_u8.astype(np.int64)
    w_i64 = w_i8.astype(np.int64)
    acc_i64 = x_i64 @ w_i64.T  # exact: |sum| < 2^63 for any K numpy can hold
    return acc_i64.astype(np.int32)  # int64 -> int32 keeps the low 32 bits: the wrap fbgemm's int32 adds give


def matmul_u8s8_acc32_sat16_ref(x_u8: np.ndarray, w_i8: np.ndarray) -> np.ndarray:
    """Readable reference of eq. M2: products summed in pairs (2j, 2j+1), each pair sum saturated to int16."""
    M, K = x_u8.shape
    N = w_i8.shape[0]
    if K % 2:  # fbgemm pads K with zeros to its interleave width; a zero product changes no pair sum
        x_u8 = np.concatenate([x_u8, np.zeros((M, 1), np.uint8)], axis=1)
        w_i8 = np.concatenate([w_i8, np.zeros((N, 1), np.int8)], axis=1)
    x_i32 = x_u8.astype(np.int32)
    w_i32 = w_i8.astype(np.int32)
    acc_i64 = np.zeros((M, N), np.int64)
    for j in range(0, x_i32.shape[1], 2):
        pair_i32 = np.outer(x_i32[:, j], w_i32[:, j]) + np.outer(x_i32[:, j + 1], w_i32[:, j + 1])
        acc_i64 += np.clip(pair_i32, -32768, 32767)  # vpmaddubsw: saturate the pair sum to int16
    return acc_i64.astype(np.int32)


def matmul_u8s8_acc32(x_u8: np.ndarray, w: np.ndarray | PackedWeightS8, *,
                      saturate_int16_pairs: bool = False) -> np.ndarray:
    """(M, K) uint8 x (N, K) int8 weight (raw or packed) -> (M, N) int32 accumulators (eq. M1, or M2)."""
    w_i8 = w.w_i8 if isinstance(w, PackedWeightS8) else w
    if saturate_int16_pairs:
        return matmul_u8s8_acc32_sat16_ref(x_u8, w_i8)
    return matmul_u8s8_acc32_ref(x_u8, w_i8)
