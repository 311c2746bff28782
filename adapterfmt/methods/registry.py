"""The methods this version implements: an explicit list (grep-able; nothing registers itself)."""
from __future__ import annotations

from ..errors import UnknownMethodError, UsageError
from ..format import Adapter
from ..format.manifest import Manifest
from .descriptor import Method
from .dora import DORA
from .init_relative import OLORA, PISSA
from .lora import LORA
from .lora_tucker import LORA_TUCKER
from .nola import NOLA_METHOD
from .sorsa import SORSA_METHOD
from .adalora import ADALORA_METHOD
from .boft import BOFT_METHOD
from .ia3 import IA3_METHOD
from .loha import LOHA_METHOD
from .lokr import LOKR_METHOD
from .oft import OFT_METHOD
from .vera import VERA_METHOD
from .fourierft import FOURIERFT_METHOD
from .full import FULL_METHOD
from .trainable_tokens import TRAINABLE_TOKENS_METHOD

METHODS: tuple[Method, ...] = (LORA, DORA, OLORA, PISSA, SORSA_METHOD, NOLA_METHOD, IA3_METHOD, LOHA_METHOD,
                               LOKR_METHOD, ADALORA_METHOD, OFT_METHOD, BOFT_METHOD,
                               VERA_METHOD, FOURIERFT_METHOD, TRAINABLE_TOKENS_METHOD, LORA_TUCKER,
                               FULL_METHOD)
METHOD_BY_NAME: dict[str, Method] = {m.name: m for m in METHODS}
assert len(METHOD_BY_NAME) == len(METHODS), "two methods share a name"


def get_method(name: str, *, path: str | None = None, module: str | None = None) -> Method:
    """The method called ``name``; a clear error when this version does not know it.

    Example:
        >>> get_method("lora").roles[0].name
        'lora_A'
    """
    try:
        return METHOD_BY_NAME[name]
    except KeyError:
        where = f" (module {module!r})" if module else ""
        raise UnknownMethodError(
            f"unknown adapter method {name!r}{where}; this version knows {', '.join(sorted(METHOD_BY_NAME))}",
            path=path, hint="upgrade adapterfmt or re-export the adapter with a supported method") from None


def check_manifest_methods(manifest: Manifest, path: str | None = None, *, lenient: bool = False) -> None:
    """Every module's method is known and its entry satisfies the method's descriptor (no data read).

    Example:
        >>> check_manifest_methods(read_adapter("a.safetensors").manifest)  # doctest: +SKIP
    """
    for target, entry in manifest.modules.items():
        get_method(entry.method, path=path, module=target).check_entry(target, entry, path, lenient=lenient)


def convert_module(target: str, entry, tensors, to: str, options: dict):
    """Convert one module to method ``to`` with whichever side offers it: (entry, tensors, status, note).

    Example:
        >>> convert_module("m", nola_entry, nola_tensors, "lora", {})  # doctest: +SKIP
    """
    source, into = get_method(entry.method), get_method(to)
    if entry.layer not in into.layers:
        raise UsageError(f"module {target!r} is a {entry.layer} layer, for which {to} is not defined",
                         hint=f"{to} supports {', '.join(into.layers)} layers; keep this module as {entry.method}")
    if to in source.converts_to:
        return source.convert_to(target, entry, tensors, to, options)
    if source.name in into.converts_from:
        return into.convert_from(target, entry, tensors, options)
    from .descriptor import refuse_conversion
    raise refuse_conversion(source, target, to)


def read_checked_adapter(path) -> Adapter:
    """Read a local adapterfmt file and check every module against its method's descriptor.

    Example:
        >>> adapter = read_checked_adapter("adapter.safetensors")  # doctest: +SKIP
    """
    from ..format import read_adapter
    from ..format.versions import FORMAT_VERSION
    adapter = read_adapter(path)
    check_manifest_methods(adapter.manifest, str(path), lenient=adapter.version[1] > FORMAT_VERSION[1])
    return adapter


def write_checked_adapter(adapter: Adapter, path, *, overwrite: bool = False):
    """Check every module against its method's descriptor, then write atomically.

    Example:
        >>> write_checked_adapter(adapter, "out.safetensors")  # doctest: +SKIP
    """
    from ..format import write_adapter
    check_manifest_methods(adapter.manifest, str(path))
    return write_adapter(adapter, path, overwrite=overwrite)
