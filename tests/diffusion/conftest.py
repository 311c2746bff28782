import pytest

from .models import build_components, save_pipeline


@pytest.fixture(scope="session")
def sd15(tmp_path_factory):
    """(pipeline dir, {component: model}) for the tiny SD 1.x pipeline."""
    components = build_components("sd15")
    return save_pipeline("sd15", tmp_path_factory.mktemp("sd15") / "pipe", components), components


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory):
    components = build_components("sdxl")
    return save_pipeline("sdxl", tmp_path_factory.mktemp("sdxl") / "pipe", components), components


@pytest.fixture(scope="session")
def flux(tmp_path_factory):
    components = build_components("flux")
    return save_pipeline("flux", tmp_path_factory.mktemp("flux") / "pipe", components), components
