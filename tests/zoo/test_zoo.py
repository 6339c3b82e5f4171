"""The bundled models load offline, keep the data convention, and are what the issue promised."""

import json

import pytest
import torch

from ditq_compiler import quality, zoo
from ditq_compiler.zoo.classifier import frechet_distance
from ditq_compiler.zoo.data import NULL_CLASS, digits


def test_digits_split_is_stratified_disjoint_and_in_range():
    train_x, train_y = digits("train")
    held_x, held_y = digits("held_out")
    assert len(train_y) + len(held_y) == 1797
    assert train_x.shape[1:] == (1, 8, 8) and float(train_x.min()) == -1.0 and float(train_x.max()) == 1.0
    for c in range(10):  # every class is held out in the same proportion
        assert abs(float((held_y == c).sum()) / float((train_y == c).sum() + (held_y == c).sum()) - 0.2) < 0.01
    flat_train = {tuple(row.tolist()) for row in train_x.flatten(1)}
    assert sum(tuple(row.tolist()) in flat_train for row in held_x.flatten(1)) < 5  # (a few duplicates exist)


def test_classifier_reaches_97_percent_on_held_out_digits():
    images, labels = digits("held_out")
    assert quality.class_accuracy(images, labels) >= 0.97


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_a_shift():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=gen)
    assert abs(frechet_distance(a, a)) < 1e-8
    assert frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=1e-6)  # |mu|^2 with equal covariances


def test_fd_floor_is_far_below_noise():
    assert quality.real_fd_floor() < 10 < quality.fd_digits(torch.rand(400, 1, 8, 8) * 2 - 1)


@pytest.mark.parametrize("name, cls", [("dit-digits", "DiTTransformer2DModel"), ("unet-digits", "UNet2DModel")])
def test_diffusion_models_load_offline_with_the_promised_shape(name, cls):
    if not zoo.weights_dir(name).exists():
        pytest.skip(f"{name} weights are not trained in this checkout")
    model = zoo.load(name)
    assert type(model).__name__ == cls and not model.training
    x = torch.randn(3, 1, 8, 8)
    out = model(x, torch.tensor([10, 500, 999]), torch.tensor([1, 2, NULL_CLASS])).sample
    assert out.shape == x.shape
    assert zoo.scheduler(name).config.num_train_timesteps == 1000
    log = json.loads((zoo.weights_dir(name) / "train_log.json").read_text())
    assert log["model"] == name and log["wall_seconds"] > 0


def test_dit_digits_architecture():
    if not zoo.weights_dir("dit-digits").exists():
        pytest.skip("dit-digits weights are not trained in this checkout")
    config = zoo.load("dit-digits").config
    assert config.num_layers >= 6 and config.num_attention_heads * config.attention_head_dim >= 128
    assert (config.in_channels, config.sample_size, config.patch_size) == (1, 8, 2)


def test_zoo_weights_fit_the_size_budget():
    total = sum(p.stat().st_size for p in zoo.weights_dir("dit-digits").parent.rglob("*") if p.is_file())
    assert total < 25 * 2**20


def test_unknown_zoo_name_lists_the_models():
    with pytest.raises(KeyError, match="dit-digits"):
        zoo.load("sd3")
