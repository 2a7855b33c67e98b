"""The training loop: one loop for every launcher (Ray Train, torchrun, a single process).

`train(config)` joins the process group the launcher made (or makes a one-process group),
restores the run's latest complete checkpoint (written by any number of workers at any ZeRO
stage), wraps the model in a DeepSpeed engine (ZeRO stage 0-3 from the config, torch's AdamW
so nothing is compiled at run time), and trains: masked-token loss, ENAT's reuse branch
(with probability reuse_prob the EMA model encodes a synthetic previous step and the model
trains on top of its features) or plain NAT training, gradient accumulation and clipping,
an EMA of the weights, metrics to stdout and MLflow (rank 0), checkpoints to storage every
N steps.

Determinism: a step's global batch is fixed by the data order (trainer/data.py) and cut into
micro-batches numbered across ranks (rank r, micro-step a: micro-batch r * grad_accum + a).
A micro-batch's randomness (mask positions, dropout, the classifier-free-guidance label
drop) comes from seeds derived from (seed, step, micro-batch number), ENAT's mask counts and
reuse coin from (seed, step). So the losses do not depend on how many workers share the
global batch: a run resumed on another number of workers, with grad_accum changed to keep
the global batch, repeats the uninterrupted run's losses in fp32 (up to reduction order).

The CFG label drop (p_uncond) is applied here, once, to the condition that both the model
and the EMA reuse pass see; the model is built with cond_dropout 0 so it cannot drop a
second time, and the exported EMA config records cond_dropout = p_uncond.

bf16 runs under torch.autocast (weights, gradients and optimizer state stay fp32), so every
ZeRO stage behaves alike and precision=fp32 is exact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from enat.models import ReuseState, build_model, config_to_dict
from enat.models.device import bf16_supported
from enat.models.layers import drop_condition
from enat.models.masking import mask_tokens, masked_token_loss, previous_step_input
from enat.models.typed_config import to_dict
from enat.pipelines import runs, storage
from enat.pipelines.tracking import Tracker
from enat.trainer import checkpoint, train_state
from enat.trainer.config import TrainConfig
from enat.trainer.data import Batch, TokenStream, open_dataset
from enat.trainer.distributed import import_deepspeed, init_distributed
from enat.trainer.ema import EMA
from enat.trainer.lr_schedule import lr_multiplier
from enat.trainer.metrics import Meter, matmul_peak, train_flops_per_sample
from enat.trainer.resume import find_start
from enat.trainer.validation import validation_batch, validation_loss


@dataclass
class TrainResult:
    step: int  # the last step trained
    losses: dict[int, float]  # this rank's loss of every step this call trained
    checkpoint: str | None  # the last checkpoint published
    resumed_from: str | None
    metrics: dict[str, float]  # the last logged metrics


def derived_seed(*parts: Any) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def masking_generators(seed: int, step: int, micro_batch: int,
                       enat: bool) -> tuple[torch.Generator, torch.Generator | None]:
    """(counts, positions) generators of micro-batch `micro_batch` of a step. ENAT packs
    tokens densely and ZeRO reduces gradients as they become ready, so all ranks must build
    one graph: ENAT's counts (ratio, reuse share and coin) come from a generator shared by
    the whole step, whatever the number of ranks. Positions are per micro-batch; shared ones
    cost the demo's default-8 FID 6.34 against 5.89. NAT draws all per micro-batch
    (positions None: from the counts generator)."""
    counts = torch.Generator().manual_seed(derived_seed("mask", seed, step, None if enat else micro_batch))
    if not enat:
        return counts, None
    return counts, torch.Generator().manual_seed(derived_seed("mask-positions", seed, step, micro_batch))


def lr_factor(config: TrainConfig) -> Callable[[int], float]:
    """LambdaLR factor; optimizer step n (1-based) uses factor(n - 1)."""
    return lambda index: lr_multiplier(index + 1, config.steps, config.warmup_steps, config.schedule,
                                       config.min_lr_ratio)


class Trainer:
    def __init__(self, config: TrainConfig):
        deepspeed = import_deepspeed()
        self.config = config
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if torch.cuda.is_available():
            # Launchers that give each worker only its own GPU (Ray) leave one device visible.
            local = int(os.environ.get("LOCAL_RANK", 0))
            self.device = torch.device("cuda", local if local < torch.cuda.device_count() else 0)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        model_config = config.model
        self.model_dict = config_to_dict(model_config)
        self.kind = model_config.kind
        self.p_uncond = model_config.cond_dropout if config.p_uncond is None else config.p_uncond
        self.export_config = replace(model_config, cond_dropout=self.p_uncond)
        self.dataset = open_dataset(config.data, model_config)
        validation = config.validation
        self.val_batch = validation_batch(self.dataset, validation) if validation.samples else None
        bf16 = config.precision == "bf16" or (config.precision == "auto" and bf16_supported(self.device))
        self.dtype = torch.bfloat16 if bf16 else torch.float32

        self.start = find_start(config, self.model_dict)
        self.grad_accum, self.global_batch = self.start.grad_accum, self.start.global_batch
        restored = self.start.restored

        torch.manual_seed(config.seed)
        model = build_model(replace(model_config, cond_dropout=0.0))
        if restored is not None:  # DeepSpeed builds its fp32 copies from these
            train_state.load_weights(model, restored.weights)
        model = model.to(self.device)
        self.seq_len, self.mask_id = model_config.seq_len, model_config.mask_id
        self.null_class, self.width = model_config.null_class, model_config.width
        self.flops_per_sample = train_flops_per_sample(model, config.masking, self.kind == "enat",
                                                       self.autocast, self.device)
        self.peak = matmul_peak(self.device, self.dtype)
        self.ema = EMA(model, config.ema_decay)
        if restored is not None:
            self.ema.load_state_dict(restored.ema)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=tuple(config.betas),
                                      weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config))
        ds_config = {
            "train_micro_batch_size_per_gpu": config.batch_size,
            "gradient_accumulation_steps": self.grad_accum,
            "train_batch_size": self.global_batch,
            "gradient_clipping": config.grad_clip,
            # One contiguous gradient buffer spares GPU memory from fragmentation; on CPU it
            # only costs the copy (bench/zero_overhead.py: ZeRO-2 steps 4-8% faster without
            # it in 3 runs of 4, equal in the fourth).
            "zero_optimization": {"stage": config.zero_stage,
                                  "contiguous_gradients": self.device.type == "cuda"},
            "steps_per_print": 2**31 - 1,
        }
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config, dist_init_required=False)
        if restored is not None:
            train_state.restore(self.engine, restored.moments, restored.adam_step)
            train_state.set_schedule(self.engine, restored.step)
        self.logged_through = 0  # the last step MLflow already has (a restart recomputes later ones)
        self.tracker: Tracker | None = None
        self.tracking_url = storage.join(runs.run_url(config.root, config.run), runs.TRACKING_NAME)
        self.run_id_recorded = False
        self.stream: TokenStream | None = None
        self.last_checkpoint: str | None = None
        self.metrics: dict[str, float] = {}

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # -- start: resume, tracking ---------------------------------------------------------

    def _start_tracking(self) -> None:
        config = self.config
        run_id = json.loads(storage.read_bytes(self.tracking_url))["mlflow_run_id"] \
            if config.tracking and storage.exists(self.tracking_url) else None
        tags = {"enat.run": config.run, "enat.root": config.root, "enat.model": self.kind}
        self.tracker = Tracker(config.mlflow_experiment, config.run, run_id=run_id, enabled=config.tracking,
                               tags=tags, wait=config.tracking_wait)
        self.run_id_recorded = run_id is not None
        self.logged_through = self.tracker.last_step("loss") if run_id is not None else 0
        if config.tracking and run_id is None:
            self.tracker.log_params(to_dict(config))
        self._record_run_id()

    def _record_run_id(self) -> None:
        """Name the MLflow run in the run's tracking.json once MLflow has created it: at the
        start, or, when MLflow was down then, at a later checkpoint or the end."""
        if not self.run_id_recorded and self.tracker.run_id:
            record = {"mlflow_run_id": self.tracker.run_id}
            storage.write_bytes(self.tracking_url, json.dumps(record).encode())
            self.run_id_recorded = True

    def _track(self, metrics: dict[str, float], step: int) -> None:
        """Log to MLflow unless it has this step already (a restart recomputes the steps after
        the last checkpoint; their first values stay)."""
        if step > self.logged_through:
            self.tracker.log_metrics(metrics, step)

    # -- one step ------------------------------------------------------------------------

    def _micro_step(self, batch: Batch, step: int, micro: int) -> tuple[torch.Tensor, float | None]:
        config, enat = self.config, self.kind == "enat"
        micro_batch = self.rank * self.grad_accum + micro  # its number in the global batch
        generator, positions = masking_generators(config.seed, step, micro_batch, enat)
        torch.manual_seed(derived_seed("dropout", config.seed, step, micro_batch))  # + label drop
        cond = drop_condition(batch.cond, self.p_uncond, self.null_class) if self.p_uncond > 0 else batch.cond
        masked, mask = mask_tokens(batch.ids, self.mask_id, config.masking, generator,
                                   one_ratio_per_batch=enat, positions=positions)
        with self.autocast():
            if enat:
                # Every parameter must take part in every step: ZeRO-3 applies a parameter's
                # last (stale) gradient again in a step that gave it none.
                prev_ids = None
                if float(torch.rand(1, generator=generator)) < config.masking.reuse_prob:
                    prev_ids = previous_step_input(masked, mask, self.mask_id, generator, positions)
                    # Re-masking nothing would leave the encoder idle (no token is new), a
                    # step generation never takes: train such a step without reuse.
                    prev_ids = None if torch.equal(prev_ids, masked) else prev_ids
                if prev_ids is not None:
                    with torch.no_grad():
                        prev = self.ema.model(prev_ids, cond)
                else:
                    # A previous step that saw nothing: the same numbers as no reuse, but the
                    # reuse path's parameters take part (with zero gradients).
                    prev = ReuseState(torch.zeros(*mask.shape, self.width, device=self.device),
                                      torch.ones_like(mask))
                logits = self.engine(masked, cond, prev).logits
            else:
                logits = self.engine(masked, cond)
            loss = masked_token_loss(logits, batch.ids, mask, config.masking.label_smoothing)
        self.engine.backward(loss)
        grad_norm = None
        if config.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
            norms = [torch.linalg.vector_norm(p.grad) for p in self.engine.module.parameters()
                     if p.grad is not None]
            grad_norm = float(torch.linalg.vector_norm(torch.stack(norms)))
        self.engine.step()
        return loss.detach(), grad_norm

    def train_step(self, batches: list[Batch], step: int) -> tuple[float, float | None]:
        """One optimizer step over `batches` (one per micro-step, on the device) and the EMA
        update: (mean loss, gradient norm or None). The loop's step, and what bench/gpu.py times."""
        losses, grad_norm = [], None
        for micro, batch in enumerate(batches):
            loss, norm = self._micro_step(batch, step, micro)
            losses.append(float(loss))
            grad_norm = norm if norm is not None else grad_norm
        if self.config.zero_stage > 0:
            grad_norm = float(self.engine.get_global_grad_norm())
        self.ema.update(self.engine.module)
        return sum(losses) / len(losses), grad_norm

    # -- logging and checkpoints ---------------------------------------------------------

    def _log(self, step: int, meter: Meter, grad_norm: float | None) -> None:
        stats = self.stream.stats()
        totals = torch.tensor([meter.loss_sum, meter.loss_count, stats.corrupt_shards,
                               stats.corrupt_samples, stats.missing_shards], dtype=torch.float64)
        dist.all_reduce(totals)
        metrics = {"loss": float(totals[0] / totals[1]), "lr": self.engine.get_lr()[0],
                   "grad_norm": float(grad_norm if grad_norm is not None else float("nan")),
                   **meter.rates(self.seq_len, self.flops_per_sample, self.peak, self.world),
                   "data_corrupt_shards": float(totals[2]), "data_corrupt_samples": float(totals[3]),
                   "data_missing_shards": float(totals[4]), "world_size": float(self.world),
                   "grad_accum": float(self.grad_accum)}
        self.metrics = metrics
        if self.rank == 0:
            print(f"step {step}/{self.config.steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                  f"grad_norm {metrics['grad_norm']:.3f} tokens/s {metrics['tokens_per_s']:.0f} "
                  f"mfu {100 * metrics['mfu']:.2f}% data_wait {100 * metrics['data_wait_frac']:.1f}% "
                  f"workers {self.world}", flush=True)
            self._track(metrics, step)

    def _validate(self, step: int) -> None:
        """val_loss of the EMA weights (what gets evaluated), computed on rank 0."""
        loss = [validation_loss(self.ema.model, self.val_batch, self.config.validation, self.mask_id,
                                self.device) if self.rank == 0 else None]
        dist.broadcast_object_list(loss, src=0)
        self.metrics["val_loss"] = loss[0]
        if self.rank == 0:
            print(f"step {step}: val_loss {loss[0]:.4f}", flush=True)
            self._track({"val_loss": loss[0]}, step)

    def _checkpoint(self, step: int, on_checkpoint: Callable[[int, str, dict], None] | None) -> None:
        config = self.config
        if self.val_batch is not None:
            self._validate(step)
        url = runs.step_url(config.root, config.run, step)
        if self.rank == 0:
            self._record_run_id()  # before the checkpoint appears: its evaluation logs there
        data = {"samples": self.stream.position(), "global_batch": self.global_batch,
                "epoch_size": self.stream.order.size}
        started = time.perf_counter()
        saved = checkpoint.save(url, step, self.engine, self.ema.model, self.export_config, to_dict(config),
                                meta={"zero_stage": config.zero_stage, "model": self.model_dict,
                                      "run": config.run, "metrics": dict(self.metrics), "data": data})
        seconds = time.perf_counter() - started  # what a checkpoint costs: see checkpoint_every
        self.metrics["checkpoint_s"] = seconds
        self.last_checkpoint = saved.url
        if self.rank == 0:
            removed = checkpoint.prune(config.root, config.run, config.keep_last)
            self.tracker.set_tags({"checkpoint.latest": saved.url, f"checkpoint.step_{step}": saved.url,
                                   "ema.latest": saved.ema_url})
            self._track({"checkpoint_s": seconds}, step)
            print(f"checkpoint step {step}: {saved.url} ({seconds:.1f} s)"
                  + (f", removed {len(removed)} older" if removed else ""), flush=True)
        if on_checkpoint is not None:
            on_checkpoint(step, saved.url, dict(self.metrics))

    # -- the loop ------------------------------------------------------------------------

    def run(self, until_step: int | None,
            on_checkpoint: Callable[[int, str, dict], None] | None) -> TrainResult:
        config = self.config
        target, start = self.start.checkpoint, self.start.step
        if self.rank == 0:
            self._start_tracking()
            if target is not None:
                self.tracker.set_tags({"enat.resumed_from": target.url})
        self.stream = TokenStream(self.dataset, config.data, config.batch_size, config.seed, self.rank,
                                  self.world, self.grad_accum, self.start.samples)
        last = min(config.steps, until_step or config.steps)
        losses: dict[int, float] = {}
        meter, grad_norm, step = Meter(), None, start
        self.engine.module.train()
        try:
            while step < last:
                step += 1
                batches = []
                for _ in range(self.grad_accum):
                    waited = time.perf_counter()
                    batches.append(next(self.stream).to(self.device))
                    meter.data_wait += time.perf_counter() - waited
                losses[step], norm = self.train_step(batches, step)
                grad_norm = norm if norm is not None else grad_norm
                meter.steps += 1
                meter.samples += self.global_batch
                meter.loss_sum += losses[step]
                meter.loss_count += 1
                if step % config.log_every == 0 or step == last:
                    self._log(step, meter, grad_norm)
                    meter = Meter()
                if step % config.checkpoint_every == 0 or step == last:
                    paused = time.perf_counter()
                    self._checkpoint(step, on_checkpoint)
                    meter.started += time.perf_counter() - paused  # rates count training only
            if self.rank == 0:
                # What is buffered is delivered first (waiting at most tracking_wait); a run
                # stopped early is continued later and stays RUNNING.
                if step == config.steps:
                    self.tracker.finish("FINISHED")
                else:
                    self.tracker.close()
                self._record_run_id()
        except BaseException:
            if self.rank == 0 and self.tracker is not None:
                self.tracker.finish("FAILED")
            raise
        finally:
            self.stream.close()
        return TrainResult(step, losses, self.last_checkpoint, target.url if target else None, self.metrics)


def train(config: TrainConfig, until_step: int | None = None,
          on_checkpoint: Callable[[int, str, dict], None] | None = None) -> TrainResult:
    """Train (or continue) the run `config.run`; collective over the launcher's processes.

    `until_step` stops early after that step (a checkpoint is written there), as a
    preemption would; `on_checkpoint(step, url, metrics)` runs on every rank after each
    checkpoint is published (the Ray launcher reports to Ray Train from it)."""
    init_distributed()
    return Trainer(config).run(until_step, on_checkpoint)
