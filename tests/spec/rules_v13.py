"""The manifest rules of format 1.3, for the second reader, from the spec text alone.

README §3 (methods and features by minor), §6 (integer roles, DoRA axes), methods-tuners.md §2
`trainable_tokens` and §6 (convolutions: flattened and Tucker forms), methods-full.md. Role shapes are
README §9 step 9 (TensorError); everything else here is step 8 (ManifestError) or §3.

Example:
    >>> conv_role_shapes({"method": "loha", "shape": [5, 3, 3, 3], "layer": "conv2d",
    ...                   "params": {"rank": 2}, "tensors": {}})["w1_b"]
    [2, 3, 3, 3]
"""
from __future__ import annotations

#: README §3: methods a minor introduced, and features of existing methods (condition on a module entry).
METHOD_SINCE = {"vera": (1, 2), "fourierft": (1, 2), "trainable_tokens": (1, 3), "lora_tucker": (1, 3),
                "full": (1, 3)}
NEW_METHODS = ("trainable_tokens", "lora_tucker", "full")
FEATURE_SINCE = (
    ("loha/lokr on convolutions", (1, 3), lambda e: e.get("method") in ("loha", "lokr") and e.get("layer") == "conv2d"),
    ("DoRA on convolutions", (1, 3), lambda e: e.get("method") == "dora" and e.get("layer") == "conv2d"),
    ("DoRA magnitude per input column", (1, 3),
     lambda e: e.get("method") == "dora" and _params(e).get("magnitude_axis") == "in"),
    ("DoRA norm epsilon", (1, 3), lambda e: e.get("method") == "dora" and "norm_eps" in _params(e)),
)
#: README §6: the integer roles and their one allowed dtype.
INTEGER_ROLES = {("trainable_tokens", "indices"): "I64"}
CORES = {"loha": ("t1", "t2"), "lokr": ("t2",)}


def _params(entry: dict) -> dict:
    return entry.get("params") if isinstance(entry.get("params"), dict) else {}


def newer_than_declared(entry: dict, version: tuple[int, int]) -> tuple[str, str] | None:
    """("method" | "feature", what) when the entry uses something the declared minor lacks (README §3)."""
    method = entry.get("method")
    if isinstance(method, str) and version < METHOD_SINCE.get(method, version):
        return "method", method
    for what, since, uses in FEATURE_SINCE:
        if version < since and uses(entry):
            return "feature", what
    return None


def token_axes(entry: dict) -> tuple[int, int]:
    """(tokens, d): rows of the base parameter as stored and their width, by layer (methods-tuners.md §2)."""
    out, inn = entry["shape"]
    return (inn, out) if entry["layer"] == "embedding" else (out, inn)


def is_tucker(entry: dict) -> bool:
    return any(core in entry["tensors"] for core in CORES.get(entry["method"], ()))


def rules_v13(module: str, entry: dict, error: type[Exception]) -> None:
    """Step 8 rules of the 1.3 methods and of the Tucker form."""
    method = entry["method"]
    if method == "trainable_tokens" and entry["fan_in_fan_out"] != (entry["layer"] == "embedding"):
        raise error(f"{module}: trainable_tokens on {entry['layer']} with fan_in_fan_out {entry['fan_in_fan_out']}")
    if method in CORES:
        present = [c for c in CORES[method] if c in entry["tensors"]]
        if present and len(present) != len(CORES[method]):
            raise error(f"{module}: cores come together ({present} of {CORES[method]})")
        if present and (entry["layer"] != "conv2d" or entry["shape"][2:] == [1, 1]):
            raise error(f"{module}: a Tucker core on {entry['layer']} {entry['shape']} (kernels larger than 1×1 only)")
        if present and method == "lokr" and "w2" in entry["tensors"]:
            raise error(f"{module}: a Tucker W2 is t2 with w2_a, w2_b, never a full w2")


def new_role_shapes(entry: dict) -> dict[str, list[int]]:
    """Role shapes of trainable_tokens, lora_tucker and full."""
    method, p, shape = entry["method"], entry["params"], entry["shape"]
    if method == "trainable_tokens":
        return {"indices": [p["count"]], "values": [p["count"], token_axes(entry)[1]]}
    if method == "lora_tucker":
        out, inn, kh, kw = shape
        r = p["rank"]
        return {"lora_A": [r, inn, 1, 1], "lora_mid": [r, r, kh, kw], "lora_B": [out, r, 1, 1]}
    return {"diff": list(shape), "diff_b": [shape[0]]}


def conv_role_shapes(entry: dict) -> dict[str, list[int]]:
    """loha/lokr on conv2d (methods-tuners.md §6.1 flattened, §6.2 Tucker) and dora/lora on conv2d."""
    method, p = entry["method"], entry["params"]
    out, inn, kh, kw = entry["shape"]
    r = p.get("rank")
    if method == "loha":
        if is_tucker(entry):
            return {"w1_a": [r, out], "w2_a": [r, out], "w1_b": [r, inn], "w2_b": [r, inn],
                    "t1": [r, r, kh, kw], "t2": [r, r, kh, kw]}
        return {"w1_a": [out, r], "w2_a": [out, r], "w1_b": [r, inn, kh, kw], "w2_b": [r, inn, kh, kw]}
    if method == "lokr":
        (a, c), (b, d) = p["w1_shape"], p["w2_shape"]
        shapes = {"w1": [a, c], "w1_a": [a, r], "w1_b": [r, c]}
        if is_tucker(entry):
            return shapes | {"t2": [r, r, kh, kw], "w2_a": [r, b], "w2_b": [r, d]}
        return shapes | {"w2": [b, d, kh, kw], "w2_a": [b, r], "w2_b": [r, d, kh, kw]}
    shapes = {"lora_A": [r, inn, kh, kw], "lora_B": [out, r, 1, 1]}
    if method == "dora":
        shapes["magnitude"] = [out if p["magnitude_axis"] == "out" else inn]
    return shapes
