"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The data and official fixtures the tests need, kept in the repository (tests/shared/README.md).
REPO_SHARED = REPO_ROOT / "tests" / "shared"
#: The project's shared folder next to the repository, when there is one: it adds further checks.
SHARED_DIR = REPO_ROOT.parent / "shared"
_SKIP_REASON = "is absent: "


class SharedPath(type(Path())):
    """A path under the shared folders that resolves every join file by file: the repository's copy when it
    has the file, else ``../shared``; a file in neither (``../shared`` absent) skips the test that asked."""

    def __truediv__(self, key: str | Path) -> Path:
        joined = Path(str(self)) / key
        for base in (REPO_SHARED, SHARED_DIR):
            try:
                relative = joined.relative_to(base)
            except ValueError:
                continue
            local, external = REPO_SHARED / relative, SHARED_DIR / relative
            if local.exists():
                return SharedPath(local)
            if not SHARED_DIR.is_dir():
                pytest.skip(f"{external} {_SKIP_REASON}the repository holds no copy of it")
            return SharedPath(external)
        return joined


def shared_path(relative: str) -> Path:
    """``tests/shared/<relative>`` when the repository holds it, else ``../shared/<relative>`` (which may not
    exist: check before use)."""
    local = REPO_SHARED / relative
    return local if local.exists() else SHARED_DIR / relative


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The folder of real data samples and official fixtures: the repository's ``tests/shared`` first,
    ``../shared`` second; tests are skipped, with the reason, when neither exists."""
    for folder in (REPO_SHARED, SHARED_DIR):
        if folder.is_dir():
            return SharedPath(folder)
    pytest.skip(f"{SHARED_DIR} {_SKIP_REASON}the real-data samples and fixtures live there")


@pytest.fixture(scope="session")
def external_shared_dir() -> Path:
    """``../shared`` itself (for checks that need more than the repository's copy)."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_DIR} {_SKIP_REASON}these checks need the project's shared folder")
    return SHARED_DIR


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Say how many tests were skipped because ``../shared`` is absent (CI prints it)."""
    skipped = terminalreporter.stats.get("skipped", [])
    count = sum(
        1 for report in skipped if "shared" in str(report.longrepr) and _SKIP_REASON in str(report.longrepr)
    )
    if SHARED_DIR.is_dir():
        terminalreporter.write_line(
            f"{SHARED_DIR} found: the checks that need it ran ({count} skipped for it)"
        )
    else:
        terminalreporter.write_line(f"{count} test(s) skipped because {SHARED_DIR} is absent")


@pytest.fixture
def float64_default():
    """Build float64 tensors by default within a test, then restore the previous default dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one thread: tiny models are fastest so, and busy machines are not oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
