import pytest

from diagnostics.configio import ConfigError, apply_overrides, load_yaml


def test_overrides_parse_yaml_values_and_create_paths():
    base = {"data": {"source": "manifest", "split": {"seed": 0}}}
    out = apply_overrides(base, ["data.split.seed=7", "data.views=[PA, AP]", "train.amp=false"])
    assert out["data"]["split"]["seed"] == 7
    assert out["data"]["views"] == ["PA", "AP"]
    assert out["train"]["amp"] is False
    assert base["data"]["split"]["seed"] == 0  # the input is not modified


@pytest.mark.parametrize("bad", ["noequals", "=3", "data.source.x=1"])
def test_bad_overrides_are_refused(bad):
    with pytest.raises(ConfigError):
        apply_overrides({"data": {"source": "manifest"}}, [bad])


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_yaml(tmp_path / "bad.yaml")
