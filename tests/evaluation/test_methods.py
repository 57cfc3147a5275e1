"""The compared methods on the dummy pipeline: the random-neuron ablation's counts, orthogonal
adaptation's down-projections, what each method stores, and how modular methods combine."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cns.evaluation.methods import ConceptTask, make_method
from cns.model import cross_attention_kv_layers

from .conftest import micro_protocol


def _tasks(dummy_concepts, tmp_path, n=3):
    empty = tmp_path / "no-class-images"
    empty.mkdir(exist_ok=True)
    tasks = []
    for j, name in enumerate(["c0", "c1", "c2"][:n]):
        c = dummy_concepts[name]
        tasks.append(ConceptTask(j, c.name, c.kind, c.class_word, f"<new{j + 1}>", c.images,
                                 f"a photo of a {c.class_word}", str(empty)))
    return tasks


PROTOCOL = dict(steps=2, num_class_images=0)


def test_random_neurons_match_cns_counts_per_layer(tmp_path, base_model, dummy_concepts):
    task = _tasks(dummy_concepts, tmp_path, 1)[0]
    masks = {}
    for key in ("cns", "cns-random"):
        method = make_method(key, tmp_path / key, str(base_model), micro_protocol(**PROTOCOL))
        method.learn(task)
        masks[key] = method.masks()[0]
    assert masks["cns"].keys() == masks["cns-random"].keys()
    for name, mask in masks["cns"].items():
        assert int(mask.sum()) == int(masks["cns-random"][name].sum()), name
        assert torch.equal(mask.sum(dim=1), masks["cns-random"][name].sum(dim=1)), name  # row by row too
    assert sum(int(m.sum()) for m in masks["cns"].values()) > 0
    assert any(not torch.equal(masks["cns"][n], masks["cns-random"][n]) for n in masks["cns"])


def test_orthogonal_down_projections_are_mutually_orthogonal(tmp_path, base_model, dummy_concepts):
    method = make_method("ortho", tmp_path / "ortho", str(base_model), micro_protocol(**PROTOCOL))
    tasks = _tasks(dummy_concepts, tmp_path)
    for task in tasks:
        method.learn(task)
    downs = [method._load(t.index)[0] for t in tasks]
    rank = method.protocol.lora_rank
    for name in downs[0]:
        for i, a_i in enumerate(downs):
            assert a_i[name].shape[0] == rank
            assert torch.allclose(a_i[name] @ a_i[name].T, torch.eye(rank), atol=1e-5)
            for j, a_j in enumerate(downs):
                if i != j:
                    assert torch.allclose(a_i[name] @ a_j[name].T, torch.zeros(rank, rank), atol=1e-5), (name, i, j)
    # the down-projections stayed fixed: only B was trained
    for i, a in enumerate(downs):
        for name in a:
            assert torch.equal(a[name], method.down_projection(name, a[name].shape[1], i))
    # combining is a plain sum of the deltas on W_0
    pipe, combine = method.build(tasks)
    from cns.library import load_base_pipeline

    w0 = {n: l.weight.detach().clone() for n, l in cross_attention_kv_layers(load_base_pipeline(str(base_model)).unet).items()}
    total = {n: sum(method.deltas(t.index)[n] for t in tasks) for n in w0}
    assert any(float(t.abs().max()) > 0 for t in total.values())
    for n, layer in cross_attention_kv_layers(pipe.unet).items():
        assert torch.allclose(layer.weight, w0[n] + total[n], atol=1e-6)
    assert combine["combine_bytes"] == sum(w.numel() * 4 for w in w0.values())


@pytest.mark.parametrize("key", ["ti", "c-lora", "ortho", "mix-of-show"])
def test_stored_bytes_are_what_is_on_disk(tmp_path, base_model, dummy_concepts, key):
    method = make_method(key, tmp_path / key, str(base_model), micro_protocol(**PROTOCOL))
    tasks = _tasks(dummy_concepts, tmp_path, 2)
    from cns.library import load_base_pipeline

    pipe_probe = load_base_pipeline(str(base_model))
    for task in tasks:
        record = method.learn(task)
        path = method._state(task.index)
        tensors = load_file(path)
        assert record["stored_bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert record["file_bytes"] == path.stat().st_size
        assert 0 <= path.stat().st_size - record["stored_bytes"] < 16_384  # the safetensors header only
        assert f"embedding/{task.token}" in tensors
        if key != "ti":
            layers = [k for k in tensors if k.startswith("A/")]
            assert len(layers) == len(cross_attention_kv_layers(pipe_probe.unet))  # every attn2 K and V
            rank = method.protocol.lora_rank
            assert all(tensors[k].shape[0] == rank for k in layers)
    assert method.learned() == 2
    pipe, combine = method.build(tasks)
    ids = pipe.tokenizer.convert_tokens_to_ids([t.token for t in tasks])
    assert all(i != pipe.tokenizer.unk_token_id for i in ids)
    assert 0 < combine["combine_seconds"] < 60


def test_cns_stored_bytes_are_its_task_folder(tmp_path, base_model, dummy_concepts):
    method = make_method("cns", tmp_path / "cns", str(base_model), micro_protocol(**PROTOCOL))
    record = method.learn(_tasks(dummy_concepts, tmp_path, 1)[0])
    folder = method.library_path / "tasks" / "0001"
    assert record["stored_bytes"] == sum(p.stat().st_size for p in folder.iterdir())
    assert record["neurons"] > 0


def test_clora_regularizes_overlap_with_earlier_loras(tmp_path, base_model, dummy_concepts):
    method = make_method("c-lora", tmp_path / "clora", str(base_model), micro_protocol(**PROTOCOL))
    tasks = _tasks(dummy_concepts, tmp_path, 2)
    method.learn(tasks[0])
    # the second task starts from W_1 (the merged first LoRA) and penalises overlap with it
    pipe = method.start_pipe(tasks[1])
    from cns.evaluation.methods import inject_lora

    w1 = {n: l.weight.detach().clone() for n, l in cross_attention_kv_layers(pipe.unet).items()}
    layers = inject_lora(pipe.unet, list(w1), method.protocol.lora_rank, "probe")
    loss = method.extra_loss(tasks[1], layers, "probe")
    assert float(loss().detach()) == 0.0  # B starts at zero: no delta yet
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["probe"].weight.fill_(0.1)
    assert float(loss().detach()) > 0.0
    assert method.extra_loss(tasks[0], layers, "probe") is None


def test_mix_of_show_fusion_reproduces_each_lora_on_its_features(tmp_path, base_model, dummy_concepts):
    from cns.model import encode_prompts

    method = make_method("mix-of-show", tmp_path / "mos", str(base_model), micro_protocol(**PROTOCOL))
    task = _tasks(dummy_concepts, tmp_path, 1)[0]
    method.learn(task)
    pipe, combine = method.build([task])
    x = torch.cat(encode_prompts(pipe.tokenizer, pipe.text_encoder, method.record(0)["instance_prompts"]))
    from cns.library import load_base_pipeline

    base = cross_attention_kv_layers(load_base_pipeline(str(base_model)).unet)
    for name, layer in cross_attention_kv_layers(pipe.unet).items():
        w0 = base[name].weight.detach()
        w1 = w0 + method.deltas(0)[name]
        error = (x @ (layer.weight - w1).T).norm()
        change = (x @ (w0 - w1).T).norm()
        assert error <= 0.05 * change + 1e-6, name
    assert combine["combine_bytes"] > 0


def _unet_inputs_while_learning(method, task) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(noisy latents, timesteps) of every UNet call while ``method`` learns ``task``: every
    pipeline the method loads is watched."""
    import cns.library

    seen, original = [], cns.library.load_base_pipeline

    def watched(*args, **kwargs):
        pipe = original(*args, **kwargs)
        pipe.unet.register_forward_pre_hook(lambda module, a: seen.append((a[0].detach().clone(), a[1].detach().clone())))
        return pipe

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cns.library, "load_base_pipeline", watched)
        method.learn(task)
    return seen


@pytest.mark.parametrize("peer", ["ti", "c-lora", "mix-of-show"])
def test_every_method_trains_on_the_same_batches_noise_and_timesteps(tmp_path, base_model, dummy_concepts, peer):
    """One sampler for all: CNS (through the library) and each peer see, step by step, the same
    images, noise and timesteps for one seed; another seed draws others."""
    task = _tasks(dummy_concepts, tmp_path, 1)[0]
    settings = dict(steps=4, num_class_images=0, batch_size=2)
    cns_steps = _unet_inputs_while_learning(make_method("cns", tmp_path / "cns", str(base_model),
                                                        micro_protocol(**settings)), task)
    peer_steps = _unet_inputs_while_learning(make_method(peer, tmp_path / peer, str(base_model),
                                                         micro_protocol(**settings)), task)
    assert len(cns_steps) == len(peer_steps) == 4  # one UNet call per step, no class images drawn
    for (noisy_a, t_a), (noisy_b, t_b) in zip(cns_steps, peer_steps):
        assert torch.equal(t_a, t_b)
        assert torch.equal(noisy_a, noisy_b)
    other_seed = _unet_inputs_while_learning(make_method(peer, tmp_path / "seed1", str(base_model),
                                                         micro_protocol(**settings, seed=1)), task)
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(other_seed, cns_steps))


def test_cns_takes_the_models_settings_beyond_the_paper_and_cns_paper_does_not(tmp_path, base_model, dummy_concepts):
    import json
    import shutil

    from cns.errors import CNSError

    model = tmp_path / "model"
    shutil.copytree(base_model, model)
    (model / "cns_settings.json").write_text(json.dumps({"learn": {"lambda_generic": 2.0, "steps": 99}}))
    task = _tasks(dummy_concepts, tmp_path, 1)[0]
    default = make_method("cns", tmp_path / "cns", str(model), micro_protocol(**PROTOCOL))
    paper = make_method("cns-paper", tmp_path / "paper", str(model), micro_protocol(**PROTOCOL))
    assert default.config().lambda_generic == 2.0 and paper.config().lambda_generic == 0.0
    assert default.config().steps == paper.config().steps == PROTOCOL["steps"]  # the budget is the protocol's
    assert default.label.endswith("[lambda_generic=2.0]") and paper.label == "CNS as in the paper"
    default.learn(task)
    assert default._library().task_record(default._library().tasks[0])["config"]["lambda_generic"] == 2.0
    # the model's default changes: the folder's tasks are no longer this method's, and it says so
    (model / "cns_settings.json").write_text(json.dumps({"learn": {"lambda_generic": 5.0}}))
    with pytest.raises(CNSError, match="other settings \\(lambda_generic\\)"):
        make_method("cns", tmp_path / "cns", str(model), micro_protocol(**PROTOCOL)).learned()
