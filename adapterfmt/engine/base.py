"""Binding an adapter to its base: check names, shapes and fingerprints, and record the identity.

Written once here; ``convert --base``, ``validate --base``, ``merge`` and ``unmerge`` all use it.
"""
from __future__ import annotations

import torch

from ..checkpoint import BaseCheckpoint
from ..errors import BaseMismatchError
from ..format import Adapter
from ..format.components import split_components
from ..methods.full import bias_roles_as_payloads
from ..format.manifest import ModuleEntry


def canonical_base(entry: ModuleEntry, weight: torch.Tensor) -> torch.Tensor:
    """A stored base weight in the module's canonical (out, in) orientation, fp32.

    Example:
        >>> canonical_base(entry, base.get(entry.base_weight))  # doctest: +SKIP
    """
    return entry.canonical(weight.float())


def bind_base(adapter: Adapter, base: BaseCheckpoint, path: str | None = None, *, check_only: bool = False,
              force_hint: str = "use the base the adapter was made for") -> None:
    """Check the adapter against a base checkpoint and record (or verify) its identity.

    Recorded fingerprints are always compared (a mismatch is a :class:`BaseMismatchError`);
    unless ``check_only``, missing dtypes and fingerprints are filled in from ``base``.

    A multi-component adapter (spec §7.2) binds each component to that component of a diffusers
    pipeline base, against its own base identity; a single component directory binds an adapter
    that has only that component.

    Example:
        >>> bind_base(adapter, BaseCheckpoint("tiny-llama"))  # doctest: +SKIP
    """
    if adapter.manifest.components:
        for component, view in split_components(adapter).items():
            _bind_single(view, _component_base(base, component, adapter, path), path, check_only, force_hint)
        if not check_only and hasattr(base, "components"):  # the pipeline itself, for humans; no weights
            adapter.manifest.base.architecture = adapter.manifest.base.architecture or base.architecture
            adapter.manifest.base.name_or_path = adapter.manifest.base.name_or_path or base.name_or_path
        return
    _bind_single(adapter, base, path, check_only, force_hint)


def _component_base(base: BaseCheckpoint, component: str, adapter: Adapter, path: str | None) -> BaseCheckpoint:
    """The checkpoint of one component: from a pipeline, or the base itself for a one-component adapter."""
    if hasattr(base, "component"):
        return base.component(component)
    if len(adapter.manifest.components) == 1:
        return base
    raise BaseMismatchError(f"the adapter has components {', '.join(adapter.manifest.components)}; one model "
                            "directory cannot be the base of them all", path=path,
                            hint="pass the diffusers pipeline directory (with model_index.json) as --base")


def shape_mismatch(name: str, shape, want, path: str | None) -> BaseMismatchError:
    """The refusal for a base parameter whose shape is not the adapter's, naming the one common cause.

    PEFT stores LoHa/LoKr/LoRA factors of a Conv2d flattened to 2-D, so a file read without ``--base``
    records such a module as a Linear (out, in·kh·kw); the maths is the same, the layer kind is not.

    Example:
        >>> str(shape_mismatch("conv.weight", [8, 3, 7, 7], [8, 147], None)).startswith("base parameter")
        True
    """
    shape, want = list(shape), list(want)
    if len(shape) == 4 and len(want) == 2 and [shape[0], shape[1] * shape[2] * shape[3]] == want:
        return BaseMismatchError(f"base parameter {name!r} is a convolution {shape}; the adapter holds it as a "
                                 f"Linear {want} (its factors were read without the base)", path=path,
                                 hint="convert the source adapter again with --base so that its convolutions "
                                      "are recognised")
    return BaseMismatchError(f"base parameter {name!r} has shape {shape}, the adapter expects {want}", path=path,
                             hint="this adapter is for a different model")


def _bind_single(adapter: Adapter, base: BaseCheckpoint, path: str | None, check_only: bool, force_hint: str) -> None:
    manifest = adapter.manifest
    recorded = manifest.base.architecture
    if recorded and base.architecture and recorded != base.architecture:
        raise BaseMismatchError(f"the adapter was made for {recorded}, the base is {base.architecture}", path=path,
                                hint="use the base the adapter was made for")
    expected = {e.base_weight: w for e in manifest.modules.values()
                for w in [manifest.base.weights.get(e.base_weight)] if w is not None}
    for payload in manifest.payloads.values():
        if payload.target not in base:
            raise BaseMismatchError(f"payload target {payload.target!r} is not in the base model", path=path,
                                    hint="check --base")
    for name, want in expected.items():
        shape = base.shape(name)
        if list(shape) != list(want.shape):
            raise shape_mismatch(name, shape, want.shape, path)
        fingerprint = base.fingerprint(name)  # None: not comparable (a pre-quantized base's weights)
        if want.fingerprint and fingerprint is not None and want.fingerprint != fingerprint:
            raise BaseMismatchError(f"base parameter {name!r} has different content than the adapter's "
                                    "base (fingerprint mismatch)", path=path, hint=force_hint)
        if not check_only and fingerprint is not None:
            want.dtype, want.fingerprint = base.dtype_name(name), fingerprint
    if not check_only:
        manifest.base.architecture = manifest.base.architecture or base.architecture
        manifest.base.name_or_path = manifest.base.name_or_path or base.name_or_path


def component_view(adapter: Adapter, base: BaseCheckpoint, path: str | None = None) -> Adapter:
    """The part of an adapter that applies to one model directory.

    A single-model adapter is returned as is. For a multi-component adapter (spec §7.2) the
    component is the one whose recorded architecture is the base's, or else the one whose recorded
    fingerprints the base matches; none or several is a :class:`BaseMismatchError`.

    Example:
        >>> component_view(sd_lora, DiffusersComponent("sd15/unet")).manifest.base.architecture  # doctest: +SKIP
        'UNet2DConditionModel'
    """
    if not adapter.manifest.components:
        return bias_roles_as_payloads(adapter)
    views = split_components(adapter)
    chosen = [c for c, v in views.items() if v.manifest.base.architecture and
              v.manifest.base.architecture == base.architecture]
    if len(chosen) != 1:
        chosen = [c for c, v in views.items() if _fingerprints_match(v, base)]
    if len(chosen) != 1:
        raise BaseMismatchError(f"cannot tell which of the adapter's components ({', '.join(views)}) this base "
                                f"({base.architecture or 'unknown architecture'}) is", path=path,
                                hint="merge into a component directory the adapter has modules for" if any(
                                    v.manifest.base.architecture for v in views.values()) else
                                "the adapter records no base (converted without --base); convert it again with "
                                "--base pointing at the pipeline, then merge")
    # bias roles (full's diff_b) merge as bias deltas, the engine's one way of changing a bias
    return bias_roles_as_payloads(views[chosen[0]])


def _fingerprints_match(view: Adapter, base: BaseCheckpoint) -> bool:
    weights = view.manifest.base.weights
    return bool(weights) and all(w.fingerprint and name in base and base.fingerprint(name) == w.fingerprint
                                 for name, w in weights.items())


def stored_name(entry: ModuleEntry, base: BaseCheckpoint) -> str:
    """The name of a module's base weight in ``base``: ``<component>.<weight>`` in a pipeline.

    Example:
        >>> stored_name(entry, DiffusersPipeline("sd15"))  # doctest: +SKIP
        'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight'
    """
    if entry.component is not None and hasattr(base, "components"):
        return f"{entry.component}.{entry.base_weight}"
    return entry.base_weight
