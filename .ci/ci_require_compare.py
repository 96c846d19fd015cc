"""pytest plugin for CI (.ci/run loads it with ``-p ci_require_compare``): the comparison tests
(marker ``compare``, against the official ``elatentlpips`` and ``lpips`` packages) must RUN.

Outside CI those tests skip when the packages are missing; in CI a skip would hide a failed
install behind a green run, so here:
  * the session stops at once when a comparison package cannot be imported (the reason is the
    import error, e.g. ``pkg_resources`` missing with setuptools >= 81);
  * every skipped ``compare`` test, and every test module skipped at collection for want of a
    comparison package, fails the run;
  * a run in which no ``compare`` test passed fails too (deselected or not collected).
The summary line "ci_require_compare: ..." tells .ci/run that the plugin was active.
"""
from __future__ import annotations

import importlib

import pytest

# What the comparison tests import (elatentlpips.ada_aug pulls in pkg_resources).
REQUIRED_MODULES = ("elatentlpips", "elatentlpips.ada_aug", "elatentlpips.elatentlpips", "lpips")

_skipped: list[str] = []
_passed = 0


def pytest_sessionstart(session):
    missing = []
    for name in REQUIRED_MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, or whatever the package raises while importing
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
    if missing:
        raise pytest.UsageError("ci_require_compare: comparison packages cannot be imported: "
                                + "; ".join(missing) + ". `make venv` installs them.")


def _skip_reason(report) -> str:
    """A skip's reason: longrepr is (path, line, reason) for skips."""
    longrepr = report.longrepr
    return str(longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr)


def pytest_collectreport(report):
    if report.skipped and "lpips" in _skip_reason(report):  # elatentlpips or lpips
        _skipped.append(f"{report.nodeid} (skipped at collection: {_skip_reason(report)})")


def pytest_runtest_logreport(report):
    global _passed
    if "compare" not in report.keywords:
        return
    if report.skipped:
        _skipped.append(f"{report.nodeid} ({_skip_reason(report)})")
    elif report.when == "call" and report.passed:
        _passed += 1


def pytest_sessionfinish(session, exitstatus):
    if _skipped or _passed == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    if _skipped:
        tr.write_line(f"ci_require_compare: FAILED: {len(_skipped)} comparison test(s) or "
                      f"module(s) skipped:", red=True)
        for line in _skipped:
            tr.write_line(f"  {line}", red=True)
    elif _passed == 0:
        tr.write_line("ci_require_compare: FAILED: no comparison test ran", red=True)
    else:
        tr.write_line(f"ci_require_compare: {_passed} comparison tests passed, none skipped")
