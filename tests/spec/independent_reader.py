"""A second adapterfmt 1.1 reader, written from spec/ alone (numpy, json, struct, hashlib, math, re).

It imports nothing from adapterfmt, torch or safetensors: if it and the package disagree on a file,
either the spec is ambiguous or one of them is wrong. It parses the container, checks every rule of
spec/README.md §9, and computes ΔW per module as spec/README.md §6 and the method files define it.

Example:
    >>> adapter = read("spec/vectors/v1.1/lora_patterns.safetensors")  # doctest: +SKIP
    >>> delta(adapter, "model.q_proj").shape  # doctest: +SKIP
    (8, 6)
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from pathlib import Path

import numpy as np

READER_VERSION = (1, 1)
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "spec" / "manifest.schema.json"
MAX_HEADER = 100_000_000
MAX_MANIFEST_CHARS = 67_108_864
MAX_INT = 2**53 - 1
VERSION_RE = re.compile(r"(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})")
INIT_RE = {"olora": re.compile(r"olora"), "pissa": re.compile(r"pissa|pissa_niter_[0-9]+")}
NAME_RE = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
SEED_RE = re.compile(r"0|[1-9][0-9]{0,19}")


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


# ------------------------------------------------------------------ schema (JSON Schema subset)
def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def _ecma(pattern: str) -> re.Pattern:
    # ECMA-262 `$` (no multiline) matches only at the very end; Python's `$` also before a final \n.
    return re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern)


def _is_type(value, kind: str) -> bool:
    return {"object": isinstance(value, dict), "array": isinstance(value, list),
            "string": isinstance(value, str), "boolean": isinstance(value, bool), "null": value is None,
            "integer": type(value) is int or (type(value) is float and value.is_integer()),
            "number": type(value) in (int, float)}[kind]


class Schema:
    """The subset of draft 2020-12 that manifest.schema.json uses; ``opened`` as README §3 says."""

    def __init__(self, schema: dict, opened: bool):
        self.root, self.opened = schema, opened

    def check(self, value, node=None, where="manifest"):
        node = self.root if node is None else node
        if "$ref" in node:
            target = self.root
            for part in node["$ref"].lstrip("#/").split("/"):
                target = target[part]
            self.check(value, target, where)
        for key in ("type", "enum", "const", "pattern", "minLength", "maxLength", "minimum",
                    "exclusiveMinimum", "items", "minItems", "maxItems", "required", "properties",
                    "additionalProperties", "propertyNames", "allOf", "oneOf"):
            if key in node:
                getattr(self, "_" + key)(value, node[key], node, where)

    def fail(self, where, what):
        raise ManifestError(f"schema: {where}: {what}")

    def _type(self, v, kinds, node, where):
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is_type(v, k) for k in kinds):
            self.fail(where, f"not {kinds}")

    def _enum(self, v, options, node, where):
        if not any(type(v) is type(o) and v == o for o in options):
            self.fail(where, f"{v!r} not one of {options}")

    def _const(self, v, c, node, where):
        if v != c:
            self.fail(where, f"{v!r} is not {c!r}")

    def _pattern(self, v, p, node, where):
        if isinstance(v, str) and not _ecma(p).search(v):
            self.fail(where, f"{v!r} does not match {p}")

    def _minLength(self, v, n, node, where):
        if isinstance(v, str) and len(v) < n:
            self.fail(where, "too short")

    def _maxLength(self, v, n, node, where):
        if isinstance(v, str) and len(v) > n:
            self.fail(where, "too long")

    def _minimum(self, v, n, node, where):
        if _is_type(v, "number") and not isinstance(v, bool) and v < n:
            self.fail(where, f"{v} < {n}")

    def _exclusiveMinimum(self, v, n, node, where):
        if _is_type(v, "number") and not isinstance(v, bool) and v <= n:
            self.fail(where, f"{v} <= {n}")

    def _items(self, v, sub, node, where):
        if isinstance(v, list):
            for i, item in enumerate(v):
                self.check(item, sub, f"{where}[{i}]")

    def _minItems(self, v, n, node, where):
        if isinstance(v, list) and len(v) < n:
            self.fail(where, "too few items")

    def _maxItems(self, v, n, node, where):
        if isinstance(v, list) and len(v) > n:
            self.fail(where, "too many items")

    def _required(self, v, names, node, where):
        if isinstance(v, dict):
            for name in names:
                if name not in v:
                    self.fail(where, f"missing {name!r}")

    def _properties(self, v, props, node, where):
        if isinstance(v, dict):
            for name, sub in props.items():
                if name in v:
                    self.check(v[name], sub, f"{where}.{name}")

    def _additionalProperties(self, v, extra, node, where):
        if not isinstance(v, dict):
            return
        known = node.get("properties", {})
        for name, value in v.items():
            if name in known:
                continue
            if extra is False:
                if not self.opened:
                    self.fail(where, f"unknown member {name!r}")
            elif isinstance(extra, dict):
                self.check(value, extra, f"{where}.{name}")

    def _propertyNames(self, v, sub, node, where):
        if isinstance(v, dict):
            if self.opened and "enum" in sub:
                return
            for name in v:
                self.check(name, sub, f"{where} key {name!r}")

    def _allOf(self, v, subs, node, where):
        for sub in subs:
            if "if" in sub:
                if self._valid(v, sub["if"]):
                    self.check(v, sub.get("then", {}), where)
            else:
                self.check(v, sub, where)

    def _oneOf(self, v, subs, node, where):
        if sum(self._valid(v, s) for s in subs) != 1:
            self.fail(where, "matches not exactly one alternative")

    def _valid(self, v, sub) -> bool:
        try:
            self.check(v, sub)
        except ManifestError:
            return False
        return True


# ------------------------------------------------------------------ the file
class Adapter:
    """A read file: version, manifest and its tensors (dtype, shape, raw bytes) by container name."""

    def __init__(self, version, manifest, tensors):
        self.version, self.manifest, self.tensors = version, manifest, tensors

    def role(self, module: str, role: str) -> np.ndarray:
        ref = self.manifest["modules"][module]["tensors"][role]
        return to_array(*self.tensors[ref["name"]])

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
    Schema(load_schema(), opened=version[1] > READER_VERSION[1]).check(manifest)
    check_names(manifest)
    named = check_tensors(manifest, tensors)
    for module, entry in manifest["modules"].items():
        if entry["method"] not in METHODS_KNOWN:
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
    if method in ("lora", "dora", "olora", "pissa"):
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
        out, inn = entry["shape"]
        want = [inn, out] if entry["fan_in_fan_out"] else [out, inn]
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
    out, inn = entry["shape"]
    p, method = entry["params"], entry["method"]
    r = p["rank"]
    if method in ("lora", "dora", "olora", "pissa"):
        shapes = {"lora_A": [r, inn], "lora_B": [out, r]}
        if method == "dora":
            shapes["magnitude"] = [out]
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
        if ref["dtype"] not in FACTOR_DTYPES:
            raise TensorError(f"{module}: role {role} has dtype {ref['dtype']}")
        if ref["shape"] != shapes[role]:
            raise TensorError(f"{module}: role {role} has shape {ref['shape']}, expected {shapes[role]}")


# ------------------------------------------------------------------ ΔW (README §6, method files)
def fl32(x: float) -> np.float32:
    return np.float32(x)


def delta(adapter: Adapter, module: str, base: np.ndarray | None = None) -> np.ndarray:
    """ΔW of one module, fp32, canonical (out, in), in the spec's reference operation order.

    ``base`` is the canonical fp32 base weight (needed by DoRA only).
    """
    entry = adapter.manifest["modules"][module]
    return METHODS_KNOWN[entry["method"]](adapter, module, entry, base)


def _lora(adapter, module, entry, base):
    product = adapter.role(module, "lora_B") @ adapter.role(module, "lora_A")
    return product * fl32(entry["params"]["scale"])


def _dora(adapter, module, entry, base):
    if base is None:
        raise ValueError("DoRA needs the base weight")
    v = base + _lora(adapter, module, entry, base)
    norm = np.sqrt((v * v).sum(axis=1, dtype=np.float32))
    merged = (adapter.role(module, "magnitude") / norm)[:, None] * v
    return merged - base


def _init_relative(adapter, module, entry, base):
    trained = adapter.role(module, "lora_B") @ adapter.role(module, "lora_A")
    init = adapter.role(module, "lora_B0") @ adapter.role(module, "lora_A0")
    return (trained - init) * fl32(entry["params"]["scale"])


def _sorsa(adapter, module, entry, base):
    def product(suffix):
        u, s, vt = (adapter.role(module, n + suffix) for n in ("U_p", "S_p", "Vt_p"))
        return (u * s[None, :]) @ vt
    return (product("") - product("0")) * fl32(entry["params"]["scale"])


def _nola(adapter, module, entry, base):
    p = entry["params"]
    out, inn = entry["shape"]
    rows = p.get("rows", [0, out])
    factors = {}
    for side, dims in (("A", (p["rank"], inn)), ("B", (rows[1] - rows[0], p["rank"]))):
        coef = adapter.role(module, f"coef_{side}")
        offset = (adapter.role(module, f"offset_{side}") if f"offset_{side}" in entry["tensors"] else None)
        factors[side] = nola_factor(int(p[side]["seed"]), dims, coef, p[side]["basis_scale"], offset)
    full = np.zeros((out, inn), dtype=np.float32)
    full[rows[0]:rows[1]] = (factors["B"] @ factors["A"]) * fl32(p["scale"])
    return full


METHODS_KNOWN = {"lora": _lora, "dora": _dora, "olora": _init_relative, "pissa": _init_relative,
                 "sorsa": _sorsa, "nola": _nola}


def nola_factor(seed: int, dims: tuple[int, int], coef: np.ndarray, basis_scale: float,
                offset: np.ndarray | None) -> np.ndarray:
    """spec/nola.md §3 steps 1–4, fp32."""
    rows, cols = dims
    per = rows * cols
    step = max(1, (1 << 22) // per)
    acc = np.zeros(per, dtype=np.float32)
    for c0 in range(0, len(coef), step):
        c1 = min(len(coef), c0 + step)
        acc += coef[c0:c1] @ philox_basis(seed, c0 * per, c1 * per).reshape(c1 - c0, per)
    acc = acc * fl32(basis_scale)
    factor = acc.reshape(rows, cols)
    return factor + offset if offset is not None else factor


# ------------------------------------------------------------------ Philox4x32-10 (nola-generator.md)
M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK = 0xFFFFFFFF


def philox4x32_10(counters: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Random123 philox4x32_R<10>: counters (n, 4) of uint32 values -> (n, 4) outputs (uint64 holding u32)."""
    x = [counters[:, i].astype(np.uint64) for i in range(4)]
    k0, k1 = key
    mask = np.uint64(MASK)
    for round_index in range(10):
        if round_index:
            k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
        p0 = np.uint64(M0) * x[0]
        p1 = np.uint64(M1) * x[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & mask
        hi1, lo1 = p1 >> np.uint64(32), p1 & mask
        x = [hi1 ^ x[1] ^ np.uint64(k0), lo1, hi0 ^ x[3] ^ np.uint64(k1), lo0]
    return np.stack(x, axis=1)


def philox_basis(seed: int, start: int, stop: int) -> np.ndarray:
    """Elements [start, stop) of the flat basis of generator philox4x32-10 v1, fp32."""
    if not 0 <= seed < 2**64:
        raise ValueError("seed is not a uint64")
    n = np.arange(start, stop, dtype=np.uint64)
    c = n // np.uint64(4)
    counters = np.stack([c & np.uint64(MASK), c >> np.uint64(32), np.zeros_like(c), np.zeros_like(c)], axis=1)
    words = philox4x32_10(counters, (seed & MASK, seed >> 32))
    u = words[np.arange(len(n)), (n % np.uint64(4)).astype(np.int64)]
    integer = (np.uint64(2) * (u >> np.uint64(8))).astype(np.int64) - (1 << 24)
    return integer.astype(np.float32) * np.float32(2.0**-24)


def basis_fingerprint(seed: int, numel: int) -> str:
    """nola-generator.md §4: hex SHA-256 of the first min(numel, 4096) fp32 LE elements."""
    return hashlib.sha256(philox_basis(seed, 0, min(numel, 4096)).astype("<f4").tobytes()).hexdigest()


# ------------------------------------------------------------------ validator extras (README §7, §9)
def weight_fingerprint(dtype: str, shape: list[int], raw: bytes) -> str:
    """README §7 on a stored tensor."""
    width = DTYPE_BYTES[dtype]
    count = math.prod(shape)
    k = min(count, 1024)
    sample = b"".join(raw[(i * count // k) * width:(i * count // k + 1) * width] for i in range(k))
    prefix = f"{dtype}:{'x'.join(str(d) for d in shape)}:".encode()
    return "sample1024-sha256:" + hashlib.sha256(prefix + sample).hexdigest()


def validate(adapter: Adapter, base_tensors: dict | None = None) -> list[str]:
    """Validator rules: NaN/Inf, NOLA basis fingerprints, and with a base the checks of README §7."""
    problems = []
    for name, (dtype, shape, raw) in adapter.tensors.items():
        if dtype in FACTOR_DTYPES and not np.isfinite(to_array64(dtype, shape, raw)).all():
            problems.append(f"{name}: NaN/Inf")
    for module, entry in adapter.manifest["modules"].items():
        if entry["method"] != "nola":
            continue
        p = entry["params"]
        rows = p.get("rows", [0, entry["shape"][0]])
        for side, per in (("A", p["rank"] * entry["shape"][1]), ("B", (rows[1] - rows[0]) * p["rank"])):
            got = basis_fingerprint(int(p[side]["seed"]), p[side]["num_basis"] * per)
            if "sha256:" + got != p[side]["fingerprint"]:
                problems.append(f"{module}: basis {side} fingerprint differs")
    for name, want in adapter.manifest["base"]["weights"].items():
        if base_tensors is None:
            break
        if name not in base_tensors:
            problems.append(f"base lacks {name}")
            continue
        dtype, shape, raw = base_tensors[name]
        if shape != want["shape"] or want.get("dtype") not in (None, dtype):
            problems.append(f"base {name} is {dtype}{shape}")
        elif want.get("fingerprint") not in (None, weight_fingerprint(dtype, shape, raw)):
            problems.append(f"base {name} fingerprint differs")
    return problems


def canonical_base(adapter: Adapter, module: str, base_tensors: dict) -> np.ndarray:
    """The module's base weight from a parsed base file, fp32, canonical orientation."""
    entry = adapter.manifest["modules"][module]
    weight = to_array(*base_tensors[entry["base_weight"]])
    return weight.T.copy() if entry["fan_in_fan_out"] else weight
