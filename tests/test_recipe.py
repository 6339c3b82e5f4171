import json

import pytest

from ditq_compiler.graph import LayerInfo
from ditq_compiler.recipe import Recipe, RecipeError

PRESETS = ["w8a8-minmax", "w8a8", "w4a8-minmax", "w4a8", "w6a6-minmax", "w6a6"]


def layer(name="blocks.0.attn.to_q", role="qkv"):
    return LayerInfo(node="n", name=name, op="linear", role=role, timestep_dependent=True)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_round_trip_through_yaml_and_json(name, tmp_path):
    recipe = Recipe.load(name)
    assert recipe.name == name
    for suffix in (".yaml", ".json"):
        path = recipe.save(tmp_path / f"r{suffix}")
        assert Recipe.load(path) == recipe


def test_minmax_presets_use_minmax_symmetric_per_channel_weights_and_per_tensor_activations():
    for name in [p for p in PRESETS if p.endswith("-minmax")]:
        r = Recipe.load(name)
        assert (r.weights.observer, r.weights.symmetric, r.weights.granularity) == ("minmax", True, "channel")
        assert (r.activations.observer, r.activations.granularity) == ("minmax", "tensor")


def test_default_keeps_conditioning_patch_embed_and_final_in_full_precision():
    recipe = Recipe.load("w8a8")
    for role in ("embed", "adaln", "patch_embed", "final"):
        assert recipe.plan(layer(role=role)) is None
    assert recipe.plan(layer(role="fc2")).weights.bits == 8


def test_overrides_by_role_and_by_name_regex():
    recipe = Recipe.from_dict({
        "weights": {"bits": 8},
        "overrides": [
            {"role": "fc2", "weights": {"bits": 4}},
            {"name": r"blocks\.1\..*", "activations": False},
            {"role": "final", "quantize": True},
        ]})
    assert recipe.plan(layer("blocks.0.ff", "fc2")).weights.bits == 4
    assert recipe.plan(layer("blocks.0.ff", "fc2")).activations.bits == 8
    assert recipe.plan(layer("blocks.1.attn.to_q", "qkv")).activations is None
    assert recipe.plan(layer("blocks.0.attn.to_q", "qkv")).weights.bits == 8
    assert recipe.plan(layer("proj_out", "final")) is not None
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_recipe_is_frozen():
    with pytest.raises(AttributeError):
        Recipe.load("w8a8").name = "x"


@pytest.mark.parametrize("data, path", [
    ({"weigths": {}}, "recipe.weigths"),
    ({"weights": {"bitz": 4}}, "recipe.weights.bitz"),
    ({"overrides": [{"role": "fc2"}, {"role": "qkv", "weights": {"nope": 1}}]}, "recipe.overrides[1].weights.nope"),
    ({"weights": {"bits": 12}}, "recipe.weights.bits"),
    ({"weights": {"granularity": "token"}}, "recipe.weights.granularity"),
    ({"activations": {"granularity": "channel"}}, "recipe.activations.granularity"),
    ({"weights": {"granularity": "group"}}, "recipe.weights.group_size"),
    ({"quantize_roles": ["qkv", "mlp"]}, "recipe.quantize_roles[1]"),
    ({"overrides": [{"weights": {"bits": 4}}]}, "recipe.overrides[0]"),
    ({"overrides": [{"name": "blocks.(", "quantize": False}]}, "recipe.overrides[0].name"),
    ({"overrides": [{"role": "fc9"}]}, "recipe.overrides[0].role"),
    ({"version": 99}, "recipe.version"),
    ({"activations": False, "overrides": [{"role": "fc2", "activations": {"symmetric": True}}]},
     "recipe.overrides[0].activations"),
    ({"shift": {"statistic": "median"}}, "recipe.shift.statistic"),
    ({"shift": {"momentum": 1.5}}, "recipe.shift.momentum"),
    ({"shift": {"sites": "fc1"}}, "recipe.shift.sites"),
    ({"shift": {"momentun": 0.9}}, "recipe.shift.momentun"),
    ({"migration": {"top_k": 0.02}}, "recipe.migration"),
    ({"shift": {}, "migration": {"top_k": 0.0}}, "recipe.migration.top_k"),
    ({"reconstruction": {"mode": "jointly"}}, "recipe.reconstruction.mode"),
    ({"reconstruction": {"iterations": 10.5}}, "recipe.reconstruction.iterations"),
    ({"reconstruction": {"drop_prob": -0.1}}, "recipe.reconstruction.drop_prob"),
    ({"reconstruction": {"b_end": 0}}, "recipe.reconstruction.b_end"),
    ({"activations": False, "reconstruction": {}}, "recipe.reconstruction"),
    ({"activations": {"bits": 1.58}}, "recipe.activations.bits"),
    ({"weights": {"bits": 1.58, "observer": "minmax"}}, "recipe.weights.observer"),
    ({"rotation": {"roles": ["qkv", "mlp"]}}, "recipe.rotation.roles[1]"),
    ({"rotation": {"roles": "qkv"}}, "recipe.rotation.roles"),
    ({"rotation": {"fuse": "yes"}}, "recipe.rotation.fuse"),
    ({"rotation": {"rols": ["qkv"]}}, "recipe.rotation.rols"),
    ({"rotation": {}, "shift": {}}, "recipe.rotation"),
    ({"distillation": {"iterations": -1}}, "recipe.distillation.iterations"),
    ({"distillation": {"lr": "fast"}}, "recipe.distillation.lr"),
    ({"distillation": {"leniency": 120}}, "recipe.distillation.leniency"),
    ({"distillation": {"output_weight": 0, "block_weight": 0}}, "recipe.distillation.output_weight"),
    ({"distillation": {}, "reconstruction": {}}, "recipe.distillation"),
])
def test_bad_recipes_name_the_field(data, path):
    with pytest.raises(RecipeError) as err:
        Recipe.from_dict(data)
    assert str(err.value).startswith(path), str(err.value)


def test_unknown_key_in_a_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "x", "activations": {"bits": 8, "oberver": "mse"}}))
    with pytest.raises(RecipeError, match=r"recipe\(bad.json\)\.activations\.oberver"):
        Recipe.load(path)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(RecipeError, match="w8a8-minmax"):
        Recipe.load("w9a9")


@pytest.mark.parametrize("name", ["hadamard-only", "w1.58a4-minmax", "robuq-w1.58a4", "robuq-w1.58a3", "w4a4-minmax",
                                  "robuq-w4a4"])
def test_robuq_presets_load_and_round_trip(name, tmp_path):
    recipe = Recipe.load(name)
    for suffix in (".yaml", ".json"):
        assert Recipe.load(recipe.save(tmp_path / f"r{suffix}")) == recipe
    if name.startswith("robuq") or name == "hadamard-only":
        assert recipe.rotation.roles == ("qkv", "attn_out", "fc1", "fc2") and recipe.rotation.fuse
    if "1.58" in name:
        assert recipe.weights.ternary and recipe.weights.observer == "absmean"
        assert (recipe.activations.bits, recipe.activations.granularity) == (4, "token")
    assert (recipe.distillation is not None) == (name in ("robuq-w1.58a4", "robuq-w1.58a3"))
    assert (recipe.mixed_precision is not None) == (name == "robuq-w1.58a3")


def test_hadamard_only_quantizes_nothing():
    recipe = Recipe.load("hadamard-only")
    assert recipe.quantize_roles == () and recipe.plan(layer(role="qkv")) is None


def test_taq_dit_presets_carry_the_papers_defaults_and_round_trip(tmp_path):
    taq = Recipe.load("taq-dit-w4a8")
    assert (taq.weights.bits, taq.weights.symmetric, taq.weights.granularity) == (4, False, "channel")
    assert (taq.activations.bits, taq.activations.granularity) == (8, "tensor")
    assert (taq.shift.statistic, taq.shift.momentum, taq.shift.sites) == ("mean", 0.95, "post_gelu")
    assert taq.migration.top_k == 0.02
    r = taq.reconstruction
    assert (r.mode, r.round_loss_weight, r.b_start, r.b_end, r.act_lr, r.drop_prob) == ("joint", 0.01, 20, 2, 4e-5, 0.5)
    assert Recipe.load("taq-dit-w4a8-noshift").shift is None
    separate = Recipe.load("taq-dit-w4a8-separate")
    assert separate.reconstruction.mode == "separate" and separate.shift is None
    for suffix in (".yaml", ".json"):
        assert Recipe.load(taq.save(tmp_path / f"taq{suffix}")) == taq
    assert Recipe.from_dict({"version": 1, "name": "old"}).shift is None   # version-1 recipes still read


TQ_PRESETS = ["tq-dit-w8a8", "tq-dit-w6a6", "tq-dit-w6a6-ho", "tq-dit-w6a6-ho-mrq", "tq-dit-w6a6-baseline"]


@pytest.mark.parametrize("name", TQ_PRESETS)
def test_tq_dit_presets_round_trip(name, tmp_path):
    recipe = Recipe.load(name)
    for suffix in (".yaml", ".json"):
        assert Recipe.load(recipe.save(tmp_path / f"r{suffix}")) == recipe


def test_tq_dit_presets_are_the_rows_of_table_iii():
    full = Recipe.load("tq-dit-w6a6")
    s = full.scale_search
    assert (s.metric, s.rounds, s.eq_alpha, s.eq_beta, s.eq_n) == ("hessian", 3, 0.01, 1.2, 100)
    assert full.attention.matmuls and full.multi_region.post_softmax and full.multi_region.post_gelu
    assert full.time_groups.groups == 10 and set(full.time_groups.sites) == {"post_softmax", "post_gelu",
                                                                             "linear_inputs", "attention_operands"}
    assert (full.weights.bits, full.activations.bits) == (6, 6) and Recipe.load("tq-dit-w8a8").weights.bits == 8
    ho_mrq, ho, baseline = (Recipe.load(f"tq-dit-w6a6-{x}") for x in ("ho-mrq", "ho", "baseline"))
    assert ho_mrq.time_groups is None and ho_mrq.multi_region == full.multi_region
    assert ho.multi_region is None and ho.scale_search == full.scale_search
    assert baseline.scale_search.metric == "mse" and baseline.attention == full.attention


@pytest.mark.parametrize("data, path", [
    ({"scale_search": {"metric": "fisher"}}, "recipe.scale_search.metric"),
    ({"scale_search": {"rounds": 0}}, "recipe.scale_search.rounds"),
    ({"scale_search": {"eq_alpha": 0.5, "eq_beta": 0.4}}, "recipe.scale_search.eq_beta"),
    ({"scale_search": {"eq_n": 2.5}}, "recipe.scale_search.eq_n"),
    ({"scale_search": {}, "time_groups": {"groups": 0}}, "recipe.time_groups.groups"),
    ({"scale_search": {}, "time_groups": {"sites": ["post_relu"]}}, "recipe.time_groups.sites[0]"),
    ({"scale_search": {}, "time_groups": {"sites": "post_gelu"}}, "recipe.time_groups.sites"),
    ({"scale_search": {}, "time_groups": {"sites": ["post_gelu", "post_gelu"]}}, "recipe.time_groups.sites"),
    ({"scale_search": {}, "time_groups": {"sites": ["post_gelu", "post_softmax"]}}, "recipe.time_groups.sites[1]"),
    ({"scale_search": {}, "multi_region": {}}, "recipe.multi_region.post_softmax"),
    ({"scale_search": {}, "multi_region": {"post_gelu": "yes", "post_softmax": False}},
     "recipe.multi_region.post_gelu"),
    ({"multi_region": {"post_softmax": False}}, "recipe.multi_region"),
    ({"time_groups": {"sites": ["post_gelu"]}}, "recipe.time_groups"),
    ({"attention": {}}, "recipe.attention"),
    ({"attention": {"heads": 2}}, "recipe.attention.heads"),
    ({"activations": False, "attention": {}, "scale_search": {}}, "recipe.attention"),
    ({"scale_search": {}, "weights": {"granularity": "group", "group_size": 32}}, "recipe.scale_search"),
    ({"scale_search": {}, "activations": {"granularity": "token"}}, "recipe.scale_search"),
    ({"scale_search": {}, "reconstruction": {}}, "recipe.scale_search"),
    ({"scale_search": {}, "multi_region": {"post_softmax": False, "post_gelu": False}}, "recipe.multi_region:"),
    ({"scale_search": {}, "overrides": [{"role": "fc2", "activations": {"granularity": "token"}}]},
     "recipe.overrides[0].activations.granularity"),
    ({"scale_search": {}, "time_groups": {}, "attention": {},
      "overrides": [{"name": "x", "quantize": True},
                    {"role": "fc1", "weights": {"granularity": "group", "group_size": 32}}]},
     "recipe.overrides[1].weights.granularity"),
])
def test_bad_tq_dit_sections_name_the_field(data, path):
    with pytest.raises(RecipeError) as err:
        Recipe.from_dict(data)
    assert str(err.value).startswith(path), str(err.value)


def test_one_time_group_and_weight_only_search_are_valid():
    recipe = Recipe.from_dict({"activations": False, "scale_search": {"metric": "mse"}})
    assert recipe.scale_search.metric == "mse" and recipe.attention is None
    grouped = Recipe.from_dict({"attention": True, "scale_search": True, "time_groups": {"groups": 1}})
    assert grouped.time_groups.groups == 1 and grouped.attention.matmuls
