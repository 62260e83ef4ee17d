"""A small GGUF (version 3) writer with the F32, F16, Q8_0 and MXFP4 encoders.

A tensor is given as a NumPy array in row-major order, shape (..., n_0): GGUF's
ne is the reversed shape, so ne[0] = n_0 is the innermost (contiguous) size,
as ggml stores a PyTorch (out, in) weight as ne = [in, out].
"""
import struct

import numpy as np

ALIGN = 32
QK = 32

F32, F16, Q8_0, MXFP4 = 0, 1, 8, 39
TYPE_NAMES = {F32: "F32", F16: "F16", Q8_0: "Q8_0", MXFP4: "MXFP4"}

# GGUF metadata value types
_U32, _I32, _F32, _BOOL, _STR, _ARR = 4, 5, 6, 7, 8, 9

# E2M1 values doubled, as ggml keeps them (kvalues_mxfp4); scaled by 2^(e - 128)
MXFP4_VALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float32)


def quant_q8_0(x):
    """Blocks of 32: an F16 scale amax / 127, then 32 int8 values round(x / scale)."""
    b = x.astype(np.float32).reshape(-1, QK)
    amax = np.abs(b).max(axis=1)
    d = amax / 127.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.clip(np.trunc(b * inv[:, None] + np.copysign(0.5, b)), -127, 127).astype(np.int8)
    out = np.empty((b.shape[0], 2 + QK), np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.tobytes()


def quant_mxfp4(x):
    """Blocks of 32: an E8M0 exponent byte e, then 16 bytes of E2M1 codes, value j
    in the low nibble of byte j and value j + 16 in its high nibble; a value is
    MXFP4_VALUES[code] * 2^(e - 128).  e = floor(log2(amax)) - 2 + 127 and the
    nearest code (the first on a tie), as ggml's quantize_row_mxfp4_ref."""
    b = x.astype(np.float32).reshape(-1, QK)
    amax = np.abs(b).max(axis=1)
    e = np.zeros(b.shape[0], np.int32)
    nz = amax > 0
    e[nz] = np.floor(np.log2(amax[nz])).astype(np.int32) - 2 + 127
    e = np.clip(e, 0, 254)
    d = np.ldexp(np.float32(1.0), e - 128).astype(np.float32)
    codes = np.empty(b.shape, np.uint8)
    step = 1 << 14  # blocks per chunk, to bound the (blocks, 32, 16) error array
    for s in range(0, b.shape[0], step):
        cand = MXFP4_VALUES[None, None, :] * d[s:s + step, None, None]
        err = np.abs(cand - b[s:s + step, :, None])
        codes[s:s + step] = np.argmin(err, axis=2)
    out = np.empty((b.shape[0], 1 + QK // 2), np.uint8)
    out[:, 0] = e.astype(np.uint8)
    out[:, 1:] = codes[:, :QK // 2] | (codes[:, QK // 2:] << 4)
    return out.tobytes()


def dequant_mxfp4(x):
    """The values quant_mxfp4 stores for x (for measuring its error)."""
    blob = np.frombuffer(quant_mxfp4(x), np.uint8).reshape(-1, 1 + QK // 2)
    d = np.ldexp(np.float32(1.0), blob[:, 0].astype(np.int32) - 128).astype(np.float32)
    lo, hi = blob[:, 1:] & 15, blob[:, 1:] >> 4
    codes = np.concatenate([lo, hi], axis=1)
    return (MXFP4_VALUES[codes] * d[:, None]).reshape(x.shape)


def encode(x, ggml_type):
    if ggml_type == F32:
        return x.astype("<f4").tobytes()
    if ggml_type == F16:
        return x.astype("<f2").tobytes()
    if ggml_type == Q8_0:
        return quant_q8_0(x)
    if ggml_type == MXFP4:
        return quant_mxfp4(x)
    raise ValueError(f"unsupported type {ggml_type}")


def _str(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(kind, v):
    if kind == "u32":
        return struct.pack("<I", _U32) + struct.pack("<I", v)
    if kind == "i32":
        return struct.pack("<I", _I32) + struct.pack("<i", v)
    if kind == "f32":
        return struct.pack("<I", _F32) + struct.pack("<f", v)
    if kind == "bool":
        return struct.pack("<I", _BOOL) + struct.pack("<B", 1 if v else 0)
    if kind == "str":
        return struct.pack("<I", _STR) + _str(v)
    if kind == "arr_str":
        return struct.pack("<IIQ", _ARR, _STR, len(v)) + b"".join(_str(s) for s in v)
    if kind == "arr_i32":
        return struct.pack("<IIQ", _ARR, _I32, len(v)) + np.asarray(v, "<i4").tobytes()
    raise ValueError(f"unsupported metadata kind {kind}")


def write(path, kvs, tensors):
    """kvs: list of (key, kind, value); tensors: list of (name, array, ggml type)."""
    blobs = []
    infos = b""
    offset = 0
    for name, arr, t in tensors:
        if t in (Q8_0, MXFP4) and arr.shape[-1] % QK:
            raise ValueError(f"{name}: row of {arr.shape[-1]} is not a multiple of {QK}")
        data = encode(arr, t)
        ne = list(reversed(arr.shape))
        infos += _str(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        infos += struct.pack("<IQ", t, offset)
        pad = -len(data) % ALIGN
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    head += b"".join(_str(k) + _value(kind, v) for k, kind, v in kvs)
    head += infos
    head += b"\0" * (-len(head) % ALIGN)
    with open(path, "wb") as f:
        f.write(head)
        for b in blobs:
            f.write(b)
    return len(head) + offset
