"""benchmarks/gpu_check.py with every Triton launch made to raise, in-process at CPU-smoke sizes (the
shell script's fault-injection run, ``WINNOW_GPU_CHECK_FAULT=triton``, does the same per process):
every section still records its reference numbers, every Triton path is recorded as failed with the
fault's message, ``WINNOW_KERNELS`` is restored, and the exit status is 0. ~30 s here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

pytest.importorskip("triton")
pytest.importorskip("peft")


def test_every_triton_launch_raising_leaves_every_reference(tmp_path, monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the CPU smoke: needs the interpreter (tests/conftest.py sets it without CUDA)")
    gpu_check.inject_triton_fault(monkeypatch.setattr)
    monkeypatch.setenv("WINNOW_KERNELS", "auto")
    assert gpu_check.drive(tmp_path, smoke=True, budget=300, in_process=True) == 0
    assert os.environ["WINNOW_KERNELS"] == "auto"
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    for name, s in sections.items():
        tri = [e for e in s["result"] if e["triton"] and not e.get("skipped")]
        other = [e for e in s["result"] if not e["triton"]]
        assert all(not e["ok"] and "injected fault" in e["error"] for e in tri), (name, tri)
        assert all(e["ok"] for e in other), (name, other)
        assert name == "self_check" or other, name  # every other section measured something
        assert "error" not in s and s["ok"] is (not tri)
    assert len([e for e in sections["self_check"]["result"] if not e["ok"]]) == 3
    ref = {
        s: next(e for e in sections[s]["result"] if e["path"] == "reference")
        for s in ("loss_step", "train_step")
    }
    assert ref["loss_step"]["loss"] > 0 and ref["train_step"]["step_s"] > 0
    trainer = {e["path"]: e for e in sections["trainer_step"]["result"]}
    assert trainer["reference"]["ok"] and trainer["flex"]["skipped"]
    lora = {e["path"]: e for e in sections["lora"]["result"]}
    assert lora["lora"]["checks"]["first loss vs full"]["ok"]  # auto on CPU: the reference head, no fault


def test_exit_status_fails_on_any_non_triton_failure():
    ok = {"path": "reference", "ok": True, "triton": False}
    tri_bad = {"path": "triton", "ok": False, "triton": True}
    ref_bad = {"path": "materialized", "ok": False, "triton": False}
    assert gpu_check.exit_status({"sections": {"a": {"result": [ok, tri_bad]}}}) == 0
    assert gpu_check.exit_status({"sections": {"a": {"result": [ok, ref_bad]}}}) == 1
    assert gpu_check.exit_status({"sections": {"a": {"result": [ok], "error": "build failed"}}}) == 1
    died = {"result": [ok, tri_bad], "error": "rc=-11", "died_in": {"path": "triton", "triton": True}}
    assert gpu_check.exit_status({"sections": {"a": died}}) == 0


def test_recorder_closes_a_section_whose_process_died_inside_a_path(tmp_path):
    rec = gpu_check.Recorder(tmp_path)
    rec.save({"meta": {}, "sections": {}})
    rec.begin("s")
    rec.add("s", {"path": "reference", "ok": True, "triton": False, "loss": 1.0})
    rec.running("s", {"path": "triton", "triton": True, "optional": False})
    rec.end("s", 2.0, "section process exited with rc=-6")
    s = rec.load()["sections"]["s"]
    assert [e["path"] for e in s["result"]] == ["reference", "triton"] and s["result"][0]["loss"] == 1.0
    assert s["result"][1]["ok"] is False and s["ok"] is False and s["died_in"]["path"] == "triton"
    assert gpu_check.exit_status({"sections": {"s": s}}) == 0


def test_a_section_process_killed_inside_a_triton_path_keeps_its_reference(tmp_path, monkeypatch):
    """A sticky fault, simulated: the head section's process aborts at its first Triton launch. The
    driver records the path it died in as failed, keeps the reference measured before it, and the
    next section still runs in a fresh process (~15 s: two child processes)."""
    monkeypatch.setenv(gpu_check.FAULT_ENV, "triton-abort")
    assert gpu_check.drive(tmp_path, smoke=True, budget=120, only=["head", "packer"]) == 0
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    head = sections["head"]
    assert [(e["path"], e["ok"]) for e in head["result"]] == [("reference", True), ("triton", False)]
    assert head["died_in"]["path"] == "triton" and "rc=" in head["error"] and head["result"][0]["ms"] > 0
    assert sections["packer"]["ok"]
