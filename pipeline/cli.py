"""The `winnow` command. Each verb is a thin shell over a Python function of the same name.

torch and transformers are imported only by the steps that need them, so `winnow --help` and
table-only verbs (`inspect`) start in well under a second. Exit status: 0 success, 2 user error
(bad flag, file or config: the message names it and the fix), 1 anything else, 130 on Ctrl-C
(:mod:`winnow.pipeline.cli_exit`).
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from winnow.core.params import build_params, parse_sets
from winnow.core.store import UserError
from winnow.pipeline import steps as registry

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="winnow: score, inspect and select fine-tuning data sample by sample and token by token.",
)


def _version(value: bool) -> None:
    if value:
        from winnow import __version__

        typer.echo(f"winnow {__version__}")
        raise typer.Exit(0)


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show the traceback of a runtime error")] = False,
) -> None:
    """winnow: score, inspect and select fine-tuning data sample by sample and token by token."""


def _other_rank() -> bool:
    """Under torchrun, True on every rank but 0: a verb that runs on rank 0 only (inspect, show, verify,
    card, export, steps) returns at once there, and the distributed verbs print their summary once."""
    return os.environ.get("RANK", "0") != "0"


SetOpt = Annotated[list[str] | None, typer.Option("--set", help="step parameter key=value (repeatable)")]


def _run_step(step_name: str, run_dir: str, values: dict, create: bool = False, check=None) -> dict:
    """Run one step under the run lock; ``check(run, params)`` first, inside the lock (a refusal)."""
    from winnow.core.dist import failing_marks_exit
    from winnow.core.lock import run_lock
    from winnow.core.store import RunDir

    step = registry.get_step(step_name)
    params = build_params(step.params, values, where=f"winnow {step_name}")
    run = RunDir(run_dir, create=create)
    with run_lock(run, registry.spec(step_name).key(params)), failing_marks_exit():  # one writer per run
        if check is not None:
            check(run, params)
        return step.run(run, params)


def _ingest_targets(run_dir: str, targets: object) -> None:
    """``--targets FILE`` (dv4llm): ingest the texts into ``targets/`` with the samples' tokenizer first, as
    a step of its own (``ingest:targets``); the stage reads them through the store. Nothing when the run
    has no samples yet (the stage then says to ingest them)."""
    if not isinstance(targets, str) or not targets or targets.startswith("sql:"):
        return
    from winnow.core.store import RunDir

    samples = RunDir(run_dir).table("samples")
    if not samples.exists():
        return
    model = (samples.schema().metadata or {}).get(b"winnow.model", b"").decode()
    _run_step("ingest", run_dir, {"inputs": [targets], "model": model, "table": "targets"})


@app.command()
def run(
    recipe: Annotated[str, typer.Argument(help="recipe TOML, e.g. recipes/quickstart.toml")],
    run_dir: Annotated[str | None, typer.Option("--run-dir", help="override the recipe's run_dir")] = None,
) -> None:
    """Run every step a recipe names, skipping what is already done."""
    from winnow.pipeline.recipe import run_recipe

    run_recipe(recipe, run_dir)


@app.command()
def ingest(
    inputs: Annotated[
        list[str], typer.Argument(help="JSONL/JSON/Parquet/CSV files, save_to_disk dirs, builtin:demo")
    ],
    run_dir: Annotated[str, typer.Option("--run", help="run directory (created if missing)")],
    model: Annotated[
        str, typer.Option("--model", help="local HF model dir (tokenizer + chat template) or builtin:tiny")
    ],
    fmt: Annotated[
        str, typer.Option("--format", help="auto|chat|sharegpt|prompt_response|alpaca|gsm8k|text")
    ] = "auto",
    loss_on: Annotated[str, typer.Option("--loss-on", help="all_turns|last_turn")] = "all_turns",
    sets: SetOpt = None,
) -> None:
    """Tokenize local data into samples/ and rejects/ (every input row is accounted for)."""
    values = {
        "inputs": inputs,
        "model": model,
        "format": fmt,
        "loss_on": loss_on,
        **parse_sets(sets, "ingest"),
    }
    entry = _run_step("ingest", run_dir, values, create=True)
    if _other_rank():
        return
    c = entry["counts"]
    typer.echo(
        f"{c['rows_in']} rows -> {c['samples']} samples, {c['rejects']} rejects"
        + (f" ({plain(c['rejects_by_reason'])})" if c.get("rejects_by_reason") else "")
    )


@app.command()
def score(
    run_dir: Annotated[str, typer.Argument(help="run directory")],
    stage: Annotated[
        str | None,
        typer.Argument(help=f"a scoring stage: {'|'.join(registry.score_stages())} (omit for a model pass)"),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="model pass: local HF dir or builtin:<name>")
    ] = None,
    alias: Annotated[str | None, typer.Option("--alias", help="model pass: signals/<alias>/")] = None,
    signals: Annotated[
        str | None, typer.Option("--signals", help="logprob,entropy,attention,embedding")
    ] = None,
    contrast: Annotated[bool, typer.Option("--contrast", help="two-model cDPO contrast pass")] = False,
    positive: Annotated[str | None, typer.Option("--positive", help="contrast pass: positive model")] = None,
    negative: Annotated[str | None, typer.Option("--negative", help="contrast pass: negative model")] = None,
    beta: Annotated[float | None, typer.Option("--beta", help="contrast pass: contrast strength")] = None,
    targets: Annotated[
        str | None, typer.Option("--targets", help="dv4llm: target file or SQL filter")
    ] = None,
    sets: SetOpt = None,
) -> None:
    """A model pass (--model/--alias), the contrast pass (--contrast) or a scoring STAGE."""
    values: dict = parse_sets(sets, "score")
    if contrast:
        if stage or model:
            raise UserError("--contrast takes --positive and --negative, not a STAGE or --model")
        values |= {
            k: v
            for k, v in {"positive": positive, "negative": negative, "beta": beta}.items()
            if v is not None
        }
        name = "contrast_pass"
    elif stage:
        if stage not in registry.score_stages():
            raise UserError(
                f"unknown stage {stage!r}; stages: {registry.score_stages()} (or --model for a model pass)"
            )
        if targets is not None:
            values["targets"] = targets
        _ingest_targets(run_dir, values.get("targets"))
        name = stage
    else:
        if model is None:
            raise UserError("give --model PATH --alias NAME for a model pass, --contrast, or a STAGE name")
        values |= {"model": model}
        if alias is not None:
            values["alias"] = alias
        if signals is not None:
            values["signals"] = signals
        name = "model_pass"
    entry = _run_step(name, run_dir, values)
    if not _other_rank():
        typer.echo(_summary(entry))


def plain(value: object, key: str = "") -> str:
    """A console value without Python reprs: ``key=value`` pairs (nested keys dotted), floats to 4
    significant digits, lists joined by ``,`` (issue 28: lines printed ``{'kept': 2}`` and 16-digit floats)."""
    if isinstance(value, dict):
        pairs = [plain(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()]
        return " ".join(pairs) if pairs or not key else f"{key}=none"
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, list | tuple):
        text = ",".join(plain(v) for v in value)
    else:
        text = str(value)
    return f"{key}={text}" if key else text


def _loss(value: object) -> str:
    """A loss as the training log prints it (4 decimals: 1.0619), or ``none``."""
    return f"{value:.4f}" if isinstance(value, float) else plain(value if value is not None else "none")


def _summary(entry: dict) -> str:
    keys = ("step", "alias", "shards", "counts", "wall_s")
    return plain({k: entry[k] for k in keys if k in entry}) or "done"


def _stage_sets(policy: str, values: dict) -> dict:
    """``select POLICY --set KEY=VALUE`` where KEY is a parameter of the policy's own scoring stage and
    not of select (token_cleaning's ``rho``, ``level``): those keys leave ``values`` for that stage."""
    import dataclasses

    from winnow.stages.select_policy import SelectParams

    if policy not in registry.score_stages():
        return {}
    own = {f.name for f in dataclasses.fields(SelectParams)}
    stage = {f.name for f in dataclasses.fields(registry.get_step(policy).params)}
    return {k: values.pop(k) for k in list(values) if k not in own and k in stage}


@app.command()
def select(
    run_dir: Annotated[str, typer.Argument(help="run directory")],
    policy: Annotated[
        str,
        typer.Argument(
            help="|".join(registry.selection_policies())
            + ", or several joined by ',' (kept when every one keeps it), or a user policy "
            "python:pkg.module:function | python:path/file.py:function"
        ),
    ],
    name: Annotated[
        str | None, typer.Option("--name", help="selection/<name>/ (default: the policy)")
    ] = None,
    tokens: Annotated[
        str | None,
        typer.Option("--tokens", help=f"token weights: {'|'.join(registry.token_sources())}"),
    ] = None,
    keep: Annotated[
        str | None, typer.Option("--keep", help="policy sql: boolean SQL over the samples view")
    ] = None,
    always_keep: Annotated[
        str | None,
        typer.Option(
            "--always-keep",
            help='TEXT[,TEXT...]: tokens the token half never drops where supervised (e.g. "<|im_end|>,####")',
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="replace selection/<name>/ made with other parameters")
    ] = False,
    sets: SetOpt = None,
) -> None:
    """Turn scores into a keep flag per sample and a weight per token: selection/<name>/."""
    from winnow.core.always_keep import split_texts
    from winnow.stages.select_policy import refuse_other_configuration

    values: dict = {"policy": policy, **parse_sets(sets, "select")}
    values |= {k: v for k, v in {"name": name, "tokens": tokens, "keep": keep}.items() if v is not None}
    staged = _stage_sets(policy, values)
    if staged:  # the policy's own stage parameters: (re)score it first (a fresh stage writes nothing)
        typer.echo(_summary(_run_step(policy, run_dir, staged)))
    if always_keep is not None:  # a list, so an empty item reaches the check that names it
        values["always_keep"] = split_texts(always_keep)
    entry = _run_step("select", run_dir, values, check=None if force else refuse_other_configuration)
    if _other_rank():
        return
    c = entry["counts"]
    typer.echo(
        f"{entry['outputs'][0]}: kept {c.get('kept', '?')} of {c.get('samples', '?')} samples, "
        f"{c.get('weighted_tokens', '?')} weighted tokens; reasons {plain(entry['reasons'])}"
    )


@app.command()
def inspect(
    run_dir: Annotated[str, typer.Argument(help="run directory")],
    sql: Annotated[
        str | None, typer.Option("--sql", help="SQL to run (omit for an interactive prompt)")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="table|csv|json|parquet")] = "table",
    out: Annotated[str | None, typer.Option("--out", help="write the result to this file")] = None,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="skip checking shards against their sha256 (warns)")
    ] = False,
) -> None:
    """Query the run's tables with DuckDB, read-only (views: samples, rejects, tokens, signals_*, ...)."""
    if _other_rank():  # rank 0 only
        return
    from winnow.pipeline.inspect_run import check_out_path, format_result, open_views, repl, run_sql

    if fmt not in ("table", "csv", "json", "parquet"):
        raise UserError(f"--format {fmt!r}: use table, csv, json or parquet")
    check_out_path(run_dir, out)
    if sql is None:
        repl(run_dir, verify=not no_verify)
        return
    views = open_views(run_dir, verify=not no_verify)
    for w in views.warnings:
        typer.echo(f"warning: {w}", err=True)
    try:
        result = run_sql(views, sql)
    finally:
        views.close()
    if result is not None:
        format_result(result, fmt, out)


@app.command()
def show(
    run_dir: Annotated[str, typer.Argument(help="run directory")],
    sample_id: Annotated[str, typer.Argument(help="the sample's sample_id")],
    selection: Annotated[
        str | None, typer.Option("--selection", help="colour by this selection's token weights")
    ] = None,
    score: Annotated[
        str | None, typer.Option("--score", help="colour by a stage's token score (STAGE or STAGE:COLUMN)")
    ] = None,
    html_out: Annotated[
        str | None, typer.Option("--html", help="also write a self-contained HTML page")
    ] = None,
) -> None:
    """Show one sample token by token: weight or score as colour, dropped tokens struck through."""
    if _other_rank():  # rank 0 only
        return
    from rich.console import Console

    from winnow.core.store import RunDir
    from winnow.pipeline.show import check_html_path, load_view, render_terminal, write_html

    check_html_path(run_dir, html_out)
    view = load_view(RunDir(run_dir), sample_id, selection, score)
    render_terminal(view, Console(soft_wrap=True))
    if html_out:
        write_html(view, html_out)
        typer.echo(f"wrote {html_out}")


@app.command()
def verify(
    run_dir: Annotated[str, typer.Argument(help="run directory")],
    full: Annotated[bool, typer.Option("--full", help="hash every file again, ignoring the cache")] = False,
) -> None:
    """Check every shard against its commit record, and the plan and manifest (exit 1 on a problem)."""
    if _other_rank():  # rank 0 only
        return
    from winnow.pipeline.verify import verify_run

    problems, summary = verify_run(run_dir, full)
    typer.echo(summary)
    for p in problems:
        typer.echo(f"problem: {p}", err=True)
    if problems:
        sys.exit(1)  # typer.Exit's code is swallowed under standalone_mode=False


@app.command()
def card(
    run_dir: Annotated[str, typer.Argument(help="run directory")],
    out: Annotated[str | None, typer.Option("--out", help="output folder (default RUN/card)")] = None,
) -> None:
    """Write a data card (Markdown + plots) of what the run kept and why."""
    if _other_rank():  # rank 0 only
        return
    from winnow.pipeline.card import write_card

    typer.echo(str(write_card(run_dir, out)))


@app.command()
def export(
    run_dir: Annotated[str, typer.Argument(help="run directory")],
    fmt: Annotated[str, typer.Option("--format", help="jsonl|parquet|hf")],
    out: Annotated[str, typer.Option("--out", help="output file (jsonl, parquet) or folder (hf)")],
    selection: Annotated[str | None, typer.Option("--selection", help="selection name (if several)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out")] = False,
) -> None:
    """Write the kept samples of a selection as chat JSONL or tokenized rows with -100 labels."""
    if _other_rank():  # rank 0 only
        return
    from winnow.pipeline.export import export_selection

    e = export_selection(run_dir, fmt, out, selection, force)
    typer.echo(
        f"selection/{e['selection']}: {e['rows']} samples, {e['weighted_tokens']} weighted tokens -> {e['out']}"
    )


@app.command()
def train(
    run_dir: Annotated[str | None, typer.Argument(help="run directory (omit with --data)")] = None,
    selection: Annotated[
        str | None,
        typer.Option("--selection", help="selection/<name>/ to train on, or all (every non-rejected sample)"),
    ] = None,
    data: Annotated[str | None, typer.Option("--data", help="an export parquet instead of a run")] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="builtin:<name> or a local HF model dir")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="RUN/train/<name>/ (default: the selection)")
    ] = None,
    out: Annotated[str | None, typer.Option("--out", help="save_pretrained directory of the result")] = None,
    sets: SetOpt = None,
) -> None:
    """Train a model on a selection (or an export): token-weighted, packed, resumable, torchrun-ready."""
    from winnow.trainer.config import TrainParams

    if run_dir is not None and not data and not selection:  # before the run is opened or locked
        from winnow.pipeline.train import NEEDS_SELECTION

        raise UserError(NEEDS_SELECTION)
    flags = {"selection": selection, "data": data, "model": model, "name": name, "out": out}
    values = parse_sets(sets, "train") | {k: v for k, v in flags.items() if v is not None}
    if run_dir is None:  # an export: no run to lock or record into
        from winnow.pipeline.train import train as train_export

        entry = train_export(build_params(TrainParams, values, where="winnow train"), None)
    else:  # the same step runner (and run lock) as every other verb
        entry = _run_step("train", run_dir, values)
    if _other_rank():  # torchrun: one report, from rank 0
        return
    if entry.get("skipped"):
        typer.echo(
            f"{entry.get('out', out)}: already trained (eval_loss {_loss(entry.get('eval_loss'))}); nothing to do"
        )
        return
    typer.echo(
        f"{entry['out']}: {entry['steps']} steps, eval_loss {_loss(entry['eval_loss_before'])} -> "
        f"{_loss(entry['eval_loss'])}"
    )


@app.command("lemo-fit")
def lemo_fit(
    run_dir: Annotated[str, typer.Argument(help="run directory (its samples: long documents)")],
    model: Annotated[str | None, typer.Option("--model", help="the model you will train")] = None,
    out: Annotated[
        str | None, typer.Option("--out", help="folder for the predictors (outside the run)")
    ] = None,
    sets: SetOpt = None,
) -> None:
    """Fit LeMo's per-layer block predictors on a run's samples (then: train --set lemo.predictors=OUT)."""
    if _other_rank():  # rank 0 only: a few hundred small steps, not worth a rendezvous
        return
    flags = {"model": model, "out": out}
    values = parse_sets(sets, "lemo-fit") | {k: v for k, v in flags.items() if v is not None}
    entry = _run_step("lemo_fit", run_dir, values)
    typer.echo(f"{entry['out']}: layers {entry['layers']}, held-out recall {entry['recall_mean']:.3f}")


@app.command()
def steps(
    step: Annotated[str | None, typer.Argument(help="one step (e.g. train): its parameters only")] = None,
) -> None:
    """List the steps a recipe can name, with their parameters, defaults and what each one does."""
    if _other_rank():  # rank 0 only
        return
    from winnow.core.params import flat_defaults, flat_docs, suggest

    names = registry.available_steps()
    if step is not None and step not in names:
        hint = suggest([step], {n: n for n in names})
        raise UserError(f"winnow steps: no step {step!r} (steps: {', '.join(names)}){hint}")
    for name in [step] if step else names:
        params = registry.get_step(name).params
        typer.echo(f"{name} ({registry.spec(name).kind}): {registry.spec(name).help}")
        docs = flat_docs(params)
        for key, default in flat_defaults(params):
            line = f"    {key} = {default!r}"
            typer.echo(f"{line:<44}  # {docs[key]}" if docs.get(key) else line)
        aliases = getattr(params, "ALIASES", {})
        if aliases:  # names from before a parameter moved into a group, still accepted
            typer.echo("    aliases: " + ", ".join(f"{old} -> {new}" for old, new in aliases.items()))


def _fixed_mmap_threshold() -> None:
    """Serve large temporary arrays (a shard padded to (B, T) is megabytes) straight from mmap, so
    freeing one returns it to the OS. glibc otherwise raises its mmap threshold after the first such
    free and serves them from the heap, whose fragments made peak RSS grow with the number of shards:
    `score eu_plane` peaked at 798 MB with glibc's default and 547 MB with this, at 100k samples
    (benchmarks/bench_scale.py, issue 16)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB, no dynamic raise
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def main() -> None:
    """The console script: exit statuses and one-line errors as :mod:`winnow.pipeline.cli_exit` lists."""
    from winnow.pipeline.cli_exit import run_and_exit

    _fixed_mmap_threshold()
    run_and_exit(app, sys.argv[1:], UserError)


if __name__ == "__main__":
    main()
