"""Full (dense) ΔW: the whole weight difference stored as is (LyCORIS ``full``: ``diff`` and ``diff_b``).

ΔW = diff; the optional ``diff_b`` is a delta on the layer's bias (b' = b + diff_b). No scale and no
factorisation: the stored tensor is the update. There is no PEFT counterpart (PEFT export refuses it).
"""
from __future__ import annotations

import dataclasses

from ..format import Adapter, Manifest
from ..format.manifest import Payload
from .descriptor import CONV2D_LAYER, Method, Params, Role, take_rows

#: Roles that are deltas on the layer's bias, not on its weight (merged as ``bias_delta`` payloads).
BIAS_ROLES = ("diff_b",)


class FullParams(Params):
    pass


class Full(Method):
    name = "full"
    summary = "dense weight difference (LyCORIS full / A1111 diff), optional bias difference"
    params_model = FullParams
    roles = (Role("diff", ("out", "in")), Role("diff_b", ("out",), required=False))
    conv2d_roles = (Role("diff", ("out", "in", "kh", "kw")), Role("diff_b", ("out",), required=False))
    row_separable = True
    layers = ("linear", CONV2D_LAYER)
    formula = "ΔW = diff; bias' = bias + diff_b (optional)"
    spec_file = "methods-full.md"

    def roles_for(self, entry):
        return self.conv2d_roles if entry.layer == CONV2D_LAYER else self.roles

    def dims(self, entry, params):
        if entry.layer == CONV2D_LAYER:
            out_f, in_f, kh, kw = entry.shape
            return {"out": out_f, "in": in_f, "kh": kh, "kw": kw}
        return super().dims(entry, params)

    def delta(self, entry, tensors, base=None, rows=None):
        return take_rows(tensors["diff"], rows).float()


FULL_METHOD = Full()


def bias_roles_as_payloads(adapter: Adapter) -> Adapter:
    """The adapter with every bias role (``diff_b``) moved to a ``bias_delta`` payload on ``<module>.bias``,
    which is how the merge engine applies bias deltas; the adapter itself when there is none.

    Example:
        >>> merged_view = bias_roles_as_payloads(adapter)  # doctest: +SKIP
    """
    manifest = adapter.manifest
    if not any(role in entry.tensors for entry in manifest.modules.values() for role in BIAS_ROLES):
        return adapter
    modules, payloads = {}, dict(manifest.payloads)
    for target, entry in manifest.modules.items():
        kept = {role: ref for role, ref in entry.tensors.items() if role not in BIAS_ROLES}
        for role in set(entry.tensors) - set(kept):
            bias = entry.base_weight.removesuffix(".weight") + ".bias"
            payloads[bias] = Payload(kind="bias_delta", target=bias, tensor=entry.tensors[role])
        modules[target] = dataclasses.replace(entry, tensors=kept)
    view = Manifest(base=manifest.base, modules=modules, payloads=payloads, source=manifest.source,
                    created_by=manifest.created_by, components=manifest.components)
    return Adapter(view, adapter.tensors, adapter.version)
