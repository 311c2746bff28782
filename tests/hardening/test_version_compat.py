"""Version compatibility: the checked-in v1.0 files stay readable; v1.x readers refuse v2 clearly.

The v1.0 vectors are frozen: their bytes are pinned here. A later format version adds a new
``spec/vectors/v1.N`` directory; it never regenerates these.
"""
import hashlib
import json
import re
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapterfmt.cli import main
from adapterfmt.errors import VersionError
from adapterfmt.format import read_adapter
from adapterfmt.format.versions import FORMAT_VERSION, SUPPORTED_MAJORS

from .corpus import split_file, st_bytes

V10 = Path(__file__).resolve().parents[2] / "spec" / "vectors" / "v1.0"
PINNED = {
    "base.safetensors": "a4b6495520e8e93e5aaae5e5753e81dbafb64000cecabb4d50cf7e189ad8dcd6",
    "dora.expected.safetensors": "759660e2fe67bcb70553866db594cc5d3deb5423381918e4d050652b5f05926f",
    "dora.safetensors": "2b67d0b99b43277d1941e5fdc551107ece52e3cdedc1826169861fbb8a23160d",
    "lora_bf16_conv1d_embedding_payload.expected.safetensors":
        "9618f72997d4412f31b4f5a4c1256f7185f4fa7b9dc1890bf0e18bfe4d974e30",
    "lora_bf16_conv1d_embedding_payload.safetensors":
        "97e6432c542b0757699c67ae48704544402808a000c1e3570fb88308947b6250",
    "lora_rank_alpha_rslora.expected.safetensors": "13737ea91c26c956834f619f8273151fc9598f912802dca506f618c587c5c271",
    "lora_rank_alpha_rslora.safetensors": "f7a4b8f61a10d78bd15793216634c5c96ed33915aa99df640370c81b9ba67d7d",
    "nola_small.expected.safetensors": "8cb372b6a8484665d9d8fcffe35f16420fe93f7b1a02b4be42b6d8c40a6b2ef6",
    "nola_small.safetensors": "05c4a8a5890322c579a212e67822156c43a70e2c74085491dcb1c69ed179a276",
}
ADAPTERS = sorted(n for n in PINNED if not n.endswith(".expected.safetensors") and n != "base.safetensors")


def test_v10_vectors_are_frozen():
    present = {p.name for p in V10.iterdir()}
    assert set(PINNED) <= present, set(PINNED) - present
    for name, digest in PINNED.items():
        assert hashlib.sha256((V10 / name).read_bytes()).hexdigest() == digest, \
            f"{name} changed: v1.0 vectors are frozen; add new vectors under spec/vectors/v1.N instead"


@pytest.mark.parametrize("name", ADAPTERS)
def test_v10_vectors_stay_readable(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 1.0 file must read without a version warning
        adapter = read_adapter(V10 / name)
    assert adapter.version == (1, 0) and adapter.manifest.modules
    result = CliRunner().invoke(main, ["inspect", str(V10 / name), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["format_version"] == "1.0"
    result = CliRunner().invoke(main, ["validate", str(V10 / name)])
    assert result.exit_code == 0, result.output


def test_this_reader_is_v1():
    assert FORMAT_VERSION[0] == 1 and SUPPORTED_MAJORS == (1,)


def relabel(src: Path, dst: Path, version: str, manifest_edit=None) -> Path:
    header, data = split_file(src)
    header["__metadata__"]["adapterfmt.version"] = version
    if manifest_edit is not None:
        header["__metadata__"]["adapterfmt.manifest"] = manifest_edit(header["__metadata__"]["adapterfmt.manifest"])
    dst.write_bytes(st_bytes(header, data))
    return dst


@pytest.mark.parametrize("version", ["2.0", "2.5", "10.0", "0.9"])
@pytest.mark.parametrize("name", ADAPTERS)
def test_other_majors_are_refused_clearly(tmp_path, name, version):
    path = relabel(V10 / name, tmp_path / "future.safetensors", version)
    with pytest.raises(VersionError, match=rf"format version {re.escape(version)} is not supported"):
        read_adapter(path)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.count("\n") == 1
    assert re.search(r"future\.safetensors: adapterfmt format version .* not supported.*; upgrade adapterfmt",
                     result.stderr)


def test_v2_with_a_different_manifest_is_refused_by_version_not_schema(tmp_path):
    """A v2 manifest may look like anything; the reader must say 'version', not 'schema'."""
    path = relabel(V10 / ADAPTERS[0], tmp_path / "v2.safetensors", "2.0",
                   lambda text: json.dumps({"layers": [{"kind": "something-new"}]}))
    with pytest.raises(VersionError):
        read_adapter(path)


def test_newer_minor_reads_with_a_warning(tmp_path):
    def add_fields(text):
        data = json.loads(text)
        data["added_in_1_9"] = {"anything": [1, 2]}
        for module in data["modules"].values():
            module["added_in_1_9"] = "x"
        return json.dumps(data)
    path = relabel(V10 / ADAPTERS[0], tmp_path / "v19.safetensors", "1.9", add_fields)
    with pytest.warns(UserWarning, match="1.9"):
        adapter = read_adapter(path)
    assert adapter.version == (1, 9)
    assert len(adapter.manifest.modules) == len(read_adapter(V10 / ADAPTERS[0]).manifest.modules)
