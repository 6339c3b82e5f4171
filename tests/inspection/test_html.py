"""The HTML view in headless Chromium: loads without errors, shows every quantized layer, a click opens its panel.

Needs Debian's chromium (`apt-get install -y chromium`); skipped without it.
"""

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import ditq_compiler as dq
from ditq_compiler.cli import cli
from ditq_compiler.inspection.html import block_of, render_html, view_data

from .chromium import CHROMIUM, Chromium

SHIFT_MIGRATE = {"name": "w8a8-shift-migrate", "weights": {"observer": "minmax"}, "activations": {"observer": "minmax"},
                 "shift": {}, "migration": {"top_k": 0.05}}


@pytest.fixture(scope="module")
def artifact(dit, dit_batches, tmp_path_factory):
    compiled = dq.compile(dit, dq.Recipe.from_dict(SHIFT_MIGRATE), calibration=dit_batches, progress=False)
    return compiled.save(tmp_path_factory.mktemp("artifact") / "dit")


def embedded_data(page: str) -> dict:
    return json.loads(re.search(r'id="ditq-data">(.*?)</script>', page, re.S).group(1).replace("<\\/", "</"))


def test_the_page_is_self_contained_and_holds_every_layer(artifact):
    compiled = dq.load(artifact)
    page = render_html(compiled)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page) and "@import" not in page
    data = embedded_data(page)
    assert data == view_data(compiled) | {}                         # plain JSON: no NaN/Infinity tokens
    assert {layer["name"] for layer in data["layers"].values()} == {r.name for r in compiled.layers}
    fc2 = next(layer for layer in data["layers"].values() if layer["role"] == "fc2")
    assert [p["pass"] for p in fc2["passes"]] == ["fold_shift_into_bias", "migrate_outliers", "quantize_linears"]
    assert {p["arg"] for p in fc2["parameters"]} >= {"w_codes", "w_scale", "a_scale", "a_bits"}
    assert fc2["activation_stats"]["transformed"] is True
    blocks = [b["name"] for b in data["blocks"]]
    assert blocks[:3] == ["pos_embed", "transformer_blocks.0", "transformer_blocks.1"]
    assert any(b.startswith("transformer_blocks.0 (again, after ") for b in blocks)   # the final layer's conditioning
    assert block_of("down_blocks.1.attentions.0.to_q") == "down_blocks.1" and block_of("proj_out_1") == "proj_out_1"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium: apt-get install -y chromium")
def test_the_page_in_headless_chromium(artifact, tmp_path):
    html = tmp_path / "view.html"
    result = CliRunner().invoke(cli, ["inspect", str(artifact), "--html", str(html)])
    assert result.exit_code == 0, result.output
    layers = {r.name: r for r in dq.load(artifact).layers}

    browser = Chromium(tmp_path / "profile")
    try:
        browser.navigate(html.as_uri())
        shown = browser.evaluate("[...document.querySelectorAll('button.layer')].map(b => b.title)")
        assert sorted(shown) == sorted(layers)
        fc2 = next(name for name, r in layers.items() if r.role == "fc2")
        box = browser.evaluate(f"(() => {{ const b = [...document.querySelectorAll('button.layer')]"
                               f".find(b => b.title === {json.dumps(fc2)}); b.scrollIntoView();"
                               f" const r = b.getBoundingClientRect();"
                               f" return [r.x + r.width / 2, r.y + r.height / 2]; }})()")
        browser.click(*box)
        panel = browser.evaluate("(() => { const p = document.getElementById('panel');"
                                 " const h = p.querySelector('h2');"
                                 " return {open: p.classList.contains('open'), title: h && h.textContent,"
                                 " text: p.textContent, plots: p.querySelectorAll('svg').length}; })()")
        assert panel["open"] and panel["title"] == fc2
        assert "fold_shift_into_bias" in panel["text"] and "migrate_outliers" in panel["text"]
        assert "NaN" not in panel["text"] and "weight_rounding=nearest" in panel["text"]
        assert layers[fc2].weights in panel["text"] and panel["plots"] == 3
        shot = browser.screenshot(tmp_path / "inspect-panel.png")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        assert browser.errors() == []
    finally:
        browser.close()
