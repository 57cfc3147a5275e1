"""Caption sources: a user file, the template, and a transformers image-to-text model."""

import json

import pytest
from PIL import Image

from cns import CNSError
from cns.captions import TemplateCaptioner, TransformersCaptioner, captions_for_images, insert_token, read_caption_file


def test_caption_file_json_and_tab_lines(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"00.png": "a red dog", "01": "a dog on the left"}))
    assert captions_for_images(["00.png", "01.png"], "dog", tmp_path / "c.json") == ["a red dog", "a dog on the left"]
    (tmp_path / "c.txt").write_text("# comment\n00.png\ta red dog\n\n01.png: a big dog\n")
    assert read_caption_file(tmp_path / "c.txt") == {"00.png": "a red dog", "01.png": "a big dog"}


def test_caption_file_must_match_the_images(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"00.png": "a red dog"}))
    with pytest.raises(CNSError, match="no caption for 01.png"):
        captions_for_images(["00.png", "01.png"], "dog", tmp_path / "c.json")
    (tmp_path / "d.json").write_text(json.dumps({"00.png": "a red dog", "01.png": "x", "09.png": "y"}))
    with pytest.raises(CNSError, match="not in the folder: 09.png"):
        captions_for_images(["00.png", "01.png"], "dog", tmp_path / "d.json")


def test_template_default_and_token_insertion():
    assert captions_for_images(["a.png", "b.png"], "hat") == ["a photo of a hat"] * 2
    assert TemplateCaptioner("a {class_word} in a room")([None], "cat") == ["a cat in a room"]
    assert insert_token("a big star on the left, flat style", "<new1>", "star") == "a big <new1> star on the left, flat style"
    assert insert_token("a small red thing", "<new2>", "dog") == "photo of a <new2> dog, a small red thing"


def _tiny_blip(folder):
    """A BLIP captioner of a few thousand random parameters, saved like a hub checkpoint."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "dog", "red"]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(words))
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    tokenizer.bos_token = "[CLS]"
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    config = BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, encoder_hidden_size=16, bos_token_id=2, sep_token_id=3, pad_token_id=0),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_transformers_captioner_from_a_local_folder(tmp_path):
    model = _tiny_blip(tmp_path / "blip")
    images = [Image.new("RGB", (40, 40), (200, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 200))]
    captioner = TransformersCaptioner(str(model), max_new_tokens=5)
    first = captions_for_images(["a.png", "b.png"], "dog", captioner=captioner, images=images)
    assert len(first) == 2 and all(isinstance(c, str) and c for c in first)
    assert set(" ".join(first).split()) <= {"a", "photo", "of", "dog", "red"}
    assert TransformersCaptioner(str(model), max_new_tokens=5)(images, "dog") == first  # greedy: deterministic


def test_transformers_captioner_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(CNSError, match="cannot load captioning model"):
        TransformersCaptioner(str(tmp_path / "missing"))([Image.new("RGB", (8, 8))], "dog")


def _folder_with_images(folder, count=2):
    from cns.testing import write_dummy_images

    return write_dummy_images(folder, count=count, seed=3, color=(200, 40, 40))


@pytest.mark.parametrize("layout", ["captions.json", "sidecar .txt", "sidecar .caption"])
def test_captions_beside_the_images_are_used_without_a_flag(tmp_path, base_model, layout):
    from cns import ConceptLibrary, ConceptSpec
    from cns.images import load_image_folder

    from .conftest import fast_config

    folder = _folder_with_images(tmp_path / "dog")
    names = [im.path.name for im in load_image_folder(folder)]
    texts = {n: f"a red dog number {k}" for k, n in enumerate(names)}
    if layout == "captions.json":
        (folder / "captions.json").write_text(json.dumps(texts))
    else:
        for n, t in texts.items():
            (folder / (n.rsplit(".", 1)[0] + layout.split()[-1])).write_text(t + "\n")
    library = ConceptLibrary.create(tmp_path / "lib", str(base_model))
    record = library.learn([ConceptSpec(folder, "dog")], fast_config(steps=1), progress=False)[0]
    assert record["caption_source"] == "folder"
    assert record["captions"] == [texts[n] for n in names]
    assert record["instance_prompts"] == [f"a red <new1> dog number {k}" for k in range(len(names))]


def test_caption_files_beside_only_some_images_are_not_used(tmp_path, base_model):
    from cns import ConceptLibrary, ConceptSpec
    from cns.images import load_image_folder

    from .conftest import fast_config

    folder = _folder_with_images(tmp_path / "dog", count=3)
    first = load_image_folder(folder)[0].path
    (folder / (first.stem + ".txt")).write_text("a red dog")
    library = ConceptLibrary.create(tmp_path / "lib", str(base_model))
    with pytest.warns(UserWarning, match="caption files beside 1 of 3 images .* not used"):
        record = library.learn([ConceptSpec(folder, "dog")], fast_config(steps=1), progress=False)[0]
    assert record["caption_source"] == "template"
    # a caption file given on the command line wins over what lies beside the images
    (folder / "mine.json").write_text(json.dumps({p.name: "a big dog" for p in sorted(folder.glob("*.png"))}))
    record = library.learn([ConceptSpec(folder, "dog", captions_file=folder / "mine.json")], fast_config(steps=1),
                           progress=False)[0]
    assert record["caption_source"] == "file" and record["captions"][0] == "a big dog"
