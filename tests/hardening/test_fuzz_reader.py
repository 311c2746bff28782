"""Mutation fuzzing of the container/manifest reader inside the suite (hypothesis).

Flip, insert and delete bytes of a valid file's header and manifest JSON (and of whole files);
the reader may accept the result or raise an AdapterFmtError subclass, never anything else.
Longer runs: ``fuzz/fuzz_reader.py`` (atheris).
"""
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .fuzz_harness import check_one, seed_inputs

SEEDS = seed_inputs()
WORK = Path(tempfile.mkdtemp(prefix="adapterfmt-hyp-fuzz-"))

flip = st.tuples(st.just("flip"), st.integers(0, 1 << 30), st.integers(1, 255))
insert = st.tuples(st.just("insert"), st.integers(0, 1 << 30), st.binary(min_size=1, max_size=16))
delete = st.tuples(st.just("delete"), st.integers(0, 1 << 30), st.integers(1, 64))
replace_text = st.tuples(st.just("text"), st.integers(0, 1 << 30),
                         st.sampled_from([b"null", b"[]", b"{}", b"-1", b"1e400", b"NaN", b'"', b"\\u0000",
                                          b'"lora"', b'"dora"', b'"F16"', b"[0]", b"true", b"\xff\xfe"]))


def mutate(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in ops:
        # Never touch the mode byte: mutations aim at the header/manifest/file it selects.
        at = 1 + pos % max(len(buf) - 1, 1)
        if kind == "flip" and at < len(buf):
            buf[at] ^= arg
        elif kind == "insert":
            buf[at:at] = arg
        elif kind == "delete":
            del buf[at:at + arg]
        elif kind == "text":
            buf[at:at + len(arg)] = arg
    return bytes(buf)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(range(len(SEEDS))), ops=st.lists(st.one_of(flip, insert, delete, replace_text),
                                                              min_size=1, max_size=6))
def test_mutated_inputs_raise_only_our_errors(seed, ops):
    check_one(mutate(SEEDS[seed], ops), WORK / "fuzz.safetensors")


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_raise_only_our_errors(data):
    check_one(b"\x00" + data, WORK / "random.safetensors")


def test_seeds_are_valid():
    assert [check_one(seed, WORK / "seed.safetensors") for seed in SEEDS] == ["ok"] * len(SEEDS)
