"""Official NOLA checkpoints: ViT (bit-exact CPU basis + checksums), GPT-2 and LLaMA (CUDA emulation)."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterfmt.ops.convert import convert
from adapterfmt.engine.merge import merge
from adapterfmt.errors import ForeignFormatError, PickleRefusedError, UsageError
from adapterfmt.format import read_adapter
from adapterfmt.formats import detect_format
from adapterfmt.methods import get_method
from adapterfmt.methods.nola.cuda_emulation import cuda_uniform_range, total_threads
from adapterfmt.methods.nola.reference_numpy import philox4x32_10_numpy
from adapterfmt.ops.validate import validate
from tests.helpers import tiny_gpt2

DIM, HIDDEN, RANK, KA, KB = 16, 64, 2, 8, 6


def official_vit_basis(ka, kb, n_in, n_out, r):
    """vit/NOLA.py: manual_seed(0); kaiming into zeros(ka, in, r), then zeros(kb, r, out)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        a = torch.zeros(ka, n_in, r)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(kb, r, n_out)
        torch.nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    return a, b


@pytest.fixture
def vit_file(tmp_path):
    gen = torch.Generator().manual_seed(5)
    state = {}
    for i in range(2):
        for fc, (n_in, n_out) in (("fc1", (DIM, HIDDEN)), ("fc2", (HIDDEN, DIM))):
            a, _ = official_vit_basis(KA, KB, n_in, n_out, RANK)
            state[f"{fc}_alpha_{i:03d}"] = torch.randn(KA, generator=gen)
            state[f"{fc}_beta_{i:03d}"] = torch.randn(KB, generator=gen)
            state[f"{fc}_A_{i:03d}"] = a[0, :10, 0].clone()
    state[f"fc_{DIM}in_10out"] = torch.randn(10, DIM, generator=gen)
    path = tmp_path / "nola_vit.safetensors"
    save_file(state, str(path))
    return path, state


def test_vit_import_reproduces_checksums_and_official_delta(vit_file, tmp_path):
    src, state = vit_file
    assert detect_format(src).name == "nola_official"
    dst = tmp_path / "out.safetensors"
    report = convert(src, dst, format_options={"nola_rank": RANK})
    assert all("checksum verified" in m.note for m in report.modules) and len(report.modules) == 4
    adapter = read_adapter(dst)
    for i in range(2):
        for fc, (n_in, n_out) in (("fc1", (DIM, HIDDEN)), ("fc2", (HIDDEN, DIM))):
            a, b = official_vit_basis(KA, KB, n_in, n_out, RANK)
            alpha, beta = state[f"{fc}_alpha_{i:03d}"].double(), state[f"{fc}_beta_{i:03d}"].double()
            # Official: ΔWᵀ = (1/r) (Σ α_i A_i)(Σ β_j B_j), float64 here.
            dwt = (torch.einsum("k,kij->ij", alpha, a.double()) @ torch.einsum("k,kij->ij", beta, b.double())) / RANK
            target = f"blocks.{i}.mlp.{fc}"
            entry = adapter.manifest.modules[target]
            got = get_method("nola").delta(entry, adapter.module_tensors(target)).double()
            assert entry.shape == [n_out, n_in]
            assert torch.allclose(got, dwt.T, rtol=1e-5, atol=1e-6 * float(dwt.abs().max()))
            # The regenerated canonical basis equals the official one bit for bit.
            from adapterfmt.methods.nola.bases import basis_chunk
            basis = basis_chunk(entry.params["generator"], entry.params["A"], (RANK, n_in), 0, KA)
            assert torch.equal(basis, a.transpose(1, 2))
    assert "head.weight" in adapter.manifest.payloads
    assert validate(dst).valid


def test_vit_needs_rank_and_detects_wrong_rank(vit_file, tmp_path):
    src, _ = vit_file
    with pytest.raises(UsageError, match="store the rank"):
        convert(src, tmp_path / "a.safetensors")
    with pytest.raises(ForeignFormatError, match="checksum"):
        convert(src, tmp_path / "b.safetensors", format_options={"nola_rank": 3})


def test_cuda_emulation_layout():
    # Element n: thread n % T, word (n // T) % 4 of draw n // (4T); u -> fl32(float(u)*2^-32 + 2^-33).
    seed, numel, sm, tps = 2**40 + 3, 3000, 2, 512
    threads = total_threads(numel, sm, tps)
    assert threads == 1024
    got = cuda_uniform_range(seed, 0, numel, numel, sm, tps)
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint64)
    for n in (0, 1, 1023, 1024, 2047, 2048, 2999):
        t, lane = n % threads, n // threads
        words = philox4x32_10_numpy(np.array([lane // 4, 0, t, 0], dtype=np.uint64), key)
        u = int(words[lane % 4])
        rand = np.float32(np.float64(np.float32(u)) * 2.0**-32 + 2.0**-33)
        value = np.float32(np.float64(rand) * 2 - 1)
        assert float(got[n]) == float(-1.0 if value == 1.0 else value)
    assert got.min() >= -1 and got.max() < 1
    # Chunks agree with the whole (counter-based).
    assert torch.equal(cuda_uniform_range(seed, 1500, 2100, numel, sm, tps), got[1500:2100])


def gpt2_state(n_layer=2, n=32, r=4, k=16, l=12):
    gen = torch.Generator().manual_seed(9)
    state = {}
    for i in range(n_layer):
        for role, seed_a, seed_b in (("nola_query", 11, 12), ("nola_value", 13, 2**40)):
            p = f"module.transformer.h.{i}.attn.{role}"
            state[f"{p}.lora_A.weight"] = torch.randn(r, n, generator=gen) * 0.02
            state[f"{p}.lora_A.seed"] = torch.tensor([seed_a], dtype=torch.int64)
            state[f"{p}.lora_A.coefficients"] = torch.randn(k, generator=gen)
            state[f"{p}.lora_B.weight"] = torch.randn(n, r, generator=gen) * 0.02
            state[f"{p}.lora_B.seed"] = torch.tensor([seed_b], dtype=torch.int64)
            state[f"{p}.lora_B.coefficients"] = torch.randn(l, generator=gen)
    return state


def official_llm_delta(parts, alpha, sm, tps):
    """GPT-2/LLaMA formula in float64 with the emulated fp32 CUDA basis (times fl32(1/sqrt(k)))."""
    factors = []
    for side in "AB":
        w0, seed, coef = parts[f"lora_{side}.weight"], int(parts[f"lora_{side}.seed"]), parts[f"lora_{side}.coefficients"]
        k, (rows, cols) = coef.numel(), w0.shape
        basis = cuda_uniform_range(seed, 0, k * rows * cols, k * rows * cols, sm, tps).view(k, rows, cols)
        basis = basis * np.float32(1 / math.sqrt(k))
        factors.append(w0.double() + torch.einsum("k,kij->ij", coef.double(), basis.double()))
    a, b = factors
    return alpha / a.shape[0] * b @ a


def test_gpt2_import_and_merge(tmp_path):
    state = gpt2_state()
    src = tmp_path / "model.100.pt"
    torch.save({"model_state_dict": state}, src)
    assert detect_format(src).name == "nola_official"
    opts = {"nola_alpha": 8.0, "cuda_sm_count": 1, "cuda_threads_per_sm": 256}
    with pytest.raises(PickleRefusedError):
        convert(src, tmp_path / "x.safetensors", format_options=opts)
    with pytest.raises(UsageError, match="SM count"):
        convert(src, tmp_path / "x.safetensors", allow_pickle=True, format_options={"nola_alpha": 8.0})
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA device"):
            convert(src, tmp_path / "x.safetensors", allow_pickle=True,
                    format_options={"nola_alpha": 8.0, "nola_materialise": True})
    dst = tmp_path / "gpt2.safetensors"
    report = convert(src, dst, allow_pickle=True, format_options=opts)
    assert all("UNVERIFIED" in m.note for m in report.modules)
    result = validate(dst)
    assert result.valid and all(v["basis_generator_unverified"] == 1.0 for v in result.measurements.values())
    adapter = read_adapter(dst)
    entry = adapter.manifest.modules["transformer.h.1.attn.c_attn.v"]
    assert entry.params["rows"] == [64, 96] and entry.fan_in_fan_out and entry.params["B"]["seed"] == str(2**40)
    assert entry.params["provenance"]["id"] == "torch-cuda-philox-grid"
    # Merge into a GPT-2 base: q and v column blocks of c_attn get ΔWᵀ, k is untouched.
    base = tiny_gpt2(tmp_path / "gpt2")
    merge(base, [(dst, 1.0)], tmp_path / "merged")
    before = load_file(base / "model.safetensors")["transformer.h.1.attn.c_attn.weight"].double()
    after = load_file(tmp_path / "merged/model.safetensors")["transformer.h.1.attn.c_attn.weight"].double()
    for role, cols in (("nola_query", slice(0, 32)), ("nola_value", slice(64, 96))):
        prefix = f"module.transformer.h.1.attn.{role}."
        ref = official_llm_delta({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, 8.0, 1, 256)
        assert torch.allclose(after[:, cols] - before[:, cols], ref.T, atol=1e-5)
    assert torch.equal(after[:, 32:64], before[:, 32:64])
    # PEFT keys adapters by module name: the fused-block modules are refused, not written wrongly.
    with pytest.raises(UsageError, match="fused"):
        convert(dst, tmp_path / "peft", to="peft")
    assert not (tmp_path / "peft").exists()


def test_llama_import(tmp_path):
    src = tmp_path / "llama"
    src.mkdir()
    config = {"peft_type": "LORA", "use_nola": True, "nola_num_basis": 16, "r": 4, "lora_alpha": 2,
              "target_modules": ["q_proj"], "base_model_name_or_path": "llama"}
    (src / "adapter_config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(3)
    state = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 64, generator=gen),
             "base_model.model.model.layers.0.self_attn.q_proj.lora_A.seed": torch.tensor([5], dtype=torch.int64),
             "base_model.model.model.layers.0.self_attn.q_proj.lora_A.coefficients": torch.randn(16, generator=gen),
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4),
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.seed": torch.tensor([6], dtype=torch.int64),
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.coefficients": torch.randn(16, generator=gen)}
    save_file(state, str(src / "adapter_model.safetensors"))
    assert detect_format(src).name == "nola_official"
    dst = tmp_path / "out.safetensors"
    convert(src, dst, format_options={"cuda_sm_count": 2, "cuda_threads_per_sm": 1024})
    adapter = read_adapter(dst)
    target = "model.layers.0.self_attn.q_proj"
    entry = adapter.manifest.modules[target]
    assert "offset_A" in entry.tensors and "offset_B" not in entry.tensors  # zero B0 dropped exactly
    prefix = f"base_model.model.{target}."
    ref = official_llm_delta({k[len(prefix):]: v for k, v in state.items()}, 2.0, 2, 1024)
    got = get_method("nola").delta(entry, adapter.module_tensors(target)).double()
    assert torch.allclose(got, ref, atol=1e-6 * float(ref.abs().max()) + 1e-9)
