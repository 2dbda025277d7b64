"""Models from other packages (`prerank.models` entry points): every way a plugin can be wrong is
reported clearly."""

import re
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from prerank.cli import app
from prerank.models import base, create_model
from prerank.models.registry import ModelRegistry

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
    assert result.exit_code == 2 and "error: model plugin 'broken'" in result.output and "No module named" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
