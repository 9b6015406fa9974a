"""`make gpu-check`'s script on the CPU: the code path the GPU host runs (random-weight pipelines built
in memory, Kiln's loop over the shared modules beside diffusers' pipeline, the budget, the report), on
the tiny models in fp32 with 2 steps at batch 1 and 2, so the script cannot rot between GPU runs.
Timings are reported, never asserted; what both sides drew is."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_INSTALLED = "TensorRT is not installed"


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    from kiln.benchmarks import gpu_check

    root = tmp_path_factory.mktemp("gpu-check")
    report = gpu_check.run(root / "out", root / "work", [gpu_check.TINY["sd15"], gpu_check.TINY["sdxl"]],
                           batches=(1, 2), runs=1)
    return root / "out", report


def test_kiln_draws_what_diffusers_draws_and_the_report_says_how_fast(tiny_check):
    out, report = tiny_check
    assert json.loads((out / "gpu_check.json").read_text()) == report
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json"]  # scratch files go elsewhere
    assert report["complete"] is True and report["device"].startswith("cpu") and report["device_memory_gib"] is None
    assert report["settings"]["precision"] == "fp32" and report["versions"]["torch"] and report["versions"]["diffusers"]
    for family in ("sd15", "sdxl"):
        section = report["families"][family]
        assert section["steps"] == 2 and set(section["cases"]) == {"batch_1", "batch_2"}
        assert section["attention"]["unet"] == "AttnProcessor2_0"  # torch's SDPA
        for batch in (1, 2):
            case = section["cases"][f"batch_{batch}"]
            for side in ("kiln", "diffusers"):  # one guided UNet call (2 rows per image) per step, both sides
                timing = case[side]
                assert timing["unet_calls_per_run"] == 2 and timing["unet_batch"] == [2 * batch], (family, side)
                assert timing["unet_step_ms"] > 0 and timing["end_to_end_s"] > 0 and timing["peak_memory_gib"] is None
                assert timing["images_per_s"] == pytest.approx(batch / timing["end_to_end_s"], rel=0.01)
            parity = case["parity_255"]  # fp32 on the same weights: step for step the same computation
            assert parity["max_abs"] <= 1 and parity["within"] is True, (family, batch, parity)


def test_what_the_host_lacks_is_skipped_with_why(tiny_check):
    _, report = tiny_check
    assert set(report["skipped"]) == {"tensorrt", "onnxruntime_cuda"}  # a failed case would be listed too
    assert NOT_INSTALLED in report["skipped"]["tensorrt"] and "no CUDA GPU" in report["skipped"]["onnxruntime_cuda"]
    assert not any("onnx_backends" in s for s in report["families"].values())  # nothing exported
    for family in ("sd15", "sdxl"):  # runtime LoRA adapters: the same check a GPU host runs
        lora = report["families"][family]["lora_adapters"]
        assert lora["adapted_layers"] > 0 and lora["pytorch"]["a_b_a_identical"] is True
        timed = ("plain", "no_adapter", "same_adapter", "switching_every_step")
        assert all(lora["pytorch"][k]["median_ms"] > 0 for k in timed)
        assert NOT_INSTALLED in lora["tensorrt"]["skipped"]


def test_onnx_backends_run_through_the_same_loop_when_asked(tmp_path):
    """--onnx on: the path a host with TensorRT or ONNX Runtime's CUDA build takes, on the CPU provider."""
    from kiln.benchmarks import gpu_check

    report = gpu_check.run(tmp_path / "out", tmp_path / "work", [gpu_check.TINY["sd15"]], batches=(1,), runs=1,
                           onnx="on", lora=False)
    assert set(report["skipped"]) == {"tensorrt"} and NOT_INSTALLED in report["skipped"]["tensorrt"]
    timing = report["families"]["sd15"]["onnx_backends"]["onnxruntime_cpu"]
    assert timing["unet_step_ms"] > 0 and timing["end_to_end_s"] > 0


def test_parity_outside_its_tolerance_is_reported():
    import numpy as np

    from kiln.benchmarks.gpu_check import compare_images

    ours = np.full((1, 8, 8, 3), 100, dtype=np.uint8)
    theirs = ours.copy()
    theirs[0, 0, 0, 0] = 102
    assert compare_images(ours, theirs, "fp32") | {"tolerance": None} == {
        "max_abs": 2, "mean_abs": round(2 / 192, 4), "p99_abs": 0.0, "over_8": 0.0, "tolerance": None, "within": False}
    assert compare_images(ours, theirs, "fp16")["within"] is True  # mean 0.01 <= 3
    assert compare_images(ours, theirs[:, :4], "fp32")["within"] is False


def test_the_budget_skips_what_does_not_fit_and_still_writes_the_report(tmp_path):
    from kiln.benchmarks import gpu_check

    assert gpu_check.Budget(100).refuse(50) is None
    assert "needs about 1000 s" in gpu_check.Budget(100).refuse(1000)
    report = gpu_check.run(tmp_path, tmp_path / "work", [gpu_check.TINY["sd15"], gpu_check.TINY["sdxl"]], runs=1,
                           budget_s=1.0)
    assert report["complete"] is False and json.loads((tmp_path / "gpu_check.json").read_text()) == report
    assert all(report["skipped"][f].startswith("out of time") for f in ("sd15", "sdxl"))
    assert not (tmp_path / "work").exists()  # nothing built


def test_a_bare_host_is_told_what_to_carry(tmp_path, monkeypatch, capsys):
    from kiln.benchmarks import gpu_check

    assert gpu_check.missing_requirements() == {}
    monkeypatch.setattr(gpu_check, "REQUIRED", (*gpu_check.REQUIRED, ("diffusers_missing_here", "diffusers")))
    assert gpu_check.main([str(tmp_path / "out"), "--tiny"]) == 3
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert set(report) == {"missing", "carry"} and "carry diffusers==0.42.1" in report["missing"]["diffusers"]
    assert "pip download --no-deps -d .whl diffusers==0.42.1" in report["carry"]
    assert "diffusers: no module diffusers_missing_here" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--scheduler", "warp"), ("--runs", "0"), ("--batches", "0"),
                                         ("--batches", "5"), ("--families", "sd3"), ("--budget", "0")])
def test_bad_settings_are_refused_before_any_work(tmp_path, capsys, flag, value):
    """A typo must not spend a GPU run on a report whose every case was skipped."""
    from kiln.benchmarks import gpu_check

    with pytest.raises(SystemExit) as exit_:
        gpu_check.main([str(tmp_path / "out"), "--tiny", flag, value])
    assert exit_.value.code == 2 and f"{flag.lstrip('-')}=" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_without_a_gpu_it_says_so_and_builds_nothing(tmp_path):
    import torch

    from kiln.benchmarks import gpu_check

    if torch.cuda.is_available():
        pytest.skip("this host has a CUDA GPU: the check would run in full")
    assert gpu_check.main([str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert "no CUDA GPU" in report["skipped"]["all"] and report["families"] == ["sd15", "sdxl"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.json"]


def test_the_wrapper_runs_from_the_source_tree_without_kiln_installed(tmp_path):
    """benchmarks/gpu_check.sh as a lent GPU host runs it: a python that sees torch and diffusers but
    not Kiln (site-packages on PYTHONPATH, `-S` so the editable install's .pth is not read), the
    report under $OUT."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"], "GPU_CHECK_PYTHON": str(python),
           "GPU_CHECK_WHEELS": str(tmp_path / "no-wheels"), "OUT": str(tmp_path / "out")}
    bare = subprocess.run([str(python), "-c", "import kiln.export"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert "No module named 'kiln.export'" in bare.stderr  # what the script has to arrange itself
    command = ["bash", "benchmarks/gpu_check.sh", "--tiny", "--families", "sd15", "--batches", "1", "--runs", "1",
               "--no-lora"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["complete"] is True and report["families"]["sd15"]["cases"]["batch_1"]["parity_255"]["within"]
    assert "report written to" in (tmp_path / "out" / "gpu_check.log").read_text()
