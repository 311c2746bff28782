"""PEFT ``TRAINABLE_TOKENS`` (the standalone tuner) <-> adapterfmt ``trainable_tokens``.

One ``token_indices`` list for every targeted module; ``<module>.trainable_tokens_delta`` holds the
trained rows (see :mod:`..tokens`). The import needs the base (the vocabulary size is not saved).
"""
from __future__ import annotations

from ....errors import UsageError
from ..config import PREFIX
from ..tokens import TUNER_LEAF, drop_tied_copies, split_token_rows, token_module, token_state
from ._common import Tuner, common_export_fields


def shared(config, state, path, base, report):
    """Drop PEFT's copy of the rows for a head tied to the embedding; the builder then sees each module once."""
    rest, rows = split_token_rows(state, TUNER_LEAF)
    indices = {module: config.get("token_indices") for module in rows}
    kept = drop_tied_copies(rows, indices, base, report)
    rest.update({f"{PREFIX}{module}{TUNER_LEAF}": values for module, values in kept.items()})
    return rest, build


def build(config, module, parts, path, base):
    return token_module(module, parts["trainable_tokens_delta"], config.get("token_indices"), base, path)


def export(adapter, report):
    indices, state = token_state(adapter, TUNER_LEAF)
    distinct = {tuple(v) for v in indices.values()}
    if len(distinct) > 1:
        raise UsageError(f"PEFT's TrainableTokens has one token_indices list, but the modules replace different rows "
                         f"({', '.join(sorted(indices))})", hint="export the modules as separate adapters")
    if adapter.manifest.payloads:
        raise UsageError(f"PEFT's TrainableTokens has no modules_to_save or other payloads "
                         f"({', '.join(sorted(adapter.manifest.payloads))})",
                         hint="merge the adapter instead, or keep the adapterfmt file")
    config = {"peft_type": "TRAINABLE_TOKENS", **common_export_fields(adapter),
              "token_indices": list(distinct.pop()), "init_weights": True}
    config.pop("modules_to_save")
    for target in indices:
        report.add(target, "lossless")
    return config, state


TRAINABLE_TOKENS_TUNER = Tuner(peft_type="TRAINABLE_TOKENS", method="trainable_tokens",
                               leaves={"trainable_tokens_delta": "values"},
                               handled=frozenset({"token_indices"}), training_only=frozenset({"init_weights"}),
                               build=build, export=export, shared=shared)
