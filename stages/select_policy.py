"""Selection policies (`winnow select DIR POLICY`): scores in, a keep flag per sample and a weight per
token out, into ``selection/<name>/`` — the table a trainer consumes.

A policy has two halves, chosen separately so that methods combine:

* **which samples** (``POLICY``): each stage's own, as its module declares it (``Stage.policy``,
  else its ``keep`` column): ``eu_plane`` (Q-Tuning's quadrants: the stage's ``keep``),
  ``critical_tokens`` (cDPO for SFT: keep the samples labelled correct), ``dv4llm`` (GOT-D: the
  ``selected`` candidates, plus the target samples unless ``keep_targets=false``), ``excess_loss`` and
  ``sstoken`` (token-level methods: every sample); or the selection's own ``all``, or ``sql`` (``--set keep="<DuckDB boolean
  expression over the samples view>"``; subqueries reach every other view, e.g. ``sample_id in
  (select sample_id from scores_eu_plane where keep)``). The reason recorded for each sample is the
  scoring stage's own (``kept_q2``, ``dropped_q1``, ``incorrect``, ...) or the policy's
  (``selected``, ``not_selected``, ``target``, ``sql_keep``, ``sql_drop``, ``all``).
* **which tokens** (``tokens``): the policy's own by default — the ``token_keep`` of eu_plane,
  excess_loss or sstoken, all supervised tokens otherwise — or any of ``loss_mask`` (every
  supervised token), ``eu_plane`` / ``excess_loss`` / ``sstoken`` (that stage's ``token_keep``) or
  ``p_ce`` (cDPO's chosen-side weight, ``scores/critical_tokens.token_p_ce``, on correct samples).
  ``winnow select RUN critical_tokens --set tokens=excess_loss`` drops wrong answers and trains on
  Rho-1's tokens of the rest.

**Compositions.** ``POLICY`` may list several policies joined by ``,`` (``dv4llm,critical_tokens``): a
sample is kept only when every listed policy keeps it (an intersection, so the order never changes what is
kept). Its reason is ``<policy>:<reason>`` of the first listed policy that dropped it
(``dv4llm:not_selected``), or the kept reasons joined by ``+`` (``selected+correct``); the token half is
``tokens`` or else the first listed policy's own. One policy alone keeps its plain reasons.

**User policies.** ``python:pkg.module:function`` or ``python:path/to/file.py:function`` names a Python
function that decides both halves of each shard (:mod:`winnow.stages.user_policy`: the contract, the
checks, its source digest in the fingerprint); ``tokens`` then multiplies its weights. It does not compose
with ``,``; the selection's default name is ``<module or file stem>.<function>``.

**Always-keep floor.** ``--always-keep "<|im_end|>,####"`` (``always_keep``) names texts whose tokens the
token half never drops: at supervised positions whose ``input_id`` is one of their ids (tokenized with the
samples' tokenizer, :mod:`winnow.core.always_keep`), ``token_weight`` becomes at least the
``loss_mask`` value (1.0), in the samples the selection trains on (a dropped sample, or one with no token
selected, stays dropped). Without it ssToken kept 1.9% of ``<|im_end|>`` and 0.6% of ``####`` and the
fine-tuned model stopped answering (RESULTS.md, curation from the quality base). The texts and ids are
recorded in every shard's schema metadata, ``winnow.always_keep`` (JSON ``{"texts", "ids"}``).

``token_weight[i]`` is 0 wherever ``loss_mask[i] == 0``, on dropped samples, and on tokens the
token half did not select; a kept sample whose weights all come out 0 is dropped with reason
``no_token_weight`` (nothing left to train on). Output columns: ``sample_id``, ``keep``, ``reason``,
``policy``, ``n_supervised``, ``n_weighted`` (tokens with weight > 0), ``weight_sum`` and
``token_weight`` (list<float32>, ``n_tokens`` entries). Every sample of ``samples/`` has a row.

Freshness: the output records whole-table digests of every table the policy read (a SQL policy reads
the whole run), so a changed score reselects everything; an unchanged rerun writes nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from winnow.core import steps
from winnow.core.params import as_dict
from winnow.core.steps import Step
from winnow.core.store import RunDir, UserError
from winnow.core.write_guard import check_name, refuse_view_collision
from winnow.stages import stage_io as io
from winnow.stages import user_policy

CODE_VERSION = "select/1"
# policies and token sources come from the step registry (steps.selection_policies, steps.token_sources)


@dataclass
class SelectParams:
    # one policy, several joined by "," (kept when every one keeps it), or python:pkg.module:function or
    # python:path/file.py:function (a user policy: winnow.stages.user_policy)
    policy: str
    name: str = ""  # selection/<name>/; default: the policy's name (the names joined by "_and_"; python: file.function)
    tokens: str = ""  # "" = the policy's own token half; else one of steps.token_sources()
    keep: str = ""  # policy=sql: a DuckDB boolean expression over the samples view
    keep_targets: bool = True  # policy=dv4llm: keep the target samples too
    # texts whose tokens the token half never drops (winnow.core.always_keep), e.g. <|im_end|>,####
    always_keep: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for policy in [] if self.user else self.policies:  # a user function decides both halves itself
            if policy not in steps.selection_policies():
                raise ValueError(
                    f"unknown policy {policy!r}; policies: {steps.selection_policies()}, or several joined "
                    "by ',' (e.g. dv4llm,critical_tokens)"
                )
        if len(set(self.policies)) != len(self.policies):
            raise ValueError(f"policy={self.policy!r} lists a policy twice")
        if self.tokens and self.tokens not in steps.token_sources():
            raise ValueError(
                f"tokens={self.tokens!r}: use one of {steps.token_sources()} (or leave it unset)"
            )
        if ("sql" in self.policies) != bool(self.keep):
            raise ValueError(
                'policy sql needs --set keep="<boolean SQL over samples>"; other policies take no keep='
            )
        if self.always_keep and self.token_source == "loss_mask" and not self.user:
            raise ValueError(
                f"always_keep={','.join(self.always_keep)} floors a token-level selection, but this one keeps "
                f"every supervised token already: add --tokens {'|'.join(steps.token_sources()[1:])}"
            )
        default = self.user.default_name if self.user else "_and_".join(self.policies)
        self.name = check_name(self.name or default)  # one folder, <= 100 characters
        if self.name == "all" and self.policies != ["all"]:
            # `winnow train --selection all` trains on every sample: only policy all may carry the name
            raise ValueError(
                f"name='all' is reserved for policy all (`winnow train --selection all` trains on every "
                f"sample), not {self.policy}: choose another --name"
            )

    @property
    def user(self) -> user_policy.UserPolicy | None:
        """The user policy ``python:...`` names (loaded and checked; cached while its file is unchanged),
        else None. Not an attribute: parameters hold only their fields (recipe.resolved.json is ``vars``)."""
        return user_policy.load(self.policy) if self.policy.startswith(user_policy.PREFIX) else None

    @property
    def policies(self) -> list[str]:
        if self.policy.startswith(user_policy.PREFIX):
            return [self.policy]
        return [x.strip() for x in self.policy.split(",")]

    @property
    def token_source(self) -> str:
        """``tokens``, else the token half of the first listed policy that has one, else every token."""
        if self.tokens:
            return self.tokens
        own = [x for x in self.policies if steps.writes_column(x, "token_keep")]
        return own[0] if own else "loss_mask"


def _score_table(run: RunDir, stage: str, columns: list[str], part: int) -> dict[str, dict]:
    """sample_id -> {column: value} of shard ``part`` of ``scores/<stage>`` (a stage writes one shard
    per samples shard; the caller checked the table present and fresh). One shard at a time, so memory
    does not grow with the run (issue 16); a missing shard leaves its samples unscored."""
    table = run.table(f"scores/{stage}")
    if table.record(part) is None:
        return {}
    data = table.read_part(part, columns=["sample_id", *columns]).to_pydict()
    return {sid: {c: data[c][i] for c in columns} for i, sid in enumerate(data["sample_id"])}


def _sample_half(
    run: RunDir, p: SelectParams, ids: list[str], part: int, sql_keep: dict[str, bool] | None
) -> tuple[dict[str, bool], dict[str, str]]:
    """Keep and reason per sample. A composition keeps a sample when every policy keeps it; the reason is
    ``<policy>:<its reason>`` of the first policy that dropped it, or the kept reasons joined by ``+``."""
    halves = [(policy, _one_policy(run, policy, p, ids, part, sql_keep)) for policy in p.policies]
    if len(halves) == 1:
        return halves[0][1]
    keep, why = {}, {}
    for sid in ids:
        dropped = next(((pol, h[1][sid]) for pol, h in halves if not h[0][sid]), None)
        keep[sid] = dropped is None
        why[sid] = "+".join(h[1][sid] for _, h in halves) if dropped is None else f"{dropped[0]}:{dropped[1]}"
    return keep, why


def _one_policy(
    run: RunDir, policy: str, p: SelectParams, ids: list[str], part: int, sql_keep: dict[str, bool] | None
) -> tuple[dict[str, bool], dict[str, str]]:
    """Keep and reason of one policy for the samples ``ids`` of samples shard ``part`` (issue 16: one
    shard of scores in memory at a time; a sql policy's values come precomputed in ``sql_keep``).

    ``all`` and ``sql`` are the selection's own policies; a stage's is the one it declares
    (``steps.sample_policy``: its ``Policy``, or its ``keep``/``reason`` columns); a token-level stage
    keeps every sample."""
    if policy == "sql":
        assert sql_keep is not None
        keep = {sid: bool(sql_keep.get(sid, False)) for sid in ids}
        return keep, {sid: "sql_keep" if k else "sql_drop" for sid, k in keep.items()}
    declared = steps.sample_policy(policy)
    if declared is None:
        reason = "all" if policy == "all" else "token_level"
        return dict.fromkeys(ids, True), dict.fromkeys(ids, reason)
    return declared.decide(_score_table(run, policy, list(declared.columns), part), ids, p)


def _sql_keep(run: RunDir, expr: str) -> dict[str, bool]:
    """sample_id -> the expression's value over the whole samples view (it may aggregate or use
    windows, so it is not evaluated shard by shard): a bool per sample, the one global state."""
    from winnow.core.views import condition_rows

    query = f"SELECT sample_id, coalesce(({expr}), false) FROM samples"
    return dict(condition_rows(run, query, f"keep={expr!r} over samples"))


def _check_fresh(run: RunDir, stage: str) -> None:
    stale = run.stale_tables().get(f"scores/{stage}")
    if stale:
        raise UserError(f"scores/{stage} is stale ({stale[0]}): rerun `winnow score {run.root} {stage}`")


def _flat(col: pa.ChunkedArray | pa.Array, fill: float) -> np.ndarray:
    """A per-token list column flattened to float32, null entries (and null lists) as ``fill``."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    values = pc.list_flatten(arr)
    return pc.fill_null(values.cast(pa.float32()), fill).to_numpy(zero_copy_only=False)


def token_selection(
    run: RunDir, source: str, part: int, sample_id: pa.Array, n_tokens: np.ndarray
) -> np.ndarray:
    """The token half for one samples shard, flat over its tokens (float32; null selects nothing)."""
    total = int(n_tokens.sum())
    if source == "loss_mask":
        return np.ones(total, np.float32)
    stage = "critical_tokens" if source == "p_ce" else source
    columns = ["token_p_ce", "is_correct"] if source == "p_ce" else ["token_keep"]
    got = run.table(f"scores/{stage}").read_part(part, columns=["sample_id", *columns])
    if not got["sample_id"].combine_chunks().equals(sample_id):
        raise UserError(
            f"scores/{stage}/part-{part:05d} does not list the samples of samples/part-{part:05d} in order: "
            f"rerun `winnow score {run.root} {stage}`"
        )
    sel = _flat(got[columns[0]], 0.0)
    if len(sel) != total:
        raise UserError(
            f"scores/{stage}/part-{part:05d}: per-token lists do not match n_tokens; rerun the stage"
        )
    if source == "p_ce":  # cDPO's chosen-side weight exists for correct samples only
        correct = pc.fill_null(got["is_correct"].combine_chunks(), False).to_numpy(zero_copy_only=False)
        sel = sel * np.repeat(correct, n_tokens).astype(np.float32)
    return sel


def _halves(
    run: RunDir, p: SelectParams, cols: pa.Table, part: int, sql_keep: dict[str, bool] | None
) -> tuple[dict[str, bool], dict[str, str], np.ndarray]:
    """Keep, reason and the token half of samples shard ``part``; a user policy (``python:...``) decides
    both halves in one call, its token weights multiplied by the ``--tokens`` source (1 by default)."""
    ids, n_tokens = cols["sample_id"].combine_chunks(), cols["n_tokens"].to_numpy()
    own: np.ndarray | float = 1.0
    if p.user is None:
        keep, why = _sample_half(run, p, ids.to_pylist(), part, sql_keep)
    else:
        keep, why, own = p.user.decide(run, part)
    return keep, why, own * token_selection(run, p.token_source, part, ids, n_tokens)


def _floor(weight: np.ndarray, mask: np.ndarray, cols: pa.Table, row_of: np.ndarray, floor_ids) -> np.ndarray:
    """``always_keep``: supervised tokens whose id is in ``floor_ids`` get at least their loss_mask weight,
    in the samples the selection trains on (some weight left after both halves); a dropped sample, or one
    whose token half selected nothing, stays as it is."""
    trains = np.bincount(row_of, weights=weight > 0, minlength=len(cols)) > 0
    input_ids = pc.list_flatten(cols["input_ids"].combine_chunks()).to_numpy(zero_copy_only=False)
    force = np.isin(input_ids, floor_ids) & (mask > 0) & trains[row_of]
    return np.where(force, np.maximum(weight, mask), weight).astype(np.float32)


def _shard_table(
    cols: pa.Table,
    keep: dict[str, bool],
    why: dict[str, str],
    selection: np.ndarray,
    policy: str,
    floor_ids: np.ndarray | None = None,
) -> pa.Table:
    sample_id = cols["sample_id"].combine_chunks()
    ids = sample_id.to_pylist()
    n_tokens = cols["n_tokens"].to_numpy()
    mask = _flat(cols["loss_mask"], 0.0)
    keep_row = np.array([keep[s] for s in ids], dtype=bool)
    weight = mask * selection * np.repeat(keep_row, n_tokens).astype(np.float32)  # (total tokens,)
    row_of = np.repeat(np.arange(len(ids)), n_tokens)
    if floor_ids is not None:
        weight = _floor(weight, mask, cols, row_of, floor_ids)
    n_weighted = np.bincount(row_of, weights=weight > 0, minlength=len(ids)).astype(np.int32)
    weight_sum = np.bincount(row_of, weights=weight.astype(np.float64), minlength=len(ids))
    reason = [why[s] for s in ids]
    for r in np.flatnonzero(keep_row & (n_weighted == 0)):  # nothing left to train on
        keep_row[r], reason[r] = False, "no_token_weight"
    offsets = np.concatenate([[0], np.cumsum(n_tokens)]).astype(np.int32)
    return pa.table(
        {
            "sample_id": sample_id,
            "keep": pa.array(keep_row, pa.bool_()),
            "reason": pa.array(reason, pa.string()),
            "policy": pa.array([policy] * len(ids), pa.string()),
            "n_supervised": pa.array(np.bincount(row_of, weights=mask, minlength=len(ids)).astype(np.int32)),
            "n_weighted": pa.array(n_weighted),
            "weight_sum": pa.array(weight_sum, pa.float64()),
            "token_weight": pa.ListArray.from_arrays(pa.array(offsets), pa.array(weight, pa.float32())),
        }
    )


def _always_keep(run: RunDir, p: SelectParams) -> tuple[np.ndarray | None, dict | None]:
    """The floor's token ids (tokenized with the samples' tokenizer) and the schema metadata recording
    them in every shard of the selection (``winnow.always_keep``: the texts and the ids)."""
    if not p.always_keep:
        return None, None
    from winnow.core import always_keep as ak

    where = "select --always-keep (always_keep)"
    ids = ak.always_keep_ids(ak.run_tokenizer(run, where), p.always_keep, where)
    meta = {ak.METADATA_KEY: json.dumps({"texts": p.always_keep, "ids": ids}).encode()}
    return np.asarray(ids, np.int64), meta


def refuse_other_configuration(run: RunDir, p: SelectParams) -> None:
    """`winnow select --name X` without ``--force``: refuse to replace ``selection/X`` made with other
    parameters (the parameters each shard recorded), as `winnow export` refuses an existing ``--out``; the
    same parameters again are a no-op (every shard fresh). Recipes replace a changed step's table as
    before: a recipe is the configuration."""
    table = run.table(f"selection/{p.name}")
    new = json.loads(json.dumps(as_dict(p)))  # as the records hold it (lists, not tuples)
    for rec in table.records() if table.exists() else []:
        old = rec.extra.get("params")
        if old is None:
            continue
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if differ:
            raise UserError(
                f"{table.dir} holds another selection (differs in {', '.join(differ)}): pass --force to "
                "replace it, or choose another --name"
            )


def run_select(run: RunDir, p: SelectParams) -> dict:
    started = time.time()
    samples = run.table(io.SAMPLES)
    if not samples.exists():
        raise UserError(f"{run.root} has no samples: run `winnow ingest` first")
    refuse_view_collision(run, f"selection/{p.name}")
    parts = [r.part for r in samples.records()]
    floor_ids, meta = _always_keep(run, p)  # a bad text fails before anything is read or written
    if p.user is not None:  # its declared tables first: the message names the spec
        p.user.check(run)
    read = {t.removeprefix("scores/") for t in steps.spec("select").tables_read(p) if t.startswith("scores/")}
    for stage in sorted(read):
        if not run.table(f"scores/{stage}").exists():
            raise UserError(f"{run.root} has no scores/{stage}: run `winnow score {run.root} {stage}` first")
        _check_fresh(run, stage)
    tables = {f"scores/{stage}" for stage in read}
    if p.user is not None:  # the tables it declares are inputs; the source digest is in the fingerprint
        tables |= set(p.user.reads)
        meta = {**(meta or {}), **p.user.metadata}
    if "sql" in p.policies:  # the expression may read any view
        tables |= {t for t in run.tables() if not t.startswith("selection/")}
    version = CODE_VERSION + (p.user.version if p.user else "")  # a user policy: its source digest too
    st = io.StageOutput(
        run, "select", p, version, started, table=f"selection/{p.name}", key=f"select:{p.name}"
    )
    inputs = io.table_inputs(run, sorted({io.SAMPLES, *tables}))
    io.drop_orphans(st.out, parts)
    counts: dict = {}
    if not io.all_fresh(st.out, parts, st.fp, inputs):
        sql_keep = _sql_keep(run, p.keep) if "sql" in p.policies else None
        kept = weighted = n_samples = 0
        columns = ["sample_id", "n_tokens", "loss_mask"] + (["input_ids"] if p.always_keep else [])
        for part in parts:  # one shard in memory at a time
            cols = samples.read_part(part, columns=columns)
            n_tokens = cols["n_tokens"].to_numpy()
            keep, why, selection = _halves(run, p, cols, part, sql_keep)
            n_samples += len(n_tokens)
            table = _shard_table(cols, keep, why, selection, p.policy, floor_ids)
            table = table.replace_schema_metadata(meta)
            kept += int(pc.sum(table["keep"].cast(pa.int64())).as_py() or 0)
            weighted += int(pc.sum(table["n_weighted"]).as_py() or 0)
            st.commit(part, table, inputs)
        counts = {
            "samples": n_samples,
            "kept": kept,
            "dropped": n_samples - kept,
            "weighted_tokens": weighted,
        }
    return st.finish(len(parts), counts)


STEP = Step(
    name="select",
    params=SelectParams,
    run=run_select,
)
