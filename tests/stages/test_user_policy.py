"""User token policies (`winnow select RUN python:...`, winnow.stages.user_policy): the module and file-path
forms through the `winnow` console script, the weights they write (by hand from the synthetic run's
signals), the selection's identity following the function's source, and every check on what a function
returns or declares (exit 2, one line naming the spec and the sample; without the checks these would write
a selection and the tests fail)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import textwrap

import pytest

import synthetic_runs.eu_plane as eu_run
from cli_runner import WINNOW, run_cli, sql_json

L2, L8 = math.log(2.0), math.log(8.0)
POLICY = """\
import numpy as np

def nll(shard):
    # weight = the current model's NLL where it is scored; s2 dropped by the function
    lp = shard.tokens("signals/current", "logprob")
    ids = shard.samples["sample_id"].to_pylist()
    return {
        "keep": [s != "s2" for s in ids],
        "reason": ["mine" if s != "s2" else "not_mine" for s in ids],
        "token_weight": [np.where(np.isnan(x), 0.0, -x) for x in lp],
    }

nll.reads = ("signals/current",)
"""
# by hand from synthetic_runs/eu_plane.py: -logprob at supervised positions (loss_mask zeroes the rest)
EXPECTED = {
    "s0": (False, "no_token_weight", [0, 0]),  # its one supervised token has NLL 0
    "s1": (True, "mine", [0, L2, L2]),
    "s2": (False, "not_mine", [0, 0, 0]),
    "s3": (True, "mine", [0, 0, 1.0, 2.0, 0.5, 0, 0, 1.5, 3.0, 0]),
    "s4": (True, "mine", [0, L8, L8, L8]),
    "s5": (False, "no_token_weight", [0, 0]),
}


def _check(rows):
    got = {r["sample_id"]: (r["keep"], r["reason"], r["token_weight"]) for r in rows}
    assert set(got) == set(EXPECTED)
    for sid, (keep, reason, weights) in EXPECTED.items():
        assert got[sid][:2] == (keep, reason), sid
        assert got[sid][2] == pytest.approx(weights, rel=1e-6, abs=1e-7), sid


def test_module_and_file_forms_through_the_console_script(tmp_path):
    run = eu_run.make_run(tmp_path / "run").root
    (tmp_path / "upol_pkg").mkdir()
    (tmp_path / "upol_pkg" / "__init__.py").write_text("")
    (tmp_path / "upol_pkg" / "weights.py").write_text(POLICY)
    (tmp_path / "pols").mkdir()
    decorated = POLICY.replace("def nll", '@reads("signals/current")\ndef nll').replace("nll.reads = (", "(")
    (tmp_path / "pols" / "mine.py").write_text("from winnow.stages.user_policy import reads\n" + decorated)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # the module form: an importable module
    for spec, name in (
        ("python:upol_pkg.weights:nll", "weights.nll"),
        ("python:pols/mine.py:nll", "mine.nll"),
    ):
        got = subprocess.run(
            [WINNOW, "select", str(run), spec],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert got.returncode == 0, got.stderr
        assert f"selection/{name}: kept 3 of 6 samples" in got.stdout
        _check(sql_json(run, f"select * from selection_{name.replace('.', '_')}"))
    # the file form needs no PYTHONPATH; the module form without it says how to name a file instead
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    got = subprocess.run(
        [WINNOW, "select", str(run), "python:upol_pkg.weights:nll", "--name", "x"],
        cwd=tmp_path, env=plain, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert got.returncode == 2 and "no module 'upol_pkg.weights'" in got.stderr
    assert "python:path/to/file.py:function" in got.stderr and len(got.stderr.strip().splitlines()) == 1


def test_identity_follows_the_source(tmp_path, monkeypatch):
    run = eu_run.make_run(tmp_path / "run").root
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.py").write_text(POLICY)
    assert run_cli("select", run, "python:p.py:nll")[0] == 0
    manifest = lambda: json.loads((run / "manifest.json").read_text())["steps"]["select:p.nll"]  # noqa: E731
    first = manifest()
    assert first["code_version"].startswith("select/1+user:")
    assert run_cli("select", run, "python:p.py:nll")[0] == 0
    assert manifest()["shards"]["computed"] == 0  # unchanged: nothing rewritten
    (tmp_path / "p.py").write_text(POLICY.replace('s != "s2" for', "s not in ('s2', 's4') for"))
    assert run_cli("select", run, "python:p.py:nll")[0] == 0
    second = manifest()
    assert second["fingerprint"] != first["fingerprint"] and second["shards"]["computed"] == 2
    kept = {r["sample_id"]: r["keep"] for r in sql_json(run, "select sample_id, keep from selection_p_nll")}
    assert kept["s4"] is False
    # every shard records the spec and the digest of the source (sha256 of the file, NUL, the qualname)
    import hashlib

    import pyarrow.parquet as pq

    digest = hashlib.sha256((tmp_path / "p.py").read_bytes() + b"\0nll").hexdigest()
    for part in sorted((run / "selection" / "p.nll").glob("part-*.parquet")):
        recorded = json.loads(pq.read_schema(part).metadata[b"winnow.user_policy"])
        assert recorded == {"spec": "python:p.py:nll", "sha256": digest}
    assert second["code_version"] == f"select/1+user:{digest[:16]}"


BAD_RESULTS = [  # (the function's body, what the one-line error says)
    ("return [1, 2]", "returned a list; return a dict with keep, reason, token_weight"),
    ("return {'weights': []}", "returned keys ['weights']"),
    ("return {'keep': [True]}", "returned 1 keep values for the 3 samples of the shard"),
    ("return {'keep': ['yes'] * len(ids)}", "keep of sample s0 (row 0) is 'yes', not a bool"),
    ("return {'reason': [''] * len(ids)}", "reason of sample s0 (row 0) is '', not a non-empty string"),
    ("return {'token_weight': [[1.0]] * len(ids)}", "token_weight of sample s0 (row 0) has 1 entries for its 2 tokens"),
    ("return {'token_weight': [1.0] * len(ids)}", "token_weight of sample s0 (row 0) is 1.0, not a list"),
    ("return {'token_weight': [np.full(k, np.nan) for k in lens]}", "sample s0 (row 0): token weight nan is not a finite"),
    ("return {'token_weight': [np.full(k, np.inf) for k in lens]}", "sample s0 (row 0): token weight inf is not a finite"),
    ("return {'token_weight': [np.full(k, 1e39) for k in lens]}", "sample s0 (row 0): token weight 1e+39 is not a finite"),
    ("return {'token_weight': [np.full(k, -0.5) for k in lens]}", "sample s0 (row 0): negative token weights"),
]  # fmt: skip


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    return eu_run.make_run(tmp_path_factory.mktemp("upol") / "run").root


BAD_IDS = [
    "list",
    "key",
    "length",
    "keep",
    "reason",
    "misaligned",
    "scalar",
    "nan",
    "inf",
    "over_f32",
    "negative",
]


@pytest.mark.parametrize("body,message", BAD_RESULTS, ids=BAD_IDS)
def test_each_bad_result_exits_2_naming_the_spec_and_the_sample(
    shared_run, tmp_path, monkeypatch, body, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.py").write_text(
        "import numpy as np\n\ndef f(shard):\n    ids = shard.samples['sample_id'].to_pylist()\n"
        f"    lens = shard.samples['n_tokens'].to_pylist()\n    {body}\n"
    )
    code, _, err = run_cli("select", shared_run, "python:bad.py:f")
    assert code == 2, err
    line = err.strip()
    assert len(line.splitlines()) == 1 and "python:bad.py:f on samples/part-00000" in line and message in line
    assert not (shared_run / "selection" / "bad.f").exists() or not list(
        (shared_run / "selection/bad.f").glob("*.parquet")
    )


BAD_SPECS = [  # (the file's text, the spec, exit code, what the one-line error says)
    ("", "python:nofunction", 2, "write python:pkg.module:function or python:path/to/file.py:function"),
    ("", "python:missing.py:f", 2, "no file missing.py"),
    ("def g(shard): pass\n", "python:p.py:f", 2, "p.py has no function 'f'"),
    ("def f(shard): pass\nf.reads = 'signals/current'\n", "python:p.py:f", 2, "f.reads must be a tuple"),
    ("def f(shard): pass\nf.reads = ('selection/x',)\n", "python:p.py:f", 2, "f.reads names selection/x"),
    ("def f(shard): pass\nf.reads = ('scores/none',)\n", "python:p.py:f", 2, "reads scores/none, which"),
    ("def f(shard):\n    raise KeyError('oops')\n", "python:p.py:f", 1, "python:p.py:f failed on samples/part-00000: KeyError"),
    ("def f(shard):\n    shard.tokens('signals/current', 'logprob')\n", "python:p.py:f", 1, "signals/current is not among"),
    ("def f(shard) pass\n", "python:p.py:f", 2, "p.py:1: "),  # the parser's words vary by Python version
    ("raise ValueError('at import')\n", "python:p.py:f", 1, "importing p.py failed: ValueError: at import"),
]  # fmt: skip


@pytest.mark.parametrize(
    "source,spec,code,message",
    BAD_SPECS,
    ids=[
        "form",
        "file",
        "function",
        "reads",
        "selection",
        "table",
        "raises",
        "undeclared",
        "syntax",
        "import",
    ],
)
def test_each_bad_spec_or_declaration_names_it(
    shared_run, tmp_path, monkeypatch, source, spec, code, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.py").write_text(textwrap.dedent(source))
    got, _, err = run_cli("select", shared_run, spec, "--name", "spec_check")
    assert got == code, err
    assert message in err and len(err.strip().splitlines()) == 1


def test_the_card_names_the_function_and_spreads_its_weights(tmp_path, monkeypatch):
    from winnow.pipeline.card import write_card

    run = eu_run.make_run(tmp_path / "run").root
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.py").write_text(POLICY)
    assert run_cli("select", run, "python:p.py:nll")[0] == 0
    text = write_card(run, tmp_path / "card").read_text()
    assert "A user policy: `python:p.py:nll` (source sha256 `" in text
    # kept s1, s3, s4 (EXPECTED): weight 1 once (s3), above 1: 2, 1.5, 3 and 3 x ln 8; below 1: 2 x ln 2, 0.5
    mass = (2 + 1.5 + 3 + 3 * L8) / (2 * L2 + 1 + 2 + 0.5 + 1.5 + 3 + 3 * L8)
    assert f"| 1 | 6 | 3 | {mass:.1%} | 1.5 / 2.08 / 3 |" in text


def test_winnow_steps_shows_the_python_form():
    code, out, _ = run_cli("steps", "select")
    assert code == 0 and "python:pkg.module:function" in out and "python:path/file.py:function" in out


def test_a_recipe_step_names_a_user_policy(tmp_path, monkeypatch):
    run = eu_run.make_run(tmp_path / "run").root
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.py").write_text(POLICY)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'run_dir = "{run}"\n\n[[steps]]\nstep = "select"\npolicy = "python:p.py:nll"\n')
    code, _, err = run_cli("run", recipe)
    assert code == 0, err
    _check(sql_json(run, "select * from selection_p_nll"))
    # the resolved recipe holds the parameters' fields only (JSON), the spec among them
    resolved = json.loads((run / "recipe.resolved.json").read_text())
    import dataclasses

    from winnow.stages.select_policy import SelectParams

    (step,) = resolved["steps"]
    assert step["policy"] == "python:p.py:nll" and step["name"] == "p.nll"
    assert set(step) == {"step", *(f.name for f in dataclasses.fields(SelectParams))}
