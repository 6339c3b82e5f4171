"""Small diffusers models and calibration batches shared by the tests (built, never downloaded)."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):     # pytest-xdist runs one worker per core: one torch thread each
    torch.set_num_threads(1)

from ditq_compiler.toy import random_dit_batches, random_unet_batches, small_dit, small_unet  # noqa: E402


@pytest.fixture(scope="session")
def dit():
    return small_dit()


@pytest.fixture(scope="session")
def dit_batches():
    return random_dit_batches()


@pytest.fixture(scope="session")
def unet():
    return small_unet()


@pytest.fixture(scope="session")
def unet_batches():
    return random_unet_batches()


@pytest.fixture(scope="session")
def compiled_dit_w8a8(dit, dit_batches):
    import ditq_compiler as dq

    return dq.compile(dit, dq.Recipe.load("w8a8"), calibration=dit_batches, progress=False)


@pytest.fixture(scope="session", autouse=True)
def _cache_in_a_temporary_folder(tmp_path_factory):
    """compile() keeps interrupted work under $DITQ_CACHE_DIR: never the user's ~/.cache during tests."""
    import os

    old = os.environ.get("DITQ_CACHE_DIR")
    os.environ["DITQ_CACHE_DIR"] = str(tmp_path_factory.mktemp("ditq-cache"))
    yield
    if old is None:
        os.environ.pop("DITQ_CACHE_DIR", None)
    else:
        os.environ["DITQ_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def planned_dit():
    """A factory: the small DiT captured, attention decomposed, annotated and planned for a TQ-DiT recipe, with the
    parameter tables from a small scale search (plain MSE, 5 candidates, 1 round) on two random batches. Built once
    per recipe; each call gets its own copy of the graph."""
    import copy
    import dataclasses

    import ditq_compiler as dq
    from ditq_compiler.activation_sites import plan_sites
    from ditq_compiler.annotate import annotate
    from ditq_compiler.calibration.scale_search import search_scales
    from ditq_compiler.capture import capture
    from ditq_compiler.calibration.data import flat_inputs
    from ditq_compiler.graph import analyse
    from ditq_compiler.passes.decompose_attention import DecomposeAttention

    built = {}

    def build(**sections):
        key = repr(sorted(sections.items()))
        if key not in built:
            built[key] = _build(**sections)
        captured, gm, *rest = built[key]
        return (captured, copy.deepcopy(gm), *rest)

    def _build(**sections):
        recipe = dq.Recipe.from_dict({**dq.Recipe.load("tq-dit-w8a8").to_dict(), **sections})
        recipe = dataclasses.replace(recipe, scale_search=dataclasses.replace(recipe.scale_search, metric="mse",
                                                                              eq_n=4, rounds=1))
        batches = random_dit_batches(count=2)
        captured = capture(small_dit(), batches[0])
        gm = DecomposeAttention()(captured.graph_module).graph_module
        analysis = analyse(gm, captured.sample_input, captured.timestep_input)
        annotations = annotate(gm, analysis, recipe)
        plan = plan_sites(gm, analysis, annotations, recipe)
        flat = [flat_inputs(captured.bind(a, k)) for a, k in batches]
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        searched = search_scales(gm, annotations, plan, flat, recipe.scale_search, None,
                                 names.index(captured.timestep_input), progress=False)
        return captured, gm, annotations, plan, flat, searched

    return build
