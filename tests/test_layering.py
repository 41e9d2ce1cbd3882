"""The layering of DESIGN.md's picture: the import-linter contracts hold, they catch a planted
import, and ``services/`` holds only what a running service imports.

The contracts live in pyproject.toml (``[tool.importlinter]``) and ``make test`` runs
``lint-imports``; here each contract is shown to fail on a copy of the packages with one import
planted that breaks it, so a contract that silently stopped checking would fail this test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grimp
import pytest
from importlinter.api import read_configuration

from tests.support.paths import ROOT

PACKAGES = ("services", "clients", "rlhf_train", "benchmarks", "rlhf_feedback", "protos")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

# services/ modules that no running service imports, each with its reason. Keep it short: a
# module that is here for no good reason belongs outside services/.
NOT_LOADED_BY_A_SERVER = {
    "services.runtime.backends.fake": "the deterministic fake backend, for tests (DESIGN.md convention 8)",
    "services.runtime.default_head": "a data package: the default head's weights ship in it, read as files",
    "services.judge.templates": "a data package: the judge's prompt templates, read as files",
    "services.judge.templates.default": "a data package: the judge's default prompt templates, read as files",
}

# contract id -> (new module planted in a copy of the packages, the import it makes)
PLANTED = {
    "packages": ("clients/planted.py", "import rlhf_feedback.cli"),
    "services": ("services/judge/planted.py", "import services.reward.engine.service"),
    "reward-layers": ("services/reward/engine/planted.py", "import services.reward.transports.http"),
    "judge-layers": ("services/judge/backends/planted.py", "import services.judge.transports.http"),
    "services-standalone": ("services/reward/planted.py", "import benchmarks.runner"),
    "common-knows-no-service": ("services/common/planted.py", "import services.runtime.items"),
    "training-over-the-wire": ("rlhf_train/planted.py", "import services.reward.engine.service"),
    "clients-standalone": ("clients/planted.py", "import services.common.errors"),
}


def _contract_ids() -> list[str]:
    config = read_configuration(str(ROOT / "pyproject.toml"))
    return [c["id"] for c in config["contracts_options"]]


def _lint(root: Path, contract: str | None = None) -> subprocess.CompletedProcess[str]:
    args = [str(LINT_IMPORTS), "--no-cache", "--no-logo"] + (["--contract", contract] if contract else [])
    # PYTHONPATH first: the copy's packages shadow the editable install of the real ones.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the packages' Python files and pyproject.toml, to plant imports in."""
    root = tmp_path_factory.mktemp("layering")
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors", "*.md"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


@pytest.fixture
def planted(tree: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    path, line = PLANTED[request.param]
    target = tree / path
    target.write_text(f'"""An import that breaks a contract."""\n\n{line}\n', encoding="utf-8")
    try:
        yield tree
    finally:
        target.unlink()


def test_every_contract_has_a_planted_import_that_breaks_it() -> None:
    assert sorted(PLANTED) == sorted(_contract_ids())


def test_the_contracts_hold_on_the_real_tree() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {len(PLANTED)} kept, 0 broken." in result.stdout


@pytest.mark.parametrize("planted", sorted(PLANTED), indirect=True)
def test_a_planted_import_breaks_its_contract(planted: Path, request: pytest.FixtureRequest) -> None:
    contract = request.node.callspec.params["planted"]
    result = _lint(planted, contract)
    assert result.returncode == 1, f"{contract} kept despite {PLANTED[contract]}:\n{result.stdout}"
    assert "BROKEN" in result.stdout
    module = PLANTED[contract][0].removesuffix(".py").replace("/", ".")
    assert module in result.stdout  # the report names the offending module


def test_the_copy_without_a_plant_is_clean(tree: Path) -> None:
    """So that the failures above come from the planted line, not from the copy."""
    result = _lint(tree)
    assert result.returncode == 0, result.stdout + result.stderr


def _loaded_by_the_servers() -> set[str]:
    """Every module the two servers import, also inside functions (backends load lazily)."""
    graph = grimp.build_graph(*PACKAGES)
    loaded: set[str] = set()
    for server in ("services.reward.server", "services.judge.server"):
        loaded |= graph.find_upstream_modules(server) | {server}
    # importing a module imports its parent packages
    return loaded | {m.rsplit(".", i)[0] for m in loaded for i in range(1, m.count(".") + 1)}


def test_services_holds_only_what_a_running_service_imports() -> None:
    graph = grimp.build_graph(*PACKAGES)
    in_services = {m for m in graph.modules if m == "services" or m.startswith("services.")}
    unused = in_services - _loaded_by_the_servers() - set(NOT_LOADED_BY_A_SERVER)
    assert not unused, f"services/ modules no server imports (move them out of services/): {sorted(unused)}"
    stale = set(NOT_LOADED_BY_A_SERVER) - in_services
    assert not stale, f"allowlisted modules that no longer exist: {sorted(stale)}"


def test_importing_both_servers_loads_no_training_benchmark_client_or_cli_code() -> None:
    code = (
        "import json, sys; import services.reward.server, services.judge.server; print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    modules = json.loads(out.stdout)
    outside = [m for m in modules if m.split(".")[0] in ("rlhf_train", "benchmarks", "rlhf_feedback", "clients")]
    assert outside == []
