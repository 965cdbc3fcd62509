"""The reference engines' expert tensors in vLLM's and SGLang's own layout (``--quant``), with
exact dequantisation.

Each MoE layer is a list of SEPARATE arrays, dim 0 = the local slots, named and shaped as vLLM
0.33 / SGLang 0.5.23 name and shape them (``../shared/ENGINES.md``, "How real engines store
experts"; I = ffn, H = hidden, E = slots of this rank, B = the fp8 block):

* ``none``: ``w13_weight [E, 2I, H]``, ``w2_weight [E, H, I]``, bf16 (numpy: its bits as u16).
* ``fp8-block`` (DeepSeek-V3/R1): fp8 e4m3 weights (bytes) of the same shapes, and fp32
  ``w13_weight_scale_inv [E, 2 ceil(I/B), ceil(H/B)]``, ``w2_weight_scale_inv [E, ceil(H/B), ceil(I/B)]``
  (B = 128 by default; the gate and the up half of w13 are blocked apart, as in vLLM).
* ``nvfp4``: packed e2m1 pairs (low nibble first) ``w13_weight [E, 2I, H/2]``, ``w2_weight [E, H, I/2]``
  u8; fp8 e4m3 block scales of 16 elements ``w13_weight_scale [E, 2I, H/16]`` (its rows padded:
  a row stride larger than the row, as SGLang pads on some devices), ``w2_weight_scale [E, H, I/16]``;
  per-expert fp32 ``w13_weight_scale_2 [E, 2]`` (gate, up) and ``w2_weight_scale_2 [E]``; and the
  GLOBAL fp32 ``w13_input_scale [E_global, 2]``, ``w2_input_scale [E_global]``, indexed by the
  logical expert, which must never move.

Exactness: every dequantised weight is an integer in [-7, 7] (``model.WMAX``): the quantised value
times its scales is exact in fp32 (fp8 and fp4 values of few significant bits times powers of
two), so the expert math of ``model.py`` (and the GPU engine's bf16 GEMMs with fp32 accumulation)
stays exact and the EP forward pass equals the reference bit for bit. ``none`` and ``fp8-block``
dequantise to the very weights of ``model.expert_weights``; ``nvfp4`` draws its weights from its
scales (every value a multiple of its block's scale), so they differ, from the same key
(seed, layer, expert). A scale left behind by a mover changes the dequantised weights: the
output check and the applied-bytes check both see it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

from . import model

QUANTS = ("none", "fp8-block", "nvfp4")
FP8_BLOCK = 128  # DeepSeek-V3's weight_block_size
NVFP4_GROUP = 16  # elements a fp8 block scale covers
NVFP4_SCALE_PAD = 32  # bytes of padding after each slot's w13_weight_scale row (row_stride > row_bytes)
SCALE_TAG = 1 << 21  # generator keys apart from model.py's
NVFP4_TAG = 1 << 22
INPUT_SCALE_TAG = 1 << 23


@dataclass(frozen=True)
class TensorLayout:
    """One tensor of a layer: ``shape`` is one slot's (per-expert) or the whole tensor's (global);
    ``dtype`` the contract's dtype name; ``np_dtype`` the storage; ``pad`` elements after each row."""

    name: str
    dtype: str
    np_dtype: np.dtype
    shape: Tuple[int, ...]
    kind: str = "expert"
    pad: int = 0

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.np_dtype).itemsize if self.kind == "expert" else 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_shape(quant: str, hidden: int, ffn: int, block: int = FP8_BLOCK) -> None:
    if quant not in QUANTS:
        raise ValueError(f"--quant {quant!r}: one of {', '.join(QUANTS)}")
    if quant == "fp8-block" and block < 1:
        raise ValueError(f"--fp8-block {block} must be >= 1")
    if quant == "nvfp4" and (hidden % NVFP4_GROUP or ffn % NVFP4_GROUP):
        raise ValueError(f"--quant nvfp4 needs hidden and ffn multiples of {NVFP4_GROUP} (got {hidden}, {ffn})")


def layout(quant: str, hidden: int, ffn: int, num_logical: int, block: int = FP8_BLOCK) -> List[TensorLayout]:
    """The tensors of one layer, in table order (per-expert ones first, then the globals)."""
    check_shape(quant, hidden, ffn, block)
    H, I = hidden, ffn
    u8, f32 = np.dtype("u1"), np.dtype("<f4")
    if quant == "none":
        return [TensorLayout("w13_weight", "bf16", np.dtype("<u2"), (2 * I, H)),
                TensorLayout("w2_weight", "bf16", np.dtype("<u2"), (H, I))]
    if quant == "fp8-block":
        return [TensorLayout("w13_weight", "f8e4m3", u8, (2 * I, H)),
                TensorLayout("w2_weight", "f8e4m3", u8, (H, I)),
                TensorLayout("w13_weight_scale_inv", "f32", f32, (2 * _cdiv(I, block), _cdiv(H, block))),
                TensorLayout("w2_weight_scale_inv", "f32", f32, (_cdiv(H, block), _cdiv(I, block)))]
    G = NVFP4_GROUP
    return [TensorLayout("w13_weight", "fp4x2", u8, (2 * I, H // 2)),
            TensorLayout("w2_weight", "fp4x2", u8, (H, I // 2)),
            TensorLayout("w13_weight_scale", "f8e4m3", u8, (2 * I, H // G), pad=NVFP4_SCALE_PAD),
            TensorLayout("w2_weight_scale", "f8e4m3", u8, (H, I // G)),
            TensorLayout("w13_weight_scale_2", "f32", f32, (2,)),
            TensorLayout("w2_weight_scale_2", "f32", f32, ()),
            TensorLayout("w13_input_scale", "f32", f32, (num_logical, 2), kind="global"),
            TensorLayout("w2_input_scale", "f32", f32, (num_logical,), kind="global")]


def expert_bytes(tensors: List[TensorLayout]) -> int:
    """Bytes that move with one expert: the sum of the per-expert rows."""
    return sum(t.row_bytes for t in tensors)


def alloc(t: TensorLayout, rows: int) -> np.ndarray:
    """A zeroed ``[rows, *shape]`` array; with ``pad``, a view of a padded allocation whose row
    stride is ``pad`` elements larger than the row."""
    n = int(np.prod(t.shape, dtype=np.int64))
    if not t.pad:
        return np.zeros((rows,) + t.shape, t.np_dtype)
    buf = np.zeros((rows, n + t.pad), t.np_dtype)
    it = buf.itemsize
    inner = tuple(int(np.prod(t.shape[i + 1 :], dtype=np.int64)) * it for i in range(len(t.shape)))
    return np.lib.stride_tricks.as_strided(buf, (rows,) + t.shape, ((n + t.pad) * it,) + inner)


# ---- number formats ------------------------------------------------------------------------


def _e4m3_values() -> np.ndarray:
    c = np.arange(256)
    e, m = (c >> 3) & 15, c & 7
    v = np.where(e == 0, m / 8.0 * 2.0**-6, (1.0 + m / 8.0) * 2.0 ** (e - 7.0))
    v = np.where(c & 0x80, -v, v)
    v[(c & 0x7F) == 0x7F] = np.nan
    return v.astype(np.float32)


E4M3 = _e4m3_values()  # code -> value (e4m3fn: no infinities, 0x7f / 0xff NaN)
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)  # code -> value


def e4m3_encode(v: np.ndarray) -> np.ndarray:
    """Codes of values that fp8 e4m3 holds exactly (raises otherwise)."""
    v = np.asarray(v, np.float32)
    pos = E4M3[:127]  # ascending
    idx = np.searchsorted(pos, np.abs(v))
    idx = np.minimum(idx, 126)
    if not np.array_equal(pos[idx], np.abs(v)):
        raise ValueError("a value fp8 e4m3 does not hold exactly")
    return (idx | np.where(v < 0, 0x80, 0)).astype(np.uint8)


def bf16_encode(v: np.ndarray) -> np.ndarray:
    """bf16 bits (u16) of float32 values that bf16 holds exactly (raises otherwise)."""
    b = np.ascontiguousarray(v, np.float32).view(np.uint32)
    if np.any(b & 0xFFFF):
        raise ValueError("a value bf16 does not hold exactly")
    return (b >> 16).astype(np.uint16)


def bf16_decode(u: np.ndarray) -> np.ndarray:
    return (u.astype(np.uint32) << 16).view(np.float32)


def fp4_pack(codes: np.ndarray) -> np.ndarray:
    """[..., 2n] e2m1 codes -> [..., n] bytes, element 2i in the low nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def fp4_unpack(packed: np.ndarray) -> np.ndarray:
    out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), np.uint8)
    out[..., 0::2] = packed & 15
    out[..., 1::2] = packed >> 4
    return out


# ---- generation: one expert's tensors from (seed, layer, expert) ----------------------------


def _block_index(n: int, half: int, b: int) -> np.ndarray:
    """Block row of each of n rows blocked apart in halves of ``half`` rows (w13: gate, up)."""
    r = np.arange(n)
    return (r // half) * _cdiv(half, b) + (r % half) // b


# e2m1 codes q with q * p an integer in [-7, 7], for the block scale products p of nvfp4.
_NVFP4_P = np.array([0.25, 0.5, 1.0, 2.0, 4.0], np.float32)
_ALLOWED = [np.array([c for c in range(16) if float(E2M1[c] * p).is_integer() and abs(E2M1[c] * p) <= model.WMAX
                      and not (c == 8)], np.uint8) for p in _NVFP4_P]
_ALLOWED_N = np.array([len(a) for a in _ALLOWED])
_ALLOWED_T = np.stack([np.pad(a, (0, 16 - len(a))) for a in _ALLOWED])


def nvfp4_codes(u: np.ndarray, p_idx: np.ndarray) -> np.ndarray:
    """e2m1 codes from uniforms ``u`` in [0, 1) and each element's index into _NVFP4_P."""
    k = np.minimum((u * _ALLOWED_N[p_idx]).astype(np.int64), _ALLOWED_N[p_idx] - 1)
    return _ALLOWED_T[p_idx, k]


def expert_tensors(quant: str, seed: int, layer: int, expert: int, shape: model.ModelShape,
                   block: int = FP8_BLOCK) -> Tuple[Dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(one expert's per-expert tensors by name, its dequantised w13 [H, 2I], w2 [I, H] float32):
    a pure function of (quant, seed, layer, expert)."""
    H, I = shape.hidden, shape.ffn
    if quant in ("none", "fp8-block"):
        w13, w2 = model.expert_weights(seed, layer, expert, shape)
        if quant == "none":
            return {"w13_weight": bf16_encode(w13.T), "w2_weight": bf16_encode(w2.T)}, w13, w2
        rng = np.random.default_rng([seed, layer, expert, SCALE_TAG])
        s13 = np.exp2(rng.integers(-2, 3, size=(2 * _cdiv(I, block), _cdiv(H, block)))).astype(np.float32)
        s2 = np.exp2(rng.integers(-2, 3, size=(_cdiv(H, block), _cdiv(I, block)))).astype(np.float32)
        q13 = e4m3_encode(w13.T / _expand(s13, 2 * I, H, I, block))
        q2 = e4m3_encode(w2.T / _expand(s2, H, I, H, block))
        return {"w13_weight": q13, "w2_weight": q2, "w13_weight_scale_inv": s13, "w2_weight_scale_inv": s2}, w13, w2
    if quant != "nvfp4":
        raise ValueError(f"unknown quant {quant!r}")
    G = NVFP4_GROUP
    rng = np.random.default_rng([seed, layer, expert, NVFP4_TAG])
    sc2_13 = np.exp2(rng.integers(-1, 2, size=2)).astype(np.float32)  # gate, up
    sc2_2 = np.float32(np.exp2(rng.integers(-1, 2)))
    bs13 = np.exp2(rng.integers(-1, 2, size=(2 * I, H // G))).astype(np.float32)
    bs2 = np.exp2(rng.integers(-1, 2, size=(H, I // G))).astype(np.float32)
    out: Dict[str, np.ndarray] = {}
    deq = []
    for name, bs, sc2_rows, (n, k) in (("w13", bs13, np.repeat(sc2_13, I), (2 * I, H)), ("w2", bs2, np.full(H, sc2_2), (H, I))):
        p = np.repeat(bs, G, axis=1) * sc2_rows[:, None]  # [n, k]: block scale x scale_2
        p_idx = np.searchsorted(_NVFP4_P, p)
        codes = nvfp4_codes(rng.random((n, k)), p_idx)
        out[f"{name}_weight"] = fp4_pack(codes)
        out[f"{name}_weight_scale"] = e4m3_encode(bs)
        deq.append((E2M1[codes] * p).astype(np.float32))
    out["w13_weight_scale_2"] = sc2_13
    out["w2_weight_scale_2"] = np.asarray(sc2_2, np.float32)
    return out, np.ascontiguousarray(deq[0].T), np.ascontiguousarray(deq[1].T)


def global_tensors(quant: str, seed: int, layer: int, num_logical: int) -> Dict[str, np.ndarray]:
    """The layer's global tensors (nvfp4: the activations' input scales, powers of two a logical
    expert), a pure function of (seed, layer)."""
    if quant != "nvfp4":
        return {}
    rng = np.random.default_rng([seed, layer, INPUT_SCALE_TAG])
    return {"w13_input_scale": np.exp2(rng.integers(-1, 2, size=(num_logical, 2))).astype(np.float32),
            "w2_input_scale": np.exp2(rng.integers(-1, 2, size=num_logical)).astype(np.float32)}


def _expand(s: np.ndarray, n: int, k: int, half: int, b: int) -> np.ndarray:
    """Block scales [n_blocks, k_blocks] -> [n, k] (rows blocked apart in halves of ``half``)."""
    return s[_block_index(n, half, b)][:, np.arange(k) // b]


# ---- dequantisation: a layer's slots -> the model's float32 weights --------------------------


def dequant(quant: str, views: Dict[str, np.ndarray], slots: np.ndarray, shape: model.ModelShape,
            block: int = FP8_BLOCK) -> Tuple[np.ndarray, np.ndarray]:
    """(w13 [n, H, 2I], w2 [n, I, H]) float32 of the local ``slots`` from the layer's per-expert
    tensors ``views`` (name -> [slots_per_rank, ...]), exact."""
    H, I = shape.hidden, shape.ffn
    if quant == "none":
        w13 = bf16_decode(views["w13_weight"][slots])
        w2 = bf16_decode(views["w2_weight"][slots])
    elif quant == "fp8-block":
        r13, c13 = _block_index(2 * I, I, block), np.arange(H) // block
        r2, c2 = _block_index(H, H, block), np.arange(I) // block
        s13 = views["w13_weight_scale_inv"][slots][:, r13][:, :, c13]
        s2 = views["w2_weight_scale_inv"][slots][:, r2][:, :, c2]
        w13 = E4M3[views["w13_weight"][slots]] * s13
        w2 = E4M3[views["w2_weight"][slots]] * s2
    else:
        G = NVFP4_GROUP
        sc13 = np.repeat(views["w13_weight_scale_2"][slots], I, axis=1)  # [n, 2I]
        sc2 = views["w2_weight_scale_2"][slots]  # [n]
        w13 = (E2M1[fp4_unpack(views["w13_weight"][slots])] * np.repeat(E4M3[views["w13_weight_scale"][slots]], G, axis=2)
               * sc13[:, :, None])
        w2 = (E2M1[fp4_unpack(views["w2_weight"][slots])] * np.repeat(E4M3[views["w2_weight_scale"][slots]], G, axis=2)
              * sc2[:, None, None])
    return w13.transpose(0, 2, 1).astype(np.float32), w2.transpose(0, 2, 1).astype(np.float32)
