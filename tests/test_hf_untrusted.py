"""A Hugging Face folder is untrusted input: its config is checked against its checkpoint's headers before
any memory is spent on the model it describes, a missing or impossible value is one line naming the file
and the field, and a recipe's `init:` from a folder compares configurations, not a second random model."""

from __future__ import annotations

import json

import pytest
from hf_helpers import randomize, save
from test_hf_towers import VISION

from glimpse.errors import GlimpseError
from glimpse.families import init_from_hf, load_hf

transformers = pytest.importorskip("transformers")


@pytest.fixture
def vision_folder(tmp_path):
    save(randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION))), tmp_path / "v")
    return tmp_path / "v"


def edit_config(folder, **changes):
    c = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            c.pop(key, None)
        else:
            c[key] = value
    (folder / "config.json").write_text(json.dumps(c))


def test_a_config_larger_than_its_checkpoint_is_refused_before_building(vision_folder):
    # 65,536 wide and 1,000 layers deep would ask for terabytes if it were built before it is checked
    edit_config(vision_folder, hidden_size=65536, intermediate_size=65536, num_hidden_layers=1000)
    with pytest.raises(GlimpseError, match=r"embeddings\.patch_embedding\.weight has shape \(32, 3, 8, 8\), "
                                           r"which does not fit glimpse.s vision\.patch_embed\.weight "
                                           r"\[\(65536, 3, 8, 8\)\]"):
        load_hf(vision_folder)


@pytest.mark.parametrize("changes, message", [
    ({"num_attention_heads": 0}, "config.json's num_attention_heads is 0, not a whole number of at least 1"),
    ({"hidden_size": "wide"}, "config.json's hidden_size is 'wide', not a whole number of at least 1"),
    ({"num_hidden_layers": True}, "config.json's num_hidden_layers is True"),
    ({"hidden_size": None}, "config.json has no 'hidden_size'"),
    ({"num_attention_heads": 5}, "config.json describes no model glimpse can build"),
])
def test_a_config_that_no_model_can_be_built_from_is_one_line(vision_folder, changes, message):
    edit_config(vision_folder, **changes)
    with pytest.raises(GlimpseError) as e:
        load_hf(vision_folder)
    assert message in str(e.value) and "\n" not in str(e.value) and str(vision_folder) in str(e.value)


def test_nested_configs_are_checked_too(tmp_path):
    cfg = transformers.CLIPConfig(vision_config=VISION, text_config=dict(hidden_size=24, intermediate_size=36,
                                  num_hidden_layers=2, num_attention_heads=2, vocab_size=50, max_position_embeddings=12),
                                  projection_dim=16)
    save(randomize(transformers.CLIPModel(cfg)), tmp_path / "clip")
    edit_config(tmp_path / "clip", vision_config={**json.loads((tmp_path / "clip" / "config.json").read_text())[
        "vision_config"], "num_attention_heads": -4})
    with pytest.raises(GlimpseError, match="config.json's vision_config.num_attention_heads is -4"):
        load_hf(tmp_path / "clip")


def test_init_from_a_folder_compares_configurations(vision_folder, tmp_path):
    from glimpse.families.dual_encoder.model import ImageEncoder

    loaded = load_hf(vision_folder)
    other = ImageEncoder(type(loaded.model.cfg.vision)(**{**loaded.model.cfg.vision.__dict__, "act": "gelu"}))
    with pytest.raises(GlimpseError, match=r"the recipe's model\.vision\.act is 'gelu', the checkpoint's is "
                                           r"'quick_gelu'"):
        init_from_hf(other, vision_folder)
    same = ImageEncoder(loaded.model.cfg.vision)
    init_from_hf(same, vision_folder)
    assert all((a == b).all() for a, b in zip(same.state_dict().values(), loaded.model.state_dict().values()))


def test_a_run_folder_recipe_is_checked_on_loading(tiny_run, tmp_path):
    import shutil

    import glimpse

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    recipe = (run / "recipe.yaml").read_text()
    (run / "recipe.yaml").write_text(recipe.replace("patch_size: 8", "patch_size: 7", 1))
    with pytest.raises(GlimpseError, match="recipe key model.vision.patch_size: 7 must divide image_size 32"):
        glimpse.load(run)
