"""Dump torch's CPU RNG outputs for a fixed case list as JSON (runs on any torch >= 1.13, no numpy)."""
import json, math, os, sys
if os.environ.get("STUB_LAZY"):
    sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_GLOBAL)
import torch

def gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)

def peft_kaiming(shape, g):  # PEFT 0.21 VeRA _kaiming_init
    t = torch.empty(shape)
    fan = t.size(1) * (math.prod(shape[2:]) if len(shape) > 2 else 1)
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan))
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=g)

def capability():
    for get in (lambda: torch.backends.cpu.get_cpu_capability(), lambda: torch._C._get_cpu_capability()):
        try:
            return get()
        except Exception:
            pass
    return os.environ.get("ATEN_CPU_CAPABILITY", "?") + "(env)"

out = {"version": torch.__version__, "capability": capability()}
cases = {}
for seed in [0, 1, 777, 2**32 + 5, 2**63 - 1, 2**64 - 1]:
    g = gen(seed)
    a = peft_kaiming((8, 97), g); b = peft_kaiming((61, 8), g)
    cases[f"vera/{seed}"] = a.flatten().tolist() + b.flatten().tolist()
    for dt in ["float32", "bfloat16", "float16"]:
        t = torch.empty(3, 1, 1000, dtype=getattr(torch, dt))
        try:
            k = torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen(seed))
        except TypeError:  # torch < 2.1: no generator argument; the same bound and call by hand
            bound = math.sqrt(3.0) * (math.sqrt(2.0 / (1 + math.sqrt(5) ** 2)) / math.sqrt(1000))
            k = t.uniform_(-bound, bound, generator=gen(seed))
        cases[f"kaiming_a5/{dt}/{seed}"] = k.float().flatten().tolist()
    cases[f"rand/{seed}"] = torch.rand(1001, generator=gen(seed)).tolist()
    cases[f"randperm/{seed}"] = torch.randperm(4099, generator=gen(seed)).tolist()
    cases[f"fourierft/{seed}"] = torch.randperm(64 * 96, generator=gen(seed))[:300].tolist()
out["cases"] = cases
json.dump(out, open(sys.argv[1], "w"))
print(out["version"], out["capability"], len(cases))
