"""Trainable tokens (PEFT ``TrainableTokensConfig`` / LoRA ``trainable_token_indices``): replaced rows.

Some rows of a stored weight (token embeddings of an input embedding, or of an output head) are
replaced by trained values: W'[i] = v_j for i = indices[j]. Not a ΔW method: the merged weight is
the base with those rows overwritten, so merging needs the base and a merge weight w ≠ 1 blends,
W'[i] = W[i] + w·(v_j − W[i]). Rows are rows of the weight *as stored* ((vocab, hidden) for both an
``nn.Embedding`` and an ``nn.Linear`` head); in canonical (out, in) orientation that is a column of
an embedding (``fan_in_fan_out``) and a row of a linear layer.

Unmerging needs the original rows, which the file does not hold (PEFT keeps them in memory only):
it takes them from the base (``--base``).
"""
from __future__ import annotations

import torch
from pydantic import Field

from ..errors import ManifestError, TensorError
from .descriptor import Finding, Method, Params, Role


class TrainableTokensParams(Params):
    #: Number of replaced rows (the length of ``indices``).
    count: int = Field(ge=1)


def trainable_tokens_params(count: int) -> dict:
    """The params dict of a trainable-tokens module entry.

    Example:
        >>> trainable_tokens_params(3)
        {'count': 3}
    """
    return {"count": int(count)}


def token_axes(entry) -> tuple[int, int]:
    """(number of rows as stored = tokens, row width) of the module's base weight.

    Example:
        >>> from adapterfmt.format import ModuleEntry
        >>> token_axes(ModuleEntry("trainable_tokens", "e.weight", [16, 64], {}, {}, True, "embedding"))
        (64, 16)
    """
    out_f, in_f = entry.shape
    # By layer, as the spec says (an embedding is stored (tokens, d) = transposed): a file whose
    # fan_in_fan_out contradicts its layer is then refused by that rule, not by a role shape.
    return (in_f, out_f) if entry.layer == "embedding" else (out_f, in_f)


def check_indices(target: str, indices: torch.Tensor, tokens: int) -> None:
    """Indices are distinct and in [0, tokens): else a TensorError naming the module (spec: replaced rows)."""
    outside = indices[(indices < 0) | (indices >= tokens)]
    if outside.numel():
        raise TensorError(f"module {target!r}: token index {int(outside[0])} is outside the weight's {tokens} rows",
                          hint="the adapter belongs to another base; re-export it")
    if torch.unique(indices).numel() != indices.numel():
        raise TensorError(f"module {target!r}: a token index is listed twice (the replacement would be ambiguous)",
                          hint="the file is damaged; re-export the adapter")


class TrainableTokens(Method):
    name = "trainable_tokens"
    summary = "replaced rows (token embeddings) of an embedding or output head (PEFT trainable tokens)"
    params_model = TrainableTokensParams
    roles = (Role("indices", ("k",), dtypes=("I64",), trained=False), Role("values", ("k", "d")))
    needs_base = True
    row_separable = False
    layers = ("embedding", "linear")
    formula = "W'[indices[j], :] = values[j] (rows of the stored weight); W' − W elsewhere 0"
    spec_file = "methods-tuners.md"

    def dims(self, entry, params):
        return {"k": params.count, "d": token_axes(entry)[1]}

    def check_entry(self, target, entry, path=None, *, lenient=False):
        params = super().check_entry(target, entry, path, lenient=lenient)
        if entry.fan_in_fan_out != (entry.layer == "embedding"):
            raise ManifestError(f"module {target!r}: trainable_tokens on a {entry.layer} layer must have "
                                f"fan_in_fan_out {entry.layer == 'embedding'}", path=path,
                                hint="the manifest is inconsistent; re-export the adapter")
        return params

    def merged(self, entry, tensors, base, rows=None):
        # The stored weight's rows are replaced: fp32 values, rounded once to the base dtype by the
        # engine, the same single rounding as PEFT's values.to(W.dtype) in index_copy.
        indices = tensors["indices"].to(torch.int64)
        check_indices(entry.base_weight, indices, token_axes(entry)[0])
        out = base.clone()
        values = tensors["values"].float().to(out.device)
        if entry.fan_in_fan_out:
            out[:, indices] = values.t()
        else:
            out[indices, :] = values
        return out

    changes_tied_uses = True
    restores_from_base = True

    def unmerged_with_base(self, entry, tensors, merged, base):
        """The merged weight with the replaced rows copied back from the original base (fp32, canonical)."""
        indices = tensors["indices"].to(torch.int64)
        out = merged.clone()
        if entry.fan_in_fan_out:
            out[:, indices] = base[:, indices]
        else:
            out[indices, :] = base[indices, :]
        return out

    def invariants(self, entry, tensors):
        """Indices distinct and inside the weight's rows (an error otherwise: the merge would be ambiguous)."""
        indices = tensors["indices"].to(torch.int64)
        tokens = token_axes(entry)[0]
        findings = []
        outside = int(((indices < 0) | (indices >= tokens)).sum())
        if outside:
            findings.append(Finding("error", "token_index_out_of_range",
                                    f"{outside} token index(es) outside the weight's {tokens} rows",
                                    {"indices_out_of_range": float(outside)}))
        repeated = indices.numel() - int(torch.unique(indices).numel())
        if repeated:
            findings.append(Finding("error", "token_index_repeated",
                                    f"{repeated} token index(es) listed twice (the replacement is ambiguous)",
                                    {"indices_repeated": float(repeated)}))
        return findings

    def parameter_count(self, entry):
        return entry.params["count"] * token_axes(entry)[1]

    def example_tensors(self, entry, generator, dtype=torch.float32):
        tokens, width = token_axes(entry)
        count = self.params(entry).count
        indices = torch.randperm(tokens, generator=generator)[:count]  # distinct rows
        return {"indices": indices.to(torch.int64), "values": torch.randn(count, width, generator=generator).to(dtype)}


TRAINABLE_TOKENS_METHOD = TrainableTokens()
