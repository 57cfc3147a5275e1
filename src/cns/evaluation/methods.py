"""The methods compared by the evaluation, behind one interface.

Every method learns the concepts of a continual set one task at a time, on the same backbone,
with the same step budget, the same instance and prior-preservation images and the same seeds;
its state after task j is kept on disk under its own folder (so a run can resume), and
``build(tasks)`` returns a pipeline that can draw any mix of the learned tokens, with what
combining the concepts cost (seconds and extra bytes held while combining).

Methods (``METHODS``):

- ``cns``: Concept Neuron Selection as ``cns learn`` runs it by default, through
  :class:`cns.ConceptLibrary`: the paper's method with the model's recommended settings beyond
  the paper (``BEYOND_PAPER``, from its ``cns_settings.json``).
- ``cns-paper``: the paper's CNS (Eq. 7-8 only); the ablations below are of this one.
- ``cns-random``: ablation, random neurons (same count per row, hence per layer, as CNS).
- ``cns-noreg``: ablation, CNS without L_reg.
- ``cns-keep``: CNS with L_keep (beyond the paper, ``LearnConfig.lambda_keep``), which holds the
  keys and values of earlier concepts' tokens.
- ``kv-all``: every K/V weight + the token, no L_reg: the paper's "all K/V" curve, i.e. Custom
  Diffusion learned sequentially.
- ``ti``: Textual Inversion (the token embedding only).
- ``c-lora``: C-LoRA / Continual Diffusion: a new LoRA on K/V per task on top of the merged
  model so far, with the self-regularisation ``lambda * ||(sum of earlier deltas) * delta||^2``.
- ``ortho``: Orthogonal Adaptation: per concept a LoRA ``dW = B A`` whose down-projection A is
  a fixed slice of a random orthogonal basis (disjoint slices: mutually orthogonal across
  concepts); only B is trained, from W_0; concepts are combined by summing the deltas.
- ``mix-of-show``: a plain LoRA per concept from W_0, combined by Mix-of-Show's gradient fusion,
  solved exactly per K/V layer (its inputs are text features, so the fusion is linear least
  squares: ``W = argmin sum_i ||X_i (W - W_i)^T||^2`` on each concept's prompt features,
  with a small ridge towards W_0). ED-LoRA's layer-wise embeddings are not reproduced.

LoRA layers come from peft (``LoraConfig(target_modules=[...attn2.to_k/to_v])``).
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from ..model import cross_attention_kv_layers
from ..model_settings import BEYOND_PAPER
from ..storage import write_json_atomic
from ..training import Example

__all__ = ["ConceptTask", "Method", "METHODS", "METHOD_LABELS", "make_method", "parse_variant",
           "orthogonal_basis", "train_generic"]


@dataclass
class ConceptTask:
    """One task of a continual set: a concept, its token and where its images live."""

    index: int  # 0-based position in the set
    name: str
    kind: str
    class_word: str
    token: str
    folder: str  # instance images (+ optional captions.json)
    class_prompt: str
    class_folder: str  # prior-preservation images drawn by the base model

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------


def _load_pipe(model: str, device: Optional[str]):
    from ..library import load_base_pipeline

    pipe = load_base_pipeline(model)
    if device:
        pipe.to(device)
    return pipe


def _resolution(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def instance_prompts(task: ConceptTask, n_images: int, names: Sequence[str]) -> list[str]:
    """Training prompts: the folder's captions with the token inserted (as the library does),
    else ``photo of a {token} {class_word}``."""
    from ..captions import captions_for_images, insert_token

    captions_file = Path(task.folder) / "captions.json"
    if captions_file.is_file():
        captions = captions_for_images(list(names), task.class_word, captions_file)
        return [insert_token(c, task.token, task.class_word) for c in captions]
    return [f"photo of a {task.token} {task.class_word}"] * n_images


def task_examples(task: ConceptTask, resolution: int, num_class_images: int):
    """(instance examples, prior examples) of a task, as every method trains on them."""
    from ..images import image_tensor, load_image_folder

    images = load_image_folder(task.folder)
    prompts = instance_prompts(task, len(images), [im.path.name for im in images])
    instance = [Example(image_tensor(im.image, resolution), p) for im, p in zip(images, prompts)]
    prior = []
    if num_class_images > 0:
        for im in load_image_folder(task.class_folder)[:num_class_images]:
            prior.append(Example(image_tensor(im.image, resolution), task.class_prompt))
    return instance, prior


def add_concept_tokens(pipe, tasks: Sequence[ConceptTask], embeddings: Optional[dict] = None) -> list[int]:
    """Add the tasks' tokens; rows from ``embeddings`` (token -> row) or from the class word."""
    from ..tokens import add_tokens, class_word_embedding

    tokens = [t.token for t in tasks]
    ids = add_tokens(pipe.tokenizer, pipe.text_encoder, tokens)
    table = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for task, row in zip(tasks, ids):
            if embeddings is not None and task.token in embeddings:
                table[row] = embeddings[task.token].to(table.dtype)
            else:
                table[row] = class_word_embedding(pipe.tokenizer, table, task.class_word).to(table.dtype)
    return ids


def train_generic(
    pipe,
    instance: Sequence[Example],
    prior: Sequence[Example],
    token_ids: Sequence[int],
    params: Sequence[torch.nn.Parameter],
    lr: float,
    lr_embedding: float,
    steps: int,
    batch_size: int,
    seed: int,
    prior_loss_weight: float = 1.0,
    extra_loss: Optional[Callable[[], Optional[torch.Tensor]]] = None,
) -> dict:
    """Eq. 8 (diffusion loss + prior preservation) on ``params`` and the embedding rows of
    ``token_ids``, with an optional extra loss; everything else frozen. The batches, noise and
    timesteps are :class:`cns.training.DenoisingStream`'s: for one seed, the same as every
    other method's, CNS's included."""
    from ..sparse import RowDeltaEmbedding
    from ..training import DenoisingStream

    unet, text_encoder = pipe.unet, pipe.text_encoder
    device = unet.device
    for module in (text_encoder, pipe.vae):
        module.requires_grad_(False)
    trainable = {id(p) for p in params}
    for p in unet.parameters():
        p.requires_grad_(id(p) in trainable)
    started = time.perf_counter()
    stream = DenoisingStream(pipe, instance, prior, batch_size, seed, prior_loss_weight, device)
    embedding = RowDeltaEmbedding(text_encoder.get_input_embeddings(), list(token_ids)) if token_ids else None
    if embedding is not None:
        text_encoder.set_input_embeddings(embedding)
    groups = [{"params": list(params), "lr": lr}] if params else []
    if embedding is not None:
        groups.append({"params": [embedding.trainable_rows], "lr": lr_embedding})
    losses: list[float] = []
    try:
        optimizer = torch.optim.Adam(groups, weight_decay=0.0) if groups else None
        for step in range(steps if optimizer else 0):
            loss = stream.loss(unet, text_encoder, stream.batch(step), device)
            if extra_loss is not None:
                extra = extra_loss()
                if extra is not None:
                    loss = loss + extra
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        if embedding is not None:
            text_encoder.set_input_embeddings(embedding.merge())
        for p in unet.parameters():
            p.requires_grad_(False)
    return {"losses": losses, "seconds": time.perf_counter() - started}


def _file_bytes(paths: Sequence[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def _payload_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ---------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------


class Method:
    """A personalization method under evaluation; its state lives in ``root``."""

    key = "method"
    label = "method"
    continual = True  # False: one module per concept, combined at inference

    def __init__(self, root: str | Path, model: str, protocol, device: Optional[str] = None,
                 calibration_prompts: Optional[Sequence[str]] = None):
        self.root = Path(root)
        self.model = model
        self.protocol = protocol
        self.device = device
        self.calibration_prompts = list(calibration_prompts) if calibration_prompts else None
        self.root.mkdir(parents=True, exist_ok=True)

    # --- bookkeeping of finished tasks (resume) ---
    def _record_path(self, index: int) -> Path:
        return self.root / f"task_{index + 1:04d}.json"

    def learned(self) -> int:
        """How many tasks are finished on disk (in order)."""
        n = 0
        while self._record_path(n).is_file():
            n += 1
        return n

    def record(self, index: int) -> dict:
        return json.loads(self._record_path(index).read_text())

    def learn(self, task: ConceptTask) -> dict:
        """Learn ``task`` into the method's state (task ``task.index`` must be the next one);
        returns and saves its record: token, training seconds, bytes stored."""
        if task.index != self.learned():
            raise ValueError(f"{self.key}: task {task.index + 1} is not the next one ({self.learned() + 1})")
        record = self._learn(task)
        record.update({"task": task.index + 1, "concept": task.name, "token": task.token})
        write_json_atomic(self._record_path(task.index), record)
        return record

    def _learn(self, task: ConceptTask) -> dict:
        raise NotImplementedError

    def build(self, tasks: Sequence[ConceptTask]):
        """(pipeline with the tokens of ``tasks`` usable, {'combine_seconds', 'combine_bytes'}):
        the state after the last of ``tasks``."""
        raise NotImplementedError


# ---------------------------------------------------------------------------
# CNS and its ablations (through the concept library)
# ---------------------------------------------------------------------------


# The ``cns`` method (what `cns learn` does by default) takes the settings beyond the paper
# (``BEYOND_PAPER``) from the model's cns_settings.json; ``cns-paper`` and the paper's ablations
# leave them off.


class CNSMethod(Method):
    key, label = "cns", "CNS (cns's default)"
    neurons = "concept"
    regularize = True
    lambda_keep = 0.0
    model_defaults = True  # take the model's recommended settings beyond the paper
    overrides: dict = {}  # LearnConfig settings of a variant (``cns:lambda_generic=100``)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the model's recommended settings beyond the paper (none for cns-paper and the ablations)
        self.beyond_paper = {}
        if self.model_defaults:
            from ..model_settings import read_model_settings

            learn = read_model_settings(self.model).get("learn", {})
            self.beyond_paper = {k: learn[k] for k in BEYOND_PAPER if k in learn}
        self._name_settings()

    def _name_settings(self) -> None:
        """The label names the settings beyond the class's own: the model's, then a variant's."""
        settings = {**self.beyond_paper, **self.overrides}
        if settings:
            self.label = f"{type(self).label} [" + ", ".join(f"{k}={v}" for k, v in settings.items()) + "]"

    @property
    def library_path(self) -> Path:
        return self.root / "library"

    def _library(self):
        from ..library import ConceptLibrary

        if (self.library_path / "library.json").is_file():
            return ConceptLibrary(self.library_path)
        return ConceptLibrary.create(self.library_path, self.model, calibration_prompts=self.calibration_prompts)

    def config(self):
        from ..config import LearnConfig

        p = self.protocol
        settings = dict(steps=p.steps, batch_size=p.batch_size, lr_neurons=p.lr_neurons,
                        lr_embedding=p.lr_embedding, select_ratio=p.select_ratio, num_class_images=p.num_class_images,
                        prior_loss_weight=p.prior_loss_weight, seed=p.seed, neurons=self.neurons,
                        regularize=self.regularize, lambda_keep=self.lambda_keep, device=self.device)
        return LearnConfig(**{**settings, **self.beyond_paper, **self.overrides})

    def _check_settings(self, library) -> None:
        """A library made with other training settings (a changed model default, say) is refused:
        its tasks would not be this method's."""
        if not library.tasks:
            return
        from ..errors import CNSError

        recorded = library.task_record(library.tasks[0])["config"]
        wanted = {k: v for k, v in self.config().to_dict().items() if k not in ("device", "checkpoint_every")}
        differ = sorted(k for k, v in wanted.items() if k in recorded and recorded[k] != v)
        if differ:
            raise CNSError(f"{self.root} was trained with other settings ({', '.join(differ)}); use a new --out folder")

    def learned(self) -> int:
        # the library commits a task atomically; a record may be missing after a crash in between
        n = super().learned()
        if (self.library_path / "library.json").is_file():
            library = self._library()
            self._check_settings(library)
            tasks = library.tasks
            if len(tasks) > n:
                for k in range(n, len(tasks)):
                    write_json_atomic(self._record_path(k), self._library_record(k))
                n = len(tasks)
        return n

    def _library_record(self, k: int) -> dict:
        library = self._library()
        task = library.tasks[k]
        folder = library.path / task["dir"]
        record = library.task_record(task)
        concept = record["concepts"][0]
        return {"task": k + 1, "token": concept["token"], "train_seconds": record["training"]["seconds"],
                "stored_bytes": _file_bytes(list(folder.iterdir())), "neurons": concept["neurons"],
                "density": concept["density"], "loss_last": record["training"]["loss_last"]}

    def _learn(self, task: ConceptTask) -> dict:
        from ..library import ConceptSpec

        library = self._library()
        captions = Path(task.folder) / "captions.json"
        spec = ConceptSpec(task.folder, task.class_word, token=task.token,
                           captions_file=captions if captions.is_file() else None,
                           class_prompt=task.class_prompt, class_data_dir=task.class_folder)
        started = time.perf_counter()
        library.learn([spec], self.config(), progress=False)
        record = self._library_record(len(library.tasks) - 1)
        record["wall_seconds"] = time.perf_counter() - started
        return record

    def masks(self) -> list[dict[str, torch.Tensor]]:
        return self._library().concept_masks()

    def build(self, tasks):
        library = self._library()
        if len(library.tasks) < len(tasks):
            raise ValueError(f"{self.key}: the library holds {len(library.tasks)} tasks, asked for {len(tasks)}")
        pipe = library.load_pipeline(apply=False)
        started = time.perf_counter()
        if len(library.tasks) == len(tasks):
            library.apply(pipe)  # writes the stored values in place: nothing to fuse
        else:
            apply_first_tasks(library, pipe, len(tasks))  # W_j of an earlier task (a resumed run)
        seconds = time.perf_counter() - started
        if self.device:
            pipe.to(self.device)
        return pipe, {"combine_seconds": seconds, "combine_bytes": 0}


def apply_first_tasks(library, pipe, count: int) -> None:
    """``library.apply`` restricted to its first ``count`` tasks (W_count)."""
    library.apply(pipe, library.tasks[:count])


class PaperCNSMethod(CNSMethod):
    key, label = "cns-paper", "CNS as in the paper"
    model_defaults = False


class RandomNeuronsMethod(PaperCNSMethod):
    key, label = "cns-random", "CNS, random neurons"
    neurons = "random"


class NoRegMethod(PaperCNSMethod):
    key, label = "cns-noreg", "CNS, no L_reg"
    regularize = False


class KeepMethod(PaperCNSMethod):
    key, label = "cns-keep", "CNS + L_keep (beyond the paper)"
    lambda_keep = 10.0


class AllKVMethod(PaperCNSMethod):
    key, label = "kv-all", "all K/V + token (Custom Diffusion, sequential)"
    neurons = "all"
    regularize = False


# ---------------------------------------------------------------------------
# Textual Inversion
# ---------------------------------------------------------------------------


class TextualInversionMethod(Method):
    key, label = "ti", "Textual Inversion"

    def _state(self, index: int) -> Path:
        return self.root / f"task_{index + 1:04d}.safetensors"

    def _learn(self, task):
        p = self.protocol
        pipe = _load_pipe(self.model, self.device)
        instance, prior = task_examples(task, _resolution(pipe), p.num_class_images)
        ids = add_concept_tokens(pipe, [task])
        result = train_generic(pipe, instance, prior, ids, [], p.lr_lora, p.lr_embedding, p.steps, p.batch_size,
                               p.seed, p.prior_loss_weight)
        tensors = {f"embedding/{task.token}": pipe.text_encoder.get_input_embeddings().weight[ids[0]].detach().clone()}
        save_file(tensors, self._state(task.index))
        return {"train_seconds": result["seconds"], "stored_bytes": _payload_bytes(tensors),
                "file_bytes": self._state(task.index).stat().st_size, "loss_last": result["losses"][-1:] or None}

    def _embeddings(self, tasks) -> dict:
        rows = {}
        for t in tasks:
            for k, v in load_file(self._state(t.index)).items():
                if k.startswith("embedding/"):
                    rows[k.split("/", 1)[1]] = v
        return rows

    def build(self, tasks):
        pipe = _load_pipe(self.model, self.device)
        started = time.perf_counter()
        add_concept_tokens(pipe, tasks, self._embeddings(tasks))
        return pipe, {"combine_seconds": time.perf_counter() - started, "combine_bytes": 0}


# ---------------------------------------------------------------------------
# LoRA methods
# ---------------------------------------------------------------------------


def inject_lora(unet, names: Sequence[str], rank: int, adapter: str) -> dict:
    """peft LoRA (alpha = rank: scaling 1) on the named K/V layers; returns {name: lora layer}."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(names),
                        init_lora_weights=True, bias="none")
    inject_adapter_in_model(config, unet, adapter_name=adapter)
    return {n: unet.get_submodule(n) for n in names}


def lora_delta(layer, adapter: str) -> torch.Tensor:
    """The (differentiable) weight delta ``scaling * B @ A`` of a peft LoRA layer."""
    a = layer.lora_A[adapter].weight
    b = layer.lora_B[adapter].weight
    return layer.scaling[adapter] * (b @ a)


def orthogonal_basis(size: int, seed: int) -> torch.Tensor:
    """A random (size x size) orthogonal matrix, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.float()


class _LoRAMethod(Method):
    """A LoRA on every cross-attention K/V per concept, stored as ``A`` / ``B`` per layer plus
    the token's embedding row."""

    def _state(self, index: int) -> Path:
        return self.root / f"task_{index + 1:04d}.safetensors"

    def _load(self, index: int) -> tuple[dict, dict, dict]:
        """(A per layer, B per layer, embedding rows) of task ``index``."""
        data = load_file(self._state(index))
        a = {k[2:]: v for k, v in data.items() if k.startswith("A/")}
        b = {k[2:]: v for k, v in data.items() if k.startswith("B/")}
        e = {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith("embedding/")}
        return a, b, e

    def deltas(self, index: int) -> dict[str, torch.Tensor]:
        a, b, _ = self._load(index)
        return {n: b[n] @ a[n] for n in a}

    def start_pipe(self, task: ConceptTask):
        """The pipeline a task trains from (W_0 by default)."""
        return _load_pipe(self.model, self.device)

    def setup_lora(self, task, layers: dict, adapter: str) -> list[torch.nn.Parameter]:
        """Trainable parameters of the new LoRA (both A and B by default)."""
        params = []
        for layer in layers.values():
            params += [layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
        return params

    def extra_loss(self, task, layers: dict, adapter: str):
        return None

    def _learn(self, task):
        p = self.protocol
        pipe = self.start_pipe(task)
        names = list(cross_attention_kv_layers(pipe.unet))
        instance, prior = task_examples(task, _resolution(pipe), p.num_class_images)
        ids = add_concept_tokens(pipe, [task])
        adapter = f"c{task.index + 1}"
        layers = inject_lora(pipe.unet, names, p.lora_rank, adapter)
        if self.device:
            pipe.unet.to(self.device)
        params = self.setup_lora(task, layers, adapter)
        result = train_generic(pipe, instance, prior, ids, params, p.lr_lora, p.lr_embedding, p.steps,
                               p.batch_size, p.seed, p.prior_loss_weight, self.extra_loss(task, layers, adapter))
        tensors = {}
        for n, layer in layers.items():
            scale = float(layer.scaling[adapter])
            tensors[f"A/{n}"] = layer.lora_A[adapter].weight.detach().float().cpu().clone()
            tensors[f"B/{n}"] = (scale * layer.lora_B[adapter].weight.detach().float().cpu()).clone()
        tensors[f"embedding/{task.token}"] = pipe.text_encoder.get_input_embeddings().weight[ids[0]].detach().float().cpu().clone()
        save_file(tensors, self._state(task.index))
        return {"train_seconds": result["seconds"], "stored_bytes": _payload_bytes(tensors),
                "file_bytes": self._state(task.index).stat().st_size, "loss_last": result["losses"][-1:] or None,
                "instance_prompts": [e.prompt for e in instance]}

    def _embeddings(self, tasks) -> dict:
        rows = {}
        for t in tasks:
            rows.update(self._load(t.index)[2])
        return rows

    def _apply_sum(self, pipe, tasks) -> int:
        """W = W_0 + sum of the tasks' deltas; returns the extra bytes held while summing."""
        layers = cross_attention_kv_layers(pipe.unet)
        extra = 0
        with torch.no_grad():
            total = {n: torch.zeros_like(l.weight, dtype=torch.float32) for n, l in layers.items()}
            extra += sum(t.numel() * 4 for t in total.values())
            for t in tasks:
                for n, d in self.deltas(t.index).items():
                    total[n] += d
            for n, l in layers.items():
                l.weight += total[n].to(l.weight.device, l.weight.dtype)
        return extra

    def build(self, tasks):
        pipe = _load_pipe(self.model, None)
        add_concept_tokens(pipe, tasks, self._embeddings(tasks))
        started = time.perf_counter()
        extra = self._apply_sum(pipe, tasks)
        seconds = time.perf_counter() - started
        if self.device:
            pipe.to(self.device)
        return pipe, {"combine_seconds": seconds, "combine_bytes": extra}


class CLoRAMethod(_LoRAMethod):
    key, label = "c-lora", "C-LoRA (Continual Diffusion)"

    def start_pipe(self, task):
        pipe = _load_pipe(self.model, None)
        earlier = [self._task_stub(k) for k in range(task.index)]
        if earlier:
            add_concept_tokens(pipe, earlier, self._embeddings(earlier))
            self._apply_sum(pipe, earlier)
        if self.device:
            pipe.to(self.device)
        return pipe

    def _task_stub(self, index: int) -> ConceptTask:
        r = self.record(index)
        return ConceptTask(index, r["concept"], "", "", r["token"], "", "", "")

    def extra_loss(self, task, layers, adapter):
        if task.index == 0 or self.protocol.clora_lambda <= 0:
            return None
        earlier = {n: torch.zeros_like(l.get_base_layer().weight, dtype=torch.float32) for n, l in layers.items()}
        for k in range(task.index):
            for n, d in self.deltas(k).items():
                earlier[n] += d
        weight = {n: e.abs().to(layers[n].get_base_layer().weight.device) for n, e in earlier.items()}
        lam = self.protocol.clora_lambda

        def loss():
            return lam * sum(((weight[n] * lora_delta(l, adapter)) ** 2).sum() for n, l in layers.items())

        return loss


class OrthogonalMethod(_LoRAMethod):
    key, label = "ortho", "Orthogonal Adaptation"
    continual = False

    def down_projection(self, layer_name: str, in_features: int, concept_index: int) -> torch.Tensor:
        """Rows ``[k r, (k+1) r)`` of a per-layer random orthogonal basis: concepts get disjoint
        rows, hence mutually orthogonal down-projections."""
        r = self.protocol.lora_rank
        if (concept_index + 1) * r > in_features:
            raise ValueError(f"orthogonal adaptation: {concept_index + 1} concepts x rank {r} exceed the "
                             f"input width {in_features}")
        q = orthogonal_basis(in_features, seed=97 * self.protocol.seed + zlib.crc32(layer_name.encode()))
        return q[concept_index * r:(concept_index + 1) * r].clone()

    def setup_lora(self, task, layers, adapter):
        params = []
        with torch.no_grad():
            for name, layer in layers.items():
                a = layer.lora_A[adapter].weight
                a.copy_(self.down_projection(name, a.shape[1], task.index).to(a.device, a.dtype))
                a.requires_grad_(False)
                params.append(layer.lora_B[adapter].weight)
        return params


class MixOfShowMethod(_LoRAMethod):
    key, label = "mix-of-show", "Mix-of-Show (gradient fusion, exact)"
    continual = False
    ridge = 1e-3  # relative to the mean diagonal of the feature Gram matrix (choice)

    def build(self, tasks):
        from ..model import encode_prompts

        pipe = _load_pipe(self.model, None)
        add_concept_tokens(pipe, tasks, self._embeddings(tasks))
        started = time.perf_counter()
        layers = cross_attention_kv_layers(pipe.unet)
        with torch.no_grad():
            features = []  # each concept's text features: what Mix-of-Show stores for the fusion
            for t in tasks:
                x = torch.cat(encode_prompts(pipe.tokenizer, pipe.text_encoder, self.record(t.index)["instance_prompts"]))
                features.append(x.double())
            deltas = [self.deltas(t.index) for t in tasks]
            held = sum(x.numel() * 4 for x in features) + sum(d.numel() * 4 for ds in deltas for d in ds.values())
            layer_peak = 0  # per layer (float64): Gram matrix + its regularised copy, right-hand side + W_i
            for n, layer in layers.items():
                w0 = layer.weight.detach().double()
                gram = torch.zeros(w0.shape[1], w0.shape[1], dtype=torch.float64)
                rhs = torch.zeros_like(w0)
                for x, delta in zip(features, deltas):
                    g = x.T @ x
                    gram += g
                    rhs += (w0 + delta[n].double()) @ g
                mu = self.ridge * float(gram.diagonal().mean()) if tasks else 1.0
                fused = torch.linalg.solve(gram + mu * torch.eye(gram.shape[0], dtype=torch.float64),
                                           (rhs + mu * w0).T).T
                layer.weight.copy_(fused.to(layer.weight.dtype))
                layer_peak = max(layer_peak, 8 * (2 * gram.numel() + 2 * rhs.numel()))
            extra = held + layer_peak
        seconds = time.perf_counter() - started
        if self.device:
            pipe.to(self.device)
        return pipe, {"combine_seconds": seconds, "combine_bytes": extra}


METHODS: dict[str, type[Method]] = {
    m.key: m
    for m in (CNSMethod, PaperCNSMethod, RandomNeuronsMethod, NoRegMethod, KeepMethod, AllKVMethod, TextualInversionMethod, CLoRAMethod,
              OrthogonalMethod, MixOfShowMethod)
}
METHOD_LABELS = {k: m.label for k, m in METHODS.items()}


def parse_variant(key: str) -> tuple[str, dict]:
    """``"cns-keep:lambda_generic=100,select_ratio=0.2"`` -> ("cns-keep", {"lambda_generic": 100.0,
    "select_ratio": 0.2}): a CNS method with LearnConfig settings changed. Values are read as
    JSON (numbers, true / false, quoted strings) or kept as plain strings."""
    from ..config import LearnConfig

    base, _, spec = key.partition(":")
    if base not in METHODS:
        raise KeyError(f"unknown method {base!r}; choose from {', '.join(METHODS)}")
    overrides = {}
    if spec:
        if not issubclass(METHODS[base], CNSMethod):
            raise KeyError(f"{base}: only CNS methods take settings (cns:name=value,...)")
        known = set(LearnConfig().to_dict())
        for item in spec.split(","):
            name, eq, text = item.partition("=")
            if not eq or name.strip() not in known:
                raise KeyError(f"{key}: {item!r} is not name=value with a LearnConfig setting name")
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text
            overrides[name.strip()] = value
    return base, overrides


def make_method(key: str, root, model: str, protocol, device=None, calibration_prompts=None) -> Method:
    base, overrides = parse_variant(key)
    method = METHODS[base](root, model, protocol, device=device, calibration_prompts=calibration_prompts)
    if overrides:
        method.key, method.overrides = key, overrides
        if isinstance(method, CNSMethod):
            method._name_settings()
    return method
