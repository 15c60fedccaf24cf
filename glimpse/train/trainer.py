"""The training loop every family shares.

AdamW with warmup + cosine, gradient accumulation and clipping, optional bf16 autocast,
DDP under torchrun, periodic evaluation, atomic checkpoints and exact resume.  It knows a
family only through the registry (glimpse.families): the recipe's `family:` gives the model,
the data, the loss and the evaluation.  The run folder's layout is glimpse.runs'.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from glimpse import families, runs
from glimpse.config import Recipe, save_recipe, validate_recipe
from glimpse.data.tokenizer import Tokenizer
from glimpse.data.world import ensure_shapes, ensure_shapes_shop, ensure_shapes_video
from glimpse.distributed import agree, all_reduce_int, all_reduce_mean, barrier, init_distributed
from glimpse.errors import GlimpseError
from glimpse.hardware import keep_freed_cpu_memory, matmul_gflops, warn_if_slow_dtype
from glimpse.hub import folder as hub_folder
from glimpse.hub import is_hf_folder, resolve
from glimpse.train import checkpoint as ckpt
from glimpse.train import parallel
from glimpse.train.plots import plot_metrics
from glimpse.train.sampler import StepBatchSampler

FAILURE_REASONS = ("missing", "format", "truncated", "corrupt", "oversized")


def lr_at(step: int, cfg) -> float:
    """Linear warmup to lr, then a cosine down to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def data_root(recipe: Recipe, progress: bool = True) -> Path:
    if recipe.data.source == "shapes":
        return ensure_shapes(recipe.data, progress)
    if recipe.data.source == "shapes-video":
        return ensure_shapes_video(recipe.data, progress)
    if recipe.data.source == "shapes-shop":
        return ensure_shapes_shop(recipe.data, progress)
    return Path(recipe.data.root or ".")


def param_groups(model: torch.nn.Module, weight_decay: float, lr_scale: dict[str, float] | None = None) -> list[dict]:
    """Weight decay on weight matrices only: not on biases, norms, the temperature (all < 2-D),
    nor on the embeddings (token, position, class token).  `lr_scale` gives a part (a top-level
    submodule: vision, lm, ...) its own factor on the learning rate, e.g. a pretrained tower
    fine-tuned 10x slower than the new layers."""
    lr_scale = lr_scale or {}
    for part in lr_scale:
        runs.model_part(model, part, "train.lr_scale: ")
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        embedding = name.endswith(("pos_embed", "class_token", "token_embed.weight"))
        decay = not (p.ndim < 2 or embedding)
        groups.setdefault((float(lr_scale.get(name.split(".", 1)[0], 1.0)), decay), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
            for (scale, decay), ps in groups.items()]


def _step_of(line: str) -> float:
    """The step of a metrics record; infinity for a blank or half-written line (dropped on resume)."""
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return math.inf


def resume_state(out: Path, model, optimizer, main: bool) -> dict:
    """The trainer state of the newest checkpoint that loads; a broken one is passed over with a warning
    (the next save replaces it)."""
    for ck in reversed(runs.list_checkpoints(out)):
        try:
            return ckpt.load_checkpoint(ck, model, optimizer, sharded=parallel.is_sharded(model))
        except ckpt.CheckpointMismatch:
            raise
        except GlimpseError as e:
            if main:
                print(f"glimpse: warning: {e}; resuming from the checkpoint before it", file=sys.stderr)
    raise GlimpseError(f"no checkpoint of {out} loads: start a new run (another --out)")


class MetricsLog:
    """RUN/metrics.jsonl, one JSON record per line; on resume, records past the checkpoint are dropped
    (the file rewritten through a temporary one, so a crash there loses nothing).  With `tensorboard`,
    every number also goes to TensorBoard event files in RUN/tensorboard (torch.utils.tensorboard), whose
    records past the checkpoint TensorBoard drops on resume (purge_step)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None, tensorboard: bool = False):
        self.path, self.enabled = path, enabled
        self.board = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise GlimpseError("train.log_to: tensorboard needs the tensorboard package: "
                                   "pip install 'glimpse-vl[tensorboard]'") from None
            if resume_step is None:  # a fresh run: no curves of an earlier attempt in the same folder
                shutil.rmtree(path.parent / runs.TENSORBOARD, ignore_errors=True)
            self.board = SummaryWriter(str(path.parent / runs.TENSORBOARD),
                                       purge_step=None if resume_step is None else resume_step + 1)
        if enabled and resume_step is not None and path.exists():
            keep = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
            tmp = path.with_name(f".tmp-{path.name}")
            tmp.write_text("".join(k + "\n" for k in keep))
            os.replace(tmp, path)
        elif enabled:
            path.write_text("")

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.board is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.board.add_scalar(key, value, step)
                elif isinstance(value, dict):  # bad samples by reason
                    for sub, v in value.items():
                        self.board.add_scalar(f"{key}/{sub}", v, step)
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def train(recipe: Recipe, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train `recipe` into the run folder `out`; returns the final evaluation."""
    t_start = time.time()
    validate_recipe(recipe)
    dist_info = init_distributed()
    main = dist_info.is_main
    tc = recipe.train
    if dist_info.enabled and tc.padding_groups > 1:
        raise GlimpseError("train.padding_groups > 1 runs the model several times a step, which DDP does not "
                           "allow: use 1 with several processes")
    if tc.batch_size % (dist_info.world_size * tc.grad_accum):
        raise GlimpseError(f"train.batch_size {tc.batch_size} must be a multiple of processes x grad_accum "
                           f"({dist_info.world_size} x {tc.grad_accum})")
    out = Path(out)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = torch.device(f"cuda:{dist_info.local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and tc.keep_freed_memory:
        keep_freed_cpu_memory()
    if tc.precision == "bf16" and main:
        warn_if_slow_dtype(torch.bfloat16, device, "train.precision: fp32")
    # a wall time holds only for its machine: the run records how fast this one multiplies (run.json)
    gflops = matmul_gflops(device=device.type) if main else 0.0

    if main and resume:
        ckpt.tidy(out)  # finish a save that a crash interrupted
    barrier()
    existing = runs.latest_checkpoint(out)
    if existing is not None and not resume:
        raise GlimpseError(f"{out} already holds a run (last checkpoint {existing.name}); "
                           "pass --resume to continue it, or choose another --out")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        root = data_root(recipe, progress)
    barrier()  # the other processes wait for the data the main one generated
    if not main:
        root = data_root(recipe, False)
    tok_path = resolve(recipe.tokenizer) if recipe.tokenizer else root / runs.TOKENIZER
    if tok_path.is_dir():  # a Hugging Face model folder
        tok_path = tok_path / hub_folder.TOKENIZER
    tokenizer = Tokenizer(tok_path)
    task = families.get(recipe.family)(recipe, root, tokenizer)

    torch.manual_seed(tc.seed)
    model = task.build_model().to(device)
    if recipe.init:  # a glimpse run, or a Hugging Face folder of the same architecture
        if is_hf_folder(recipe.init):
            families.init_from_hf(model, recipe.init)
        else:  # a family may load another member's run its own way (new heads)
            task.load_init(model, runs.run_weights(recipe.init))
    for part, value in recipe.init_parts.items():
        run, source = runs.part_source(value)  # RUN#name: that run's part `name` (a vision tower as a second one)
        if is_hf_folder(run):
            if source:
                raise GlimpseError(f"init_parts.{part}: {value}: '#{source}' names a part of a glimpse run; a "
                                   "Hugging Face folder gives the part its family reads for the recipe's part")
            families.init_part_from_hf(model, part, run)
        else:
            runs.load_part(model, part, runs.run_weights(run), source)
    for part in recipe.freeze:
        runs.model_part(model, part, "freeze: ").requires_grad_(False)
    if tc.lora.r > 0:  # adapters on the targets outside the frozen parts; only they train (PEFT's default)
        from glimpse.models import lora

        lora.apply_lora(model, tc.lora, skip=recipe.freeze)
        lora.mark_only_lora_trainable(model)
    fsdp = dist_info.enabled and tc.parallel == "fsdp"
    if tc.activation_checkpointing:
        parallel.checkpoint_blocks(model)
    if fsdp:  # before the optimizer: it must hold the sharded parameters
        parallel.shard(model, tc.precision)
    # fused on a GPU: one kernel for every parameter instead of several per tensor (sharded DTensors stay on foreach)
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay, tc.lr_scale), lr=tc.lr, betas=tuple(tc.betas),
                                  fused=device.type == "cuda" and not fsdp or None)
    state = {"failures": {}, "bad_in_a_row": 0}
    start = 0
    if existing is not None:
        state = resume_state(out, model, optimizer, main)
        start = state["step"]
        if main:
            print(f"resuming {out} from step {start}")
    with parallel.gathered(model, writeback=True):
        task.prepare(model, device, main and progress)  # once, with the weights training starts from
    if main:
        save_recipe(recipe, out / runs.RECIPE)
        if tok_path.resolve() != (out / runs.TOKENIZER).resolve():
            shutil.copyfile(tok_path, out / runs.TOKENIZER)
        if task.transform is not None:
            (out / runs.PREPROCESS).write_text(json.dumps(task.transform.to_dict()))
        for name, text in task.run_files().items():
            tmp = out / f".tmp-{name}"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, out / name)

    ddp = DistributedDataParallel(model) if dist_info.enabled and not fsdp else None
    net = ddp or model
    if tc.compile:
        net = torch.compile(net)  # the same parameters: checkpoints and eval use `model` as is
    dataset, collate = task.train_data()
    if tc.group_by_length and not hasattr(dataset, "lengths"):
        raise GlimpseError(f"train.group_by_length: a {recipe.family} run's samples have no length to group by")
    # data.stream: the data set orders itself (glimpse.data.stream), endlessly, from the checkpoint's position
    stream = isinstance(dataset, torch.utils.data.IterableDataset)
    if stream:
        micro = tc.batch_size // (dist_info.world_size * tc.grad_accum)
        dataset.start_at(start * tc.grad_accum, micro, recipe.data.num_workers, state.get("stream"))
        loader = DataLoader(dataset, batch_size=micro, collate_fn=collate, num_workers=recipe.data.num_workers,
                            persistent_workers=False, prefetch_factor=4 if recipe.data.num_workers else None)
    else:
        sampler = StepBatchSampler(len(dataset), tc.batch_size, seed=tc.seed, start_step=start, rank=dist_info.rank,
                                   world_size=dist_info.world_size, grad_accum=tc.grad_accum, max_steps=tc.max_steps,
                                   lengths=dataset.lengths() if tc.group_by_length else None)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=recipe.data.num_workers,
                            persistent_workers=False, prefetch_factor=4 if recipe.data.num_workers else None)
    log = MetricsLog(out / runs.METRICS, main, start if existing is not None else None, "tensorboard" in tc.log_to)
    failures = Counter(state["failures"])
    bad_in_a_row = state["bad_in_a_row"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16")
    bar = tqdm(total=tc.max_steps, initial=start, desc=f"train {recipe.name}", disable=not (main and progress),
               dynamic_ncols=True, mininterval=1.0)

    try:  # the progress bar and TensorBoard's writer are closed however training ends
        batches = dataset.read(loader) if stream else iter(loader)
        step = start
        final = None  # FSDP: the whole model gathered for the last checkpoint, used again by the adapter export
        model.train()
        while step < tc.max_steps:
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, tc) * group.get("lr_scale", 1.0)
            optimizer.zero_grad(set_to_none=True)
            loss_sum, n_samples, n_micro = torch.zeros((), device=device), 0, 0
            for micro in range(tc.grad_accum):
                batch = next(batches)
                for status in batch["status"]:
                    if status is None:
                        bad_in_a_row = 0
                    else:
                        failures[status] += 1
                        bad_in_a_row += 1
                # processes decide together, or one would wait in a collective the other skipped
                n_good, worst_run = agree(len(batch["status"]) - len(batch["messages"]), bad_in_a_row)
                if worst_run > tc.max_consecutive_failures:
                    last = batch["messages"][-1] if batch["messages"] else "on another process"
                    raise GlimpseError(f"stopping: {worst_run} bad samples in a row (last: {last}); check the data")
                if n_good == 0:  # a micro-batch with no good sample (on some process): skip it everywhere
                    continue
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                sync = contextlib.nullcontext() if ddp is None or micro == tc.grad_accum - 1 else ddp.no_sync()
                with sync:
                    with autocast:
                        loss = task.loss(net, batch)
                    # every process must agree before backward, or DDP's all-reduce would hang
                    if not bool(all_reduce_mean(torch.isfinite(loss.detach()).float()) == 1.0):
                        raise GlimpseError(f"non-finite loss at step {step} (loss={loss.item()}); stopped before "
                                           "the optimizer step: lower train.lr or use train.precision=fp32")
                    (loss / tc.grad_accum).backward()
                loss_sum += loss.detach()
                n_micro += 1
                n_samples += len(batch["status"])
            if fsdp:
                parallel.sync_replicated_grads(model)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
            if hasattr(grad_norm, "full_tensor"):  # FSDP: the norm over every process's shards
                grad_norm = grad_norm.full_tensor()
            if not torch.isfinite(grad_norm):
                raise GlimpseError(f"non-finite gradient at step {step}; stopped before the optimizer step: "
                                   "lower train.lr or use train.precision=fp32")
            optimizer.step()
            step += 1
            if step == start + 1:  # what one process holds (its shards under FSDP): the largest over processes
                memory = {k: all_reduce_int(v, device, "max") for k, v in parallel.local_bytes(model, optimizer).items()}
            dt = time.perf_counter() - t0
            loss_value = all_reduce_mean(loss_sum / max(n_micro, 1)).item()  # skipped micro-batches do not count
            throughput = n_samples * dist_info.world_size / dt
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", samples_s=f"{throughput:.0f}")
            if step % tc.log_every == 0 or step == tc.max_steps:
                log.write({"step": step, "loss": loss_value, "lr": lr_at(step - 1, tc),
                           "grad_norm": grad_norm.item(), "samples_per_s": throughput,
                           **({"bad_samples": dict(failures)} if failures else {})})
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
                with parallel.gathered(model):  # FSDP: the main process evaluates the whole model alone
                    if main:
                        figures = task.evaluate(model, recipe.eval.during_train)
                        log.write({"step": step, **figures})
                        bar.write(f"step {step}: " + "  ".join(f"{k} {v if isinstance(v, int) else format(v, '.3f')}"
                                                                for k, v in figures.items()))
                        model.train()
                    barrier()
            if step == tc.max_steps:
                with parallel.gathered(model, writeback=True):
                    task.finish(model, device)  # on every process: the weights stay the same everywhere
            if step % tc.save_every == 0 or step == tc.max_steps:
                trainer_state = {"failures": dict(failures), "bad_in_a_row": bad_in_a_row,
                                 **({"stream": dataset.position(step * tc.grad_accum)} if stream else {})}
                if fsdp:  # every process writes its shards; the last checkpoint also holds the whole model
                    final = parallel.full_state(model) if step == tc.max_steps else None
                    ckpt.save_sharded_checkpoint(out, step, model, optimizer, trainer_state, tc.keep_checkpoints,
                                                 final if main else None)
                elif main:
                    ckpt.save_checkpoint(out, step, model, optimizer, trainer_state, tc.keep_checkpoints)
                if main:
                    plot_metrics(out / runs.METRICS, out / runs.LOSS_PLOT)
                barrier()
        bar.close()

        results: dict = {}
        with parallel.gathered(model):
            if main:
                results = task.evaluate(model, recipe.eval.splits) if recipe.eval.splits else {}
        if main:
            log.write({"step": step, **results, "bad_samples": dict(failures)})
            (out / runs.EVAL).write_text(json.dumps(results, indent=2) + "\n")
            plot_metrics(out / runs.METRICS, out / runs.LOSS_PLOT)
            (out / runs.RUN_INFO).write_text(json.dumps({
                "seconds": round(time.time() - t_start, 1), "steps": [start, step], "matmul_gflops": round(gflops, 1),
                "device": str(device), "threads": torch.get_num_threads(), "processes": dist_info.world_size,
                **({"parallel": tc.parallel} if dist_info.enabled else {}), "torch": torch.__version__,
                "bytes_per_process": memory if step > start else None}, indent=2) + "\n")
            if failures:
                print("skipped bad samples: " + ", ".join(f"{r} {n}" for r, n in sorted(failures.items())))
        if tc.lora.r > 0:  # the adapters in PEFT's format too, where the family exports (RUN/adapter: glimpse.hub.peft)
            from glimpse.hub import peft as hub_peft
            from glimpse.models import lora

            layers = lora.lora_layers(model)  # on every process: FSDP gathers each adapter whole
            if fsdp and final is None:  # a run resumed at its last step saved nothing: gather it now
                final = parallel.full_state(model)
            if main:
                from_folder = recipe.init and not recipe.init_parts and is_hf_folder(recipe.init)
                plain = model
                if fsdp:  # the export reads plain tensors: a one-process copy of the model
                    plain = task.build_model()
                    lora.apply_lora(plain, tc.lora, skip=recipe.freeze)
                    runs.load_tensors(plain, final, out)
                try:  # they apply to the Hugging Face folder the run started from, if it did
                    hub_peft.adapter_of(task.to_hf(plain), layers, tc.lora,
                                        str(resolve(recipe.init).resolve()) if from_folder else None
                                        ).write(out / runs.ADAPTER)
                except GlimpseError as e:
                    print(f"glimpse: note: no PEFT adapter written: {e}", file=sys.stderr)
        barrier()
        return results
    finally:
        bar.close()
        log.close()
