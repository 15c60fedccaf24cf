import pytest

from glimpse.config import apply_override, load_recipe, recipe_from_dict
from glimpse.errors import GlimpseError


def test_shipped_recipe_loads_by_path_and_name():
    a = load_recipe("configs/shapes-clip.yaml")
    b = load_recipe("shapes-clip")
    assert a == b
    assert a.name == "shapes-clip" and a.family == "dual_encoder"
    assert a.model.vision.patch_size == 8 and a.train.max_steps > 0


def test_set_overrides_with_types():
    r = load_recipe("shapes-clip", ["train.lr=3e-4", "train.max_steps=7", "model.vision.layers=2",
                                    "eval.splits=[test]", "data.root=/tmp/x", "train.min_lr_ratio=0"])
    assert r.train.lr == 3e-4 and r.train.max_steps == 7 and r.model.vision.layers == 2
    assert r.eval.splits == ["test"] and r.data.root == "/tmp/x"
    assert isinstance(r.train.min_lr_ratio, float)  # an int is accepted for a float, losslessly


@pytest.mark.parametrize("item, fragment", [
    ("train.lrr=1", "valid keys in train: max_steps, batch_size"),
    ("nope=1", "valid keys: name, family"),
    ("train.max_steps=abc", "train.max_steps: expected int"),
    ("train.max_steps=1.5", "expected int"),
    ("train.max_steps=true", "expected int"),  # a bool is not an int here
    ("model.vision.class_token=3", "expected bool"),
    ("train.lr", "key=value"),
    ("train.lr.x=1", "is a value, not a section"),
])
def test_bad_overrides_are_clear_errors(item, fragment):
    with pytest.raises(GlimpseError, match=".*") as e:
        load_recipe("shapes-clip", [item])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_in_file_lists_valid_keys(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("family: dual_encoder\ntrain: {max_step: 3}\n")
    with pytest.raises(GlimpseError, match="unknown recipe key train.max_step; valid keys in train: max_steps"):
        load_recipe(p)


def test_retired_key_loads_at_its_old_default_only():
    """A run saved before a key's removal (its recipe.yaml holds every key) still loads; a recipe that
    sets the removed key to anything else is refused, not silently trained without it."""
    old = {"family": "flamingo", "model": {"episode_distill": 0.0, "episode_distill_layer": 1, "max_shots": 3}}
    assert recipe_from_dict(old).model.max_shots == 3
    with pytest.raises(GlimpseError, match="recipe key model.episode_distill was removed"):
        recipe_from_dict({"family": "flamingo", "model": {"episode_distill": 0.5}})


def test_malformed_yaml_and_unknown_family(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("train: {max_steps: [1,\n")
    with pytest.raises(GlimpseError, match="malformed recipe .*broken.yaml"):
        load_recipe(p)
    with pytest.raises(GlimpseError, match="unknown family 'gan'"):
        recipe_from_dict({"family": "gan"})
    with pytest.raises(GlimpseError, match="a recipe must name its family: family: one of .*dual_encoder"):
        recipe_from_dict({"train": {"max_steps": 3}})
    with pytest.raises(GlimpseError, match="no recipe 'nonexistent'"):
        load_recipe("nonexistent")


def test_free_mapping_keys():
    r = load_recipe("shapes-clip")
    apply_override(r, "data.files.train=/data/coco/captions_train2017.json")
    assert r.data.files == {"train": "/data/coco/captions_train2017.json"}


@pytest.mark.parametrize("item, fragment", [
    ("eval.prompt_ensemble=maxx", "is not one of mean, max"),
    ("train.precision=fp16", "is not one of fp32, bf16"),
    ("train.log_every=0", "must be at least 1"),
    ("train.grad_accum=3", "must be a multiple of train.grad_accum"),
    ("model.vision.pool=cls", "needs model.vision.class_token"),
    ("model.vision.patch_size=7", "must divide image_size"),
    ("model.loss=triplet", "is not one of clip, siglip"),
    ("data.image_std=[0.1,0.2]", "must hold 3 values"),
    ("eval.templates=[a photo]", "with a {} for the class name"),
    ("train.padding_groups=0", "must be at least 1"),
    ("train.padding_groups=2", "is for the families that implement it (vlm), not dual_encoder"),
])
def test_values_out_of_range_are_refused_on_loading(item, fragment):
    with pytest.raises(GlimpseError) as e:
        load_recipe("shapes-clip", [item])
    assert fragment in str(e.value)
