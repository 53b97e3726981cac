"""The typed settings: loading, validation messages, consistency checks."""
import json

import pytest

import core
from core.settings import Settings, SettingsError, check_consistency, set_value, settings_from_dict


def test_training_json_loads_as_the_defaults():
    assert core.load_settings().to_dict() == Settings().to_dict()


def test_partial_file_takes_defaults_for_missing_keys(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"network": {"rank": 8}}))
    s = core.load_settings(p)
    assert s.network.rank == 8 and s.network.alpha == Settings().network.alpha


def test_out_of_range_value_names_field_and_range():
    with pytest.raises(SettingsError) as e:
        settings_from_dict({"network": {"rank": 0}, "optimizer": {"optimizer_type": "Adam9"}})
    msg = str(e.value)
    assert "network.rank" in msg and "1" in msg and "1024" in msg and "got 0" in msg
    assert "optimizer.optimizer_type" in msg and "AdamW8bit" in msg


def test_unknown_key_is_rejected_by_name():
    with pytest.raises(SettingsError, match=r"network\.rnak: unknown setting"):
        settings_from_dict({"network": {"rnak": 4}})


def test_assignment_is_validated():
    s = Settings()
    s.model.architecture = "sdxl"
    with pytest.raises(SettingsError, match=r"schedule\.train_batch_size"):
        set_value(s, "schedule.train_batch_size", -1)


def test_invalid_json_file_gets_a_clear_error(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(SettingsError, match="not valid JSON"):
        core.load_settings(p)


def test_consistency_checks_combinations():
    s = Settings()
    s.dataset.min_bucket_reso = 1024
    s.dataset.max_bucket_reso = 512
    problems = check_consistency(s)
    assert any("min_bucket_reso" in p for p in problems)
    assert any("dataset.path" in p for p in problems) and any("model.model_path" in p for p in problems)


def test_show_if_follows_values():
    s = Settings()
    s.optimizer.lr_scheduler = "constant"
    assert not s.applies("optimizer.lr_scheduler_num_cycles")
    s.optimizer.lr_scheduler = "cosine_with_restarts"
    assert s.applies("optimizer.lr_scheduler_num_cycles")


@pytest.mark.parametrize("preset", sorted((core.settings.default_training_json().parent / "examples" / "presets")
                                          .glob("*.json")), ids=lambda p: p.stem)
def test_shipped_presets_are_valid_settings(preset):
    s = core.load_settings(preset)
    assert s.to_dict() == json.loads(preset.read_text())  # no stale or missing keys


def test_architecture_choices_and_labels_match_the_plugins():
    import architectures
    from core.settings import ARCHITECTURE_LABELS, ARCHITECTURES
    assert architectures.available() == {a: ARCHITECTURE_LABELS[a] for a in ARCHITECTURES}


def test_error_labels_cover_every_architecture():
    from architectures.base import SHORT_LABELS
    from core.settings import ARCHITECTURES
    assert set(SHORT_LABELS) == set(ARCHITECTURES)
