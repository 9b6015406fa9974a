"""kiln eval --sweep: sampler settings measured side by side through Triton (cost and accuracy), the
fastest one within the accuracy window chosen, diffusers' pipeline beside them."""

import json

import pytest

from kiln.evaluation.report import EvalSpec
from kiln.evaluation.settings import (SettingResult, Setting, Window, choose, parse_setting, sweep)
from kiln.errors import KilnError


def result(name: str, seconds: float, digit: float, colour: float, runtime: str = "triton") -> SettingResult:
    return SettingResult(Setting(name), runtime, {"median": seconds}, 0, {"digit": digit, "colour": colour})


def test_the_fastest_setting_within_the_window_is_chosen():
    results = [result("ref", 1.0, 0.90, 0.95), result("fast but worse", 0.2, 0.85, 0.95),
               result("colour lost", 0.3, 0.95, 0.90), result("good", 0.5, 0.895, 0.96),
               result("slower", 0.7, 0.99, 0.99), result("eager", 0.1, 0.99, 0.99, "diffusers")]
    chosen = choose(results, Window(0.01, 0.01))
    assert chosen["setting"] == "good"
    assert chosen["speedup_vs_reference"] == pytest.approx(2.0)
    assert chosen["digit_change"] == pytest.approx(-0.005)
    assert choose(results, Window(0.1, 0.1))["setting"] == "fast but worse"
    assert choose(results[:1], Window(0, 0))["setting"] == "ref"  # the reference is always within


def test_unet_rows_count_guided_steps_twice():
    assert Setting("a", steps=20).unet_rows() == 40
    assert Setting("a", steps=10, guidance_cutoff=0.5).unet_rows() == 6 * 2 + 4
    assert Setting("a", steps=10, guidance_end=0.7).unet_rows() == 7 * 2 + 3
    assert Setting("a", steps=10, guidance_scale=1.0).unet_rows() == 10


def test_settings_parse_by_position_and_bad_ones_are_named():
    s = parse_setting("fast=dpmpp_2m:10:4:1:0:0.7")
    assert (s.name, s.scheduler, s.steps, s.guidance_scale, s.guidance_end) == ("fast", "dpmpp_2m", 10, 4.0, 0.7)
    assert parse_setting("x=unipc:8").guidance_scale == Setting("x").guidance_scale
    for bad in ("fast", "fast=euler:ten", "=euler:10", "a=euler:1:2:3:4:5:6:7"):
        with pytest.raises(KilnError, match="--setting"):
            parse_setting(bad)
    for bad, named in (("a=euler:0", "steps 0"), ("a=euler:8:nan", "guidance nan"), ("a=euler:8:4:1.5", "guidance_cutoff 1.5"),
                       ("a=euler:8:4:1:0.6:0.3", "start 0.6 >= end 0.3"), ("a=euler:8:-inf", "guidance -inf")):
        with pytest.raises(KilnError, match=named):
            parse_setting(bad)


def test_sweep_through_triton_beside_diffusers(triton, tiny_model, tmp_path):
    from kiln.evaluation.classifier import train_classifier

    train_classifier(tmp_path / "classifier", samples=200, steps=5)  # what it reads does not matter here
    info = triton()
    settings = (Setting("euler 4", steps=4), Setting("dpmpp 2, interval", "dpmpp_2m", 2, guidance_end=0.5))
    report = sweep(info.http_url, "http", tmp_path / "classifier", tmp_path / "out", settings,
                   EvalSpec(seeds=1), model_dir=tiny_model(), window=Window(1.0, 1.0))
    saved = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert saved["chosen"] == report["chosen"]
    rows = saved["results"]
    assert [(r["setting"]["name"], r["runtime"], r["unet_rows"]) for r in rows] == [
        ("euler 4", "triton", 8), ("dpmpp 2, interval", "triton", 3), ("euler 4", "diffusers", 8)]
    assert all(r["seconds_per_image"]["images"] == saved["prompts"] == 20 for r in rows)
    assert all(0 <= r["accuracy"][k] <= 1 for r in rows for k in ("digit", "colour", "both"))
    assert report["chosen"]["setting"] in {"euler 4", "dpmpp 2, interval"}
    assert report["chosen"]["speedup_vs_diffusers_eager"] > 0
    table = (tmp_path / "out" / "sweep.md").read_text()
    assert "| dpmpp 2, interval | triton | 3 |" in table and "chosen:" in table
