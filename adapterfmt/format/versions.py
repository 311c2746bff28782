"""Format name, version and the compatibility rule (GGUF's: major only for structural changes)."""
from __future__ import annotations

import re
import warnings

from ..errors import ManifestError, UnknownMethodError, VersionError

FORMAT_NAME = "adapterfmt"
FORMAT_VERSION = (1, 3)
#: Methods added after 1.0, with the minor that introduced them. A file declaring an older minor is
#: validated as that minor, where the method does not exist: UnknownMethodError (spec README §3).
#: Writers write the oldest version that holds every method of the file, so files without them stay 1.1.
METHOD_SINCE = {"vera": (1, 2), "fourierft": (1, 2), "trainable_tokens": (1, 3), "lora_tucker": (1, 3),
                "full": (1, 3)}
#: Features of existing methods added after 1.0: (what, minor, predicate over a module entry dict). A file
#: declaring an older minor is validated as that minor, whose closed schema lacks the feature:
#: ManifestError (spec README §3, "Features by minor"). Writers stamp at least the feature's minor.
FEATURE_SINCE = (
    ("loha/lokr on a conv2d layer", (1, 3),
     lambda e: e.get("method") in ("loha", "lokr") and e.get("layer") == "conv2d"),
    ("DoRA magnitude_axis 'in'", (1, 3),
     lambda e: e.get("method") == "dora" and _params(e).get("magnitude_axis") == "in"),
    ("DoRA norm_eps", (1, 3), lambda e: e.get("method") == "dora" and "norm_eps" in _params(e)),
    ("DoRA on a conv2d layer", (1, 3), lambda e: e.get("method") == "dora" and e.get("layer") == "conv2d"),
)
OLDEST_WRITTEN = (1, 1)
SUPPORTED_MAJORS = (1,)

# safetensors metadata is a str -> str map; our keys are namespaced so that other
# tools' keys (``format``: ``pt``) can live beside them.
KEY_FORMAT = "adapterfmt.format"
KEY_VERSION = "adapterfmt.version"
KEY_MANIFEST = "adapterfmt.manifest"

# fullmatch: "1.1\n" is not a version ($ would match before the newline).
_VERSION_RE = re.compile(r"(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})")


def _params(entry: dict) -> dict:
    params = entry.get("params")
    return params if isinstance(params, dict) else {}


def _module_entries(data) -> list[tuple[str, dict]]:
    modules = data.get("modules") if isinstance(data, dict) else None
    return [(t, e) for t, e in (modules.items() if isinstance(modules, dict) else ()) if isinstance(e, dict)]


def features_of(entry: dict) -> list[tuple[str, tuple[int, int]]]:
    """The post-1.0 features (FEATURE_SINCE) a module entry uses, with their minor.

    Example:
        >>> features_of({"method": "loha", "layer": "conv2d", "params": {}})
        [('loha/lokr on a conv2d layer', (1, 3))]
    """
    return [(what, since) for what, since, uses in FEATURE_SINCE if uses(entry)]


def version_string(version: tuple[int, int] = FORMAT_VERSION) -> str:
    return f"{version[0]}.{version[1]}"


def parse_version(text: str, path: str | None = None) -> tuple[int, int]:
    """Parse ``"MAJOR.MINOR"`` and enforce the compatibility rule.

    An unknown major is refused; a newer minor is read with a warning, because minors only
    add optional fields.

    Example:
        >>> parse_version("1.0")
        (1, 0)
    """
    match = _VERSION_RE.fullmatch(text or "")
    if not match:
        raise ManifestError(f"format version {text!r} is not MAJOR.MINOR", path=path,
                            hint="the file is damaged or was not written by an adapterfmt writer")
    major, minor = int(match.group(1)), int(match.group(2))
    if major not in SUPPORTED_MAJORS:
        raise VersionError(
            f"adapterfmt format version {major}.{minor} is not supported by this reader "
            f"(it reads major version(s) {', '.join(map(str, SUPPORTED_MAJORS))})",
            path=path, hint="upgrade adapterfmt to read this file")
    if minor > FORMAT_VERSION[1]:
        warnings.warn(
            f"{path or 'adapter'}: written with format {major}.{minor}, newer than this reader's "
            f"{version_string()}; unknown optional fields are ignored", stacklevel=2)
    return major, minor


def version_for_methods(methods) -> tuple[int, int]:
    """The version a writer stamps on a file with these methods: the oldest that defines all of them.

    Example:
        >>> version_for_methods(["lora"]), version_for_methods(["lora", "vera"])
        ((1, 1), (1, 2))
    """
    return max([OLDEST_WRITTEN] + [METHOD_SINCE.get(m, OLDEST_WRITTEN) for m in methods])


def version_for_manifest(data: dict) -> tuple[int, int]:
    """The version a writer stamps on a manifest (as a JSON dict): the oldest defining its methods and features.

    Example:
        >>> version_for_manifest({"modules": {"m": {"method": "dora", "layer": "conv2d", "params": {}}}})
        (1, 3)
    """
    entries = [e for _, e in _module_entries(data)]
    version = version_for_methods([e.get("method") for e in entries if isinstance(e.get("method"), str)])
    return max([version] + [since for e in entries for _, since in features_of(e)])


def refuse_features_newer_than(data, version: tuple[int, int], path: str | None = None) -> None:
    """ManifestError for a module using a feature (FEATURE_SINCE) the file's declared minor does not define.

    Example:
        >>> refuse_features_newer_than({"modules": {"m": {"method": "lora", "layer": "conv2d"}}}, (1, 1))
    """
    for target, entry in _module_entries(data):
        for what, since in features_of(entry):
            if version[0] == since[0] and version < since:
                raise ManifestError(f"module {target!r}: {what} is defined from format {version_string(since)}, "
                                    f"but the file declares {version_string(version)}", path=path,
                                    hint="the file was written by a broken tool; re-export it")


def refuse_methods_newer_than(data, version: tuple[int, int], path: str | None = None) -> None:
    """UnknownMethodError for a module whose method the file's declared version does not define.

    Example:
        >>> refuse_methods_newer_than({"modules": {"m": {"method": "lora"}}}, (1, 1))
    """
    modules = data.get("modules") if isinstance(data, dict) else None
    for target, entry in (modules.items() if isinstance(modules, dict) else ()):
        method = entry.get("method") if isinstance(entry, dict) else None
        since = METHOD_SINCE.get(method) if isinstance(method, str) else None
        if since is not None and version[0] == since[0] and version < since:
            raise UnknownMethodError(f"module {target!r}: method {method!r} is defined from format "
                                     f"{version_string(since)}, but the file declares {version_string(version)}",
                                     path=path, hint="the file was written by a broken tool; re-export it")
