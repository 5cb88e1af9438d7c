"""Every test runs in a fresh empty folder: a project file (hwaware.yaml) or tables a developer keeps in the
checkout cannot change what a test sees, and nothing a test writes by relative path lands in the checkout."""

import pytest


@pytest.fixture(autouse=True)
def _in_an_empty_folder(tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture
def run_cli(capsys):
    """The CLI in this process (torch is imported once for the module, not once per command)."""
    from types import SimpleNamespace

    from hwaware.cli import main

    def run(*args):
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)

    return run
