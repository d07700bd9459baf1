"""`winnow show`: the HTML page holds every token of the sample once, in order, with the selection's weights
and the stage's scores as data attributes (checked against the tables read directly with pyarrow), dropped
tokens struck through; the terminal view; user errors."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pyarrow.parquet as pq
import pytest

from winnow.core.store import RunDir

from cli_runner import WINNOW, run_cli
from stage_fixtures import write_signals

ROWS = [
    {
        "question": f"What is {i} plus {i + 3}? Show the steps.",
        "answer": f"{i} + {i + 3} = {2 * i + 3}.\n#### {2 * i + 3}",
    }
    for i in range(12)
]


class _Tokens(HTMLParser):
    """Collects every span of class ``tok``: its attributes, its classes and its text."""

    def __init__(self):
        super().__init__()
        self.spans: list[dict] = []
        self._open: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "span" and "tok" in (a.get("class") or "").split() and "data-pos" in a:
            self._open = {**a, "text": ""}

    def handle_data(self, data):
        if self._open is not None:
            self._open["text"] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.spans.append(self._open)
            self._open = None


@pytest.fixture(scope="module")
def run(tmp_path_factory, chatml_model_dir) -> RunDir:
    root = tmp_path_factory.mktemp("show") / "run"
    inp = root.parent / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    code, _, err = run_cli("ingest", inp, "--run", root, "--model", chatml_model_dir, "--set", "shard_rows=5")
    assert code == 0, err
    rd = RunDir(root)
    rng = np.random.default_rng(0)
    for rec in rd.table("samples").records():
        t = rd.table("samples").read_part(rec.part, ["sample_id", "input_ids"])
        ids, lens = t["sample_id"].to_pylist(), [len(x) for x in t["input_ids"].to_pylist()]
        for alias in ("current", "reference"):
            lp = [[None] + list(-rng.uniform(0.1, 4.0, n - 1)) for n in lens]
            write_signals(rd, alias, rec.part, ids, {"logprob": lp}, model_fingerprint=alias)
    for args in (("score", root, "excess_loss", "--set", "k_ratio=0.5"), ("select", root, "excess_loss")):
        code, _, err = run_cli(*args)
        assert code == 0, err
    return rd


def _row(run: RunDir, table: str, sample_id: str) -> dict:
    for path in sorted((run.root / table).glob("part-*.parquet")):
        rows = [r for r in pq.read_table(path).to_pylist() if r["sample_id"] == sample_id]
        if rows:
            return rows[0]
    raise AssertionError(f"{sample_id} not in {table}")


def _a_sample_with_dropped_tokens(run: RunDir) -> str:
    for path in sorted((run.root / "selection/excess_loss").glob("part-*.parquet")):
        for r in pq.read_table(path).to_pylist():
            s = _row(run, "samples", r["sample_id"])
            if r["keep"] and any(
                w == 0 and m for w, m in zip(r["token_weight"], s["loss_mask"], strict=True)
            ):
                return r["sample_id"]
    raise AssertionError("no kept sample with a pruned supervised token: the fixture is too easy")


def test_html_holds_every_token_once_with_weights_and_scores(run, tmp_path):
    sid = _a_sample_with_dropped_tokens(run)
    out = tmp_path / "s.html"
    code, stdout, err = run_cli(
        "show", run.root, sid, "--selection", "excess_loss", "--score", "excess_loss", "--html", out
    )
    assert code == 0, err
    p = _Tokens()
    p.feed(out.read_text())
    sample, sel, score = (
        _row(run, "samples", sid),
        _row(run, "selection/excess_loss", sid),
        _row(run, "scores/excess_loss", sid),
    )
    assert [int(s["data-pos"]) for s in p.spans] == list(range(len(sample["input_ids"])))
    assert "".join(s["text"] for s in p.spans) == sample["text"]  # every character once, in order
    assert [int(s["data-token-id"]) for s in p.spans] == sample["input_ids"]
    dropped = 0
    for s, w, m, sc in zip(
        p.spans, sel["token_weight"], sample["loss_mask"], score["token_score"], strict=True
    ):
        assert int(s["data-loss-mask"]) == m
        assert float(s["data-weight"]) == pytest.approx(w, abs=0)
        if sc is None:
            assert s["data-score"] == ""
        else:
            assert float(s["data-score"]) == pytest.approx(sc, rel=1e-6)
        is_dropped = "dropped" in s["class"].split()
        assert is_dropped == (m == 1 and w == 0)
        dropped += is_dropped
    assert dropped > 0 and dropped < sum(sample["loss_mask"])
    assert sid in stdout and "struck through: dropped" in stdout


def test_score_alone_strikes_what_the_stage_does_not_keep(run):
    sid = _a_sample_with_dropped_tokens(run)
    code, out, err = run_cli("show", run.root, sid, "--score", "excess_loss")
    assert code == 0, err
    score, sample = _row(run, "scores/excess_loss", sid), _row(run, "samples", sid)
    n_drop = sum(1 for k, m in zip(score["token_keep"], sample["loss_mask"], strict=True) if m and k is False)
    assert f"dropped ({n_drop} of {sum(sample['loss_mask'])} supervised tokens)" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (("nope",), "sample 'nope' is not in"),
        (("{sid}", "--selection", "missing"), "no selection 'missing'"),
        (("{sid}", "--score", "excess_loss:nope"), "has no column 'nope'"),
        (("{sid}", "--html", "{run}/x.html"), "inside the run"),
    ],
)
def test_user_errors_are_one_line_exit_2(run, args, message):
    sid = pq.read_table(sorted((run.root / "samples").glob("part-*.parquet"))[0])["sample_id"][0].as_py()
    code, _, err = run_cli("show", run.root, *[a.format(sid=sid, run=run.root) for a in args])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_console_script(run, tmp_path):
    import subprocess

    sid = _a_sample_with_dropped_tokens(run)
    proc = subprocess.run(
        [WINNOW, "show", str(run.root), sid, "--selection", "excess_loss"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert sid in proc.stdout


def test_card_links_the_most_and_least_kept_samples(run, tmp_path):
    code, _, err = run_cli("card", run.root, "--out", tmp_path / "card")
    assert code == 0, err
    shares = {}
    for path in sorted((run.root / "selection/excess_loss").glob("part-*.parquet")):
        for r in pq.read_table(path).to_pylist():
            if r["keep"] and r["n_supervised"]:
                shares[r["sample_id"]] = sum(w > 0 for w in r["token_weight"]) / r["n_supervised"]
    readme = (tmp_path / "card" / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("Token by token"))
    linked = {}
    for part in line.split("[`")[1:]:
        sid, rest = part.split("`](", 1)
        linked[sid] = rest.split(")", 1)[0]
    top = max(shares.values())
    low = min(shares.values())
    assert any(shares[s] == top for s in linked) and any(shares[s] == low for s in linked)
    for sid, rel in linked.items():
        p = _Tokens()
        p.feed((tmp_path / "card" / rel).read_text())
        weights = [float(s["data-weight"]) for s in p.spans]
        assert weights == pytest.approx(_row(run, "selection/excess_loss", sid)["token_weight"], abs=0)
