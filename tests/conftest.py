import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Trained tokenizers are cached per test session, never in the user's home."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MOESAIC_CACHE", str(tmp_path_factory.mktemp("moesaic-cache")))
    yield
    mp.undo()
