"""Every shipped recipe loads and validates against its steps' parameter dataclasses."""

from pathlib import Path

import pytest

from winnow.pipeline.recipe import load_recipe
from winnow.pipeline.store import UserError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


def test_there_is_a_quickstart():
    assert any(p.name == "quickstart.toml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.steps and recipe.steps[0][0].name == "ingest"


@pytest.mark.parametrize("text, match", [
    ('[[steps]]\nstep = "ingest"\ninputs = ["x"]\nbogus = 1\n', "unknown parameter"),
    ('[[steps]]\nstep = "nope"\n', "unknown step"),
    ('[[steps]]\nstep = "ingest"\ninputs = ["x"]\nshard_rows = 0\n', "shard_rows"),
    ('run_dir = "x"\n', "no \\[\\[steps\\]\\]"),
    ('oops = [\n', "invalid TOML"),
])
def test_bad_recipes_fail_early_naming_the_problem(tmp_path, text, match):
    p = tmp_path / "r.toml"
    p.write_text(text)
    with pytest.raises(UserError, match=match):
        load_recipe(p)
