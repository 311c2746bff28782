"""The NOLA method descriptor: ΔW = s·B·A with A, B seeded-basis combinations (``spec/nola.md``)."""
from __future__ import annotations

from ...errors import AdapterFmtError, ManifestError, UnknownMethodError
from ..descriptor import Method, Role, refuse_conversion
from .bases import GENERATORS, fingerprint, known_generators
from .convert import NolaFromLoraOptions, lora_to_nola, nola_to_lora
from .module import SIDES, NolaParams, fl32, nola_delta, side_dims


class NOLA(Method):
    name = "nola"
    summary = "seeded random-basis LoRA (Koohpayegani et al. 2024); coefficients + seeds only"
    params_model = NolaParams
    roles = (Role("coef_A", ("k",)), Role("coef_B", ("l",)),
             Role("offset_A", ("r", "in"), required=False), Role("offset_B", ("rows", "r"), required=False))
    converts_to = ("lora",)
    converts_from = ("lora",)
    convert_options = NolaFromLoraOptions
    formula = "ΔW[rows] = scale·B·A; A = offset_A + basis_scale_A·Σα_i·A_i, B likewise"
    spec_file = "nola.md"

    def dims(self, entry, params):
        start, stop = params.rows or [0, entry.shape[0]]
        return {"out": entry.shape[0], "in": entry.shape[1], "r": params.rank, "k": params.A.num_basis,
                "l": params.B.num_basis, "rows": stop - start}

    def check_entry(self, target, entry, path=None, *, lenient=False):
        params = super().check_entry(target, entry, path, lenient=lenient)
        if (params.generator.id, params.generator.version) not in GENERATORS:
            raise UnknownMethodError(f"module {target!r}: unknown NOLA basis generator {params.generator.id}/"
                                     f"v{params.generator.version} (this version regenerates "
                                     f"{', '.join(known_generators())})", path=path,
                                     hint="upgrade adapterfmt; the basis cannot be regenerated")
        rows = params.rows or [0, entry.shape[0]]
        if not 0 <= rows[0] < rows[1] <= entry.shape[0]:
            raise ManifestError(f"module {target!r}: rows {rows} outside 0..{entry.shape[0]}", path=path,
                                hint="the manifest is damaged; re-export the adapter")
        for side in (params.A, params.B):
            if fl32(side.basis_scale) != side.basis_scale:
                raise ManifestError(f"module {target!r}: basis_scale {side.basis_scale} is not a float32 value",
                                    path=path, hint="store fl32(1/sqrt(k)) exactly")
            if not 0 <= int(side.seed) < 2**64:
                raise ManifestError(f"module {target!r}: seed {side.seed} is not a uint64", path=path,
                                    hint="the manifest is damaged")
        return params

    def delta(self, entry, tensors, base=None, rows=None):
        return nola_delta(entry, tensors)

    def validate_module(self, target, entry, tensors, base):
        problems, measures = [], {}
        gen = entry.params["generator"]
        for side in SIDES:
            info = entry.params[side]
            try:
                got = fingerprint(gen, info, side_dims(entry, side))
            except AdapterFmtError as exc:
                problems.append(f"basis {side} cannot be regenerated ({exc.message})")
                continue
            if got != info["fingerprint"]:
                problems.append(f"basis {side} regenerated from seed {info['seed']} does not match its fingerprint "
                                f"(generator {gen['id']}/v{gen['version']}); this machine's generator differs "
                                "from the one that made the adapter")
        # An unverified emulation (legacy CUDA imports) is self-consistent, so not a problem;
        # it is surfaced as a measurement so that callers can flag it.
        measures["basis_generator_unverified"] = float(gen.get("verified") is False)
        return problems, measures

    def parameter_count(self, entry):
        # Coefficients and offsets are the stored scalars; each seed counts as one scalar too.
        return super().parameter_count(entry) + len(SIDES)

    def convert_to(self, target, entry, tensors, to, options):
        if to != "lora":
            raise refuse_conversion(self, target, to)
        return nola_to_lora(target, entry, tensors)

    def convert_from(self, target, entry, tensors, options):
        return lora_to_nola(target, entry, tensors, options)


NOLA_METHOD = NOLA()
