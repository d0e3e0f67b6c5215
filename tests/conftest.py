import os

import pytest
import torch

# Test models are tiny: one thread per process avoids thread start-up and barrier costs, and
# keeps tests that run several processes (resume, distributed) from oversubscribing the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Trained tokenizers are cached per test session, never in the user's home. The CPU expert
    kernel keeps its usual build directory, so it is compiled once, not once per session."""
    from moesaic.model import native

    mp = pytest.MonkeyPatch()
    mp.setenv("MOESAIC_NATIVE_DIR", str(native.build_dir().parent))
    mp.setenv("MOESAIC_CACHE", str(tmp_path_factory.mktemp("moesaic-cache")))
    yield
    mp.undo()


def pytest_sessionfinish(session, exitstatus):
    """With MOESAIC_TEST_NO_SKIP=1 (CI, where every optional extra, a compiler and Chromium are
    installed) a skipped test fails the run: nothing there may silently go untested."""
    if os.environ.get("MOESAIC_TEST_NO_SKIP") != "1" or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.write_line(f"MOESAIC_TEST_NO_SKIP=1: {len(skipped)} test(s) were skipped")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
