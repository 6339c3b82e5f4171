"""Property tests: random quantizer parameters survive ``compiled.save`` / ``dq.load`` bitwise, and
``quant_linear`` / ``quant_conv2d`` parameters survive ``export_onnx`` into ONNX Runtime.

Hypothesis draws the formats (weights 2-8 bits or ternary 1.58, symmetric or affine, per tensor /
channel / group; activations 2-8 bits per tensor or per token, or none; TQ-DiT's two-region
quantizers and time-group tables), compiles a tiny timestep-conditioned transformer block with them,
then multiplies every floating-point quantizer parameter (scales, two-region steps, every row of a
time-group table) by a random factor, so the saved values are arbitrary floats, not the few a
calibration happens to produce. The loaded model must give identical outputs at timesteps in every
time group. Examples are few (each is a compile) and the models tiny, to keep the suite fast.
"""

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from click.testing import CliRunner
from hypothesis import strategies as st

import ditq_compiler as dq
from ditq_compiler.backends.ort import OrtModel
from ditq_compiler.cli import cli
from ditq_compiler.quant import sqnr_db
from ditq_compiler import meta
from tests.inspection.test_html import embedded_data

ROLES = list(dq.recipe.ROLES)
SITES = ["post_softmax", "post_gelu", "linear_inputs", "attention_operands"]
TIMESTEPS = (999, 700, 450, 200, 3)
FAST = settings(max_examples=5, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEWER = settings(FAST, max_examples=4)          # each example also exports to ONNX (a few seconds)


class TinyBlock(torch.nn.Module):
    """A timestep-conditioned transformer block: x + t-embedding -> attention (2 heads) -> GELU MLP."""

    def __init__(self, seed: int, width: int = 16):
        super().__init__()
        torch.manual_seed(seed)
        self.q, self.k, self.v = (torch.nn.Linear(width, width) for _ in range(3))
        self.out, self.fc1, self.fc2 = torch.nn.Linear(width, width), torch.nn.Linear(width, 32), \
            torch.nn.Linear(32, width)
        self.register_buffer("freqs", torch.linspace(1, 8, width) / 300)

    def forward(self, x, timestep):
        h = x + torch.sin(timestep.float()[:, None, None] * self.freqs)
        b, n, c = h.shape
        q, k, v = (p(h).reshape(b, n, 2, c // 2).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        h = h + self.out(a)
        return h + self.fc2(torch.nn.functional.gelu(self.fc1(h)))


def _batches(seed: int, width: int = 16):
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(len(TIMESTEPS), 6, width, generator=g), torch.tensor(TIMESTEPS)), {}) for _ in range(2)]


@st.composite
def weight_specs(draw, conv=False):
    bits = draw(st.sampled_from([2, 3, 4, 5, 6, 7, 8, 1.58]))
    if bits == 1.58:
        return {"bits": 1.58, "symmetric": True, "observer": "absmean",
                "granularity": draw(st.sampled_from(["tensor", "channel"]))}
    granularity = draw(st.sampled_from(["tensor", "channel"] if conv else ["tensor", "channel", "group"]))
    spec = {"bits": bits, "symmetric": draw(st.booleans()), "granularity": granularity, "observer": "minmax"}
    return spec | ({"group_size": draw(st.sampled_from([4, 8]))} if granularity == "group" else {})


@st.composite
def activation_specs(draw, allow_token=True):
    if draw(st.booleans()) and allow_token:
        return draw(st.sampled_from([False, {"bits": draw(st.integers(2, 8)), "symmetric": draw(st.booleans()),
                                             "granularity": "token"}]))
    return {"bits": draw(st.integers(2, 8)), "symmetric": draw(st.booleans()), "granularity": "tensor"}


@st.composite
def recipes(draw):
    """A plain recipe, or a TQ-DiT one (static activations, two-region quantizers, time-group tables)."""
    weights = draw(weight_specs())
    if draw(st.booleans()) and weights["granularity"] != "group" and weights["bits"] != 1.58:
        post_softmax = draw(st.booleans())
        sites = draw(st.lists(st.sampled_from(SITES), min_size=1, max_size=4, unique=True))
        return {"name": "random-tq", "quantize_roles": ROLES, "weights": weights,
                "activations": draw(activation_specs(allow_token=False)), "attention": {"matmuls": True},
                "scale_search": {"metric": "mse", "rounds": 1, "eq_n": 3},
                "multi_region": {"post_softmax": post_softmax, "post_gelu": not post_softmax or draw(st.booleans())},
                "time_groups": {"groups": draw(st.integers(1, 3)), "sites": sites}}
    return {"name": "random", "quantize_roles": ROLES, "weights": weights, "activations": draw(activation_specs())}


def _randomize(compiled, seed: int) -> int:
    """Every floating-point quantizer constant times a random factor in [1/8, 8]; how many were changed."""
    g = torch.Generator().manual_seed(seed)
    changed = 0
    for name, value in compiled.graph_module.named_buffers():
        leaf = name.rsplit(".", 1)[-1]
        if value.is_floating_point() and any(p in leaf for p in ("scale", "_s1", "_s_neg", "_s_pos")):
            value.mul_(torch.exp2(torch.rand(value.shape, generator=g) * 6 - 3))
            changed += 1
    return changed


def _outputs(model, batches):
    with torch.no_grad():
        return [model(*args, **kwargs) for args, kwargs in batches]


@FAST
@given(recipe=recipes(), seed=st.integers(0, 2**16))
def test_random_quantizers_round_trip_bitwise(recipe, seed, tmp_path_factory):
    batches = _batches(seed)
    compiled = dq.compile(TinyBlock(seed), dq.Recipe.from_dict(recipe), calibration=batches, progress=False,
                          cache_dir=False)
    assert compiled.layers and _randomize(compiled, seed) > 0
    loaded = dq.load(compiled.save(tmp_path_factory.mktemp("artifact") / "tiny"))
    saved = dict(compiled.graph_module.named_buffers())
    for name, value in loaded.graph_module.named_buffers():
        assert value.dtype == saved[name].dtype and torch.equal(value, saved[name]), name
    for expected, got in zip(_outputs(compiled, batches), _outputs(loaded, batches), strict=True):
        assert torch.equal(expected, got)
    grouped = [n for n in loaded.graph_module.graph.nodes if meta.get(n).time_grouped]
    assert len(grouped) == sum(1 for s in compiled.sites if s.groups > 1)


class OneLayer(torch.nn.Module):
    def __init__(self, seed: int, conv: bool):
        super().__init__()
        torch.manual_seed(seed)
        self.layer = torch.nn.Conv2d(8, 6, 3, padding=1) if conv else torch.nn.Linear(16, 12)

    def forward(self, x):
        return self.layer(x)


@FEWER
@given(conv=st.booleans(), data=st.data(), seed=st.integers(0, 2**16))
def test_random_linear_and_conv_parameters_round_trip_through_onnx_runtime(conv, data, seed, tmp_path_factory):
    """One quant_linear / quant_conv2d with random formats and scales: saved, loaded, exported for ORT; ONNX
    Runtime computes the same integer codes, so only float summation order separates it from the reference."""
    recipe = {"name": "random-layer", "quantize_roles": ROLES, "weights": data.draw(weight_specs(conv=conv)),
              "activations": data.draw(activation_specs(allow_token=not conv))}   # per-token: linears only
    g = torch.Generator().manual_seed(seed)
    shape = (3, 8, 5, 5) if conv else (3, 7, 16)
    batches = [((torch.randn(shape, generator=g),), {}) for _ in range(2)]
    compiled = dq.compile(OneLayer(seed, conv), dq.Recipe.from_dict(recipe), calibration=batches, progress=False,
                          cache_dir=False)
    assert [r.role for r in compiled.layers] in (["patch_embed"], ["final"], ["conv"], ["linear"])
    _randomize(compiled, seed)
    folder = tmp_path_factory.mktemp("onnx")
    loaded = dq.load(compiled.save(folder / "layer"))
    path = loaded.export_onnx(folder / "layer.onnx", target="ort")
    x = torch.randn(shape, generator=g)
    with torch.no_grad():
        reference, ort = loaded(x), OrtModel(path, threads=1)(x)
    assert ort.shape == reference.shape and math.isfinite(float(ort.abs().max()))
    assert sqnr_db(reference, ort) >= 60, recipe


def _quick(name: str) -> dq.Recipe:
    """The preset cut to seconds: a 4-candidate MSE search and 3 time groups, or 3 distillation steps."""
    recipe = dq.Recipe.load(name)
    if recipe.scale_search is not None:
        recipe = dataclasses.replace(recipe, scale_search=dataclasses.replace(recipe.scale_search, metric="mse",
                                                                              eq_n=4, rounds=1),
                                     time_groups=dataclasses.replace(recipe.time_groups, groups=3))
    if recipe.distillation is not None:
        recipe = dataclasses.replace(recipe, distillation=dataclasses.replace(recipe.distillation, iterations=3,
                                                                              batch_size=4))
    return recipe


def _passes(data: dict, layer: str) -> list[dict]:
    return next(entry["passes"] for entry in data["layers"].values() if entry["name"] == layer)


@pytest.mark.parametrize("name", ["tq-dit-w8a8", "robuq-w1.58a4"])
def test_tq_dit_and_robuq_models_round_trip_and_inspect(name, dit, dit_batches, tmp_path):
    compiled = dq.compile(dit, _quick(name), calibration=dit_batches[:4], progress=False, cache_dir=False)
    path = compiled.save(tmp_path / "dit")
    loaded = dq.load(path)
    assert str(loaded.summary()) == str(compiled.summary())      # the site / time-group / rotation tables too
    for args, kwargs in dit_batches[4:]:
        with torch.no_grad():
            assert torch.equal(compiled(*args, **kwargs).sample, loaded(*args, **kwargs).sample)
    result = CliRunner().invoke(cli, ["inspect", str(path), "--html", str(tmp_path / "view.html")])
    assert result.exit_code == 0, result.output
    data = embedded_data((tmp_path / "view.html").read_text(encoding="utf-8"))
    assert {entry["name"] for entry in data["layers"].values()} == {r.name for r in compiled.layers}
    fc2 = _passes(data, "transformer_blocks.0.ff.net.2")
    if name.startswith("tq-dit"):
        site = next(p for p in fc2 if p["pass"] == "quantize_activations")
        assert (site["quantizer"], site["regions"], site["time_groups"]) == ("gelu_mrq", 2, 3), fc2
        assert fc2[-1]["pass"] == "quantize_linears"
        assert "time groups (by timestep)" in result.output and "int8 2-region" in result.output
    else:
        assert fc2[0] == {"pass": "insert_hadamard", "rotation": "H512 = H16 x H32", "placement": "online"}, fc2
        out = _passes(data, "transformer_blocks.0.attn1.to_out.0")[0]
        assert out["pass"] == "insert_hadamard" and out["placement"].startswith("per-head"), out
        to_v = _passes(data, "transformer_blocks.0.attn1.to_v")
        assert {"pass": "insert_hadamard", "output_rotated": "for the rotated layers it feeds"} in to_v, to_v
        assert "Hadamard rotations" in result.output
