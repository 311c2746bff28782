"""The manifest: what an adapter is, which base it belongs to, and where its tensors are.

It is stored as JSON under ``adapterfmt.manifest`` in the safetensors metadata. The
dataclasses here are the only way the code builds or reads it, so the JSON Schema in
``spec/manifest.schema.json`` and this module describe the same thing.
"""
from __future__ import annotations

import json
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ManifestError



@dataclass
class TensorRef:
    """A tensor in the container: its name there, dtype (safetensors name) and shape."""

    name: str
    dtype: str
    shape: list[int]


@dataclass
class BaseWeight:
    """What the adapter expects of one base parameter."""

    shape: list[int]
    dtype: str | None = None
    fingerprint: str | None = None


@dataclass
class BaseQuantization:
    """The form of the base the adapter was trained against (spec §7): e.g. QLoRA's NF4.

    ``scheme`` is ``none``, ``nf4``, ``fp4``, ``int8`` or ``gguf:<TYPE>``; ``compute_dtype`` is the
    dtype the quantized weight is dequantized into (part of the form: bf16 and fp32 compute train
    against different weights); ``weight_dtype`` the dtype the base was loaded in before quantizing
    (None: as stored); ``skip_modules`` the library's skip list (None: its default).
    """

    scheme: str
    block_size: int | None = None
    compute_dtype: str | None = None
    weight_dtype: str | None = None
    double_quant: bool | None = None
    skip_modules: list[str] | None = None
    library: str | None = None
    library_version: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BaseQuantization":
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})


@dataclass
class BaseIdentity:
    """The base model: how to find it, and per targeted parameter its shape/dtype/fingerprint.

    ``quantization`` (optional, spec 1.1) records the base form used in training; None = unknown.
    """

    name_or_path: str | None = None
    revision: str | None = None
    architecture: str | None = None
    weights: dict[str, BaseWeight] = field(default_factory=dict)
    quantization: BaseQuantization | None = None


@dataclass
class ModuleEntry:
    """One adapted module.

    ``shape`` is the canonical ``(out, in)`` of the base weight as ``nn.Linear`` lays it out;
    ``fan_in_fan_out`` says the stored base weight is the transpose (GPT-2 ``Conv1D``,
    embeddings), so ΔW is transposed when applied. ``params`` are the method's own
    (LoRA: rank, alpha, use_rslora, scale); ``tensors`` maps the method's roles to tensors.
    """

    method: str
    base_weight: str
    shape: list[int]
    params: dict[str, Any]
    tensors: dict[str, TensorRef]
    fan_in_fan_out: bool = False
    layer: str = "linear"
    #: Multi-component adapters only: the pipeline component (``unet``, ``text_encoder``, ...) whose
    #: parameter ``base_weight`` is; the module's key is ``<component>.<module path in the component>``.
    component: str | None = None

    def replace(self, **changes: Any) -> "ModuleEntry":
        """A copy with some fields changed (e.g. another method's params and tensors)."""
        return dataclasses.replace(self, **changes)

    def stored_shape(self) -> list[int]:
        """The base parameter's shape as stored: ``shape``, with the last two dims swapped when
        ``fan_in_fan_out``."""
        shape = list(self.shape)
        return shape[:-2] + [shape[-1], shape[-2]] if self.fan_in_fan_out else shape

    def canonical(self, stored: Any) -> Any:
        """A base weight as stored -> canonical ``(out, in)`` orientation (a view, no copy; per expert if 3-D)."""
        return stored.transpose(-2, -1) if self.fan_in_fan_out else stored


@dataclass
class Payload:
    """A non-adapter tensor (PEFT ``modules_to_save``, full replacement, bias delta)."""

    kind: str
    target: str
    tensor: TensorRef


@dataclass
class Manifest:
    """The whole manifest. ``modules`` is keyed by the target module's name in the base."""

    base: BaseIdentity = field(default_factory=BaseIdentity)
    modules: dict[str, ModuleEntry] = field(default_factory=dict)
    payloads: dict[str, Payload] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    created_by: str = ""
    #: Multi-component adapters only: component name -> that component's base identity.
    components: dict[str, BaseIdentity] = field(default_factory=dict)

    def methods(self) -> list[str]:
        """Distinct methods used, in first-seen order."""
        return list(dict.fromkeys(m.method for m in self.modules.values()))

    def tensor_refs(self) -> dict[str, TensorRef]:
        """Every tensor the manifest claims, by container name."""
        refs = {ref.name: ref for m in self.modules.values() for ref in m.tensors.values()}
        refs.update({p.tensor.name: p.tensor for p in self.payloads.values()})
        return refs

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not data["source"]:
            data.pop("source")
        # Optional 1.1 fields are absent, not empty, so files without them stay byte-identical.
        for identity in [data["base"], *data["components"].values()]:
            if identity["quantization"] is None:
                identity.pop("quantization")
        if not data["components"]:
            data.pop("components")
        for module in data["modules"].values():
            if module["component"] is None:
                module.pop("component")
        return data

    def base_for(self, entry: ModuleEntry) -> BaseIdentity:
        """The base identity a module belongs to: its component's, or the single ``base``."""
        return self.components[entry.component] if entry.component is not None else self.base

    def expected_weight(self, entry: ModuleEntry) -> BaseWeight | None:
        """What the module's base weight must be (shape, dtype, fingerprint), if recorded."""
        identity = self.components.get(entry.component) if entry.component is not None else self.base
        return identity.weights.get(entry.base_weight) if identity is not None else None

    def to_json(self) -> str:
        # sort_keys makes the header, and so the file, deterministic for golden tests.
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str | None = None) -> "Manifest":
        """Build from parsed JSON that already passed the schema."""
        try:
            identity = _identity(data.get("base", {}))
            components = {name: _identity(c) for name, c in data.get("components", {}).items()}
            modules = {
                name: ModuleEntry(
                    method=m["method"], base_weight=m["base_weight"], shape=list(m["shape"]),
                    params=dict(m["params"]),
                    tensors={role: _ref(t) for role, t in m["tensors"].items()},
                    fan_in_fan_out=bool(m.get("fan_in_fan_out", False)),
                    layer=m.get("layer", "linear"), component=m.get("component"))
                for name, m in data.get("modules", {}).items()}
            payloads = {name: Payload(kind=p["kind"], target=p["target"], tensor=_ref(p["tensor"]))
                        for name, p in data.get("payloads", {}).items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"manifest is malformed near {exc!s}", path=path,
                                hint="the file was damaged or hand-edited; re-export it") from None
        manifest = cls(base=identity, modules=modules, payloads=payloads, source=dict(data.get("source", {})),
                       created_by=data.get("created_by", ""), components=components)
        _check_components(manifest, path)
        return manifest


def _identity(base: dict[str, Any]) -> BaseIdentity:
    return BaseIdentity(
        name_or_path=base.get("name_or_path"), revision=base.get("revision"), architecture=base.get("architecture"),
        weights={k: BaseWeight(shape=list(v["shape"]), dtype=v.get("dtype"), fingerprint=v.get("fingerprint"))
                 for k, v in base.get("weights", {}).items()},
        quantization=BaseQuantization.from_dict(base["quantization"]) if "quantization" in base else None)


def _check_components(manifest: Manifest, path: str | None) -> None:
    """spec §7.2: every module of a multi-component file names a listed component and is keyed by it."""
    if not manifest.components and all(m.component is None for m in manifest.modules.values()):
        return
    for key, entry in manifest.modules.items():
        if entry.component not in manifest.components:
            raise ManifestError(f"module {key!r} names component {entry.component!r}, which is not in components",
                                path=path, hint="the manifest contradicts itself; re-export the file")
        if not key.startswith(entry.component + "."):
            raise ManifestError(f"module {key!r} of component {entry.component!r} is not keyed "
                                f"'{entry.component}.<module>'", path=path,
                                hint="the manifest contradicts itself; re-export the file")
    if manifest.base.weights:
        raise ManifestError("a multi-component manifest lists base.weights; they belong in components",
                            path=path, hint="the manifest contradicts itself; re-export the file")


def _ref(data: dict[str, Any]) -> TensorRef:
    return TensorRef(name=data["name"], dtype=data["dtype"], shape=list(data["shape"]))
