"""Independent float64 ΔW of every method, written from the spec, never from the package's maths.

Sources: ``spec/README.md`` §6 (lora, rsLoRA, dora), ``spec/methods-principal.md`` §1 (olora, pissa,
sorsa), ``spec/methods-tuners.md`` (ia3, loha, lokr, adalora, oft, boft, vera, fourierft, trainable_tokens;
§6 conv2d forms and lora_tucker), ``spec/nola.md`` §§2-3 and ``spec/nola-generator.md`` (nola). Only numpy; the one thing
taken from the package is the NOLA basis of ``adapterfmt.methods.nola.reference_numpy``, the
numpy oracle of the generator (itself pinned to the spec's known-answer vectors), because a
basis is a bit pattern, not a formula.

Every function takes the module's params (the manifest dict), its canonical ``[out, in]`` shape
and its tensors by role as float64 numpy arrays (stored values converted exactly), and returns ΔW
in canonical orientation. The scale is re-derived from the params by the spec's rule (not read from
``params["scale"]``), except for NOLA whose only scale is ``scale``.

Orientation (spec §4): with ``fan_in_fan_out`` the base stores Wᵀ; ΔW is defined on the canonical
W and transposed when applied, see :func:`applied`.

Tolerance table (``u = 2**-24``, fp32's unit roundoff; the package computes in fp32 from inputs that
are exact in fp32, the reference in float64). |X| is the elementwise absolute value.

| method | quantity | bound |
|---|---|---|
| lora, rslora | each ΔW_ij | ``(r + 2)·u·|s|·(|B|·|A|)_ij`` (r-term dot product, one scale rounding) |
| olora, pissa | each ΔW_ij | ``(r + 3)·u·|s|·(|B|·|A| + |B0|·|A0|)_ij`` (two products, a difference, the scale) |
| sorsa | each ΔW_ij | ``(r + 4)·u·|s|·(|U|·|S|·|Vt| + |U0|·|S0|·|Vt0|)_ij`` (as olora, plus U·diag(S)) |
| dora | max |ΔW − ΔW64| | ``4·(in + r + 8)·u·(max|W'| + max|W|)`` (row norm over ``in``, division, W' − W) |
| nola | |ΔW − ΔW64| | max(``1e-5·max|ΔW64|`` (spec/nola.md §3), ``(k+l+r+6)·u32·s·(|B|·|A|)`` over absolute terms) |
| full | each ΔW_ij | ``u·|diff|_ij`` (the conversion to fp32) |
| ia3 | each ΔW_ij | ``4·u·(|W| + |W'|)_ij`` (one product, the subtraction W' − W) |
| loha | each ΔW_ij | ``(2r + 6)·u·|s|·((|w1_a|·|w1_b|) ⊙ (|w2_a|·|w2_b|))_ij`` |
| lokr | each ΔW_ij | ``(2r + 6)·u·|s|·(|W1| ⊗ |W2|)_ij`` (|Wk| = |wk_a|·|wk_b| when factored; r² for r with a Tucker W2) |
| loha (Tucker) | each ΔW_ij | ``(2r² + 6)·u·|s|·(|T1| ⊙ |T2|)_ij``, |Tk| the Tucker product of the absolute factors |
| lora_tucker | each ΔW_ij | ``(r² + 4)·u·|s|·(|B|·|mid|·|A|)_ij`` (the core's r² products per tap, the scale on B first) |
| adalora | each ΔW_ij | ``(r + 5)·u·|scaling/ranknum|·(|B|·(|A| ⊙ |E|))_ij`` |
| vera | each ΔW_ij | ``(r + 4)·u·((|λ_b|·|B_m|)·(|λ_d|·|A_m|))_ij`` (two scalings, an r-term dot product) |
| fourierft | each ΔW_ij | ``(4·log2(out·in) + 8)·u·|scaling|·Σ|spectrum|/(out·in) + u_s·|ΔW64_ij|`` (fp32 FFT, the scaling, then PEFT's cast to the spectrum's dtype; u_s: that dtype's unit roundoff, inferred as the coarsest of bf16/fp16 holding every value exactly, else 0) |
| trainable_tokens | each ΔW_ij | ``u·|ΔW64_ij|`` (the replaced rows: v − W, one rounded subtraction; elsewhere 0) |
| oft, boft | max |ΔW − ΔW64| | ``8·(in + 16·(terms + factors)·b)·u·(max|W'| + max|W|)`` (series or solve, dense product) |
"""
from __future__ import annotations

import math

import numpy as np

from adapterfmt.methods.nola.reference_numpy import nola_basis_numpy

U32 = 2.0 ** -24
#: ``spec/nola.md`` §3: conformance of a NOLA ΔW, relative to max|ΔW_ref|.
NOLA_RTOL = 1e-5


# ---------------------------------------------------------------------------- scale rules
def lora_rule(params: dict) -> float:
    """spec §6: alpha/rank, or alpha/sqrt(rank) with use_rslora."""
    rank, alpha = params["rank"], params["alpha"]
    return alpha / math.sqrt(rank) if params["use_rslora"] else alpha / rank


def sorsa_rule(params: dict) -> float:
    """methods-principal §1: alpha null means s = 1, else alpha/rank."""
    return 1.0 if params["alpha"] is None else params["alpha"] / params["rank"]


# ---------------------------------------------------------------------------- ΔW per method
def lora_delta(params, shape, t, base=None):
    if len(shape) == 4:  # conv2d (spec §4): B (out, r, 1, 1) mixes A's (r, in, kh, kw) kernels
        return lora_rule(params) * np.einsum("or,rihw->oihw", t["lora_B"][:, :, 0, 0], t["lora_A"])
    return lora_rule(params) * (t["lora_B"] @ t["lora_A"])


def dora_merged(params, shape, t, base):
    """V = W + ΔW_lora; axis out: W' = diag(m / (‖V‖_row + eps))·V (a conv2d row: out channel over in, kh, kw);
    axis in: W' = V·diag(m / (‖V‖_col + eps)) (an in channel over out, kh, kw)."""
    v = base + lora_delta(params, shape, t)
    keep = {"out": 0, "in": 1}[params["magnitude_axis"]]
    other = tuple(d for d in range(v.ndim) if d != keep)
    norm = np.sqrt((v * v).sum(axis=other)) + params.get("norm_eps", 0.0)
    view = [1] * v.ndim
    view[keep] = -1
    return (t["magnitude"] / norm).reshape(view) * v


def dora_delta(params, shape, t, base):
    return dora_merged(params, shape, t, base) - base


def full_delta(params, shape, t, base=None):
    """full: ΔW = diff (diff_b is a bias delta, not part of ΔW)."""
    return t["diff"]


def init_relative_delta(params, shape, t, base=None):
    """olora/pissa: s·(B·A − B0·A0) against the original base."""
    return lora_rule(params) * (t["lora_B"] @ t["lora_A"] - t["lora_B0"] @ t["lora_A0"])


def sorsa_delta(params, shape, t, base=None):
    trained = (t["U_p"] * t["S_p"]) @ t["Vt_p"]
    init = (t["U_p0"] * t["S_p0"]) @ t["Vt_p0"]
    return sorsa_rule(params) * (trained - init)


def nola_factor(params: dict, side: str, dims: tuple[int, int], t: dict, magnitude: bool = False) -> np.ndarray:
    """offset + basis_scale·Σ coef_i·X_i with the fp32 basis values of the seed (spec/nola.md §3).

    ``magnitude``: the same sum over absolute values (what fp32 summation error is relative to).
    """
    info = params[side]
    if (params["generator"]["id"], params["generator"]["version"]) != ("philox4x32-10", 1):
        raise NotImplementedError(f"reference covers philox4x32-10/v1 only, not {params['generator']}")
    k = int(info["num_basis"])
    basis = nola_basis_numpy(int(info["seed"]), (k, *dims)).astype(np.float64)
    coef, offset = t[f"coef_{side}"], t.get(f"offset_{side}")
    if magnitude:
        basis, coef, offset = np.abs(basis), np.abs(coef), None if offset is None else np.abs(offset)
    factor = float(info["basis_scale"]) * np.tensordot(coef, basis, axes=1)
    return factor if offset is None else factor + offset


def nola_delta(params, shape, t, base=None):
    """ΔW[rows] = s·B·A, zero outside ``rows``; A is (r, in), B is (rows, r)."""
    out, inp = shape
    start, stop = params.get("rows") or (0, out)
    rank = int(params["rank"])
    a = nola_factor(params, "A", (rank, inp), t)
    b = nola_factor(params, "B", (stop - start, rank), t)
    delta = np.zeros((out, inp))
    delta[start:stop] = params["scale"] * (b @ a)
    return delta


# ---------------------------------------------------------------------------- spec/methods-tuners.md
def ia3_delta(params, shape, t, base):
    """diag(l)·W − W (axis out) or W·diag(l) − W (axis in)."""
    scale = t["scale"].reshape(-1, 1) if params["axis"] == "out" else t["scale"].reshape(1, -1)
    return base * scale - base


def tucker64(core, out_factor, in_factor):
    """Tucker-2 product (spec/methods-tuners.md §6): T[p, q] = Σᵢⱼ C[i, j]·U[i, p]·V[j, q] per kernel tap."""
    return np.einsum("ijyx,ip,jq->pqyx", core, out_factor, in_factor)


def loha_halves(shape, t):
    """(W1, W2) of a LoHa module; conv2d: Tucker halves, or flattened products reshaped to the kernel."""
    if "t1" in t:
        return tucker64(t["t1"], t["w1_a"], t["w1_b"]), tucker64(t["t2"], t["w2_a"], t["w2_b"])
    halves = [t[f"{k}_a"] @ t[f"{k}_b"].reshape(t[f"{k}_b"].shape[0], -1) for k in ("w1", "w2")]
    return tuple(h.reshape(shape) for h in halves)


def loha_delta(params, shape, t, base=None):
    """((w1_a·w1_b) ⊙ (w2_a·w2_b))·alpha/r (conv2d: each half flattened or Tucker)."""
    w1, w2 = loha_halves(shape, t)
    return (params["alpha"] / params["rank"]) * (w1 * w2)


def lokr_halves(t):
    w1 = t["w1"] if "w1" in t else t["w1_a"] @ t["w1_b"]
    if "w2" in t:
        w2 = t["w2"]
    elif "t2" in t:
        w2 = tucker64(t["t2"], t["w2_a"], t["w2_b"])
    else:
        w2b = t["w2_b"]
        w2 = (t["w2_a"] @ w2b.reshape(w2b.shape[0], -1)).reshape(t["w2_a"].shape[0], *w2b.shape[1:])
    return w1.reshape(*w1.shape, *[1] * (w2.ndim - 2)), w2


def lokr_rule(params: dict, both_full: bool) -> float:
    """peft: alpha/r; lycoris: 1 when both halves are full, else alpha/r."""
    return 1.0 if params["convention"] == "lycoris" and both_full else params["alpha"] / params["rank"]


def lokr_delta(params, shape, t, base=None):
    """scale·(W1 ⊗ W2), over all four axes on conv2d (W1 gains unit kernel axes)."""
    w1, w2 = lokr_halves(t)
    return lokr_rule(params, "w1" in t and "w2" in t) * np.kron(w1, w2)


def lora_tucker_delta(params, shape, t, base=None):
    """ΔW[o, c] = s·Σᵢⱼ B[o, i]·mid[i, j]·A[j, c] per kernel tap."""
    up, down = t["lora_B"][:, :, 0, 0], t["lora_A"][:, :, 0, 0]
    return lora_rule(params) * tucker64(t["lora_mid"], up.T, down)


def adalora_delta(params, shape, t, base=None):
    """(B·(A ⊙ E))·scaling / (ranknum + 1e-5), the denominator rounded to fp32 as the spec says."""
    denominator = float(np.float32(np.float32(params["ranknum"]) + np.float32(1e-5)))
    return (t["lora_B"] @ (t["lora_A"] * t["lora_E"].reshape(-1, 1))) * params["scaling"] / denominator


def oft_rotations(params, vectors):
    b = params["block_size"]
    rows, cols = np.triu_indices(b, 1)
    q = np.zeros((vectors.shape[0], b, b))
    q[:, rows, cols] = vectors
    q = q - np.transpose(q, (0, 2, 1))
    if params["coft"]:
        limit = params["eps"] / math.sqrt(q.shape[0])
        norms = np.sqrt((q ** 2).sum(axis=(1, 2), keepdims=True))
        q = np.where(norms <= limit, q, limit * q / np.where(norms == 0, 1, norms))
    eye = np.eye(b)
    if params["cayley"] == "exact":
        return np.stack([(eye - m) @ np.linalg.inv(eye + m) for m in q])
    n = params["neumann_terms"]
    powers = [] if n <= 1 else [(1, 2.0)] if n == 2 else \
        [(k, 2.0) for k in range(1, max(3, n - 1))] + [(max(3, n - 1), 1.0)]
    return np.stack([eye + sum(c * np.linalg.matrix_power(m, k) for k, c in powers) for m in q])


def block_diag(blocks) -> np.ndarray:
    size = sum(b.shape[0] for b in blocks)
    out, at = np.zeros((size, size)), 0
    for b in blocks:
        out[at:at + b.shape[0], at:at + b.shape[0]] = b
        at += b.shape[0]
    return out


def oft_delta(params, shape, t, base):
    """W·R_bdᵀ − W."""
    rot = oft_rotations(params, t["blocks"])
    count = shape[1] // params["block_size"]
    blocks = [rot[0]] * count if rot.shape[0] == 1 else list(rot)
    return base @ block_diag(blocks).T - base


def butterfly(n: int, groups: int, half: int, factors: int) -> np.ndarray:
    """spec/methods-tuners.md §2 boft: even chunks of ``half`` first, then odd ones, in each group."""
    if factors == 1:
        return np.arange(n)
    group = n // groups
    chunks = list(range(0, group // half, 2)) + list(range(1, group // half, 2))
    within = np.concatenate([np.arange(c * half, (c + 1) * half) for c in chunks])
    return np.concatenate([start + within for start in range(0, n, group)])


def boft_delta(params, shape, t, base):
    """(W·Mᵀ)·diag(s) − W, M = Π P_i·blockdiag(Cayley)·P_iᵀ."""
    rot = t["rotations"]
    factors, count, size, _ = rot.shape
    n, eye = count * size, np.eye(size)
    matrix = np.eye(n)
    for i in range(factors):
        perm = np.zeros((n, n))
        perm[np.arange(n), butterfly(n, count // 2 ** i, size // 2, factors)] = 1.0
        skew = [0.5 * (x - x.T) for x in rot[i]]
        blocks = block_diag([(eye - s) @ np.linalg.inv(eye + s) for s in skew])
        matrix = perm @ blocks @ perm.T @ matrix
    return (base @ matrix.T) * t["scale"].reshape(-1, 1) - base


def vera_slices(params, shape, t):
    """(A_m, B_m) float64: stored slices, else the seeded generator's pair (a bit pattern, taken from
    ``adapterfmt.methods.torch_cpu_rng_peft``, itself pinned bit for bit to torch and PEFT's saved pairs)."""
    if "proj_A" in t:
        return t["proj_A"], t["proj_B"]
    from adapterfmt.methods.torch_cpu_rng_peft import vera_projections
    a, b = vera_projections(int(params["seed"]), int(params["rank"]), int(params["max_in"]), int(params["max_out"]),
                            fma=params["float_affine"] == "fused")
    return a[:, :shape[1]].astype(np.float64), b[:shape[0], :].astype(np.float64)


def vera_delta(params, shape, t, base=None):
    """(λ_b ⊙ B_m)·(λ_d ⊙ A_m), no scale."""
    a, b = vera_slices(params, shape, t)
    return (t["lambda_b"].reshape(-1, 1) * b) @ (t["lambda_d"].reshape(-1, 1) * a)


def fourierft_delta(params, shape, t, base=None):
    """Re(ifft2(dense))·scaling in float64; positions from the seeded generator (a bit pattern, taken
    from ``adapterfmt.methods.torch_cpu_rng_peft``, pinned bit for bit to torch's randperm)."""
    from adapterfmt.methods.torch_cpu_rng_peft import fourierft_indices
    out, inp = shape
    rows, cols = fourierft_indices(int(params["seed"]), out, inp, int(params["n_frequency"]))
    dense = np.zeros((out, inp))
    dense[rows, cols] = t["spectrum"]
    return np.fft.ifft2(dense).real * params["scaling"]


#: method name -> ΔW(params, shape, tensors64, base64 or None), canonical orientation, float64.
def trainable_tokens_delta(params, shape, t, base, fan_in_fan_out):
    """W' − W where W' is W with the stored rows ``indices`` replaced by ``values`` (canonical columns when the
    base is stored transposed, ``fan_in_fan_out``)."""
    stored = (base.T if fan_in_fan_out else base).copy()
    stored[t["indices"].astype(np.int64)] = t["values"]
    merged = stored.T if fan_in_fan_out else stored
    return merged - base


#: Methods whose ΔW depends on the stored orientation (take ``fan_in_fan_out``).
ORIENTED = {"trainable_tokens": trainable_tokens_delta}
DELTA = {"lora": lora_delta, "dora": dora_delta, "olora": init_relative_delta, "pissa": init_relative_delta,
         "sorsa": sorsa_delta, "nola": nola_delta, "ia3": ia3_delta, "loha": loha_delta, "lokr": lokr_delta,
         "adalora": adalora_delta, "oft": oft_delta, "boft": boft_delta,
         "vera": vera_delta, "fourierft": fourierft_delta, "lora_tucker": lora_tucker_delta,
         "full": full_delta}
#: Methods whose ΔW depends on the base weight.
NEEDS_BASE = {"dora", "ia3", "oft", "boft", "trainable_tokens"}


def as_float64(tensors) -> dict[str, np.ndarray]:
    """Stored tensors (torch of any float dtype, or numpy) as float64 numpy arrays (an exact conversion);
    integer roles (token indices) as int64."""
    def convert(t):
        if isinstance(t, np.ndarray):
            return t if t.dtype in (np.float64, np.int64) else t.astype(np.float64)
        return t.numpy() if not t.is_floating_point() else t.double().numpy()
    return {role: convert(t) for role, t in tensors.items()}


def reference_delta(method: str, params: dict, shape, tensors, base: np.ndarray | None = None,
                    fan_in_fan_out: bool = False) -> np.ndarray:
    """ΔW of one module in canonical orientation, float64; ``base`` is the canonical float64 W.

    Example:
        >>> reference_delta("lora", {"rank": 1, "alpha": 2.0, "use_rslora": False}, [2, 1],
        ...                 {"lora_A": np.ones((1, 1)), "lora_B": np.ones((2, 1))}).tolist()
        [[2.0], [2.0]]
    """
    if method in NEEDS_BASE and base is None:
        raise ValueError(f"{method} needs the base weight")
    if method in ORIENTED:
        return ORIENTED[method](params, list(shape), as_float64(tensors), base, fan_in_fan_out)
    return DELTA[method](params, list(shape), as_float64(tensors), base)


def reference_merged(method: str, params: dict, shape, tensors, base: np.ndarray, weight: float = 1.0,
                     fan_in_fan_out: bool = False) -> np.ndarray:
    """W + weight·ΔW in float64, canonical orientation (DoRA at weight 1 is exactly its W')."""
    return base + weight * reference_delta(method, params, shape, tensors, base, fan_in_fan_out)


def applied(canonical: np.ndarray, fan_in_fan_out: bool) -> np.ndarray:
    """A canonical (out, in) matrix in the base's stored orientation (spec §4)."""
    return canonical.T if fan_in_fan_out else canonical


# ---------------------------------------------------------------------------- tolerance table
def delta_bound(method: str, params: dict, tensors64: dict, reference: np.ndarray,
                base: np.ndarray | None = None) -> np.ndarray | float:
    """The tolerance table above: an elementwise bound (array) or a max-norm bound (float)."""
    absb = {k: np.abs(v) for k, v in tensors64.items()}
    rank = int(params.get("rank", 0))  # ia3, oft, boft have none
    if method == "lora":
        b, a = absb["lora_B"], absb["lora_A"]
        products = np.einsum("or,rihw->oihw", b[:, :, 0, 0], a) if a.ndim == 4 else b @ a  # conv2d: per tap
        return (rank + 2) * U32 * abs(lora_rule(params)) * products
    if method in ("olora", "pissa"):
        products = absb["lora_B"] @ absb["lora_A"] + absb["lora_B0"] @ absb["lora_A0"]
        return (rank + 3) * U32 * abs(lora_rule(params)) * products
    if method == "sorsa":
        products = (absb["U_p"] * absb["S_p"]) @ absb["Vt_p"] + (absb["U_p0"] * absb["S_p0"]) @ absb["Vt_p0"]
        return (rank + 4) * U32 * abs(sorsa_rule(params)) * products
    if method == "dora":
        inp = reference.shape[1]
        return 4 * (inp + rank + 8) * U32 * (float(np.abs(reference + base).max()) + float(np.abs(base).max()))
    if method == "nola":
        # fp32 sums over k (and l) basis terms, then B·A: relative to the terms' magnitudes, not to a ΔW
        # that may cancel to almost nothing (a 1x3 module with rank 1 did).
        out, inp = reference.shape
        start, stop = params.get("rows") or (0, out)
        a = nola_factor(params, "A", (rank, inp), tensors64, magnitude=True)
        b = nola_factor(params, "B", (stop - start, rank), tensors64, magnitude=True)
        terms = np.zeros_like(reference)
        terms[start:stop] = abs(params["scale"]) * (b @ a)
        k, l = int(params["A"]["num_basis"]), int(params["B"]["num_basis"])
        return np.maximum(NOLA_RTOL * float(np.abs(reference).max()), (k + l + rank + 6) * U32 * terms)
    if method == "full":  # fp32(diff): exact from F16/BF16/F32
        return U32 * np.abs(reference)
    if method == "ia3":
        return 4 * U32 * (np.abs(base) + np.abs(reference + base))
    if method == "loha":
        h1, h2 = loha_halves(reference.shape, absb)
        terms = rank * rank if "t1" in absb else rank  # a Tucker half sums r² products
        return (2 * terms + 6) * U32 * abs(params["alpha"] / rank) * (h1 * h2)
    if method == "lokr":
        w1, w2 = lokr_halves(absb)
        terms = rank * rank if "t2" in absb else rank
        return (2 * terms + 6) * U32 * abs(lokr_rule(params, "w1" in absb and "w2" in absb)) * np.kron(w1, w2)
    if method == "lora_tucker":
        return (rank * rank + 4) * U32 * abs(lora_rule(params)) * lora_tucker_delta(
            {**params, "alpha": rank, "use_rslora": False}, reference.shape, absb)
    if method == "adalora":
        products = absb["lora_B"] @ (absb["lora_A"] * absb["lora_E"].reshape(-1, 1))
        return (rank + 5) * U32 * abs(params["scaling"] / params["ranknum"]) * products
    if method == "vera":
        a, b = vera_slices(params, reference.shape, tensors64)
        lam_b, lam_d = absb["lambda_b"].reshape(-1, 1), absb["lambda_d"].reshape(-1, 1)
        return (rank + 4) * U32 * ((lam_b * np.abs(b)) @ (lam_d * np.abs(a)))
    if method == "fourierft":
        size = reference.shape[0] * reference.shape[1]
        fft = (4 * math.log2(size) + 8) * U32 * abs(params["scaling"]) * float(absb["spectrum"].sum()) / size
        return fft + storage_roundoff(tensors64["spectrum"]) * np.abs(reference)
    if method == "trainable_tokens":
        return U32 * np.abs(reference)
    if method in ("oft", "boft"):
        inp = reference.shape[1]
        depth = inp + 16 * (params.get("neumann_terms", 1) + params.get("butterfly_factors", 1)) * \
            params["block_size"]
        return 8 * depth * U32 * (float(np.abs(reference + base).max()) + float(np.abs(base).max()))
    raise KeyError(f"no tolerance row for {method}")


def storage_roundoff(values: np.ndarray) -> float:
    """Unit roundoff of the coarsest half-precision dtype holding every value exactly (0: fp32 or wider)."""
    import torch
    for dtype, roundoff in ((torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)):
        if np.array_equal(torch.from_numpy(values).to(dtype).double().numpy(), values):
            return roundoff
    return 0.0


def within(got: np.ndarray, want: np.ndarray, bound) -> tuple[bool, float]:
    """(|got − want| ≤ bound everywhere, the worst excess over the bound)."""
    err = np.abs(got - want)
    excess = err - bound
    return bool((excess <= 0).all()), float(excess.max()) if excess.size else 0.0
