"""Train the VQGAN tokenizer from an image folder: checkpoints, resume, export, MLflow.

Losses: L1 + L2 reconstruction, the quantizer's codebook loss (moves codes towards
encoder outputs) and commitment loss (keeps encoder outputs near their codes), and, with
`perceptual=<classifier URL>`, a feature distance through a classifier trained on the same
images (models/classifier.py; LPIPS weights cannot be downloaded here). Other terms (an
adversarial loss, say) enter through `extra_losses` (see `ExtraLoss`).

Codebooks: l2-normalised codes (ViT-VQGAN) match by cosine similarity, so a code cannot
go unused just because its norm drifted; dead-code restarts (`dead_code_steps`) move codes
unused that long onto encoder outputs. Restarts fill a codebook but spread flat regions
over many ids, which a generator then cannot predict: the demo turns them off (the
measurements are in configs/models/tiny-tokenizer.yaml). EMA codebook updates matched
gradient-trained codes (19.94 vs 19.95 dB at 800 steps), so codes are gradient-trained.

Layout under {root}/runs/<run>/: checkpoints/step-<n>/ (model.safetensors, optimizer.pt,
state.safetensors, then checkpoint.json last: as for every trainer checkpoint, a folder
is trusted only once that marker exists), export/ (pipelines.model_io format, what
`enat pretokenize tokenizer=<url>` loads) and reconstructions.png (held-out originals
above their reconstructions). A rerun resumes from the latest complete checkpoint; each
step's batch is a pure function of (seed, step), so a resumed run sees the same data as
an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor
from tqdm import tqdm

from enat.models import VQGAN, VQGANConfig, config_to_dict
from enat.models.classifier import FeatureDistance
from enat.models.device import pick_device
from enat.models.typed_config import ConfigError, check, to_dict
from enat.pipelines import model_io, runs, storage
from enat.pipelines.tracking import Tracker
from enat.trainer import checkpoint
from enat.trainer.config import TokenizerTrainConfig
from enat.trainer.image_data import ImageSet, load_image_set
from enat.trainer.lr_schedule import lr_multiplier
from enat.trainer.tokenizer_quality import Evaluation, codebook_stats, evaluate, reconstruction_grid

WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "state.safetensors"

# An extra loss term: (images, reconstructions, step) -> weighted scalar loss. Images and
# reconstructions are float [B, 3, H, W] in [0, 1] (reconstructions unclamped, with
# gradient). A perceptual loss is `lambda x, y, step: w * lpips(x, y).mean()`; an
# adversarial one owns its discriminator and steps that discriminator's optimizer itself.
# Their state is not checkpointed by this loop.
ExtraLoss = Callable[[Tensor, Tensor, int], Tensor]





@dataclass
class TokenizerTrainResult:
    """What train_tokenizer ends with (the generator's loop returns trainer.loop.TrainResult)."""

    step: int
    resumed_from: int  # 0 for a fresh run
    evaluation: Evaluation
    export_url: str
    grid_url: str
    seconds: float


def check_model(config: TokenizerTrainConfig, model_config: object) -> VQGANConfig:
    if not isinstance(model_config, VQGANConfig):
        raise ConfigError(f"bad value for 'model': {config.model} is not a vqgan tokenizer preset")
    check(config.resolution == model_config.image_size, "resolution",
          f"equal to the model's image_size ({model_config.image_size})", config.resolution)
    return model_config


# ---- checkpoints (the layout and marker rules of pipelines.runs) ----

def save_checkpoint(config: TokenizerTrainConfig, step: int, model: VQGAN, optimizer: torch.optim.Optimizer,
                    last_used: Tensor, meta: dict) -> str:
    """Write every file, then the checkpoint.json marker; then prune to keep_last."""
    url = runs.step_url(config.root, config.run, step)
    storage.remove(url, recursive=True)  # what an interrupted save of this very step left
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    storage.write_bytes(storage.join(url, WEIGHTS_FILE), save_safetensors(weights))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)  # tensors and plain numbers only
    storage.write_bytes(storage.join(url, OPTIMIZER_FILE), buffer.getvalue())
    storage.write_bytes(storage.join(url, STATE_FILE), save_safetensors({"last_used": last_used.cpu()}))
    marker = json.dumps({"step": step, "time": time.time(), **meta}, indent=1).encode()
    storage.write_bytes(storage.join(url, runs.MARKER), marker)
    checkpoint.prune(config.root, config.run, config.keep_last)
    return url


def load_checkpoint(saved: runs.Checkpoint, model: VQGAN, optimizer: torch.optim.Optimizer) -> Tensor:
    """Restore model and optimizer in place; returns the codes' last-used steps."""
    if saved.meta.get("model") != config_to_dict(model.config):
        raise ConfigError(f"bad value for 'run': its checkpoint {saved.url} holds another model; "
                          f"pick a new run name or the model it was trained with")
    model.load_state_dict(load_safetensors(storage.read_bytes(storage.join(saved.url, WEIGHTS_FILE))))
    state = storage.read_bytes(storage.join(saved.url, OPTIMIZER_FILE))
    optimizer.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
    return load_safetensors(storage.read_bytes(storage.join(saved.url, STATE_FILE)))["last_used"]


# ---- training ----

def _generator(seed: int, stream: str, index: int) -> torch.Generator:
    """An independent random stream for (seed, purpose, index): resumes replay exactly."""
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def batch_indices(num_images: int, batch_size: int, seed: int, step: int) -> Tensor:
    """Images of `step`: consecutive slices of one seeded permutation per epoch."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // num_images
    indices = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        order = torch.randperm(num_images, generator=_generator(seed, "epoch", epoch))
        chosen = epochs == epoch
        indices[chosen] = order[positions[chosen] % num_images]
    return indices


def learning_rate(config: TokenizerTrainConfig, step: int) -> float:
    """The learning rate of step `step` (0-based, as this loop counts)."""
    return config.lr * lr_multiplier(step + 1, config.steps, config.warmup_steps)


def restart_dead_codes(model: VQGAN, encodings: Tensor, last_used: Tensor, step: int,
                       patience: int, generator: torch.Generator) -> int:
    """Move codes unused for `patience` steps onto random encoder outputs; how many moved."""
    dead = (step - last_used >= patience).nonzero().flatten()
    if len(dead) == 0:
        return 0
    flat = encodings.detach().permute(0, 2, 3, 1).reshape(-1, encodings.shape[1]).float()
    picks = torch.randint(len(flat), (len(dead),), generator=generator).to(flat.device)
    with torch.no_grad():
        model.quantizer.codebook.weight[dead.to(flat.device)] = flat[picks]
    last_used[dead] = step
    return len(dead)


def _open_tracker(config: TokenizerTrainConfig, previous_run_id: str | None) -> tuple[Tracker, bool]:
    """(tracker, is_new): continue the checkpoint's MLflow run when this store has it."""
    if previous_run_id:
        tracker = Tracker(config.experiment, config.run, run_id=previous_run_id)
        try:
            tracker.client.get_run(previous_run_id)
            return tracker, False
        except Exception:  # noqa: BLE001 - another store, or a deleted run: start a new one
            pass
    return Tracker(config.experiment, config.run, tags={"enat.job": "tokenizer-train"}), True


class _TokenizerTraining:
    """One invocation: set up (resuming if possible), run the remaining steps, export."""

    def __init__(self, config: TokenizerTrainConfig, model_config: VQGANConfig,
                 extra_losses: Sequence[ExtraLoss], progress: bool):
        self.config, self.extra_losses, self.progress = config, list(extra_losses), progress
        self.device = pick_device(config.device)
        storage.check_writable(config.root)
        self.data: ImageSet = load_image_set(config.source, config.resolution, config.held_out_share,
                                             progress)
        print(f"tokenizer data: {self.data.summary()}", flush=True)
        self.train_images = self.data.train.to(self.device)
        self.perceptual, perceptual_id = None, None
        if config.perceptual:
            net, meta = model_io.load_classifier(config.perceptual, self.device)
            check(meta["resolution"] == config.resolution, "perceptual",
                  f"a classifier trained at resolution {config.resolution}", config.perceptual)
            self.perceptual, perceptual_id = FeatureDistance(net), meta["id"]
        # held_out_share=0 means "no held-out set": report on a few training images instead.
        self.eval_images = self.data.held_out if len(self.data.held_out) else self.data.train[:64]

        torch.manual_seed(config.seed)
        self.model = VQGAN(model_config).to(self.device).train()
        with torch.no_grad():  # start at the mean colour: Adam needs ~lr-sized steps to walk there
            self.model.decoder.out_conv.bias.copy_(self.data.train.float().mean(dim=(0, 2, 3)) / 255)
        # fused: the per-tensor CPU Adam cost 15% of a step at this model size
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, betas=(0.9, 0.99),
                                          fused=True)
        self.last_used = torch.zeros(model_config.codebook_size, dtype=torch.long)
        checkpoint.clean_partial(config.root, config.run)
        self.start, previous_run_id = 0, None
        latest = runs.latest(config.root, config.run)
        if latest:
            self.last_used = load_checkpoint(latest, self.model, self.optimizer)
            self.start, previous_run_id = latest.step, latest.meta.get("mlflow_run_id")
            print(f"resuming {config.run} from step {self.start} ({latest.url})", flush=True)
        self.tracker, is_new = _open_tracker(config, previous_run_id)
        if is_new:
            self.tracker.log_params({**to_dict(config), "model_config": config_to_dict(model_config),
                                     "train_images": len(self.data.train),
                                     "held_out_images": len(self.data.held_out),
                                     "rejected_images": len(self.data.rejected)})
        self.meta = {"config": to_dict(config), "model": config_to_dict(model_config),
                     "perceptual_id": perceptual_id}

    def batch(self, step: int) -> Tensor:
        config = self.config
        indices = batch_indices(len(self.train_images), config.batch_size, config.seed, step)
        images = self.train_images[indices].float() / 255
        if config.flip:
            flips = torch.rand(len(images), generator=_generator(config.seed, "flip", step)) < 0.5
            images = torch.where(flips.to(self.device)[:, None, None, None], images.flip(-1), images)
        return images

    def train_step(self, step: int) -> tuple[dict[str, float], Tensor]:
        """One optimizer step; (loss terms, token ids of the batch)."""
        config, model = self.config, self.model
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        images = self.batch(step)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            encodings = model.encoder(images)
            quantized, ids, codebook_loss, commitment_loss = model.quantize(encodings)
            reconstruction = model.decoder(quantized).float()
        terms = {"l1": (reconstruction - images).abs().mean(), "l2": F.mse_loss(reconstruction, images),
                 "codebook_loss": codebook_loss, "commitment_loss": commitment_loss}
        loss = (config.l1_weight * terms["l1"] + config.l2_weight * terms["l2"]
                + config.codebook_weight * codebook_loss + config.commitment_weight * commitment_loss)
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(images, reconstruction)
            loss = loss + config.perceptual_weight * terms["perceptual"]
        for index, extra in enumerate(self.extra_losses):
            terms[f"extra_{index}"] = extra(images, reconstruction, step)
            loss = loss + terms[f"extra_{index}"]
        terms["loss"] = loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.last_used[ids.unique().cpu()] = step
        restarted = 0
        if config.dead_code_steps and model.config.quantizer == "vq":  # FSQ has no codes to restart
            restarted = restart_dead_codes(model, encodings, self.last_used, step, config.dead_code_steps,
                                           _generator(config.seed, "restart", step))
        return {**{k: v.item() for k, v in terms.items()}, "restarted_codes": restarted}, ids

    def evaluate(self, step: int) -> Evaluation:
        result = evaluate(self.model, self.eval_images, self.device)
        self.tracker.log_metrics({"psnr": result.psnr, "codebook_usage": result.codebook_usage,
                                  "perplexity": result.perplexity}, step)
        return result

    def run(self) -> tuple[int, Evaluation]:
        config = self.config
        bar = tqdm(range(self.start, config.steps), desc=f"tokenizer {config.run}", initial=self.start,
                   total=config.steps, disable=not self.progress)
        restarted, window_start = 0, time.monotonic()
        for step in bar:
            terms, ids = self.train_step(step)
            restarted += terms.pop("restarted_codes")
            done = step + 1
            if done % config.log_every == 0:
                seconds, window_start = time.monotonic() - window_start, time.monotonic()
                batch_usage, _ = codebook_stats(ids, self.model.config.codebook_size)
                extra = {"lr": learning_rate(config, step), "restarted_codes": restarted,
                         "images_per_second": config.log_every * config.batch_size / seconds,
                         "batch_codebook_usage": batch_usage}
                self.tracker.log_metrics({**terms, **extra}, done)
                bar.set_postfix(loss=f"{terms['loss']:.4f}")
            if done % config.eval_every == 0 and done < config.steps:
                result = self.evaluate(done)
                bar.set_postfix(loss=f"{terms['loss']:.4f}", psnr=f"{result.psnr:.2f}",
                                usage=f"{result.codebook_usage:.2f}")
            if done % config.checkpoint_every == 0 or done == config.steps:
                # The run id as of now: MLflow may have created the run after an outage.
                meta = {**self.meta, "mlflow_run_id": self.tracker.run_id}
                save_checkpoint(config, done, self.model, self.optimizer, self.last_used, meta)
        bar.close()
        final_step = max(self.start, config.steps)
        return final_step, self.evaluate(final_step)

    def publish(self, step: int, result: Evaluation) -> tuple[str, str]:
        """Grid PNG (run folder + MLflow) and the exported model; (export URL, grid URL)."""
        config = self.config
        grid_url = ""
        shown = min(config.grid_images, len(self.eval_images))
        if shown:
            grid_url = storage.join(config.run_url, "reconstructions.png")
            grid = reconstruction_grid(self.eval_images[:shown].float() / 255, result.reconstructions[:shown])
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "reconstructions.png"
                grid.save(path)
                storage.write_bytes(grid_url, path.read_bytes())
                self.tracker.log_artifact(path)
        export_url = storage.join(config.run_url, "export")
        model_io.save_model(export_url, self.model, self.model.config, extra={
            "run": config.run, "step": step, "source": config.source,
            "held_out_psnr": result.psnr, "codebook_usage": result.codebook_usage,
            "perceptual_id": self.meta["perceptual_id"]})
        self.tracker.set_tags({"export_url": export_url, "grid_url": grid_url})
        self.tracker.finish()
        return export_url, grid_url


def train_tokenizer(config: TokenizerTrainConfig, model_config: VQGANConfig,
                    extra_losses: Sequence[ExtraLoss] = (), progress: bool = True) -> TokenizerTrainResult:
    """Train (or resume, or only re-export a finished run) and return the final figures."""
    started = time.monotonic()
    check_model(config, model_config)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(config.threads, os.cpu_count() or 1))
    try:
        training = _TokenizerTraining(config, model_config, extra_losses, progress)
        try:
            step, result = training.run()
            export_url, grid_url = training.publish(step, result)
        except BaseException as err:  # the MLflow run shows it; a rerun resumes and finishes it
            training.tracker.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
    finally:
        torch.set_num_threads(threads)  # the caller's process keeps its own setting
    return TokenizerTrainResult(step, training.start, result, export_url, grid_url,
                                time.monotonic() - started)
