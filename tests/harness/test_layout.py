"""scripts/check_layout.py's rules on made-up modules: a private name borrowed from another module (imported or
read as an attribute) and an import against the harness's folder order are both refused; the real tree passes
(tests/estimator/test_layout.py)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from tests.conftest import load_script


def _checker() -> ModuleType:
    return load_script("check_layout")


def _module(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mod.py"
    path.write_text(text, encoding="utf-8")
    return path


def test_private_names_from_other_modules_are_found(tmp_path: Path) -> None:
    check = _checker()
    modules = {"harness.drivers.sweep": Path("x"), "harness.telemetry.sources": Path("y"), "harness": Path("z")}
    path = _module(tmp_path, "\n".join([
        "from harness import __version__",  # a dunder is not private
        "from harness.drivers.sweep import _finish, open_store",
        "from harness.telemetry import sources as telemetry",
        "import harness.telemetry.sources",
        "telemetry._nvml(print)",
        "harness.telemetry.sources._translate(None)",
        "telemetry.open_source(None)",
    ]))
    check.module_name = lambda p: "harness.drivers.replay"  # where the made-up module would live
    found = check.borrowed_privates(path, modules)
    assert found == [
        "harness.drivers.sweep: _finish",
        "harness.telemetry.sources: _nvml",
        "harness.telemetry.sources: _translate",
    ]


def test_a_module_may_use_its_own_private_names(tmp_path: Path) -> None:
    check = _checker()
    path = _module(tmp_path, "from harness.drivers.sweep import _finish\n")
    check.module_name = lambda p: "harness.drivers.sweep"
    assert check.borrowed_privates(path, {"harness.drivers.sweep": path}) == []


def test_imports_against_the_folder_order_are_found() -> None:
    check = _checker()
    graph = {
        "harness.engine.device": {"harness.telemetry.sources", "harness.rundata.spec"},  # allowed
        "harness.telemetry.sampler": {"harness.engine.vllm_engine"},  # telemetry under the engine: refused
        "harness.rundata.store": {"harness.drivers.sweep"},  # run data imports nothing of the harness
        "harness.drivers.sweep": {"harness.cli.app", "harness.drivers.measure"},  # the CLI is on top
        "estimator.model.tables": {"estimator.data.runs"},  # outside the harness folders: not this rule
    }
    assert check.layer_violations(graph) == [
        "harness.drivers.sweep -> harness.cli.app",
        "harness.rundata.store -> harness.drivers.sweep",
        "harness.telemetry.sampler -> harness.engine.vllm_engine",
    ]


def test_the_contract_imports_only_the_standard_library(tmp_path: Path) -> None:
    check = _checker()
    ok = _module(tmp_path, "import json\nfrom dataclasses import dataclass\nfrom contract.request import Request\n")
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy as np\nfrom harness.rundata.spec import SpecError\nimport os.path\n")
    mods = {"contract.ok": ok, "contract.bad": bad, "harness.x": bad}  # a harness module may import numpy
    assert check.contract_violations(mods) == ["contract.bad -> harness", "contract.bad -> numpy"]


def test_an_import_between_the_halves_is_found() -> None:
    check = _checker()
    graph = {
        "harness.drivers.batch": {"contract.policy", "harness.engine.vllm_engine"},
        "estimator.sim.policies": {"contract.policy", "harness.drivers.batch"},
        "harness.cli.app": {"estimator.cli"},
        "contract.policy": {"contract.request"},
    }
    assert check.halves_crossed(graph) == ["estimator.sim.policies -> harness.drivers.batch",
                                           "harness.cli.app -> estimator.cli"]
