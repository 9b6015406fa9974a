"""Glyph renderer, glyph classifier and the quality metrics on known inputs."""

import json

import numpy as np
import torch
import pytest

from kiln.dataset.glyphs import COLOURS, FONT_FACES, Glyph, available_fonts, render, sample_glyphs, write_glyphs
from kiln.evaluation import metrics
from kiln.evaluation.classifier import GlyphFeatures, degrade, load_classifier, render_batch, train_classifier


def test_glyph_folder_is_deterministic_and_prepare_compatible(tmp_path):
    a = write_glyphs(tmp_path / "a", count=30, seed=3, size=32)
    b = write_glyphs(tmp_path / "b", count=30, seed=3, size=32)
    rows = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and rows[7]["text"] == f"a {rows[7]['colour']} digit 7 on a {rows[7]['background']} background"
    assert (a / "metadata.jsonl").read_text() == (b / "metadata.jsonl").read_text()
    assert all((a / r["file_name"]).read_bytes() == (b / r["file_name"]).read_bytes() for r in rows)
    from kiln.dataset.prepare import PrepareOptions, prepare

    report = prepare(a, tmp_path / "prepared", PrepareOptions(resolution=32, dedup_distance=0))
    assert report.kept + report.dropped.get("duplicate", 0) == 30


def test_colour_weights_shape_the_mix():
    glyphs = sample_glyphs(4000, np.random.default_rng(0), colours=("purple", "red", "blue"), colour_weights=(2, 1, 1))
    share = sum(g.colour == "purple" for g in glyphs) / len(glyphs)
    assert 0.47 < share < 0.53
    with pytest.raises(Exception, match="colour weights"):
        sample_glyphs(10, np.random.default_rng(0), colours=("purple", "red"), colour_weights=(1,))
    glyphs = sample_glyphs(4000, np.random.default_rng(0), background_weights=(1, 1, 2))
    assert 0.47 < sum(g.background == "gray" for g in glyphs) / len(glyphs) < 0.53
    with pytest.raises(Exception, match="background weights"):
        sample_glyphs(10, np.random.default_rng(0), background_weights=(1, -1, 1))


def test_renders_use_the_requested_colour(tmp_path):
    assert sorted(p.name for p in available_fonts()) == sorted(FONT_FACES)
    rng = np.random.default_rng(0)
    image = np.asarray(render(Glyph(8, "blue", "white"), 32, rng)).reshape(-1, 3).astype(int)
    background = np.abs(image - np.array([245, 245, 240])).sum(1) < 30
    ink = np.abs(image - np.array(COLOURS["blue"])).sum(1) < 60
    assert background.mean() > 0.4 and ink.mean() > 0.05


def test_degrade_looks_generated_and_is_seeded():
    """Four in five renders come out softer and noisier (never out of [0, 1]); the rest untouched; the
    same generator gives the same batch."""
    x, _, _ = render_batch(400, np.random.default_rng(4))
    a = degrade(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, degrade(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, degrade(x, torch.Generator().manual_seed(2)))
    changed = (a - x).flatten(1).abs().amax(1) > 0
    assert 0.7 < changed.float().mean() < 0.9 and a.min() >= 0 and a.max() <= 1
    # the digit fainter against its background (blur, contrast; the noise averages out over the masks)
    corner = x[:, :, :1, :1]
    ink = (x - corner).abs().sum(1) > 0.3  # (N, 32, 32) from the clean render

    def contrast(images):
        return torch.stack([(im[:, m].mean(1) - im[:, ~m].mean(1)).abs().sum() for im, m in zip(images, ink)])

    assert (contrast(a[changed]) < contrast(x[changed])).float().mean() > 0.9


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier")
    report = train_classifier(folder, samples=6000, steps=600)
    return report, load_classifier(folder)


@pytest.mark.slow  # trains the glyph classifier
def test_classifier_reads_real_renders(classifier):
    report, model = classifier
    assert report.digit_accuracy >= 0.9 and report.colour_accuracy >= 0.95
    # trained through degrade, it reads degraded renders too (sharp-render judges of 1,000 steps read 0.81-0.86)
    assert report.degraded_digit_accuracy >= 0.9 and report.degraded_colour_accuracy >= 0.95
    x, digits, colours = render_batch(300, np.random.default_rng(99))
    predictions = metrics.predict((x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8), model)
    accuracy = metrics.prompt_accuracy(predictions, digits.tolist(), [model.colours[c] for c in colours])
    assert accuracy["digit"] >= 0.9 and accuracy["colour"] >= 0.95


def _renders(count, seed):
    x, _, _ = render_batch(count, np.random.default_rng(seed))
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


@pytest.mark.slow  # trains the glyph classifier
def test_metrics_on_known_inputs(classifier):
    _, model = classifier
    real, other = _renders(200, 1), _renders(200, 2)
    noise = np.random.default_rng(3).integers(0, 256, real.shape, dtype=np.uint8)
    features = GlyphFeatures(model)
    same = metrics.fid(real, real, features)
    fresh = metrics.fid(real, other, features)
    noisy = metrics.fid(real, noise, features)
    assert abs(same) < 1e-2
    assert noisy > 20 * max(fresh, 1e-3) and noisy > 10
    assert metrics.kid(real, noise, features)[0] > 10 * abs(metrics.kid(real, other, features)[0])
    is_real, _ = metrics.inception_score(real, model)
    is_noise, _ = metrics.inception_score(noise, model)
    assert is_real > 3 and is_noise < is_real / 2  # at most 10: ten balanced digits read with certainty
    assert np.allclose(metrics.glyph_lpips(real[:20], real[:20], model), 0, atol=1e-6)
    assert metrics.glyph_lpips(real[:20], noise[:20], model).mean() > metrics.glyph_lpips(real[:20], other[:20], model).mean()
    # KID's subsets and IS's splits are drawn at random: the same images give the same numbers,
    # whatever the global generator did in between, and the caller's generator is left alone
    first_kid, first_is = metrics.kid(real, other, features), metrics.inception_score(real, model)
    torch.manual_seed(12345)
    state = torch.get_rng_state()
    assert metrics.kid(real, other, features) == first_kid and metrics.inception_score(real, model) == first_is
    assert torch.equal(torch.get_rng_state(), state)


def test_missing_standard_backbones_name_the_files(tmp_path):
    with pytest.raises(metrics.MetricError) as err:
        metrics.feature_extractor(None, tmp_path / "nowhere.pth")
    assert metrics.INCEPTION_WEIGHTS in err.value.hint
    with pytest.raises(Exception) as err:
        metrics.clip_score(np.zeros((1, 32, 32, 3), np.uint8), ["a"], tmp_path / "clip")
    assert "config.json" in str(err.value) and "vocab.json" in str(err.value)
