"""NF4 (4-bit NormalFloat) weights, byte-for-byte compatible with bitsandbytes.

This module is the format: the codebook, the pure-torch reference quantizer and
dequantizer (vectorised, any device), and ``NF4Weight``, the container every
NF4 kernel in fastpeft reads (Triton, CUDA C++, CPU C++). Facts (``docs/architecture.md``, "NF4 and bitsandbytes"):

- a weight of ``numel`` elements is flattened row-major and cut into blocks of
  ``blocksize`` consecutive elements, each scaled by its fp32 ``absmax``;
- element ``2j`` is the high nibble of byte ``j``; packed shape ``(ceil(numel/2), 1)``;
- quantize: ``x * (1/absmax)`` clamped to [-1, 1], nearest code, ties (a value
  exactly on an fp32 midpoint) go to the lower code;
- dequantize: ``dtype(code[nibble] * absmax)``, one fp32 multiply;
- double quantization stores ``absmax - mean(absmax)`` as 8-bit indices into the
  signed dynamic map, in blocks of 256 with their own fp32 absmax ("nested").

bitsandbytes quirks that are reproduced on purpose because the bytes must match:
a trailing partial block is scaled by a division (not a reciprocal multiply) and
its stored absmax is clamped to 1e-38; with odd numel the spare low nibble of
the last byte holds the code of 0.0 (7); the nested 8-bit quantizer snaps
values to a 65536-point grid and reads the code from a lookup table, which is
not always the exactly nearest code.
"""
from __future__ import annotations

import json
import math
from typing import Optional

import torch
from torch import Tensor

NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NESTED_BLOCKSIZE = 256
VALID_BLOCKSIZES = tuple(2 ** p for p in range(6, 13))  # 64 .. 4096
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_SMALLEST_SCALE = 1e-38  # bitsandbytes' floor for a block scale


def nf4_code(device=None) -> Tensor:
    """The 16 NF4 code values, fp32, ascending."""
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)


def nf4_midpoints(device=None) -> Tensor:
    """The 15 fp32 decision thresholds between adjacent NF4 codes."""
    code = nf4_code(device)
    return (code[:-1] + code[1:]) / 2


def signed_dynamic_map(device=None) -> Tensor:
    """bitsandbytes' signed 8-bit dynamic quantization map (256 fp32 values, ascending).

    Seven decades ``10^-6 .. 10^0``; decade ``i`` holds ``2^i`` values, the
    midpoints of ``2^i + 1`` evenly spaced points in [0.1, 1], each with both
    signs; plus 0 and 1. The arithmetic is fp32, as in bitsandbytes.
    """
    positives = []
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2 ** i + 1, dtype=torch.float32)
        centers = (edges[:-1] + edges[1:]) / 2.0
        positives.append((10.0 ** (i - 6)) * centers)
    pos = torch.cat(positives)
    values = torch.cat([pos, -pos, torch.tensor([0.0, 1.0])])
    return torch.sort(values).values.to(device)


def check_blocksize(blocksize, name: str = "blocksize") -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{name} must be an int, got {type(blocksize).__name__}")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"{name} must be a power of two in [64, 4096], got {blocksize}")
    return blocksize


def check_double_quant(double_quant, name: str = "double_quant") -> bool:
    if not isinstance(double_quant, bool):
        raise TypeError(f"{name} must be a bool, got {type(double_quant).__name__} {double_quant!r}")
    return double_quant


def double_quant_offset(absmax: Tensor) -> Tensor:
    """The mean block scale that double quantization subtracts (torch's mean, as bitsandbytes).

    A NaN or infinite weight makes its block scale non-finite and the mean with it;
    bitsandbytes then stores a NaN offset, so every block of the weight dequantizes
    to NaN. Refused here instead, naming the cause.
    """
    offset = absmax.mean()
    if not torch.isfinite(offset):
        bad = int((~torch.isfinite(absmax)).sum())
        raise ValueError(f"weight has NaN or infinite values ({bad} of {absmax.numel()} blocks): double "
                         "quantization of the block scales would make every block NaN; quantize with "
                         "double_quant=False (only the affected blocks are non-finite) or clean the weight")
    return offset


def num_blocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)


# ---------------------------------------------------------------------------
# Reference quantizers (pure torch, vectorised)
# ---------------------------------------------------------------------------

def _blockwise_absmax_and_scaled(flat: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """fp32 ``flat`` -> (absmax per block, values scaled into [-1, 1]) as bitsandbytes does."""
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].view(-1, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=_SMALLEST_SCALE)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().amax().clamp(min=_SMALLEST_SCALE)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return absmax, scaled


def pack_nibbles(indices: Tensor) -> Tensor:
    """4-bit indices (any int dtype, flat) -> uint8 ``(ceil(n/2), 1)``, first element in the high nibble."""
    idx = indices.reshape(-1).to(torch.uint8)
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_zeros(1)])
    return ((idx[0::2] << 4) | idx[1::2]).unsqueeze(1)


def unpack_nibbles(packed: Tensor, numel: int) -> Tensor:
    """uint8 packed bytes -> int64 indices, flat, ``numel`` long."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:numel].long()


def quantize_nf4_reference(weight: Tensor, blocksize: int = 64) -> tuple[Tensor, Tensor]:
    """(packed uint8 ``(ceil(numel/2), 1)``, absmax fp32 ``[nblocks]``), bytes equal to bitsandbytes'."""
    flat = weight.reshape(-1).float()
    absmax, scaled = _blockwise_absmax_and_scaled(flat, blocksize)
    if scaled.numel() % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])  # the spare nibble holds the code of 0.0
    # bucketize (right=False) counts thresholds strictly below the value.
    indices = torch.bucketize(scaled, nf4_midpoints(flat.device))
    return pack_nibbles(indices), absmax


_LUT_SIZE = 65536


def dynamic_lookup_table(code: Tensor) -> Tensor:
    """bitsandbytes' 65536-entry table from a grid on [-1, 1] to the nearest of 256 sorted codes.

    Entry ``i`` stands for ``v_i = -1 + 2i/65535`` (fp32) and holds the number of
    fp32 code midpoints strictly below ``v_i``.
    """
    midpoints = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(_LUT_SIZE, dtype=torch.float32, device=code.device)
    grid = -1.0 + (2.0 * i) / float(_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, grid, right=False)


def quantize_dynamic_reference(values: Tensor, code: Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[Tensor, Tensor]:
    """Blockwise 8-bit quantization of ``values`` against a sorted 256-entry ``code``, as bitsandbytes' CPU kernel.

    Returns (uint8 indices, fp32 absmax per block). Each value is multiplied by
    ``1/absmax`` of its block, snapped to the 65536-point grid of
    ``dynamic_lookup_table`` (round half up) and looked up there, so the result
    is the nearest code up to the grid's resolution. A block whose absmax is 0
    stores index 0 everywhere.

    Non-finite values, as bitsandbytes' CPU quantizer: the absmax ignores NaN
    (0 for an all-NaN block), a NaN stores index 0, and an infinite absmax
    scales every finite value to 0 (inf itself becomes NaN: index 0).
    """
    flat = values.reshape(-1).float()
    n = flat.numel()
    nb = num_blocks(n, blocksize)
    padded = torch.cat([flat, flat.new_zeros(nb * blocksize - n)]).view(nb, blocksize)
    magnitude = padded.abs()
    absmax = torch.where(magnitude.isnan(), 0.0, magnitude).amax(dim=1)  # zero padding never exceeds a real |x|
    inv = 1.0 / torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    normed = (padded * inv.unsqueeze(1)).clamp(-1.0, 1.0)
    grid_index = ((normed + 1.0) * 0.5 * float(_LUT_SIZE - 1) + 0.5)
    grid_index = torch.where(grid_index.isnan(), 0.0, grid_index).long().clamp(0, _LUT_SIZE - 1)
    indices = dynamic_lookup_table(code)[grid_index]
    indices = torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(indices), indices)
    return indices.reshape(-1)[:n].to(torch.uint8), absmax


def dequantize_nested_absmax(qabsmax: Tensor, nested_absmax: Tensor, nested_code: Tensor, offset: float) -> Tensor:
    """fp32 block scales from double quantization: ``fp32(code2[q] * absmax2[i // 256]) + offset``."""
    idx = qabsmax.reshape(-1).long()
    group = torch.arange(idx.numel(), device=idx.device) // NESTED_BLOCKSIZE
    scaled = nested_code[idx] * nested_absmax[group]
    return scaled + torch.tensor(offset, dtype=torch.float32, device=scaled.device)


def dequantize_nf4_reference(packed: Tensor, absmax_fp32: Tensor, shape, blocksize: int, dtype: torch.dtype) -> Tensor:
    """``dtype(code[nibble] * absmax[block])`` reshaped to ``shape``."""
    numel = 1
    for s in shape:
        numel *= int(s)
    values = nf4_code(packed.device)[unpack_nibbles(packed, numel)]
    scale = absmax_fp32.repeat_interleave(blocksize)[:numel]
    return (values * scale).to(dtype).reshape(shape)


def nf4_matmul_reference(x: Tensor, weight: "NF4Weight", bias: Optional[Tensor] = None) -> Tensor:
    """``x @ dequant(W)ᵀ (+ bias)`` with W dequantized to x's dtype: the unfused torch baseline."""
    return torch.nn.functional.linear(x, weight.dequantize(x.dtype), bias)


def nf4_matmul_transposed_reference(dy: Tensor, weight: "NF4Weight") -> Tensor:
    """``dy @ dequant(W)`` (the input gradient of ``x @ Wᵀ``) with W dequantized to dy's dtype."""
    return dy @ weight.dequantize(dy.dtype)


# ---------------------------------------------------------------------------
# Container
# ---------------------------------------------------------------------------

class NF4Weight:
    """An NF4-quantized weight in bitsandbytes' layout (see module docstring).

    Fields: ``packed`` (uint8 ``(ceil(numel/2), 1)``), ``shape``, ``dtype``
    (the original weight dtype), ``blocksize``, ``absmax`` (fp32 ``[nblocks]``,
    or uint8 with double quantization), ``nested_absmax`` (fp32
    ``[ceil(nblocks/256)]``), ``nested_code`` (fp32 ``[256]``), ``offset``
    (float), ``code`` (fp32 ``[16]``).
    """

    def __init__(self, packed: Tensor, shape, dtype: torch.dtype, blocksize: int, absmax: Tensor,
                 nested_absmax: Optional[Tensor] = None, nested_code: Optional[Tensor] = None,
                 offset: Optional[float] = None, code: Optional[Tensor] = None):
        self.shape = _check_shape(shape)
        self.blocksize = check_blocksize(blocksize)
        if dtype not in WEIGHT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.dtype = dtype
        numel = self.shape.numel()
        nb = num_blocks(numel, self.blocksize)

        _check_tensor_arg("packed", packed, torch.uint8)
        if packed.numel() != (numel + 1) // 2:
            raise ValueError(f"packed has {packed.numel()} bytes; shape {tuple(self.shape)} needs {(numel + 1) // 2}")
        self.packed = packed.reshape(-1, 1)
        device = packed.device

        double_quant = nested_absmax is not None or nested_code is not None or offset is not None
        if double_quant and (nested_absmax is None or nested_code is None or offset is None):
            raise ValueError("double quantization needs all of nested_absmax, nested_code and offset")
        _check_tensor_arg("absmax", absmax, torch.uint8 if double_quant else torch.float32, device)
        if absmax.numel() != nb:
            raise ValueError(f"absmax has {absmax.numel()} entries; shape {tuple(self.shape)} with "
                             f"blocksize {self.blocksize} has {nb} blocks")
        self.absmax = absmax.reshape(-1)
        if double_quant:
            n2 = num_blocks(nb, NESTED_BLOCKSIZE)
            _check_tensor_arg("nested_absmax", nested_absmax, torch.float32, device)
            if nested_absmax.numel() != n2:
                raise ValueError(f"nested_absmax has {nested_absmax.numel()} entries; {nb} blocks need {n2}")
            _check_tensor_arg("nested_code", nested_code, torch.float32, device)
            if nested_code.numel() != 256:
                raise ValueError(f"nested_code must have 256 entries, got {nested_code.numel()}")
            offset = float(offset)
            if offset != offset or offset in (float("inf"), float("-inf")):
                raise ValueError(f"offset must be finite, got {offset}")
            nested_absmax, nested_code = nested_absmax.reshape(-1), nested_code.reshape(-1)
        self.nested_absmax = nested_absmax
        self.nested_code = nested_code
        self.offset = offset

        if code is None:
            code = nf4_code(device)
        _check_tensor_arg("code", code, torch.float32, device)
        if code.numel() != 16 or (code.device.type != "meta" and not torch.equal(code.reshape(-1).cpu(), nf4_code())):
            raise ValueError("code must be the 16-entry NF4 codebook (other 4-bit maps such as fp4 are not supported)")
        self.code = code.reshape(-1)
        self._absmax_float: Optional[Tensor] = None

    # -- construction -------------------------------------------------------
    @classmethod
    def from_float(cls, weight: Tensor, blocksize: int = 64, double_quant: bool = False) -> "NF4Weight":
        """Quantize a float weight with the pure-torch reference (bytes equal to bitsandbytes')."""
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dtype not in WEIGHT_DTYPES:
            raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
        if weight.dim() == 0 or weight.numel() == 0:
            raise ValueError(f"weight must be a non-empty tensor with at least one dimension, got shape {tuple(weight.shape)}")
        check_blocksize(blocksize)
        check_double_quant(double_quant)
        packed, absmax = quantize_nf4_reference(weight.detach(), blocksize)
        if not double_quant:
            return cls(packed, weight.shape, weight.dtype, blocksize, absmax)
        offset = double_quant_offset(absmax)
        nested_code = signed_dynamic_map(absmax.device)
        qabsmax, nested_absmax = quantize_dynamic_reference(absmax - offset, nested_code)
        return cls(packed, weight.shape, weight.dtype, blocksize, qabsmax,
                   nested_absmax=nested_absmax, nested_code=nested_code, offset=float(offset))

    @classmethod
    def from_bnb(cls, obj) -> "NF4Weight":
        """Wrap a quantized bitsandbytes ``Params4bit`` (or a ``Linear4bit``'s weight); no re-quantization."""
        param = getattr(obj, "weight", obj) if not isinstance(obj, Tensor) else obj
        state = getattr(param, "quant_state", None)
        if state is None:
            raise ValueError("obj has no quant_state: pass a quantized bitsandbytes Params4bit or Linear4bit "
                             "(move it to a device first so that bitsandbytes quantizes it)")
        if state.quant_type != "nf4":
            raise ValueError(f"obj is quantized as {state.quant_type!r}; only 'nf4' is supported")
        packed = param.data if isinstance(param, Tensor) else param
        packed = _as_uint8_bytes(packed)
        if state.nested:
            s2 = state.state2
            if s2.blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"nested blocksize {s2.blocksize} is not supported (only {NESTED_BLOCKSIZE})")
            return cls(packed, state.shape, state.dtype, state.blocksize, state.absmax,
                       nested_absmax=s2.absmax.float(), nested_code=s2.code.float(),
                       offset=float(state.offset), code=state.code.float())
        return cls(packed, state.shape, state.dtype, state.blocksize, state.absmax.float(), code=state.code.float())

    @classmethod
    def from_bnb_state_dict(cls, state_dict: dict, prefix: str = "weight") -> "NF4Weight":
        """Read the entries a bitsandbytes ``Linear4bit`` saves under ``prefix`` (``docs/architecture.md``)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_keys = [k for k in state_dict if k.startswith(prefix + ".quant_state.bitsandbytes__")]
        if not state_keys:
            raise KeyError(f"state_dict has no '{prefix}.quant_state.bitsandbytes__nf4' entry")
        if len(state_keys) > 1:
            raise ValueError(f"state_dict has several quant_state entries under {prefix!r}: {state_keys}")
        kind = state_keys[0].rsplit("__", 1)[1]
        if kind != "nf4":
            raise ValueError(f"state_dict entry {state_keys[0]!r} holds quant_type {kind!r}; only 'nf4' is supported")
        meta = _read_quant_state_blob(state_keys[0], state_dict[state_keys[0]])
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"quant_state quant_type is {meta.get('quant_type')!r}; only 'nf4' is supported")

        def need(key):
            full = f"{prefix}.{key}" if key else prefix
            if full not in state_dict:
                raise KeyError(f"state_dict is missing {full!r}")
            return state_dict[full]

        dtype = getattr(torch, str(meta["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"quant_state dtype {meta['dtype']!r} is not a torch dtype")
        packed = _as_uint8_bytes(need(""))
        code = need("quant_map").float()
        if "nested_offset" in meta or f"{prefix}.nested_absmax" in state_dict:
            if meta.get("nested_blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE:
                raise ValueError(f"nested_blocksize {meta['nested_blocksize']} is not supported (only {NESTED_BLOCKSIZE})")
            offset = meta.get("nested_offset")
            if isinstance(offset, bool) or not isinstance(offset, (int, float)):
                raise ValueError(f"state_dict entry {state_keys[0]!r}: nested tensors need a numeric nested_offset, "
                                 f"got {offset!r}")
            return cls(packed, meta["shape"], dtype, meta["blocksize"], need("absmax"),
                       nested_absmax=need("nested_absmax").float(), nested_code=need("nested_quant_map").float(),
                       offset=float(offset), code=code)
        return cls(packed, meta["shape"], dtype, meta["blocksize"], need("absmax"), code=code)

    # -- views --------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def num_blocks(self) -> int:
        return self.absmax.numel()

    def absmax_float(self) -> Tensor:
        """fp32 ``[nblocks]`` scales, exactly those bitsandbytes dequantizes with (cached)."""
        if self._absmax_float is None:
            if self.double_quant:
                self._absmax_float = dequantize_nested_absmax(self.absmax, self.nested_absmax, self.nested_code, self.offset)
            else:
                self._absmax_float = self.absmax
        return self._absmax_float

    # -- the matmul kernels' layout ------------------------------------------
    @staticmethod
    def check_packed_layout(packed, absmax, code, n: int, k: int, blocksize: int, name: str = "") -> None:
        """The layout every NF4 matmul kernel reads (Triton, native CPU), for an ``[n, k]`` weight in parts.

        Each quantization block lies inside one row (``k`` a multiple of an
        even ``blocksize``); ``packed`` is contiguous uint8 with ``n·k/2``
        bytes, ``absmax`` contiguous fp32 with one scale per block, ``code``
        contiguous fp32 with 16 values. A wrong dtype raises TypeError, a wrong
        size or layout ValueError, naming the argument (``name.packed`` when
        ``name`` is given). The launchers run it on their arguments, the ops on
        a weight (``check_matmul_layout``), so the kernels never read past a
        buffer.
        """
        prefix = f"{name}." if name else ""
        if blocksize <= 0 or blocksize % 2 or k % blocksize:
            raise ValueError(f"{name or 'weight'}: in_features={k} is not divisible by blocksize={blocksize}: it must "
                             "be a multiple of blocksize (an even number), so that every quantization block lies "
                             "inside one row (re-quantize with a blocksize dividing it)")
        for part, value, dtype, count in (("packed", packed, torch.uint8, n * k // 2),
                                          ("absmax", absmax, torch.float32, n * k // blocksize),
                                          ("code", code, torch.float32, 16)):
            if not isinstance(value, Tensor) or value.dtype != dtype:
                got = getattr(value, "dtype", type(value).__name__)
                raise TypeError(f"{prefix}{part} must be a {dtype} tensor, got {got}")
            if value.numel() != count:
                what = "bytes" if part == "packed" else "values"
                raise ValueError(f"{prefix}{part} has {value.numel()} {what}; a [{n}, {k}] weight with blocksize "
                                 f"{blocksize} needs {count} (the quantization state does not match the weight)")
            if not value.is_contiguous():
                raise ValueError(f"{prefix}{part} must be contiguous")

    def check_matmul_layout(self, name: str = "w") -> None:
        """This weight as the NF4 matmul kernels read it: 2-D ``[out_features, in_features]``, then
        ``check_packed_layout`` of its packed bytes, fp32 block scales and codebook."""
        if len(self.shape) != 2:
            raise ValueError(f"{name} must be a 2-D [out_features, in_features] weight, got shape {tuple(self.shape)}")
        n, k = self.shape
        packed = self.packed.reshape(-1) if isinstance(self.packed, Tensor) else self.packed
        NF4Weight.check_packed_layout(packed, self.absmax_float(), self.code, n, k, self.blocksize, name)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The weight in ``dtype`` (default: the original dtype), equal to bitsandbytes' dequantize_4bit."""
        dtype = self.dtype if dtype is None else dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        return dequantize_nf4_reference(self.packed, self.absmax_float(), self.shape, self.blocksize, dtype)

    def to(self, device) -> "NF4Weight":
        device = torch.device(device)
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Weight(move(self.packed), self.shape, self.dtype, self.blocksize, move(self.absmax),
                         move(self.nested_absmax), move(self.nested_code), self.offset, move(self.code))

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, Tensor]:
        """The entries (names, dtypes, bytes) a bitsandbytes ``Linear4bit`` writes for this weight."""
        out = {prefix: self.packed, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.code}
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _DTYPE_NAMES[self.dtype],
                "shape": list(self.shape)}
        if self.double_quant:
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = self.nested_code.clone()
            meta.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
                         "nested_offset": self.offset})
        blob = json.dumps(meta).encode("utf-8")
        out[f"{prefix}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}{dq}, "
                f"device={self.device})")


_QUANT_STATE_KEYS = ("quant_type", "blocksize", "dtype", "shape")


def _read_quant_state_blob(key: str, blob) -> dict:
    """The JSON dict bitsandbytes stores as uint8 bytes under ``key``; ValueError naming ``key`` if corrupted."""
    if not isinstance(blob, Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError(f"state_dict entry {key!r} must be a 1-D uint8 tensor (bitsandbytes' JSON quant state), "
                         f"got {getattr(blob, 'dtype', type(blob).__name__)}")
    try:
        meta = json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"state_dict entry {key!r} is not a valid bitsandbytes quant state (JSON): {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"state_dict entry {key!r} must hold a JSON object, got {type(meta).__name__}")
    missing = [k for k in _QUANT_STATE_KEYS if k not in meta]
    if missing:
        raise ValueError(f"state_dict entry {key!r} lacks {missing}")
    return meta


def _check_shape(shape) -> torch.Size:
    """A torch.Size of positive sizes whose element count fits int64 (torch's ``numel`` would wrap, e.g. to 0,
    and a wrapped count would let a tiny ``packed`` pass for a huge weight)."""
    try:
        dims = [int(s) for s in shape]
    except (TypeError, ValueError):
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from None
    if len(dims) == 0 or any(s <= 0 for s in dims):
        raise ValueError(f"shape must have at least one dimension and positive sizes, got {tuple(dims)}")
    numel = math.prod(dims)
    if numel > torch.iinfo(torch.int64).max:
        raise ValueError(f"shape {tuple(dims)} has {numel} elements, more than an int64 can count "
                         "(no tensor of that size can be allocated)")
    return torch.Size(dims)


def _check_tensor_arg(name: str, t, dtype: torch.dtype, device=None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but packed is on {device}")


def _as_uint8_bytes(t: Tensor) -> Tensor:
    """bitsandbytes may store the packed bytes in another dtype (quant_storage): view them as uint8."""
    if not isinstance(t, Tensor):
        raise TypeError(f"packed weight must be a torch.Tensor, got {type(t).__name__}")
    flat = t.detach().as_subclass(Tensor).reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
