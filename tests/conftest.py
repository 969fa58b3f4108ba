"""Fixtures shared by the tests that drive the extension in the WebUI test double."""

import pytest


@pytest.fixture(scope="module")
def sd_model():
    """A real tiny ldm LatentDiffusion, built once per test module."""
    from webui_host import make_sd_model

    return make_sd_model()


@pytest.fixture
def host(sd_model, tmp_path, monkeypatch):
    """The test double with the extension loaded and tiny weights in its caches: (runner, script)."""
    from webui_host import start_host

    yield from start_host(sd_model, tmp_path, monkeypatch)
