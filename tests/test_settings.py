"""The typed settings: loading, validation messages, consistency checks."""
import json
from pathlib import Path

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


def test_architecture_setting_is_read_from_the_registry():
    import architectures
    from architectures.base import short_label
    from core.settings import field_ui, set_value
    ui = field_ui("model.architecture")
    assert ui["choices"] == list(architectures.registry()) and ui["choice_labels"] == architectures.available()
    assert len(set(ui["choice_labels"].values())) == len(ui["choices"])            # no two families look alike
    for arch_id, cls in architectures.registry().items():
        assert cls.id == arch_id and cls.label and short_label(arch_id) in (cls.short_label, cls.label)
        assert cls.traits <= set(architectures.TRAITS), (arch_id, cls.traits - set(architectures.TRAITS))
        # the trait that shows pivotal tuning, and the data that trains and saves the embedding, go together
        assert ("embeddings" in cls.traits) == bool(cls.embedding_keys) == bool(cls.embedding_bundle_names), arch_id
        assert len(cls.embedding_bundle_names) == len(cls.embedding_keys), arch_id
        s = core.Settings()
        set_value(s, "model.architecture", arch_id)
    with pytest.raises(core.SettingsError, match=r"model\.architecture: unknown architecture .*allowed: sd15"):
        set_value(core.Settings(), "model.architecture", "sd9")


def test_family_traits_decide_visibility():
    """Every trait a show_if names is declared and held by some family; a field shows exactly for those."""
    import architectures
    from core.settings import FamilyTrait, field_ui, iter_fields
    used = set()
    for dotted, info in iter_fields():
        for other, values in info.json_schema_extra["ui"]["show_if"].items():
            if isinstance(values, FamilyTrait):
                assert other == "model.architecture"
                used.add(values.trait)
                assert field_ui(dotted)["show_if"][other] == architectures.with_trait(values.trait) != []
    assert used == set(architectures.TRAITS), set(architectures.TRAITS) ^ used     # no unused trait either
    s = core.Settings()
    for arch_id, cls in architectures.registry().items():
        s.model.architecture = arch_id
        assert s.applies("schedule.timestep_sampling") == ("flow_matching" in cls.traits)
        assert s.applies("model.guidance") == ("guidance_input" in cls.traits)
        assert s.applies("model.prediction_type") == ("ddpm" in cls.traits)


def test_core_and_ui_name_no_family():
    """Family knowledge lives in architectures/: no string in core/ or ui/ is a family id (a new family then
    needs no edit there)."""
    import ast

    import architectures
    ids = set(architectures.registry())
    root = Path(__file__).resolve().parent.parent
    hits = [f"{path.relative_to(root)}:{node.lineno}: {node.value!r}"
            for folder in ("core", "ui") for path in sorted((root / folder).rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Constant) and node.value in ids]
    assert not hits, "\n".join(hits)
