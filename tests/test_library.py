"""The library's guarantees: only the concepts' K/V elements and token rows ever change, the
state on disk is the state trained, runs are deterministic, and a library refuses the wrong base."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import cns.generate
import cns.training
from cns import CNSError, ConceptLibrary, ConceptSpec
from cns.library import load_base_pipeline
from cns.model import cross_attention_kv_layers
from cns.training import diffusion_target

from .conftest import fast_config


def _state(pipe):
    """Every tensor of the pipeline, by component and name."""
    state = {}
    for component in ("unet", "text_encoder", "vae"):
        for name, tensor in getattr(pipe, component).state_dict().items():
            state[f"{component}.{name}"] = tensor.detach().clone()
    return state


def _embedding_key(state):
    return next(k for k in state if k.endswith("token_embedding.weight"))


@pytest.mark.parametrize("tasks", [2, 3])
def test_only_concept_neurons_and_new_token_rows_change(three_concept_library, base_model, tasks):
    library_after_all, snapshots = three_concept_library
    library = ConceptLibrary(snapshots[tasks - 1])
    base = _state(load_base_pipeline(str(base_model)))
    learned = _state(library.load_pipeline())
    masks = library.concept_masks()
    assert len(masks) == tasks
    kv_names = set(cross_attention_kv_layers(load_base_pipeline(str(base_model)).unet))
    union = {n: torch.stack([m[n] for m in masks]).any(dim=0) for n in kv_names}
    changed_kv = 0
    for key, tensor in base.items():
        if key == _embedding_key(base):
            continue
        layer = key.removeprefix("unet.").removesuffix(".weight")
        if key.startswith("unet.") and layer in kv_names:
            differs = learned[key] != tensor
            assert not (differs & ~union[layer]).any(), f"{layer} changed outside the concept masks"
            changed_kv += int(differs.sum())
        else:
            assert torch.equal(learned[key], tensor), f"{key} is not bit-identical to the base model"
    assert changed_kv > 0
    embedding_key = _embedding_key(base)
    vocab = base[embedding_key].shape[0]
    assert learned[embedding_key].shape[0] == vocab + tasks
    assert torch.equal(learned[embedding_key][:vocab], base[embedding_key])


def test_earlier_concepts_are_bit_identical_after_later_tasks(three_concept_library):
    _, snapshots = three_concept_library
    states = [_state(ConceptLibrary(s).load_pipeline()) for s in snapshots]
    masks = ConceptLibrary(snapshots[2]).concept_masks()
    key = _embedding_key(states[0])
    vocab = states[0][key].shape[0] - 1
    for task in (1, 2):  # task index whose effect we follow into later tasks
        for later in range(task, 3):
            # every token learned up to `task` keeps its row, bit for bit
            assert torch.equal(states[later][key][: vocab + task], states[task - 1][key][: vocab + task])
    # W_3 differs from W_2 only inside M_3; and W_2 from W_1 only inside M_2
    for before, after, mask in [(states[0], states[1], masks[1]), (states[1], states[2], masks[2])]:
        for name in mask:
            differs = after[f"unet.{name}.weight"] != before[f"unet.{name}.weight"]
            assert not (differs & ~mask[name]).any()


def test_state_on_disk_is_the_state_trained(empty_library, concept_folders, monkeypatch):
    trained = {}
    original = cns.training.train_task

    def capture(pipe, *args, **kwargs):
        result = original(pipe, *args, **kwargs)
        trained.update(_state(pipe))
        return result

    monkeypatch.setattr(cns.training, "train_task", capture)
    empty_library.learn([ConceptSpec(concept_folders[0], "dog")], fast_config(), progress=False)
    reloaded = _state(ConceptLibrary(empty_library.path).load_pipeline())
    assert trained.keys() == reloaded.keys()
    for key in trained:
        assert torch.equal(trained[key], reloaded[key]), key


def test_same_inputs_and_seed_give_identical_libraries(tmp_path, base_model, concept_folders):
    paths = []
    for run in ("a", "b"):
        library = ConceptLibrary.create(tmp_path / run, str(base_model))
        library.learn([ConceptSpec(concept_folders[0], "dog")], fast_config(seed=5), progress=False)
        paths.append(library.path / "tasks" / "0001")
    for name in ("masks.safetensors", "values.safetensors", "embeddings.safetensors"):
        a, b = load_file(paths[0] / name), load_file(paths[1] / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    other = ConceptLibrary.create(tmp_path / "c", str(base_model))
    other.learn([ConceptSpec(concept_folders[0], "dog")], fast_config(seed=6), progress=False)
    values = load_file(other.path / "tasks" / "0001" / "values.safetensors")
    reference = load_file(paths[0] / "values.safetensors")
    assert any(not torch.equal(values[k], reference[k]) for k in values)


def test_each_task_records_its_images_captions_selection_and_settings(three_concept_library):
    library, _ = three_concept_library
    assert library.tokens == ["<new1>", "<new2>", "<new3>"]
    concept = library.concepts[1]
    assert concept["class_word"] == "hat"
    assert len(concept["images"]) == 3 and all(len(i["sha256"]) == 64 for i in concept["images"])
    assert concept["captions"] == ["a photo of a hat"] * 3
    assert concept["neurons"] > 0
    report = concept["selection"]
    assert 0 < report["density"]["concept"] <= report["density"]["base"] <= 1
    assert report["counts"]["concept"] == concept["neurons"]
    record = json.loads((library.path / "tasks" / "0002" / "task.json").read_text())
    assert record["config"]["steps"] == 6 and record["training"]["seconds"] > 0
    summary = library.summary()
    assert [c["token"] for c in summary["concepts"]] == library.tokens
    assert summary["concepts"][0]["overlap_with_earlier"] == 0
    assert 0 < summary["kv_untouched_fraction"] < 1
    manifest = json.loads((library.path / "library.json").read_text())
    assert manifest["format_version"] == 1 and len(manifest["base_model"]["fingerprint"]) == 64


def test_a_different_base_model_is_refused(tmp_path, base_model, concept_folders):
    model = tmp_path / "model"
    shutil.copytree(base_model, model)
    library = ConceptLibrary.create(tmp_path / "lib", str(model))
    weights_file = next((model / "unet").glob("*.safetensors"))
    weights = load_file(weights_file)
    key = next(k for k in weights if k.endswith("attn2.to_k.weight"))
    weights[key] = weights[key] + 1e-3
    save_file(weights, weights_file)
    with pytest.raises(CNSError, match="not the model"):
        library.load_pipeline()


def test_orphans_of_a_crashed_writer_are_removed_by_their_marker_only(three_concept_library, concept_folders):
    from cns.storage import make_owned_dir

    library, _ = three_concept_library
    # what a killed learn leaves: a staging folder and an unreferenced task folder, both marked
    make_owned_dir(library.path / ".staging-deadbeef", "learn")
    (library.path / ".staging-deadbeef" / "values.safetensors").write_bytes(b"partial")
    make_owned_dir(library.path / "tasks" / "0004", "task")
    (library.path / "tasks" / "0004" / "task.json").write_text("{}")
    (library.path / ".staging-0").mkdir()  # killed before its marker was written: empty
    # the user's folders, with names like cns's: never touched
    (library.path / ".staging-mine").mkdir()
    (library.path / ".staging-mine" / "notes.txt").write_text("mine")
    (library.path / "tasks" / "backup-0001").mkdir()
    (library.path / "tasks" / "backup-0001" / "values.safetensors").write_bytes(b"my backup")
    records = library.learn([ConceptSpec(concept_folders[0], "bird")], fast_config(), progress=False)
    assert records[0]["token"] == "<new4>"
    assert sorted(p.name for p in library.path.glob(".staging-*")) == [".staging-mine"]
    assert (library.path / ".staging-mine" / "notes.txt").read_text() == "mine"
    assert (library.path / "tasks" / "backup-0001" / "values.safetensors").read_bytes() == b"my backup"
    assert json.loads((library.path / "tasks" / "0004" / "task.json").read_text())["concepts"][0]["token"] == "<new4>"
    assert library.verify() == []


def test_a_task_folder_name_taken_by_the_user_is_never_replaced(three_concept_library, concept_folders):
    library, _ = three_concept_library
    (library.path / "tasks" / "0004").mkdir()
    (library.path / "tasks" / "0004" / "task.json").write_text('{"mine": true}')
    library.learn([ConceptSpec(concept_folders[0], "bird")], fast_config(), progress=False)
    assert (library.path / "tasks" / "0004" / "task.json").read_text() == '{"mine": true}'
    assert library.tasks[-1]["dir"] == "tasks/0004-2"
    assert library.verify() == [] and library.tokens[-1] == "<new4>"


def test_prior_images_are_generated_once_and_cached(empty_library, concept_folders):
    empty_library.learn([ConceptSpec(concept_folders[0], "dog")], fast_config(num_class_images=3), progress=False)
    folder = empty_library.path / "class_images" / "photo-of-a-dog"
    files = sorted(p.name for p in folder.glob("*.png"))
    assert files == ["0000.png", "0001.png", "0002.png"]
    stamps = {f: (folder / f).stat().st_mtime_ns for f in files}
    empty_library.learn([ConceptSpec(concept_folders[1], "dog")], fast_config(num_class_images=2), progress=False)
    assert {f: (folder / f).stat().st_mtime_ns for f in files} == stamps


def test_prior_images_are_drawn_on_the_learning_device_then_the_pipeline_comes_back(empty_library, concept_folders,
                                                                                    monkeypatch):
    # the device is faked (no GPU here): the pipeline's moves are recorded, not made
    from diffusers import StableDiffusionPipeline

    import cns.library

    moves = []
    monkeypatch.setattr(cns.library, "resolve_device", lambda device: torch.device("cuda:3"))
    monkeypatch.setattr(StableDiffusionPipeline, "to", lambda self, device: moves.append(str(device)) or self)
    drawn_between = []
    real_generate = cns.generate.generate_images
    monkeypatch.setattr(cns.generate, "generate_images",
                        lambda *a, **k: drawn_between.append(list(moves)) or real_generate(*a, **k))
    empty_library.learn([ConceptSpec(concept_folders[0], "dog")], fast_config(num_class_images=2), progress=False)
    assert drawn_between == [["cuda:3"], ["cuda:3"]]  # each class image after the move to the device
    assert moves == ["cuda:3", "cpu"]  # and back where the pipeline was, before training


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_diffusion_target_follows_prediction_type(kind):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(prediction_type=kind)
    latents, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    t = torch.tensor([10, 500])
    target = diffusion_target(scheduler, latents, noise, t)
    expected = {"epsilon": noise, "sample": latents, "v_prediction": scheduler.get_velocity(latents, noise, t)}[kind]
    assert torch.equal(target, expected)


@pytest.mark.parametrize("neurons", ["random", "all"])
def test_ablation_neuron_sets(empty_library, concept_folders, neurons):
    import warnings

    from cns.library import EARLIER_DRIFT_WARNING

    empty_library.learn([ConceptSpec(concept_folders[0], "dog")], fast_config(), progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = empty_library.learn([ConceptSpec(concept_folders[1], "hat")], fast_config(neurons=neurons),
                                      progress=False)
    moved = empty_library.task_record(empty_library.tasks[-1])["drift"]["earlier_tokens"]["total"]
    warned = [str(w.message) for w in caught if "moved the keys and values of earlier" in str(w.message)]
    assert bool(warned) == (moved > EARLIER_DRIFT_WARNING)  # the warning says when earlier tokens moved far, only then
    if neurons == "all":
        assert warned  # every K/V weight trained at lr 1e-2: the dog's keys and values move far
    masks = empty_library.concept_masks()
    selected = records[0]["selection"]["counts"]["concept"]
    if neurons == "all":
        assert all(m.all() for m in masks[1].values())
    else:
        assert records[0]["neurons"] == selected  # same count as CNS would select


def test_an_empty_concept_mask_is_explained_and_leaves_the_library_as_it_was(empty_library, concept_folders):
    before = sorted(p.relative_to(empty_library.path) for p in empty_library.path.rglob("*") if p.name != ".lock")
    # calibration prompts equal to the captions: every base neuron is general, none is left
    with pytest.raises(CNSError, match=r"no concept neurons for <new1>.*general.*select-ratio"):
        empty_library.learn([ConceptSpec(concept_folders[0], "dog")], fast_config(),
                            calibration_prompts=["a photo of a dog"], progress=False)
    after = sorted(p.relative_to(empty_library.path) for p in empty_library.path.rglob("*") if p.name != ".lock")
    assert after == before  # no task, and no class images generated for a refused task


def _token_kv(library, tokens: list[str]):
    """Keys and values of learned tokens' states in their own training prompts, every layer."""
    from cns.model import cross_attention_kv_layers, encode_token_states

    pipe = library.load_pipeline()
    pairs = [(c["token"], q) for c in library.concepts if c["token"] in tokens for q in c["instance_prompts"]]
    states = encode_token_states(pipe.tokenizer, pipe.text_encoder, pairs)
    assert len(states) == len(pairs)  # one state per prompt: the token's position
    with torch.no_grad():
        return {n: layer(states) for n, layer in cross_attention_kv_layers(pipe.unet).items()}


def _relative_change_of_differences(before: dict, after: dict) -> float:
    """Relative squared change of the outputs centred on their mean (how the tokens' keys and
    values differ from one another: what L_keep holds)."""
    def centred(x):
        return x - x.mean(dim=0, keepdim=True)

    return sum(float((centred(after[n]) - centred(before[n])).pow(2).sum()) for n in before) / sum(
        float(centred(before[n]).pow(2).sum()) for n in before)


def test_lambda_keep_holds_the_keys_and_values_of_earlier_tokens(tmp_path, base_model, concept_folders):
    # 20 steps: L_keep's gradient is 0 at the task's first step (a quadratic at dW = 0), so it
    # needs a few steps to pull back what that step moved
    drift = {}
    for lambda_keep in (0.0, 1e4):
        library = ConceptLibrary.create(tmp_path / f"lib{lambda_keep}", str(base_model))
        for folder, word in zip(concept_folders[:2], ["dog", "hat"]):
            library.learn([ConceptSpec(folder, word)], fast_config(), progress=False)
        before = _token_kv(library, ["<new1>", "<new2>"])
        library.learn([ConceptSpec(concept_folders[2], "cat")], fast_config(lambda_keep=lambda_keep, steps=20),
                      progress=False)
        drift[lambda_keep] = _relative_change_of_differences(before, _token_kv(library, ["<new1>", "<new2>"]))
        assert library.task_record(library.tasks[-1])["config"]["lambda_keep"] == lambda_keep
    assert drift[0.0] > 0
    assert drift[1e4] < 0.1 * drift[0.0]


def test_lambda_generic_holds_the_keys_and_values_of_generic_prompts(tmp_path, base_model, concept_folders):
    """L_generic, trained on the library's calibration prompts, holds the keys and values of
    generic prompts it never saw (held out), every position."""
    from cns.model import cross_attention_kv_layers, encode_prompts

    held_out = ["a red car in the city", "a blue house on the beach", "a green dog"]

    def generic_kv(library):
        pipe = library.load_pipeline()
        states = torch.cat(encode_prompts(pipe.tokenizer, pipe.text_encoder, held_out))
        with torch.no_grad():
            return {n: layer(states) for n, layer in cross_attention_kv_layers(pipe.unet).items()}

    change = {}
    for lambda_generic in (0.0, 1e4):
        library = ConceptLibrary.create(tmp_path / f"lib{lambda_generic}", str(base_model))
        before = generic_kv(library)
        library.learn([ConceptSpec(concept_folders[0], "dog")], fast_config(lambda_generic=lambda_generic, steps=20),
                      progress=False)
        after = generic_kv(library)
        change[lambda_generic] = sum(float((after[n] - before[n]).pow(2).sum()) for n in before) / sum(
            float(before[n].pow(2).sum()) for n in before)
        assert library.task_record(library.tasks[-1])["config"]["lambda_generic"] == lambda_generic
        assert library.task_record(library.tasks[-1])["concepts"][0]["neurons"] > 0
    assert change[0.0] > 0
    assert change[1e4] < 0.1 * change[0.0]


@pytest.mark.parametrize("generic_padding", [True, False])
def test_l_generic_anchors_are_the_calibration_prompts_with_or_without_padding(tmp_path, base_model, concept_folders,
                                                                            generic_padding, monkeypatch):
    import cns.training
    from cns.model import pipeline_tokens

    seen = {}
    original = cns.training.train_task

    def spy(*args, **kwargs):
        seen["states"] = kwargs["generic_states"]
        return original(*args, **kwargs)

    monkeypatch.setattr(cns.training, "train_task", spy)
    prompts = ["a red car", "a photo of a blue house on the beach"]
    library = ConceptLibrary.create(tmp_path / "lib", str(base_model), calibration_prompts=prompts)
    library.learn([ConceptSpec(concept_folders[0], "dog")],
                  fast_config(lambda_generic=1.0, generic_padding=generic_padding), progress=False)
    pipe = library.load_pipeline(apply=False)
    tokens = pipeline_tokens(pipe.tokenizer, prompts)
    expected = tokens.input_ids.numel() if generic_padding else int(tokens.attention_mask.sum())
    assert seen["states"].shape == (expected, pipe.text_encoder.config.hidden_size)
    if not generic_padding:
        assert expected < tokens.input_ids.numel()  # the prompts are padded: dropping the padding drops states


def test_class_word_states_put_the_class_word_where_the_token_stood(base_model):
    from cns.library import load_base_pipeline
    from cns.model import class_word_states, encode_prompts, pipeline_tokens
    from cns.tokens import add_tokens

    pipe = load_base_pipeline(str(base_model))
    [token_id] = add_tokens(pipe.tokenizer, pipe.text_encoder, ["<new1>"])
    states = class_word_states(pipe.tokenizer, pipe.text_encoder, ["a photo of a <new1> dog"], [token_id])
    plain = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a photo of a dog"])[0]
    position = int((pipeline_tokens(pipe.tokenizer, ["a photo of a <new1> dog"]).input_ids[0] == token_id)
                   .nonzero()[0])
    assert torch.allclose(states[0, position], plain[position], atol=1e-6)  # "dog" in the prompt without the token


def test_lambda_lock_holds_the_new_tokens_keys_at_its_class_words(tmp_path, base_model, concept_folders):
    """After training, the token's keys in its prompts are near what the base model gives its
    class word there (L_lock), far nearer than without it."""
    from cns.library import load_base_pipeline
    from cns.model import class_word_states, cross_attention_kv_layers, pipeline_tokens
    from cns.tokens import add_tokens

    base = load_base_pipeline(str(base_model))
    [base_id] = add_tokens(base.tokenizer, base.text_encoder, ["<new1>"])
    base_keys = {n: layer for n, layer in cross_attention_kv_layers(base.unet).items() if n.endswith("to_k")}
    gap = {}
    for lambda_lock in (0.0, 1e3):
        library = ConceptLibrary.create(tmp_path / f"lib{lambda_lock}", str(base_model))
        library.learn([ConceptSpec(concept_folders[0], "dog")], fast_config(lambda_lock=lambda_lock, steps=20),
                      progress=False)
        assert library.task_record(library.tasks[0])["config"]["lambda_lock"] == lambda_lock
        pipe = library.load_pipeline()
        prompts = library.concepts[0]["instance_prompts"]
        ids = pipeline_tokens(pipe.tokenizer, prompts).input_ids
        where = ids == pipe.tokenizer.convert_tokens_to_ids("<new1>")
        with torch.no_grad():
            token_states = pipe.text_encoder(ids)[0][where]
            class_states = class_word_states(base.tokenizer, base.text_encoder, prompts, [base_id])[where]
            keys = {n: layer for n, layer in cross_attention_kv_layers(pipe.unet).items() if n.endswith("to_k")}
            gap[lambda_lock] = sum(float((keys[n](token_states) - base_keys[n](class_states)).pow(2).sum())
                                   for n in keys) / sum(float(base_keys[n](class_states).pow(2).sum()) for n in keys)
    assert gap[1e3] < 0.5 * gap[0.0]


def test_lambda_refit_holds_generic_prompts_and_keeps_the_concepts_own_change(tmp_path, base_model, concept_folders):
    """The closed-form refit (cns.refit) after the same training: held-out generic prompts' K/V
    move far less, the concept's token keeps much of its K/V change, and only masked elements
    differ from the base model."""
    from cns.library import load_base_pipeline
    from cns.model import cross_attention_kv_layers, encode_prompts, pipeline_tokens

    held_out = ["a red car in the city", "a blue house on the beach", "a green dog"]
    base = load_base_pipeline(str(base_model))
    base_layers = cross_attention_kv_layers(base.unet)
    with torch.no_grad():
        generic = torch.cat(encode_prompts(base.tokenizer, base.text_encoder, held_out))
    moved, token_moved = {}, {}
    for weight in (0.0, 1.0):
        library = ConceptLibrary.create(tmp_path / f"lib{weight}", str(base_model))
        library.learn([ConceptSpec(concept_folders[0], "dog")], fast_config(lambda_refit=weight, steps=20),
                      progress=False)
        assert library.task_record(library.tasks[-1])["config"]["lambda_refit"] == weight
        pipe = library.load_pipeline()
        layers = cross_attention_kv_layers(pipe.unet)
        [mask] = library.concept_masks()
        for n, layer in layers.items():
            changed = layer.weight != base_layers[n].weight
            assert not (changed & ~mask[n].to(changed.device)).any(), n  # nothing off the mask
        ids = pipeline_tokens(pipe.tokenizer, library.concepts[0]["instance_prompts"]).input_ids
        with torch.no_grad():
            token_states = pipe.text_encoder(ids)[0][ids == pipe.tokenizer.convert_tokens_to_ids("<new1>")]
            moved[weight] = sum(float((layers[n](generic) - base_layers[n](generic)).pow(2).sum()) for n in layers)
            token_moved[weight] = sum(float((layers[n](token_states) - base_layers[n](token_states)).pow(2).sum())
                                      for n in layers)
    assert moved[1.0] < 0.3 * moved[0.0]  # measured: 0.21
    assert token_moved[1.0] > 0.4 * token_moved[0.0]  # measured: 0.62
