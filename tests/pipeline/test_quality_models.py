"""The quality report's model set stays consistent with the quickstart recipe it reruns."""

import importlib.util
from pathlib import Path

from winnow.pipeline.builtin.demo_data import DEMO_SEED
from winnow.pipeline.recipe import load_recipe, with_models

ROOT = Path(__file__).resolve().parents[2]


def _quality_models():
    spec = importlib.util.spec_from_file_location("quality_models", ROOT / "benchmarks" / "quality_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_quickstart_model_has_a_quality_counterpart():
    qm = _quality_models()
    recipe = load_recipe(ROOT / "recipes" / "quickstart.toml")
    used = {
        v
        for _, p in recipe.steps
        for k in ("model", "positive", "negative")
        if isinstance(v := getattr(p, k, None), str) and v.startswith("builtin:tiny")
    }
    assert used == set(qm.QUICKSTART_ROLES)
    swapped = with_models(recipe, {k: f"/models/{v}" for k, v in qm.QUICKSTART_ROLES.items()})
    left = [
        getattr(p, k) for _, p in swapped.steps for k in ("model", "positive", "negative") if hasattr(p, k)
    ]
    assert not any(str(v).startswith("builtin:tiny") for v in left)


def test_quality_models_never_train_on_the_demo_draw_and_share_the_tokenizer():
    qm = _quality_models()
    from winnow.pipeline.builtin.tiny_model import BUILTIN_MODELS

    assert set(qm.QUICKSTART_ROLES.values()) == set(qm.QUALITY_MODELS)
    for recipe in qm.QUALITY_MODELS.values():
        assert recipe.data_seed != DEMO_SEED
        root = recipe.base or recipe
        # same tokenizer recipe as builtin:tiny, so a run ingested with either set scores with the other
        tiny = BUILTIN_MODELS["tiny"]
        assert (root.tokenizer_seed, root.tokenizer_samples, root.vocab_size) == (
            tiny.tokenizer_seed,
            tiny.tokenizer_samples,
            tiny.vocab_size,
        )
    # the cDPO pair splits one draw by correctness
    pos, neg = qm.QUALITY_MODELS["quality-positive"], qm.QUALITY_MODELS["quality-negative"]
    assert pos.data_seed == neg.data_seed and pos.is_correct is True and neg.is_correct is False
