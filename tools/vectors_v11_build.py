"""Building blocks of the v1.1 conformance vectors: safetensors bytes, the base model, module builders.

numpy only, written from spec/: each builder stores a module's tensors and records its expected ΔW,
evaluated in float64 on the stored (decoded) values. Used by tools/make_conformance_vectors_v11.py.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "spec"))
from independent_delta import weight_fingerprint  # noqa: E402
from spec_philox import basis_fingerprint, philox_basis  # noqa: E402


# ------------------------------------------------------------------ values and bytes
def rand(tag: str, shape, scale: float = 1.0) -> np.ndarray:
    """Deterministic U[-1, 1) values (Philox4x32-10 v1, seed from the tag) times ``scale``, float64."""
    seed = int.from_bytes(hashlib.sha256(tag.encode()).digest()[:8], "little")
    count = math.prod(shape)
    return philox_basis(seed, 0, count).astype(np.float64).reshape(shape) * scale


def encode(dtype: str, values: np.ndarray) -> bytes:
    """Little-endian bytes of ``values`` stored as ``dtype`` (floats round to nearest even)."""
    if dtype == "BF16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = (bits + np.uint64(0x7FFF) + ((bits >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
        return rounded.astype("<u2").tobytes()
    kinds = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I8": "<i1", "BOOL": "<u1", "I32": "<i4"}
    return np.ascontiguousarray(values).astype(kinds[dtype]).tobytes()


def decode64(dtype: str, raw: bytes, shape) -> np.ndarray:
    """Stored bytes back to float64, exactly."""
    if dtype == "BF16":
        bits = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64).reshape(shape)
    return np.frombuffer(raw, {"F64": "<f8", "F32": "<f4", "F16": "<f2"}[dtype]).astype(np.float64).reshape(shape)


class Tensor:
    """A tensor to write: dtype, shape and raw bytes."""

    def __init__(self, dtype: str, values: np.ndarray, raw: bytes | None = None):
        self.dtype, self.shape = dtype, list(np.shape(values))
        self.raw = encode(dtype, values) if raw is None else raw

    def f64(self) -> np.ndarray:
        return decode64(self.dtype, self.raw, self.shape)


def header_entries(tensors: dict[str, Tensor]) -> list[tuple[str, dict]]:
    entries, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        entries.append((name, {"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + len(t.raw)]}))
        offset += len(t.raw)
    return entries


def container(tensors: dict[str, Tensor], metadata: dict[str, str], entries=None, data=None,
              header_text=None) -> bytes:
    """safetensors bytes: u64 length, JSON header padded with spaces to a multiple of 8, data."""
    entries = header_entries(tensors) if entries is None else entries
    if header_text is None:
        parts = [json.dumps("__metadata__") + ":" + json.dumps(metadata, sort_keys=True, separators=(",", ":"))]
        parts += [json.dumps(k) + ":" + json.dumps(v, separators=(",", ":")) for k, v in entries]
        header_text = "{" + ",".join(parts) + "}"
    header = header_text.encode()
    header += b" " * (-len(header) % 8)
    if data is None:
        data = b"".join(tensors[name].raw for name in sorted(tensors))
    return struct.pack("<Q", len(header)) + header + data


def manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False)


def metadata_for(manifest: dict | str, version: str = "1.1") -> dict[str, str]:
    text = manifest if isinstance(manifest, str) else manifest_text(manifest)
    return {"adapterfmt.format": "adapterfmt", "adapterfmt.manifest": text, "adapterfmt.version": version,
            "format": "pt"}


# ------------------------------------------------------------------ the base model
BASE = {
    "model.q_proj.weight": Tensor("F32", rand("base q", (8, 6))),
    "model.v_proj.weight": Tensor("F32", rand("base v", (4, 6))),
    "model.o_proj.weight": Tensor("BF16", rand("base o", (6, 8))),
    "model.c_attn.weight": Tensor("F32", rand("base c_attn", (6, 12))),     # Conv1D: stored (in, out)
    "model.c_fc.weight": Tensor("F32", rand("base c_fc", (6, 9))),          # Conv1D
    "model.c_qkv.weight": Tensor("F32", rand("base c_qkv", (4, 12))),       # Conv1D, fused q|k|v
    "model.embed_tokens.weight": Tensor("F32", rand("base embed", (10, 6))),  # (vocab, dim)
    "model.down_proj.weight": Tensor("F32", rand("base down", (6, 10))),
    "model.norm.weight": Tensor("F32", rand("base norm", (6,))),
}


def canonical_base(name: str, fifo: bool) -> np.ndarray:
    w = BASE[name].f64()
    return w.T if fifo else w


# ------------------------------------------------------------------ module builders
class Builder:
    """One adapter: tensors, manifest and the expected float64 ΔW per module (against ``BASE``; later
    versions' builders give their own)."""

    BASE = BASE

    def __init__(self):
        self.tensors: dict[str, Tensor] = {}
        self.expected: dict[str, np.ndarray] = {}
        self.manifest = {"base": {"name_or_path": "adapterfmt/conformance-base", "revision": None,
                                  "architecture": None, "weights": {}},
                         "created_by": "adapterfmt conformance generator (spec 1.1)", "modules": {}, "payloads": {}}

    def module(self, target, method, base_weight, shape, params, roles, *, fifo=False, layer="linear"):
        refs = {}
        for role, tensor in roles.items():
            name = f"{target}.{role}"
            self.tensors[name] = tensor
            refs[role] = {"name": name, "dtype": tensor.dtype, "shape": tensor.shape}
        self.manifest["modules"][target] = {"method": method, "base_weight": base_weight, "shape": list(shape),
                                            "fan_in_fan_out": fifo, "layer": layer, "params": params,
                                            "tensors": refs}
        weight = self.BASE[base_weight]
        self.manifest["base"]["weights"][base_weight] = {
            "shape": weight.shape, "dtype": weight.dtype,
            "fingerprint": weight_fingerprint(weight.dtype, weight.shape, weight.raw)}
        return {role: t.f64() for role, t in roles.items() if t.dtype != "I64"}  # integer roles are no values

    def payload(self, kind, target, tensor):
        name = f"payload.{target}"
        self.tensors[name] = tensor
        self.manifest["payloads"][target] = {"kind": kind, "target": target,
                                             "tensor": {"name": name, "dtype": tensor.dtype, "shape": tensor.shape}}

    def write(self, path: Path, version="1.1"):
        path.write_bytes(container(self.tensors, metadata_for(self.manifest, version)))
        if self.expected:
            exp = {k: Tensor("F64", v) for k, v in self.expected.items()}
            path.with_name(path.name.replace(".safetensors", ".expected.safetensors")).write_bytes(
                container(exp, {"format": "pt"}))


def lora_params(rank, alpha, rslora=False):
    return {"rank": rank, "alpha": float(alpha), "use_rslora": rslora,
            "scale": alpha / (math.sqrt(rank) if rslora else rank)}


def lora_module(b: Builder, target, base_weight, shape, rank, alpha, *, rslora=False, dtype="F32", fifo=False,
                layer="linear", tag=""):
    out, inn = shape
    roles = {"lora_A": Tensor(dtype, rand(f"{tag}{target} A", (rank, inn))),
             "lora_B": Tensor(dtype, rand(f"{tag}{target} B", (out, rank)))}
    params = lora_params(rank, alpha, rslora)
    v = b.module(target, "lora", base_weight, shape, params, roles, fifo=fifo, layer=layer)
    b.expected[target] = (v["lora_B"] @ v["lora_A"]) * params["scale"]


def dora_module(b: Builder, target, base_weight, shape, rank, alpha, *, fifo=False, layer="linear"):
    out, inn = shape
    a = Tensor("F32", rand(f"{target} dora A", (rank, inn)))
    bb = Tensor("F32", rand(f"{target} dora B", (out, rank), 0.1))
    params = dict(lora_params(rank, alpha), magnitude_axis="out")
    w = canonical_base(base_weight, fifo)
    v = w + (bb.f64() @ a.f64()) * params["scale"]
    norm = np.sqrt((v * v).sum(axis=1))
    magnitude = Tensor("F32", norm * (1 + 0.1 * rand(f"{target} dora m", (out,))))
    got = b.module(target, "dora", base_weight, shape, params, {"lora_A": a, "lora_B": bb, "magnitude": magnitude},
                   fifo=fifo, layer=layer)
    b.expected[target] = (got["magnitude"] / norm)[:, None] * v - w


def init_relative(b, method, target, base_weight, shape, rank, alpha, init, dtype="F32", rslora=False):
    out, inn = shape
    roles = {}
    for role, dims in (("lora_A0", (rank, inn)), ("lora_B0", (out, rank))):
        roles[role] = Tensor(dtype, rand(f"{target} {role}", dims))
        roles[role[:-1]] = Tensor(dtype, roles[role].f64() + rand(f"{target} {role} trained", dims, 0.5))
    params = dict(lora_params(rank, alpha, rslora), init=init, init_source="recomputed", residual_dtype="F32",
                  max_abs_residual_error=0.0)
    v = b.module(target, method, base_weight, shape, params, roles)
    b.expected[target] = (v["lora_B"] @ v["lora_A"] - v["lora_B0"] @ v["lora_A0"]) * params["scale"]


def sorsa_module(b, target, base_weight, shape, rank, alpha):
    out, inn = shape
    roles = {}
    for suffix in ("0", ""):
        jitter = 0.0 if suffix == "0" else 0.3
        base_u = rand(f"{target} U", (out, rank))
        base_vt = rand(f"{target} Vt", (rank, inn))
        s0 = np.sort(np.abs(rand(f"{target} S", (rank,))) + 0.5)[::-1]
        roles["U_p" + suffix] = Tensor("F32", base_u + rand(f"{target} U{suffix}", (out, rank), jitter))
        roles["S_p" + suffix] = Tensor("F32", s0 + rand(f"{target} S{suffix}", (rank,), jitter))
        roles["Vt_p" + suffix] = Tensor("F32", base_vt + rand(f"{target} Vt{suffix}", (rank, inn), jitter))
    scale = 1.0 if alpha is None else alpha / rank
    params = {"rank": rank, "alpha": None if alpha is None else float(alpha), "scale": scale,
              "init_source": "recomputed", "residual_dtype": "F32", "max_abs_residual_error": 0.0}
    v = b.module(target, "sorsa", base_weight, shape, params, roles)
    b.expected[target] = ((v["U_p"] * v["S_p"]) @ v["Vt_p"] - (v["U_p0"] * v["S_p0"]) @ v["Vt_p0"]) * scale


def nola_module(b, target, base_weight, shape, rank, scale, seeds, counts, *, offsets=False, rows=None,
                fifo=False, layer="linear"):
    out, inn = shape
    start, stop = rows or (0, out)
    dims = {"A": (rank, inn), "B": (stop - start, rank)}
    roles, params = {}, {"rank": rank, "scale": scale, "generator": {"id": "philox4x32-10", "version": 1}}
    factors = {}
    for side, seed, k in zip("AB", seeds, counts):
        basis_scale = float(np.float32(1 / math.sqrt(k)))
        per = dims[side][0] * dims[side][1]
        params[side] = {"seed": str(seed), "num_basis": k, "basis_scale": basis_scale,
                        "fingerprint": "sha256:" + basis_fingerprint(seed, k * per)}
        roles[f"coef_{side}"] = Tensor("F32", rand(f"{target} coef {side}", (k,)))
        basis = philox_basis(seed, 0, k * per).astype(np.float64).reshape(k, per)
        factor = (roles[f"coef_{side}"].f64() @ basis).reshape(dims[side]) * basis_scale
        if offsets:
            roles[f"offset_{side}"] = Tensor("F32", rand(f"{target} offset {side}", dims[side]))
            factor = factor + roles[f"offset_{side}"].f64()
        factors[side] = factor
    if rows:
        params["rows"] = [start, stop]
    b.module(target, "nola", base_weight, shape, params, roles, fifo=fifo, layer=layer)
    full = np.zeros(shape)
    full[start:stop] = (factors["B"] @ factors["A"]) * scale
    b.expected[target] = full
