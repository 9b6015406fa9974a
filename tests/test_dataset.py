import json

import pytest
import torch
from PIL import Image

from images import shape_image, write_folder
from kiln.dataset.augment import Augmentations, build_augmentation
from kiln.dataset.captions import scan
from kiln.dataset.prepare import PrepareOptions, prepare
from kiln.errors import DatasetError


def test_reads_metadata_jsonl_and_sidecars(tmp_path):
    jsonl = scan(write_folder(tmp_path / "a", 3))
    sidecar = scan(write_folder(tmp_path / "b", 3, sidecars=True))
    assert [e.caption for e in jsonl] == [e.caption for e in sidecar] == ["a red square", "a green square", "a blue square"]


def test_prepare_keeps_good_images_and_says_why_others_were_dropped(tmp_path):
    src = write_folder(tmp_path / "src", 6)
    rows = [json.loads(line) for line in (src / "metadata.jsonl").read_text().splitlines()]
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    rows.append({"file_name": "broken.png", "text": "broken"})
    Image.new("RGB", (20, 20), "red").save(src / "tiny.png")
    rows.append({"file_name": "tiny.png", "text": "a tiny red square"})
    shape_image(7)[0].save(src / "uncaptioned.png")
    duplicate, _ = shape_image(0)
    duplicate.resize((100, 100)).save(src / "zcopy.png")  # same picture, other size
    rows.append({"file_name": "zcopy.png", "text": "a red square again"})
    (src / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    report = prepare(src, tmp_path / "out", PrepareOptions(resolution=64))
    assert report.kept == 6
    assert report.dropped == {"corrupt": 1, "tiny": 1, "no caption": 1, "duplicate": 1}
    reasons = {d["file"]: d["reason"] for d in report.drops}
    assert reasons == {"broken.png": "corrupt", "tiny.png": "tiny", "uncaptioned.png": "no caption", "zcopy.png": "duplicate"}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["kept"] == 6 and manifest["seen"] == 10 and manifest["dropped"]["duplicate"] == 1
    kept = [json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert all(Image.open(tmp_path / "out" / r["file_name"]).size == (64, 64) for r in kept)
    assert kept[0]["text"] == "a red square"


def _tiny_clip(folder):
    from transformers import CLIPConfig, CLIPModel

    from kiln.models.tokenizer import write_clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                     "vocab_size": 49408, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    write_clip_tokenizer(folder)
    return folder


def test_clip_and_aesthetic_filters_run_from_local_weights(tmp_path):
    from kiln.dataset.filters import AestheticMlp

    clip = _tiny_clip(tmp_path / "clip")
    head = AestheticMlp(16)
    torch.save(head.state_dict(), tmp_path / "aesthetic.pth")
    src = write_folder(tmp_path / "src", 4)
    report = prepare(src, tmp_path / "out", PrepareOptions(resolution=64, clip_model=clip, min_clip_score=101.0))
    assert report.kept == 0 and report.dropped == {"clip score": 4}  # a cosine x 100 never exceeds 100
    report = prepare(src, tmp_path / "out2", PrepareOptions(resolution=64, clip_model=clip, min_clip_score=0.0,
                                                            aesthetic_weights=tmp_path / "aesthetic.pth",
                                                            min_aesthetic=-1e9))
    assert report.kept == 4


def test_missing_filter_weights_name_the_expected_files(tmp_path):
    src = write_folder(tmp_path / "src", 2)
    with pytest.raises(DatasetError) as err:
        prepare(src, tmp_path / "out", PrepareOptions(clip_model=tmp_path / "nowhere"))
    assert "config.json" in str(err.value) and "model.safetensors" in str(err.value)
    assert "vocab.json" in str(err.value)
    with pytest.raises(DatasetError, match="needs --clip-model"):
        prepare(src, tmp_path / "out", PrepareOptions(aesthetic_weights=tmp_path / "a.pth"))
    clip = _tiny_clip(tmp_path / "clip")
    with pytest.raises(DatasetError) as err:
        prepare(src, tmp_path / "out", PrepareOptions(clip_model=clip, aesthetic_weights=tmp_path / "missing.pth"))
    assert "sac+logos+ava1-l14-linearMSE.pth" in err.value.hint
    assert not (tmp_path / "out").exists()


def test_augmentations_are_seeded_and_shaped():
    augment = build_augmentation(Augmentations(), 32)
    batch = torch.rand(4, 3, 48, 48)
    torch.manual_seed(3)
    a = augment(batch)
    torch.manual_seed(3)
    b = augment(batch)
    torch.manual_seed(4)
    c = augment(batch)
    assert a.shape == (4, 3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert build_augmentation(Augmentations(enabled=False), 32) is None
    flip_only = build_augmentation(Augmentations(crop_scale=(1.0, 1.0), flip_probability=1.0, rotation_degrees=0,
                                                 brightness=0, contrast=0, hue=0), 48)
    assert torch.allclose(flip_only(batch), batch.flip(-1), atol=1e-5)
