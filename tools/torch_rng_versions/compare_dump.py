"""Compare a torch dump (dump_torch.py) with adapterfmt's numpy implementation, case by case."""
import json, math, sys
import numpy as np
from adapterfmt.methods.torch_cpu_rng import TorchCpuGenerator, kaiming_uniform, rand, randperm
from adapterfmt.methods.torch_cpu_rng_peft import vera_projections, fourierft_indices

def ours(key, fma, legacy=False):
    kind, *rest = key.split("/")
    seed = int(rest[-1])
    if kind == "vera":
        a, b = vera_projections(seed, 8, 97, 61, fma=fma)
        return np.concatenate([a.ravel(), b.ravel()])
    if kind == "kaiming_a5":
        return kaiming_uniform(TorchCpuGenerator(seed), (3, 1, 1000), a=math.sqrt(5), dtype=rest[0], fma=fma, legacy_narrow=legacy).ravel()
    if kind == "rand":
        return rand(TorchCpuGenerator(seed), (1001,))
    if kind == "randperm":
        return randperm(TorchCpuGenerator(seed), 4099)
    if kind == "fourierft":
        return randperm(TorchCpuGenerator(seed), 64 * 96, 300)

for path in sys.argv[1:]:
    dump = json.load(open(path))
    res = {}
    for fma, legacy in ((True, False), (False, False), (True, True), (False, True)):
        bad = {}
        for key, values in dump["cases"].items():
            exp = np.array(values, dtype=np.float32 if not key.startswith(("randperm", "fourierft")) else np.int64)
            got = ours(key, fma, legacy)
            diff = int((exp != got).sum())
            if diff:
                bad[key.rsplit("/", 1)[0]] = bad.get(key.rsplit("/", 1)[0], 0) + diff
        res[("fma" if fma else "nofma") + ("+legacy_narrow" if legacy else "")] = bad or "all equal"
    print(dump["version"], dump["capability"], json.dumps(res))
