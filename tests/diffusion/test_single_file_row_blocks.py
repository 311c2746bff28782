"""The single-file merge keeps its fp32 working set to row blocks, as the directory merge does.

A stored tensor that is one whole adapted weight is merged and written block by block (the memory a
merge needs does not grow with the largest tensor); only fused tensors (OpenCLIP's in_proj_weight,
q/k/v in one) are merged whole. The blocks change nothing: the UNet merged in the single file equals,
bit for bit, the same UNet merged as a diffusers component directory.
"""
import torch
from safetensors.torch import load_file

import adapterfmt
from adapterfmt.engine import merge as merge_engine
from adapterfmt.engine.writer import StreamingWriter

from .test_merge_single_file import _loras, _single


def test_adapted_weights_are_merged_in_row_blocks_equal_to_the_directory_merge(sdxl, tmp_path, monkeypatch):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    pipe_dir, models = sdxl
    single = _single("sdxl", models, tmp_path)
    _, specs = _loras("sdxl", models, tmp_path, single, [(1, 0.7), (2, -0.3)])
    adapters = [(af, w) for _, af, w in specs]
    monkeypatch.setattr(merge_engine, "ROW_BLOCK_BYTES", 1)  # one row per block
    blocks, whole = {}, []
    real_blocks, real_tensor = StreamingWriter.write_blocks, StreamingWriter.write_tensor

    def counting_blocks(self, name, parts):
        def counted():
            for part in parts:
                blocks[name] = blocks.get(name, 0) + 1
                yield part
        real_blocks(self, name, counted())

    def recording_tensor(self, name, tensor):
        whole.append(name)
        real_tensor(self, name, tensor)

    monkeypatch.setattr(StreamingWriter, "write_blocks", counting_blocks)
    monkeypatch.setattr(StreamingWriter, "write_tensor", recording_tensor)
    stats = adapterfmt.merge(single, adapters, tmp_path / "merged.safetensors")
    assert whole and all(name.endswith("attn.in_proj_weight") for name in whole)
    assert len(blocks) + len(whole) == stats.tensors_changed
    assert all(count > 1 for count in blocks.values())
    assert any(name.startswith("model.diffusion_model.") for name in blocks)

    adapterfmt.merge(pipe_dir / "unet", adapters, tmp_path / "merged-unet")
    from_dir = load_file(str(tmp_path / "merged-unet" / "diffusion_pytorch_model.safetensors"))
    from_single = convert_ldm_unet_checkpoint(load_file(str(tmp_path / "merged.safetensors")),
                                              {"layers_per_block": models["unet"].config.layers_per_block,
                                               "addition_embed_type": "text_time"})
    assert set(from_single) == set(from_dir)
    assert all(torch.equal(from_single[k], from_dir[k]) for k in from_dir)
