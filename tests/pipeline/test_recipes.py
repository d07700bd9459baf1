"""Every shipped recipe loads and validates against its steps' parameter dataclasses."""

from pathlib import Path

import pytest

from winnow.core.store import UserError
from winnow.pipeline.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.steps and recipe.steps[0][0].name == "ingest"


@pytest.mark.parametrize(
    "text, match",
    [
        ('[[steps]]\nstep = "ingest"\ninputs = ["x"]\nbogus = 1\n', "unknown parameter"),
        ('[[steps]]\nstep = "nope"\n', "unknown step"),
        ('[[steps]]\nstep = "ingest"\ninputs = ["x"]\nshard_rows = 0\n', "shard_rows"),
        ('run_dir = "x"\n', "no \\[\\[steps\\]\\]"),
        ("oops = [\n", "invalid TOML"),
    ],
)
def test_bad_recipes_fail_early_naming_the_problem(tmp_path, text, match):
    p = tmp_path / "r.toml"
    p.write_text(text)
    with pytest.raises(UserError, match=match):
        load_recipe(p)


def test_with_models_swaps_every_model_field_and_nothing_else():
    from winnow.pipeline.recipe import with_models

    quick = next(p for p in RECIPES if p.name == "quickstart.toml")
    recipe = load_recipe(quick)
    swapped = with_models(recipe, {"builtin:tiny": "/m/base", "builtin:tiny-negative": "/m/neg"})
    fields = [
        (s.name, {k: getattr(p, k) for k in ("model", "positive", "negative") if hasattr(p, k)})
        for s, p in swapped.steps
    ]
    assert ("ingest", {"model": "/m/base"}) in fields
    contrast = dict(fields)["contrast_pass"]
    assert contrast == {"positive": "builtin:tiny-positive", "negative": "/m/neg"}
    models = [f["model"] for name, f in fields if name == "model_pass"]
    assert models == ["builtin:tiny-warm", "/m/base", "builtin:tiny-reference"]
    # the original recipe is untouched and every other parameter is carried over
    assert [getattr(p, "model", None) for _, p in recipe.steps][0] == "builtin:tiny"
    for (_, a), (_, b) in zip(recipe.steps, swapped.steps, strict=True):
        for k, v in vars(a).items():
            if k not in ("model", "positive", "negative"):
                assert vars(b)[k] == v
