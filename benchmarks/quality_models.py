"""Stronger tiny models for the scoring-quality report, trained on separate draws of the demo generator.

The quickstart's builtin models (``pipeline/builtin/tiny_model.py``) are sized for a one-minute build, and at
400 steps they have not learned the two skills that expose a wrong answer: copying the last result
into the ``####`` line and doing the two-to-three-digit arithmetic of the steps. These recipes keep the
builtin architecture (hidden 128, 4 layers, 1.0M parameters) and tokenizer recipe, and train the base
12x longer on clean text. A probe on this CPU (one thread; 4,000 steps of 8 x 256 tokens on clean math
rows of another draw; scored on 1,500 held-out rows, 1,233 of them clean or wrong-answer) shows what
the length buys; AUROCs are of that one model's own token losses, wrong kind against clean.
``benchmarks/probe_training_length.py`` is that probe: rerun from the repo it gave identical metrics;
the seconds are both runs (exploratory / rerun), each sharing the CPU with another job:

| steps | s | ``####`` digits, clean (nats, summed) | result digits, clean (nats/digit) | wrong_final_answer (sum of ``####`` digits) | wrong_step (max token loss) | wrong_step (mean loss) |
|---|---|---|---|---|---|---|
| 500 | 142 / 146 | 0.979 | 1.85 | 0.961 | 0.625 | 0.568 |
| 1,000 | 296 / 293 | 0.033 | 1.20 | 1.000 | 0.739 | 0.729 |
| 2,000 | 566 / 628 | 0.003 | 0.74 | 1.000 | 0.899 | 0.860 |
| 3,000 | 847 / 921 | 0.001 | 0.39 | 1.000 | 0.946 | 0.947 |
| 4,000 | 1,121 / 1,218 | 0.000 | 0.26 | 1.000 | 0.973 | 0.970 |

Copying is learned by 1,000 steps; the arithmetic keeps improving to the end. A 3.5M-parameter model
(hidden 256) was no better per step at 500 steps and ran 2.5x slower, so the base stays small. It
trained 5,000 steps with the builder's previous loop (8 x 256-token windows across documents). Since
every model is built by winnow's trainer (``tiny_model`` docstring: whole samples in length-bucketed
rows, same tokens per step, ~7,000-7,800 tokens per CPU-second against ~6,200-6,500 for the old loop,
side by side on this VM), the base trains **3,000 steps** of 2,048 tokens: 5,000 did not fit the time
left on the loaded VM (other agents' jobs kept the load average at 11-14; the 3,000-step row of the
table is what the shortening costs, measured with the old loop).

The roles mirror the quickstart so the same recipe runs on either set:

| model             | trained on (draw seed)                                    | role in the report          |
|-------------------|-----------------------------------------------------------|-----------------------------|
| quality-base      | clean, near-duplicate and off-topic rows, all tokens (201) | ssToken history             |
| quality-warm      | the base fine-tuned on every kind, corrupted included (202) | current (EU plane, Rho-1, ssToken) |
| quality-reference | the base fine-tuned on clean rows (203)                   | Rho-1 reference             |
| quality-positive  | the base fine-tuned on correct rows (204)                 | cDPO positive               |
| quality-negative  | the base fine-tuned on wrong-answer rows of the same draw (204) | cDPO negative         |

No seed equals the demo's own (``TinyModelRecipe`` refuses it), so no model scores its own training
data. The base is "pretrained" on clean text only, as a real base model mostly is; the warm model sees
the corrupted kinds too, like a model part-way through fine-tuning on the very data being curated.

Models are cached like the builtin ones (``$WINNOW_CACHE/models/<name>-<hash>``, built once under a
file lock). With the old loop the 5,000-step base took 23 minutes (1,357 s) on one core of this VM and
the fine-tunes about 30 s each; the trainer-built 3,000-step base
(6.0M tokens, training loss 7.36 -> 0.29) took 67 minutes (4,008 s, 269 s of it drawing and
tokenizing) on 2026-11-30 at load average 11-14 (other agents' jobs; ~13.5 CPU-minutes of training at
the side-by-side rate above), the fine-tunes 72 s and more each at the same load. Run ``python benchmarks/quality_models.py`` to build them and print their training statistics;
``python benchmarks/quality_report.py --models quality`` builds them on demand.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from winnow.pipeline.builtin.demo_data import MATH_TEMPLATES
from winnow.pipeline.builtin.tiny_model import Architecture, TinyModelRecipe, build_model

BASE = TinyModelRecipe(
    name="quality-base",
    architecture=Architecture(),
    vocab_size=2048,
    tokenizer_seed=101,  # the builtin tokenizer recipe: same vocabulary as builtin:tiny
    tokenizer_samples=4000,
    data_seed=201,
    data_samples=60000,  # ~48k clean rows, ~4.5M tokens: about 1.4 passes in 3,000 steps of 2,048 tokens
    corruptions=("none", "near_duplicate", "off_topic"),
    steps=3000,  # 5,000 with the old loop; see the module docstring for what 3,000 costs
    tokens_per_batch=2048,
    lr=3e-3,
    warmup_steps=50,
)

# A quarter of the math templates (every fourth, in the generator's order) that the new-task base never
# sees: fine-tuning on the demo pool then teaches a task, as a user's fine-tune does, instead of
# repeating what the base learned from ~48k rows (benchmarks/curation.py, ``--start new-task``).
HELD_OUT_TEMPLATES = MATH_TEMPLATES[3::4]
NEW_TASK_BASE = dataclasses.replace(BASE, name="quality-base-new-task", exclude_templates=HELD_OUT_TEMPLATES)

_FINETUNE = dict(base=BASE, steps=300, tokens_per_batch=768, lr=5e-4, warmup_steps=20, loss_on="assistant")
# One draw split by correctness for the cDPO pair; 20,000 rows hold ~2,400 wrong-answer rows, so the
# negative model sees each of its rows about once in 300 steps of ~8 samples (768 tokens).
_CONTRAST = dict(data_seed=204, data_samples=20000, **_FINETUNE)

QUALITY_MODELS: dict[str, TinyModelRecipe] = {
    "quality-base": BASE,
    "quality-warm": TinyModelRecipe(name="quality-warm", data_seed=202, data_samples=2400, **_FINETUNE),
    "quality-reference": TinyModelRecipe(
        name="quality-reference", data_seed=203, data_samples=3400, corruptions=("none",), **_FINETUNE
    ),
    "quality-positive": TinyModelRecipe(
        name="quality-positive", corruptions=("none",), is_correct=True, **_CONTRAST
    ),
    "quality-negative": TinyModelRecipe(
        name="quality-negative",
        corruptions=("wrong_final_answer", "wrong_step"),
        is_correct=False,
        **_CONTRAST,
    ),
}

# quickstart role -> quality model, for rewriting the quickstart recipe's model fields
QUICKSTART_ROLES = {
    "builtin:tiny": "quality-base",
    "builtin:tiny-warm": "quality-warm",
    "builtin:tiny-reference": "quality-reference",
    "builtin:tiny-positive": "quality-positive",
    "builtin:tiny-negative": "quality-negative",
}


def build_quality_models(root: Path | None = None) -> dict[str, Path]:
    """Directory of every quality model, building (and caching) the missing ones."""
    return {name: build_model(recipe, root) for name, recipe in QUALITY_MODELS.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=None, help="models directory (default: the winnow cache)")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    dirs = build_quality_models(args.root)
    print(f"{'model':20s} {'rows':>7s} {'tokens':>10s} {'loss first10':>13s} {'last10':>7s} {'build s':>8s}")
    for name, path in dirs.items():
        stats = json.loads((path / "winnow_recipe.json").read_text())["stats"]
        print(
            f"{name:20s} {stats['train_rows']:7d} {stats['train_tokens']:10d} {stats['loss_first10']:13.3f} "
            f"{stats['loss_last10']:7.3f} {stats.get('build_seconds', float('nan')):8.1f}"
        )


if __name__ == "__main__":
    main()
