"""How `winnow` ends, through the installed console script: usage errors one line and exit 2, `-h`,
`--help` and `--version` exit 0, runtime errors one line and exit 1 (traceback with --debug), Ctrl-C
"Aborted" and exit 130."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from winnow import __version__
from winnow.pipeline.cli_exit import run_and_exit
from winnow.pipeline.store import UserError

from cli_runner import WINNOW
from trainer_fixtures import export_parquet, model_dir


def _winnow(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([WINNOW, *map(str, args)], capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.parametrize("args", [["-h"], ["--help"], ["inspect", "-h"], ["train", "--help"]])
def test_help_exits_0(args):
    proc = _winnow(*args)
    assert proc.returncode == 0 and "Usage" in proc.stdout and proc.stderr == "", proc.stderr


def test_version():
    proc = _winnow("--version")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"winnow {__version__}\n", "")


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect"], "error: Missing argument 'run_dir'. (see winnow inspect --help)"),
        (["inspect", "x", "--bogus"], "error: No such option: --bogus"),
        (["nosuch"], "error: No such command 'nosuch'. (see winnow --help)"),
        (["--nope"], "error: No such option: --nope"),
        (["inspect", "/no/such/run", "--sql", "select 1"], "error: "),  # a UserError: also one line, 2
    ],
)
def test_usage_and_user_errors_are_one_line_exit_2(args, message):
    proc = _winnow(*args)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr


def test_bare_winnow_prints_the_help_and_exits_2():
    proc = _winnow()
    assert proc.returncode == 2 and "Usage" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def _failing_app(args, standalone_mode):
    assert standalone_mode is False
    raise RuntimeError("the disk went away")


def test_runtime_error_is_one_line_exit_1_and_debug_shows_the_traceback(capsys):
    with pytest.raises(SystemExit) as e:
        run_and_exit(_failing_app, ["train"], UserError)
    err = capsys.readouterr().err
    assert e.value.code == 1
    assert err == "error: RuntimeError: the disk went away (rerun with --debug for the traceback)\n"
    with pytest.raises(RuntimeError, match="the disk went away"):
        run_and_exit(_failing_app, ["--debug", "train"], UserError)


def test_user_error_from_a_command_is_exit_2(capsys):
    def app(args, standalone_mode):
        raise UserError("data.jsonl row 3: no 'messages' field")

    with pytest.raises(SystemExit) as e:
        run_and_exit(app, [], UserError)
    assert e.value.code == 2 and capsys.readouterr().err == "error: data.jsonl row 3: no 'messages' field\n"


def _default_sigint():
    # a job started from a non-interactive shell may inherit SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the child the default disposition, as a terminal would
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctrl_c")
    return model_dir(root / "model"), export_parquet(root / "data.parquet", n=40)


def test_ctrl_c_while_a_checkpoint_is_written_removes_it(train_inputs, tmp_path):
    m, d = train_inputs
    out = tmp_path / "out"
    sets = ["--set", "tokens_per_batch=128", "--set", "max_seq_len=128", "--set", "save_every=2"]
    proc = subprocess.run(
        [WINNOW, "train", "--data", str(d), "--model", str(m), "--out", str(out), *sets],
        capture_output=True,
        text=True,
        timeout=240,
        preexec_fn=_default_sigint,
        env={**os.environ, "WINNOW_PROGRESS": "0", "WINNOW_FAULT_INTERRUPT_IN_SAVE": "1"},
    )
    assert proc.returncode == 130 and proc.stderr.strip().splitlines()[-1] == "Aborted", proc.stderr[-2000:]
    assert (out / "checkpoints").is_dir()  # the save had started: its folder existed
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == []  # and is gone, not half written


def test_ctrl_c_during_training_prints_aborted_and_exits_130(train_inputs, tmp_path):
    m, d = train_inputs
    out = tmp_path / "out"
    sets = [
        "--set",
        "tokens_per_batch=128",
        "--set",
        "max_seq_len=128",
        "--set",
        "epochs=50",
        "--set",
        "lr=1e-3",
    ]
    proc = subprocess.Popen(
        [WINNOW, "train", "--data", str(d), "--model", str(m), "--out", str(out), *sets],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
        env={**os.environ, "WINNOW_PROGRESS": "0"},
    )
    deadline = time.monotonic() + 120
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:  # training steps are running
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "Aborted" and "Traceback" not in err
    assert not (out / "train_result.json").exists()  # nothing is reported as finished
    leftovers = [p.name for p in (out / "checkpoints").glob(".*")] if (out / "checkpoints").exists() else []
    assert leftovers == []
