"""kohya-layout files made the way sd-scripts lays them out (lora_down/lora_up/0-d alpha per module),
for reader tests; adapterfmt itself only writes kohya names it read."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapterfmt import read_adapter


def write_kohya_file(native: Path, out: Path, prefix: str = "lora_unet", name_table: bool = True) -> dict[str, str]:
    """Write the LoRA modules of an adapterfmt file as a kohya file; returns {module: kohya name}."""
    adapter = read_adapter(native)
    state, names = {}, {}
    for target, entry in adapter.manifest.modules.items():
        name = f"{prefix}_{target.replace('.', '_')}"
        names[target] = name
        tensors = adapter.module_tensors(target)
        state[f"{name}.lora_down.weight"] = tensors["lora_A"].contiguous()
        state[f"{name}.lora_up.weight"] = tensors["lora_B"].contiguous()
        alpha = float(entry.params["scale"]) * int(entry.params["rank"])
        as32 = torch.tensor(alpha, dtype=torch.float32)
        state[f"{name}.alpha"] = as32 if float(as32) == alpha else torch.tensor(alpha, dtype=torch.float64)
    metadata = {"format": "pt", "ss_network_module": "networks.lora"}
    if name_table:
        metadata["adapterfmt.kohya_names"] = json.dumps({v: k for k, v in names.items()}, sort_keys=True)
    save_file(state, str(out), metadata=metadata)
    return names
