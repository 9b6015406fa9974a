import json

from transformers import CLIPTokenizer

from kiln.models.tokenizer import build_vocabulary, find_bpe_file, write_clip_tokenizer


def test_vocabulary_has_clips_size_and_special_tokens():
    vocab, merges = build_vocabulary(find_bpe_file())
    assert len(vocab) == 49408
    assert len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_ids_equal_clips(tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path)))
    # Reference ids from CLIP's own tokenizer for this sentence.
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.pad_token_id == 49407


def test_sd2_pads_with_exclamation_mark(tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path, pad_token="!")))
    ids = tokenizer("a cat", padding="max_length", max_length=6).input_ids
    assert ids == [49406, 320, 2368, 49407, 0, 0]
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 77
