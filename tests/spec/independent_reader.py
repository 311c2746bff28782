"""A second adapterfmt 1.3 reader, written from spec/ alone (numpy, json, struct, math, re).

It imports nothing from adapterfmt, torch or safetensors: if it and the package disagree on a file,
either the spec is ambiguous or one of them is wrong. This module parses the container and checks every
rule of spec/README.md §9; independent_delta.py computes ΔW, spec_schema.py checks the JSON Schema,
spec_philox.py regenerates NOLA bases, spec_torch_rng.py VeRA projections and FourierFT positions;
method_rules.py holds the per-method rules of spec/methods-tuners.md, rules_v13.py those of format 1.3
(methods and features by minor, integer roles, convolution forms, trainable_tokens, full).

Example:
    >>> adapter = read("spec/vectors/v1.1/lora_patterns.safetensors")  # doctest: +SKIP
    >>> adapter.version, list(adapter.manifest["modules"])[:1]  # doctest: +SKIP
    ((1, 1), ['model.down_proj'])
"""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import numpy as np

from method_rules import TUNER_METHODS, layer_rules, tuner_role_shapes, tuner_rules
from rules_v13 import (INTEGER_ROLES, NEW_METHODS, conv_role_shapes, new_role_shapes, newer_than_declared,
                       rules_v13)
from spec_schema import Schema, load_schema

READER_VERSION = (1, 3)
MAX_HEADER = 100_000_000
MAX_MANIFEST_CHARS = 67_108_864
MAX_INT = 2**53 - 1
VERSION_RE = re.compile(r"(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})")
INIT_RE = {"olora": re.compile(r"olora"), "pissa": re.compile(r"pissa|pissa_niter_[0-9]+")}
NAME_RE = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
SEED_RE = re.compile(r"0|[1-9][0-9]{0,19}")
KNOWN_METHODS = ("lora", "dora", "olora", "pissa", "sorsa", "nola") + TUNER_METHODS + NEW_METHODS


class Refusal(Exception):
    """A file this reader refuses; the subclass name is the spec's refusal class (README §9)."""


class HeaderError(Refusal):
    pass


class VersionError(Refusal):
    pass


class ManifestError(Refusal):
    pass


class TensorError(Refusal):
    pass


class UnknownMethodError(Refusal):
    pass


# ------------------------------------------------------------------ container (README §1)
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FACTOR_DTYPES = ("F64", "F32", "F16", "BF16")
ENTRY_MEMBERS = {"dtype", "shape", "data_offsets"}


def strict_json(text: str, error: type[Refusal]):
    """JSON as README §2 restricts it: no duplicate members, integers within ±(2^53−1), finite numbers."""
    def pairs(items):
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise error(f"duplicate member {dup!r}")
        return dict(items)

    def number(literal):
        value = float(literal)
        if not math.isfinite(value):
            raise error(f"number {literal[:30]} overflows a double")
        return value

    def constant(name):
        raise error(f"{name} is not JSON")

    def integer(literal):
        # 2^53 - 1 has 16 digits: check the length first, so that absurd literals are never converted.
        if len(literal.lstrip("-")) > 16 or abs(int(literal)) > MAX_INT:
            raise error(f"integer literal {literal[:20]}... ({len(literal)} characters) out of range")
        return int(literal)

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_int=integer, parse_float=number,
                          parse_constant=constant)
    except Refusal:
        raise
    except (ValueError, RecursionError) as exc:
        raise error(f"not JSON ({exc})") from None


def parse_container(data: bytes) -> tuple[dict, dict]:
    """(metadata, {name: (dtype, shape, raw bytes)}) or HeaderError."""
    if len(data) < 8:
        raise HeaderError("shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n < 2 or n > MAX_HEADER or 8 + n > len(data):
        raise HeaderError(f"header length {n} impossible for a {len(data)}-byte file")
    raw = data[8:8 + n]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderError("header is not UTF-8") from None
    if not text.startswith("{"):
        raise HeaderError("header does not start with '{'")
    header = strict_json(text.rstrip(" "), HeaderError)
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError("__metadata__ is not a string-to-string object")
    buffer = data[8 + n:]
    tensors, spans = {}, []
    for name, entry in header.items():
        dtype, shape, (begin, end) = _entry(name, entry)
        if end > len(buffer):
            raise HeaderError(f"tensor {name!r} ends at {end}, past the {len(buffer)}-byte data buffer")
        spans.append((begin, end, name))
        tensors[name] = (dtype, shape, buffer[begin:end])
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise HeaderError(f"tensor {name!r} begins at {begin}, expected {position} (overlap or gap)")
        position = end
    if position != len(buffer):
        raise HeaderError(f"data buffer has {len(buffer) - position} bytes no tensor covers")
    return metadata, tensors


def _entry(name: str, entry) -> tuple[str, list[int], tuple[int, int]]:
    if not isinstance(entry, dict) or set(entry) != ENTRY_MEMBERS:
        raise HeaderError(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise HeaderError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise HeaderError(f"tensor {name!r}: bad shape")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise HeaderError(f"tensor {name!r}: bad data_offsets")
    if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise HeaderError(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for {dtype}{shape}")
    return dtype, shape, (offsets[0], offsets[1])


def to_array(dtype: str, shape: list[int], raw: bytes) -> np.ndarray:
    """Stored values as numpy: floating dtypes as fp32 (README §6: F16/BF16 exact, F64 rounded)."""
    if dtype == "BF16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if dtype in ("F32", "F16", "F64"):
        return np.frombuffer(raw, dtype={"F32": "<f4", "F16": "<f2", "F64": "<f8"}[dtype]).astype(
            np.float32).reshape(shape)
    raise TensorError(f"dtype {dtype} is not a floating factor dtype")


def to_array64(dtype: str, shape: list[int], raw: bytes) -> np.ndarray:
    """Stored floating values as float64 (exact for every floating dtype used here)."""
    if dtype == "F64":
        return np.frombuffer(raw, dtype="<f8").reshape(shape).astype(np.float64)
    return to_array(dtype, shape, raw).astype(np.float64)


# ------------------------------------------------------------------ the file
class Adapter:
    """A read file: version, manifest and its tensors (dtype, shape, raw bytes) by container name."""

    def __init__(self, version, manifest, tensors):
        self.version, self.manifest, self.tensors = version, manifest, tensors

    def role(self, module: str, role: str) -> np.ndarray:
        ref = self.manifest["modules"][module]["tensors"][role]
        return to_array(*self.tensors[ref["name"]])

    def indices(self, module: str, role: str = "indices") -> np.ndarray:
        """An I64 role's values as integers (README §6: never converted to float)."""
        dtype, shape, raw = self.tensors[self.manifest["modules"][module]["tensors"][role]["name"]]
        return np.frombuffer(raw, dtype="<i8").reshape(shape)

    def role64(self, module: str, role: str) -> np.ndarray:
        ref = self.manifest["modules"][module]["tensors"][role]
        return to_array64(*self.tensors[ref["name"]])


def read(path) -> Adapter:
    """Read and check one file (README §9 in order); raises a :class:`Refusal` subclass."""
    metadata, tensors = parse_container(Path(path).read_bytes())
    if metadata.get("adapterfmt.format") != "adapterfmt":
        raise ManifestError("adapterfmt.format is not exactly 'adapterfmt'")
    match = VERSION_RE.fullmatch(metadata.get("adapterfmt.version", ""))
    if not match:
        raise ManifestError(f"adapterfmt.version {metadata.get('adapterfmt.version')!r} is not MAJOR.MINOR")
    version = (int(match[1]), int(match[2]))
    if version[0] != READER_VERSION[0]:
        raise VersionError(f"format {version[0]}.{version[1]} unsupported; this reader reads 1.x")
    text = metadata.get("adapterfmt.manifest")
    if text is None or len(text) > MAX_MANIFEST_CHARS:
        raise ManifestError("adapterfmt.manifest missing or over the limit")
    manifest = strict_json(text, ManifestError)
    # README §3: a file is validated as the minor it declares; a later minor's method does not exist
    # there (UnknownMethodError), a later minor's feature is outside its schema (ManifestError).
    modules = manifest.get("modules") if isinstance(manifest, dict) else None
    for module, entry in modules.items() if isinstance(modules, dict) else ():
        newer = newer_than_declared(entry, version) if isinstance(entry, dict) else None
        if newer is not None:
            error = UnknownMethodError if newer[0] == "method" else ManifestError
            raise error(f"{module}: {newer[0]} {newer[1]!r} does not exist in {version[0]}.{version[1]}")
    Schema(load_schema(), opened=version[1] > READER_VERSION[1], error=ManifestError).check(manifest)
    check_names(manifest)
    named = check_tensors(manifest, tensors)
    for module, entry in manifest["modules"].items():
        if entry["method"] not in KNOWN_METHODS:
            raise UnknownMethodError(f"{module}: unknown method {entry['method']!r}")
        if entry["method"] == "nola":
            generator = entry["params"]["generator"]
            if (generator["id"], generator["version"]) != ("philox4x32-10", 1):
                raise UnknownMethodError(f"{module}: NOLA generator {generator['id']}/v{generator['version']}")
    for module, entry in manifest["modules"].items():
        check_module_rules(manifest, module, entry)
    for key, payload in manifest["payloads"].items():
        if payload["target"] != key:
            raise ManifestError(f"payload {key!r} has target {payload['target']!r}")
    for module, entry in manifest["modules"].items():
        check_roles(module, entry, named)
    for key, payload in manifest["payloads"].items():
        if payload["kind"] == "bias_delta" and payload["tensor"]["dtype"] not in FACTOR_DTYPES:
            raise TensorError(f"payload {key!r}: a bias_delta is not {payload['tensor']['dtype']} (README §8)")
    return Adapter(version, manifest, tensors)


def check_names(manifest: dict) -> None:
    """Parameter names (also base.weights keys, which the schema leaves open) match README §4."""
    for name in manifest["base"]["weights"]:
        if len(name) > 512 or not NAME_RE.fullmatch(name):
            raise ManifestError(f"base.weights name {name!r} is not a parameter name")


def check_tensors(manifest: dict, tensors: dict) -> dict:
    """README §9 steps 5–6; returns {tensor name: ref}."""
    refs = [ref for m in manifest["modules"].values() for ref in m["tensors"].values()]
    refs += [p["tensor"] for p in manifest["payloads"].values()]
    named = {}
    for ref in refs:
        if ref["name"] in named:
            raise ManifestError(f"tensor {ref['name']!r} is named twice")
        named[ref["name"]] = ref
    for name in named:
        if name not in tensors:
            raise TensorError(f"tensor {name!r} is missing")
    for name in tensors:
        if name not in named:
            raise TensorError(f"tensor {name!r} is not named by the manifest")
    for name, ref in named.items():
        dtype, shape, _ = tensors[name]
        if ref["dtype"] != dtype or ref["shape"] != shape:
            raise ManifestError(f"tensor {name!r}: manifest says {ref['dtype']}{ref['shape']}, header {dtype}{shape}")
    return named


def lora_scale_rule(params: dict, module: str) -> None:
    s0 = params["alpha"] / (math.sqrt(params["rank"]) if params["use_rslora"] else params["rank"])
    if not abs(params["scale"] - s0) <= 1e-12 * abs(s0):
        raise ManifestError(f"{module}: scale {params['scale']} is not alpha/rank rule {s0}")


def check_module_rules(manifest: dict, module: str, entry: dict) -> None:
    """README §9 step 8: scale, rows, params that must agree, base.weights shapes."""
    params, method = entry["params"], entry["method"]
    layer_rules(module, entry, ManifestError)
    tuner_rules(module, entry, ManifestError)
    rules_v13(module, entry, ManifestError)
    if method in ("lora", "dora", "olora", "pissa", "lora_tucker"):  # lora_tucker: methods-tuners.md §6.2
        lora_scale_rule(params, module)
    if method in INIT_RE and not INIT_RE[method].fullmatch(params["init"]):
        raise ManifestError(f"{module}: init {params['init']!r} does not belong to method {method}")
    if method == "sorsa":
        s0 = 1.0 if params["alpha"] is None else params["alpha"] / params["rank"]
        if not abs(params["scale"] - s0) <= 1e-12 * abs(s0):
            raise ManifestError(f"{module}: scale {params['scale']} is not the SORSA rule {s0}")
    if method == "nola":
        _nola_rules(module, entry)
    listed = manifest["base"]["weights"].get(entry["base_weight"])
    if listed is not None:
        shape = list(entry["shape"])
        want = shape[:-2] + [shape[-1], shape[-2]] if entry["fan_in_fan_out"] else shape
        if listed["shape"] != want:
            raise ManifestError(f"{module}: base.weights shape {listed['shape']} contradicts {want}")


def _nola_rules(module: str, entry: dict) -> None:
    params = entry["params"]
    rows = params.get("rows", [0, entry["shape"][0]])
    if not 0 <= rows[0] < rows[1] <= entry["shape"][0]:
        raise ManifestError(f"{module}: rows {rows} outside 0..{entry['shape'][0]}")
    for side in "AB":
        info = params[side]
        if not SEED_RE.fullmatch(info["seed"]) or int(info["seed"]) >= 2**64:
            raise ManifestError(f"{module}: seed {info['seed']!r} is not a uint64")
        if float(np.float32(info["basis_scale"])) != info["basis_scale"]:
            raise ManifestError(f"{module}: basis_scale {info['basis_scale']} is not an fp32 value")


def role_shapes(entry: dict) -> dict[str, list[int]]:
    """The shape each known role must have, from ``shape`` and the params (README §6, method files)."""
    shapes = _matrix_role_shapes(entry)
    if entry["layer"] == "experts":  # README §6: every role gains a leading experts dimension
        return {role: [entry["shape"][0]] + shape for role, shape in shapes.items()}
    return shapes


def _matrix_role_shapes(entry: dict) -> dict[str, list[int]]:
    p, method = entry["params"], entry["method"]
    if method in NEW_METHODS:
        return new_role_shapes(entry)
    if entry["layer"] == "conv2d":
        return conv_role_shapes(entry)
    if method in TUNER_METHODS:
        return tuner_role_shapes(entry)
    out, inn = entry["shape"][-2:]
    r = p["rank"]
    if method in ("lora", "dora", "olora", "pissa"):
        shapes = {"lora_A": [r, inn], "lora_B": [out, r]}
        if method == "dora":  # README §6: out or in entries, by magnitude_axis
            shapes["magnitude"] = [out if p["magnitude_axis"] == "out" else inn]
        if method in ("olora", "pissa"):
            shapes.update(lora_A0=[r, inn], lora_B0=[out, r])
        return shapes
    if method == "sorsa":
        return {f"{n}{s}": shape for s in ("", "0")
                for n, shape in (("U_p", [out, r]), ("S_p", [r]), ("Vt_p", [r, inn]))}
    rows = p.get("rows", [0, out])
    return {"coef_A": [p["A"]["num_basis"]], "coef_B": [p["B"]["num_basis"]], "offset_A": [r, inn],
            "offset_B": [rows[1] - rows[0], r]}


def check_roles(module: str, entry: dict, named: dict) -> None:
    """README §9 step 9: role dtypes and shapes (unknown roles of a newer minor are ignored)."""
    shapes = role_shapes(entry)
    for role, ref in entry["tensors"].items():
        if role not in shapes:
            continue
        allowed = (INTEGER_ROLES[entry["method"], role],) if (entry["method"], role) in INTEGER_ROLES else FACTOR_DTYPES
        if ref["dtype"] not in allowed:
            raise TensorError(f"{module}: role {role} has dtype {ref['dtype']}, not {'/'.join(allowed)}")
        if ref["shape"] != shapes[role]:
            raise TensorError(f"{module}: role {role} has shape {ref['shape']}, expected {shapes[role]}")
