"""Models from other packages (`prerank.models` entry points): the example plugin installed and run
through the contract tests and the CLI, and every way a plugin can be wrong reported clearly."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prerank.cli import app
from prerank.models import base, create_model
from prerank.models.registry import ModelRegistry

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom-model"
PLUGIN = "example_fm"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    """examples/custom-model installed into a folder of its own (offline: no index, no build isolation)."""
    tmp = tmp_path_factory.mktemp("plugin")
    source = tmp / "source"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
               "--disable-pip-version-check", "--target", str(tmp / "site"), str(source)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp / "site"


def run_with_plugin(plugin_path, args, timeout=600):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), str(ROOT / "src"), str(ROOT)])}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_installed_plugin_passes_the_model_tests(plugin_path):
    """The tests parametrized over the registry pick the plugin up: contract, training, serving parity."""
    files = ["tests/test_contract.py", "tests/test_train.py", "tests/test_serve.py"]
    proc = run_with_plugin(plugin_path, ["-m", "pytest", *files, "-k", PLUGIN, "-rA", "-p", "no:cacheprovider"])
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    for path in files:
        assert re.search(rf"^PASSED {re.escape(path)}::\S+\[{PLUGIN}\]$", proc.stdout, re.M), f"no {PLUGIN} test ran in {path}"
    assert not re.search(r"\b(failed|skipped|error)\b", proc.stdout.splitlines()[-1]), proc.stdout[-2000:]


def test_installed_plugin_trains_exports_and_serves_by_name(plugin_path, tmp_path):
    proc = run_with_plugin(plugin_path, ["-W", "ignore", "tests/plugin_helper.py", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert re.search(rf"^{PLUGIN}\s+pre-ranker, plugin prerank-custom-model 0\.1\.0: ", result["listing"], re.M)
    assert re.search(r"^two_tower\s+pre-ranker: ", result["listing"], re.M)
    assert result["metrics"]["model"] == PLUGIN and result["metrics"]["model_config"]["embed_dim"] == 8
    assert 0 < result["metrics"]["test"]["logloss"] < 1
    assert result["manifest"]["model"] == PLUGIN and result["manifest"]["bytes_per_item"] == 4 * (8 + 1)  # vector + bias
    assert result["http_status"] == 200 and result["http"]["model"] == PLUGIN
    http = {str(item): score for item, score in zip(result["http"]["items"], result["http"]["scores"])}
    assert http == pytest.approx(result["python_scores"], abs=1e-6)


# -- plugins that are wrong -----------------------------------------------------------------------

PLUGIN_MODULES = {
    "plugin_fails_on_import": "import a_module_nobody_has\n",
    "plugin_classes": """
        from prerank.models.base import config_dataclass
        from prerank.models.two_tower import TwoTower

        @config_dataclass
        class Empty:
            pass

        class SaysOtherName(TwoTower):
            name = "other_name"

        class TwoTowerAgain(TwoTower):
            name = "two_tower"

        class HasForward(TwoTower):
            name = "has_forward"

            def forward(self, batch):
                return super().forward(batch)

        class PlainConfig(TwoTower):
            name = "plain_config"
            Config = dict

        class Fine(TwoTower):
            \"\"\"A plugin that is fine.\"\"\"
            name = "fine"
        """,
}
ENTRY_POINTS = """
    [prerank.models]
    broken = plugin_fails_on_import:Model
    misnamed = plugin_classes:SaysOtherName
    two_tower = plugin_classes:TwoTowerAgain
    has_forward = plugin_classes:HasForward
    plain_config = plugin_classes:PlainConfig
    not_a_model = plugin_classes:Empty
    fine = plugin_classes:Fine
    """


@pytest.fixture
def wrong_plugins(tmp_path, monkeypatch):
    """A distribution `wrong-plugins 1.0` on sys.path, and a registry that has read no plugins yet."""
    for module, code in PLUGIN_MODULES.items():
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(code))
    dist_info = tmp_path / "wrong_plugins-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: wrong-plugins\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(textwrap.dedent(ENTRY_POINTS))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = ModelRegistry(base.PreRankModel)
    for cls in dict(base.REGISTRY).values():
        if base.REGISTRY.origin(cls.name) is None:
            registry.add(cls)
    monkeypatch.setattr(base, "REGISTRY", registry)
    yield registry
    for module in PLUGIN_MODULES:
        sys.modules.pop(module, None)


def test_wrong_plugins_are_named_with_their_distribution_and_do_not_break_the_others(wrong_plugins, small_data):
    problems = wrong_plugins.problems()
    assert sorted(problems) == ["broken", "has_forward", "misnamed", "not_a_model", "plain_config", "two_tower"]
    for name, message in problems.items():
        assert f"entry point '{name} = " in message and "distribution wrong-plugins 1.0" in message, message
    assert "ModuleNotFoundError: No module named 'a_module_nobody_has'" in problems["broken"]
    assert "class says name = 'other_name'" in problems["misnamed"]
    assert "takes the name of the built-in model prerank.models.two_tower.TwoTower" in problems["two_tower"]
    assert "defines `forward`" in problems["has_forward"]
    assert "Config is not a dataclass" in problems["plain_config"]
    assert "not a subclass of prerank.models.base.PreRankModel" in problems["not_a_model"]

    # The built-ins and the one good plugin work; a wrong plugin's name raises its problem.
    assert type(create_model("two_tower", small_data.schema)).__module__ == "prerank.models.two_tower"
    assert create_model("fine", small_data.schema).name == "fine" and wrong_plugins.origin("fine") == "wrong-plugins 1.0"
    with pytest.raises(ValueError, match=r"model plugin 'broken' \(entry point 'broken = plugin_fails_on_import:Model'"):
        create_model("broken", small_data.schema)
    with pytest.raises(ValueError, match=r"unknown model 'nope'.*failed to load: \['broken', "):
        create_model("nope", small_data.schema)


def test_cli_reports_wrong_plugins_as_messages(wrong_plugins, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 2, result.output
    assert re.search(r"^two_tower\s+pre-ranker: Two-Tower", result.output, re.M)
    assert re.search(r"^fine\s+pre-ranker, plugin wrong-plugins 1\.0: A plugin that is fine", result.output, re.M)
    assert "model plugin 'broken' (entry point 'broken = plugin_fails_on_import:Model'" in result.output
    result = runner.invoke(app, ["train", "--model", "broken", "--dataset", "synthetic", "--epochs", "1", "--no-progress",
                                 "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 2 and "error: command line: model.name: model plugin 'broken'" in result.output and "No module named" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
