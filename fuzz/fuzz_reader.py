"""libFuzzer/atheris target for the adapterfmt container and manifest reader.

Only AdapterFmtError subclasses may escape ``read_adapter``/``inspect_adapter``; anything else
(or a hang/crash) is a bug. Inputs are decoded by ``tests/hardening/fuzz_harness.py``: the first
byte chooses whether the rest is the whole file, the manifest JSON, or the safetensors header.

Longer runs (atheris is deliberately not a dependency):

    pip install atheris && python fuzz/fuzz_reader.py -max_total_time=600

Extra arguments go to libFuzzer (e.g. a corpus directory to keep: ``fuzz/fuzz_reader.py
corpus/ -max_total_time=3600``); without one, seeds from spec/vectors/v1.0 are used.
"""
import sys
import tempfile
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["adapterfmt", "tests.hardening.fuzz_harness"]):
    from tests.hardening.fuzz_harness import check_one, seed_inputs

WORK = Path(tempfile.mkdtemp(prefix="adapterfmt-fuzz-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
TARGET = WORK / "input.safetensors"


def test_one_input(data: bytes) -> None:
    check_one(data, TARGET)


def main() -> None:
    argv = list(sys.argv)
    if not any(Path(a).is_dir() for a in argv[1:] if not a.startswith("-")):
        seeds = WORK / "seeds"
        seeds.mkdir()
        for i, seed in enumerate(seed_inputs()):
            (seeds / f"seed{i}").write_bytes(seed)
        argv.append(str(seeds))
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
