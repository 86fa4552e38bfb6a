"""ghostcore.fdlimit: the soft open-file limit raised to what the limits need, or a clear refusal."""

from __future__ import annotations

import resource
from collections.abc import Iterator

import pytest

from ghostcore.errors import ConfigError
from ghostcore.fdlimit import ensure_open_files


@pytest.fixture
def limits() -> Iterator[tuple[int, int]]:
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield saved
    resource.setrlimit(resource.RLIMIT_NOFILE, saved)


def test_raises_the_soft_limit_up_to_what_is_needed(limits: tuple[int, int]) -> None:
    _, hard = limits
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"hard limit {hard} too low to test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    assert ensure_open_files(2048, "x") == 2048
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (2048, hard)
    assert ensure_open_files(100, "x") == 2048  # never lowered


def test_refuses_when_the_hard_limit_is_too_low(monkeypatch: pytest.MonkeyPatch) -> None:
    # A process may lower its hard limit but never raise it again (even root, without CAP_SYS_RESOURCE),
    # so this case is played on a stand-in, not on the test process.
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (512, 1000))
    monkeypatch.setattr(resource, "setrlimit", lambda _, lim: calls.append(lim))
    with pytest.raises(ConfigError, match=r"open-file limit is 1000 \(hard\), below the 5000 that turn"):
        ensure_open_files(5000, "turn.max_allocations")
    assert calls == []
