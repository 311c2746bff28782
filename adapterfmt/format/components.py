"""Multi-component adapters (spec §7.2): one file, modules for several components of a pipeline.

A multi-component manifest keys each module ``<component>.<module path in that component>``, sets
the module's ``component`` and keeps each component's base identity in ``components``. Most of the
code works on single-model adapters, so these helpers split a multi-component adapter into one
single-model view per component and join such views back.
"""
from __future__ import annotations

import dataclasses

from ..errors import UsageError
from .container import Adapter
from .manifest import BaseIdentity, Manifest

#: Pipeline components an adapter may target (diffusers' attribute names).
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae", "prior")


def is_multi_component(adapter: Adapter) -> bool:
    """True when the manifest has ``components`` (spec §7.2)."""
    return bool(adapter.manifest.components)


def split_components(adapter: Adapter) -> dict[str, Adapter]:
    """One single-model adapter per component; module keys lose the ``<component>.`` prefix.

    The views share tensors and :class:`BaseWeight` objects with ``adapter``, so binding a view
    to its component's base records dtypes and fingerprints in ``adapter`` too.

    Example:
        >>> views = split_components(adapter)  # doctest: +SKIP
        >>> sorted(views)  # doctest: +SKIP
        ['text_encoder', 'unet']
    """
    manifest = adapter.manifest
    if not manifest.components:
        raise UsageError("the adapter has no components", hint="this is a single-model adapter")
    if manifest.payloads:
        raise UsageError("payloads in multi-component adapters are not supported")
    views = {}
    for component, identity in manifest.components.items():
        modules = {key[len(component) + 1:]: dataclasses.replace(entry, component=None)
                   for key, entry in manifest.modules.items() if entry.component == component}
        names = {ref.name for entry in modules.values() for ref in entry.tensors.values()}
        view = Manifest(base=identity, modules=modules, source=manifest.source, created_by=manifest.created_by)
        views[component] = Adapter(view, {n: adapter.tensors[n] for n in names}, adapter.version)
    return views


def join_components(parts: dict[str, Adapter], source: dict | None = None) -> Adapter:
    """One multi-component adapter from single-model adapters keyed by component.

    Tensor and module names get the ``<component>.`` prefix; each part's ``base`` becomes
    ``components[component]``.

    Example:
        >>> joined = join_components({"unet": unet_part, "text_encoder": te_part})  # doctest: +SKIP
    """
    manifest, tensors = Manifest(source=dict(source or {})), {}
    for component, part in parts.items():
        if component not in COMPONENTS:
            raise UsageError(f"unknown pipeline component {component!r}",
                             hint=f"components are {', '.join(COMPONENTS)}")
        if part.manifest.payloads:
            raise UsageError(f"component {component!r} has payloads; multi-component payloads are not supported")
        identity = part.manifest.base
        manifest.components[component] = BaseIdentity(identity.name_or_path, identity.revision,
                                                      identity.architecture, dict(identity.weights))
        for key, entry in part.manifest.modules.items():
            refs = {role: dataclasses.replace(ref, name=f"{component}.{ref.name}") for role, ref in entry.tensors.items()}
            for role, ref in entry.tensors.items():
                tensors[refs[role].name] = part.tensors[ref.name]
            manifest.modules[f"{component}.{key}"] = dataclasses.replace(entry, tensors=refs, component=component)
    return Adapter(manifest, tensors)
