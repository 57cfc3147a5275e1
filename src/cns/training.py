"""Continual fine-tuning of concept neurons (Sec. 4.3, Eq. 7-8).

Only the task's masked K/V elements and its new tokens' embedding rows are trainable; both are
parametrised as sparse updates of the frozen weights (:mod:`cns.sparse`), so nothing else can
move. The loop knows nothing of the library's storage: tensors in, tensors out.
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import LearnConfig
from .errors import CNSError
from .model import cross_attention_kv_layers, pipeline_tokens
from .regularizer import anchor_basis, key_lock, neuron_regularizer, output_energy, relative_output_drift
from .sparse import RowDeltaEmbedding, masked_update

__all__ = ["Example", "TrainResult", "TrainingState", "TrainingDivergedError", "train_task", "diffusion_target", "sparse_trainables",
           "step_generator"]


@dataclass
class Example:
    """One training image (CHW in [-1, 1]) and its prompt."""

    pixels: torch.Tensor
    prompt: str


@dataclass
class TrainResult:
    values: dict[str, torch.Tensor]  # W_m at the task's masked elements, row-major, per layer
    embeddings: dict[int, torch.Tensor]  # learned row per token id
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step
    seconds: float = 0.0
    steps: int = 0
    resumed_from_step: int = 0  # 0: trained from the start


@dataclass
class TrainingState:
    """Everything a run needs to go on after ``step`` optimizer steps, bit for bit: the
    trainable deltas, the optimizer's state (tensors only) and the losses so far."""

    step: int
    tensors: dict[str, torch.Tensor]
    losses: list[float]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of one training step: a function of ``(seed, step)`` alone, so a run
    resumed at any step draws exactly what an uninterrupted run draws."""
    digest = hashlib.sha256(f"cns-train:{seed}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _trainable_parameters(wrapped, embedding) -> dict[str, torch.nn.Parameter]:
    params = {f"delta/{name}": module.delta for name, module in wrapped.items()}
    if embedding is not None:
        params["embedding/rows"] = embedding.trainable_rows
    return params


def _capture_state(step: int, params, optimizer, losses: list[float]) -> TrainingState:
    tensors = {key: p.detach().cpu().clone() for key, p in params.items()}
    for index, entry in optimizer.state_dict()["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{name}"] = value.detach().cpu().clone()
            else:
                tensors[f"optimizer/{index}/{name}"] = torch.tensor(float(value))
    return TrainingState(step=step, tensors=tensors, losses=list(losses))


@torch.no_grad()
def _restore_state(state: TrainingState, params, optimizer) -> None:
    expected = set(params)
    given = {k for k in state.tensors if not k.startswith("optimizer/")}
    if given != expected:
        raise ValueError(f"checkpoint holds {sorted(given)}, this run trains {sorted(expected)}")
    for key, param in params.items():
        saved = state.tensors[key]
        if saved.shape != param.shape:
            raise ValueError(f"checkpoint {key} has shape {tuple(saved.shape)}, expected {tuple(param.shape)}")
        param.copy_(saved.to(param.device, param.dtype))
    restored: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            restored.setdefault(int(index), {})[name] = value.clone()
    saved_state = optimizer.state_dict()
    saved_state["state"] = restored
    optimizer.load_state_dict(saved_state)


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The regression target of the scheduler's ``prediction_type`` (Eq. 8 in its epsilon,
    v or x form)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r}")


def _parent(root: torch.nn.Module, dotted: str) -> tuple[torch.nn.Module, str]:
    parent_name, _, attr = dotted.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attr


@contextmanager
def sparse_trainables(unet, text_encoder, masks: Mapping[str, torch.Tensor], token_ids: Sequence[int]):
    """Swap the masked K/V layers for their trainable form (:func:`masked_update`) and the embedding for
    :class:`RowDeltaEmbedding` over ``token_ids``; on exit merge the updates back into the
    plain layers, which return to their places."""
    layers = cross_attention_kv_layers(unet)
    wrapped: dict[str, torch.nn.Module] = {}
    embedding = None
    try:
        for name, mask in masks.items():
            parent, attr = _parent(unet, name)
            wrapped[name] = masked_update(layers[name], mask.to(layers[name].weight.device))
            setattr(parent, attr, wrapped[name])
        if token_ids:
            embedding = RowDeltaEmbedding(text_encoder.get_input_embeddings(), list(token_ids))
            text_encoder.set_input_embeddings(embedding)
        yield wrapped, embedding
    finally:
        for name, module in wrapped.items():
            parent, attr = _parent(unet, name)
            setattr(parent, attr, module.merge())
        if embedding is not None:
            text_encoder.set_input_embeddings(embedding.merge())


def _encode_latents(vae, pixels: torch.Tensor, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    with torch.no_grad():
        for chunk in pixels.split(batch):
            dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
            means.append(dist.mean.float().cpu())  # noise is drawn on the CPU (seeded per step)
            stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def _token_ids(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    return pipeline_tokens(tokenizer, prompts).input_ids


@dataclass
class DenoisingBatch:
    """One step's batch of Eq. 8: the instance images first, then as many prior images."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    instance_ids: torch.Tensor  # encoded every step: the new tokens' rows train
    prior_states: torch.Tensor | None  # frozen text states of the prior prompts
    instance_index: torch.Tensor  # which instance examples the batch holds


class DenoisingStream:
    """The data of Eq. 8, one batch per optimizer step, for every method alike.

    Which instance and prior images a step uses, their latent sample, the noise and the
    timesteps are a function of ``(seed, step)`` alone (:func:`step_generator`): two methods
    trained with one seed see the same batches, and a resumed run sees what an uninterrupted
    one saw. Latents and prior text states are computed once, on entry.
    """

    def __init__(self, pipe, instance: Sequence[Example], prior: Sequence[Example], batch_size: int, seed: int,
                 prior_loss_weight: float = 1.0, device=None):
        vae, text_encoder, tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.batch_size, self.seed, self.prior_loss_weight = batch_size, seed, prior_loss_weight
        self.scheduler = _training_scheduler(pipe)
        self.instance_mean, self.instance_std = _encode_latents(vae, torch.stack([e.pixels for e in instance]))
        self.instance_ids = _token_ids(tokenizer, [e.prompt for e in instance])
        self.use_prior = bool(prior) and prior_loss_weight > 0
        if self.use_prior:
            self.prior_mean, self.prior_std = _encode_latents(vae, torch.stack([e.pixels for e in prior]))
            with torch.no_grad():
                ids = _token_ids(tokenizer, [e.prompt for e in prior]).to(device or text_encoder.device)
                self.prior_states = text_encoder(ids)[0].float().cpu()
        self.scaling = getattr(vae.config, "scaling_factor", 0.18215)
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0

    def batch(self, step: int) -> DenoisingBatch:
        """Step ``step``'s batch (CPU tensors)."""
        generator = step_generator(self.seed, step)
        n = self.batch_size
        pick = torch.randint(len(self.instance_mean), (n,), generator=generator)
        latents = self.instance_mean[pick] + self.instance_std[pick] * torch.randn(
            self.instance_mean[pick].shape, generator=generator)
        prior_states = None
        if self.use_prior:
            pick_prior = torch.randint(len(self.prior_mean), (n,), generator=generator)
            latents = torch.cat([latents, self.prior_mean[pick_prior] + self.prior_std[pick_prior] * torch.randn(
                self.prior_mean[pick_prior].shape, generator=generator)])
            prior_states = self.prior_states[pick_prior]
        latents = (latents - self.shift) * self.scaling
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(self.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        return DenoisingBatch(noisy=self.scheduler.add_noise(latents, noise, timesteps), timesteps=timesteps,
                              target=diffusion_target(self.scheduler, latents, noise, timesteps),
                              instance_ids=self.instance_ids[pick], prior_states=prior_states, instance_index=pick)

    def loss(self, unet, text_encoder, batch: DenoisingBatch, device,
             instance_states: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 8 without L_reg: the instance images' denoising error plus ``prior_loss_weight``
        times the prior images'. ``instance_states``: the instance prompts' text states, when
        the caller has encoded them already."""
        states = text_encoder(batch.instance_ids.to(device))[0] if instance_states is None else instance_states
        if batch.prior_states is not None:
            states = torch.cat([states, batch.prior_states.to(device, states.dtype)])
        prediction = unet(batch.noisy.to(device), batch.timesteps.to(device), states).sample
        target = batch.target.to(device)
        n = self.batch_size
        loss = F.mse_loss(prediction[:n].float(), target[:n])
        if batch.prior_states is not None:
            loss = loss + self.prior_loss_weight * F.mse_loss(prediction[n:].float(), target[n:])
        return loss


def train_task(
    pipe,
    masks: Mapping[str, torch.Tensor],
    token_ids: Sequence[int],
    instance: Sequence[Example],
    prior: Sequence[Example],
    config: LearnConfig,
    reg_masks: Mapping[str, torch.Tensor] | None = None,
    pretrained: Mapping[str, torch.Tensor] | None = None,
    accelerator=None,
    progress: bool = True,
    resume: TrainingState | None = None,
    on_checkpoint: Callable[[TrainingState], None] | None = None,
    keep_states: torch.Tensor | None = None,
    generic_states: torch.Tensor | None = None,
) -> TrainResult:
    """Fine-tune one task (Eq. 8) in place on ``pipe`` and return what changed.

    ``masks``: per layer, the elements this task trains (union of its concepts' masks).
    ``token_ids``: the embedding rows this task trains (its new tokens).
    ``reg_masks``: per layer M_reg (this task's masks AND the earlier concepts'); with
    ``pretrained`` (W_0 per layer) they give L_reg (Eq. 7) against W_{m-1} (the weights on
    entry) and W_0. Deterministic for a given ``config.seed`` on CPU: step ``i`` draws from
    :func:`step_generator` ``(seed, i)``.
    ``keep_states``: ``(N, width)`` text states at earlier concepts' tokens in their prompts;
    with ``config.lambda_keep`` > 0 they give L_keep (:func:`~cns.regularizer.relative_output_drift`),
    which holds how their keys and values differ from one another where W_{m-1} put them.
    ``generic_states``: ``(N, width)`` text states of generic prompts (every position); with
    ``config.lambda_generic`` > 0 they give L_generic, which holds their keys and values, and
    with ``config.lambda_refit`` > 0 the trained update is refitted against them
    (:func:`~cns.refit.refit_masked_update`; the concept's states: its new tokens' in its prompts).
    ``on_checkpoint`` receives a :class:`TrainingState` every ``config.checkpoint_every``
    steps; ``resume`` (such a state) continues from its step with the result an uninterrupted
    run gives.
    """
    if accelerator is None:
        accelerator = _accelerator(config)
    device = torch.device(config.device) if config.device else accelerator.device
    unet, text_encoder = pipe.unet, pipe.text_encoder
    for module in (unet, text_encoder, pipe.vae):
        module.requires_grad_(False)
        module.to(device)
    started = time.perf_counter()

    stream = DenoisingStream(pipe, instance, prior, config.batch_size, config.seed, config.prior_loss_weight, device)

    layers = cross_attention_kv_layers(unet)
    # output terms: (weight, basis, energy per layer); the bases are made in float64 on the CPU
    anchors = []
    if keep_states is not None and keep_states.numel() > 0 and config.lambda_keep > 0:
        anchors.append((config.lambda_keep, anchor_basis(keep_states.float().cpu())))
    if generic_states is not None and generic_states.numel() > 0 and config.lambda_generic > 0:
        anchors.append((config.lambda_generic, anchor_basis(generic_states.float().cpu(), center=False,
                                                             normalize=True)))
    refit = config.lambda_refit > 0 and generic_states is not None and generic_states.numel() > 0 and token_ids
    previous = {name: layers[name].weight.detach().clone() for name in masks} \
        if (reg_masks or anchors or refit) else {}
    lock = None  # (token positions per instance prompt, class-word states, key layer names, their entry weights)
    if config.lambda_lock > 0 and token_ids:
        from .model import class_word_states

        positions = torch.isin(stream.instance_ids, torch.tensor(list(token_ids), dtype=stream.instance_ids.dtype))
        key_names = [n for n in layers if n.endswith("to_k")]
        lock = (positions, class_word_states(pipe.tokenizer, text_encoder, [e.prompt for e in instance], token_ids),
                key_names, {n: layers[n].weight.detach().clone().to(device) for n in key_names})
    output_terms = [(weight, basis.to(device), {name: output_energy(previous[name], basis.to(device))
                                                for name in masks}) for weight, basis in anchors]
    losses: list[float] = []
    step_seconds: list[float] = []
    processors = unet.attn_processors if config.attention_slicing != "no" else None
    if processors is not None:
        unet.set_attention_slice(config.attention_slicing)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    try:
        with sparse_trainables(unet, text_encoder, masks, token_ids if config.train_embedding else []) as (
            wrapped,
            embedding,
        ):
            groups = [{"params": [m.delta for m in wrapped.values()], "lr": config.lr_neurons}]
            if embedding is not None:
                groups.append({"params": [embedding.trainable_rows], "lr": config.lr_embedding})
            optimizer = torch.optim.Adam(groups, weight_decay=0.0)
            optimizer = accelerator.prepare(optimizer)
            reg_terms = _regularizer_inputs(wrapped, reg_masks, previous, pretrained) if config.regularize else []
            params = _trainable_parameters(wrapped, embedding)
            first_step = 0
            if resume is not None and 0 < resume.step <= config.steps:
                _restore_state(resume, params, optimizer)
                first_step = resume.step
                losses.extend(resume.losses[:first_step])

            plain_layers = {n: unet.get_submodule(n) for n in (lock[2] if lock else []) if n not in wrapped}
            bar = tqdm(range(first_step, config.steps), desc="cns learn", disable=not progress, dynamic_ncols=True,
                       initial=first_step, total=config.steps)
            for step in bar:
                step_started = time.perf_counter()
                batch = stream.batch(step)
                with accelerator.autocast():
                    states = text_encoder(batch.instance_ids.to(device))[0]
                    loss = stream.loss(unet, text_encoder, batch, device, instance_states=states)
                    if reg_terms:
                        current = [wrapped[name].current_values()[sel] for name, sel, _, _ in reg_terms]
                        loss = loss + neuron_regularizer(
                            current,
                            [p for _, _, p, _ in reg_terms],
                            [w0 for _, _, _, w0 in reg_terms],
                            [torch.ones_like(c) for c in current],
                            config.lambda_previous,
                            config.lambda_pretrained,
                        )
                if output_terms:  # outside autocast: the drift of small updates needs float32
                    names = list(wrapped)
                    deltas = [wrapped[n].effective_weight().float() - previous[n].float() for n in names]
                    for weight, basis, energies in output_terms:
                        loss = loss + weight * relative_output_drift(deltas, basis, [energies[n] for n in names])
                if lock is not None:  # outside autocast, as the output terms
                    positions, class_states, key_names, entry = lock
                    where = positions[batch.instance_index]
                    weights = [wrapped[n].effective_weight() if n in wrapped else plain_layers[n].weight
                               for n in key_names]
                    loss = loss + config.lambda_lock * key_lock(
                        states.float()[where.to(states.device)], class_states[batch.instance_index][where].to(device),
                        weights, [entry[n] for n in key_names])
                value = float(loss.detach())
                if not math.isfinite(value):  # checked before the step: non-finite values never reach the weights
                    raise TrainingDivergedError(_diverged(f"the loss is {value}", step + 1, config))
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(value)
                step_seconds.append(time.perf_counter() - step_started)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                done = step + 1
                if on_checkpoint and config.checkpoint_every and done % config.checkpoint_every == 0 \
                        and done < config.steps:
                    on_checkpoint(_capture_state(done, params, optimizer, losses))
            flat_index = {name: m.flat_index for name, m in wrapped.items()}
    finally:
        if config.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
            unet.eval()
        if processors is not None:
            unet.set_attn_processor(processors)
    layers = cross_attention_kv_layers(unet)
    if refit:
        _refit(layers, masks, previous, text_encoder, stream.instance_ids, token_ids, generic_states, config, device)
    values = {name: layers[name].weight.detach().flatten()[flat_index[name]].float().cpu().clone() for name in masks}
    table = text_encoder.get_input_embeddings().weight.detach()
    embeddings = {int(i): table[int(i)].float().cpu().clone() for i in token_ids}
    for what, tensor in [*((f"K/V values of {n}", v) for n, v in values.items()),
                         *((f"the embedding of token id {i}", e) for i, e in embeddings.items())]:
        if not bool(torch.isfinite(tensor).all()):
            raise TrainingDivergedError(_diverged(f"{what} are not finite", config.steps, config))
    return TrainResult(
        values=values, embeddings=embeddings, losses=losses, step_seconds=step_seconds, seconds=time.perf_counter() - started, steps=config.steps,
        resumed_from_step=first_step,
    )


@torch.no_grad()
def _refit(layers, masks, entry, text_encoder, instance_ids, token_ids, generic_states, config, device) -> None:
    """Refit each trained layer's update in place (:func:`~cns.refit.refit_masked_update`): the
    concept's states are the new tokens' in the task's prompts (with their trained embeddings)."""
    from .refit import refit_masked_update

    ids = instance_ids.to(device)
    states = text_encoder(ids)[0].float().cpu()
    concept = states[torch.isin(instance_ids, torch.tensor(list(token_ids), dtype=instance_ids.dtype))]
    generic = generic_states.float().cpu()
    for name, mask in masks.items():
        weight = layers[name].weight
        before = entry[name].float().cpu()
        delta = (weight.detach().float().cpu() - before) * mask.cpu()
        refitted = refit_masked_update(delta, mask.cpu(), concept, generic, config.lambda_refit)
        weight.copy_((before + refitted).to(weight.dtype).to(weight.device))


class TrainingDivergedError(CNSError):
    """The loss or a trained value stopped being finite: nothing of the run may be kept."""


def _diverged(what: str, step: int, config: LearnConfig) -> str:
    return (f"training diverged at step {step} of {config.steps}: {what}; nothing was saved. Lower the learning "
            f"rates (--lr-neurons {config.lr_neurons:g}, --lr-embedding {config.lr_embedding:g})")


def _accelerator(config: LearnConfig):
    """accelerate's ``Accelerator`` for ``config``. Its state is one per process: a single
    process that learns again with another ``mixed_precision`` (or CPU choice) starts it anew
    rather than failing; a distributed run keeps its state and its error."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    try:
        return Accelerator(mixed_precision=config.mixed_precision, cpu=config.device == "cpu")
    except ValueError:
        if PartialState().num_processes != 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=config.mixed_precision, cpu=config.device == "cpu")


def _training_scheduler(pipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def _regularizer_inputs(wrapped, reg_masks, previous, pretrained):
    """Per layer with overlap: (name, selector over the layer's trainable elements, W_{m-1} and
    W_0 at the selected elements)."""
    if not reg_masks or pretrained is None:
        return []
    terms = []
    for name, module in wrapped.items():
        if name not in reg_masks:
            continue
        selector = reg_masks[name].to(module.flat_index.device).flatten()[module.flat_index]
        if not bool(selector.any()):
            continue
        index = module.flat_index[selector]
        terms.append(
            (
                name,
                selector,
                previous[name].flatten()[index].float(),
                pretrained[name].to(previous[name].device).flatten()[index].float(),
            )
        )
    return terms
