"""``MixtureRuntime``: the mixture inside Megatron-LM's loop, beside the channel logging.

* Data: ``train_dataset`` puts a ``ScheduledBlendedDataset`` over the training blend's
  components, with a shared-memory schedule made before the data loader starts its workers.
* Every iteration (called by the ``training_log`` wrapper on every rank): the controller takes
  the iteration's all-reduced channel totals (last pipeline stage, on the device: nothing is
  read on the host between decisions). Every ``interval`` iterations the last rank decides, and
  ONE broadcast of ``3K + 1`` float64 values (a flag, the weights, and the signal they came
  from) gives every rank the same weights (the first pipeline stage reads data too). Applied, they become a schedule row from sample
  ``(iteration + lag) x global batch``; every iteration the horizon moves to that same point.
  A second small all-reduce checks that every rank holds the same rows.
* Checkpoints: when Megatron saves iteration N, the last rank first writes the rows and the
  controller state to ``<save>/channel_mixture/iter_N.json``; a run loading iteration N reads
  it back on every rank (in the datasets provider, which every rank runs), so it continues the
  schedule exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import numpy as np
import torch

from ..channel_logging.jsonl_schema import MixtureChannel, MixtureRecord, append_jsonl
from ..channel_logging.wrappers import is_last_rank, write_scalars
from ..data.scheduled_blend import MixtureSchedule, ScheduledBlendedDataset
from .controller import MixtureController
from .policies import SCHEDULE
from .settings import MixtureSettings

SIDECAR_DIR = "channel_mixture"
MIXTURE_WEIGHT = "mixture weight "  # TensorBoard / W&B name prefix: "mixture weight math"


def sidecar_path(directory: str, iteration: int) -> str:
    return os.path.join(directory, SIDECAR_DIR, f"iter_{iteration:07d}.json")


def _collective_device():
    """Where a tensor handed to a collective must live: the GPU under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class MixtureRuntime:
    """Args:
        settings: the mixture settings.
        names: the channel names, in channel order.
        component_channels: the channel of each blend component (one component per channel).
        blend_weights: the blend's own weights, per component.
        global_batch_size: samples per iteration.
        jsonl_path: where the last rank appends ``MixtureRecord``s (None: nowhere).
    """

    def __init__(self, settings: MixtureSettings, names, component_channels, blend_weights, global_batch_size: int,
                 jsonl_path: str | None = None):
        self.settings, self.names = settings, tuple(names)
        self.component_channels = list(component_channels)
        initial = np.zeros(len(self.names))
        for component, channel in enumerate(self.component_channels):
            initial[channel] = blend_weights[component]
        self.controller = MixtureController(settings, initial)
        self.gbs, self.jsonl_path = int(global_batch_size), jsonl_path
        self.rows: list[tuple[int, list[float]]] = [(0, (initial / initial.sum()).tolist())]  # channel weights
        self.schedules: list[MixtureSchedule] = []
        self.pending_records: list[MixtureRecord] = []
        self.loaded_from: str | None = None
        self.component_lengths: list[int] | None = None  # on ranks that hold the training blend
        self._window = None  # device [K, 2] train totals since the last decision
        self._saved_window = None  # [K, 2] float64 totals of the interval a resumed run starts inside
        if settings.policy == SCHEDULE:
            rows = [(start * self.gbs, list(w)) for start, w in settings.schedule]
            self.rows = rows if rows[0][0] == 0 else self.rows + rows
            self.pending_records = [self._record(start // self.gbs, start, w, None) for start, w in rows]

    # ------------------------------------------------------------------ data
    def component_weights(self, channel_weights) -> list[float]:
        return [channel_weights[c] for c in self.component_channels]

    def prepare(self, load_dir: str | None, iteration: int) -> None:
        """Read the saved schedule of a resumed run and check every rank holds the same rows.
        Every rank calls it (Megatron's datasets provider runs on every rank), once."""
        if self.loaded_from is not None:
            return
        self.loaded_from = ""
        if load_dir and iteration > 0:
            self.load(load_dir, iteration)
        self._ranks_agree()
        if is_last_rank() and torch.distributed.is_initialized():
            print(f" channel mixture: {len(self.rows)} schedule row(s) at start-up |"
                  f" same rows on all {torch.distributed.get_world_size()} ranks |", flush=True)

    def train_dataset(self, blended, *, consumed_samples: int, capacity: int):
        """The training ``BlendedDataset`` under the schedule (``consumed_samples``: where training resumes)."""
        for component, channel in zip(blended.datasets, self.component_channels):
            named = getattr(getattr(component, "dataset", None), "channel_names", None) or ()
            if any(name != self.names[channel] for name in named):
                raise ValueError(
                    f"{getattr(component, 'dataset_path', component)} names the channels {sorted(set(named))} on its "
                    f"lines, but --channel-mixture steers whole blend components (this one is channel "
                    f"{self.names[channel]!r}): give one file per channel, or drop the mixture")
        horizon = blended.size if self.settings.policy == SCHEDULE else consumed_samples + self.settings.lag * self.gbs
        schedule = MixtureSchedule(self.component_weights(self.rows[0][1]), capacity=capacity + len(self.rows))
        for start, weights in self.rows[1:]:
            schedule.append(start, self.component_weights(weights))
        schedule.publish_through(horizon)
        self.schedules.append(schedule)
        self.component_lengths = [len(d) for d in blended.datasets]
        return ScheduledBlendedDataset(blended.datasets, schedule, blended.size)

    # ------------------------------------------------------------------ the loop
    def after_iteration(self, iteration: int, totals, margs) -> None:
        """Called on every rank after ``training_log`` of ``iteration``; ``totals``: the iteration's
        global table on the last stage (None elsewhere, or for a skipped iteration)."""
        if totals is not None:
            rows = totals[: len(self.names)].detach()
            if self._window is None and self._saved_window is not None:  # resumed inside an interval
                self._window, self._saved_window = torch.tensor(self._saved_window, dtype=rows.dtype,
                                                                device=rows.device), None
            self._window = rows.clone() if self._window is None else self._window + rows
        for record in self.pending_records:
            self._write(record, margs)
        self.pending_records = []
        if self.settings.policy != SCHEDULE and iteration % self.settings.interval == 0:
            self._decide(iteration, margs)
        if self.settings.apply and self.settings.policy != SCHEDULE:
            for schedule in self.schedules:
                schedule.publish_through((iteration + self.settings.lag) * self.gbs)

    def after_evaluation(self, losses: list[float | None]) -> None:
        if self.settings.signal == "validation":
            self.controller.add_validation(list(losses)[: len(self.names)])

    def _decide(self, iteration: int, margs) -> None:
        k = len(self.names)
        message = torch.zeros(k + 1 + 2 * k, dtype=torch.float64)
        decision = None
        if is_last_rank():
            if self._window is not None:
                self.controller.add_train_totals(self._window.cpu().numpy())
            decision = self.controller.decide()
            if decision is not None and not np.all(np.isfinite(decision[0])):
                message[0] = 2.0  # every rank stops alike, rather than some waiting in a collective
            elif decision is not None:
                weights, detail = decision
                message[0] = 1.0
                message[1:k + 1] = torch.from_numpy(weights)
                message[k + 1:] = torch.tensor([np.nan if v is None else v for v in detail["loss"]] + detail["score"])
        self._window = None
        dist = torch.distributed
        if dist.is_initialized() and dist.get_world_size() > 1:
            on_device = message.to(_collective_device())
            dist.broadcast(on_device, src=dist.get_world_size() - 1)
            message = on_device.cpu()
        if message[0] == 2.0:
            raise RuntimeError(f"the {self.settings.policy} policy gave non-finite weights at iteration {iteration} "
                               "(a NaN or infinite channel loss?); the mixture stops the run")
        if message[0] != 1.0:
            return
        weights = message[1:k + 1].tolist()
        self.controller.weights = np.asarray(weights)  # every rank holds the decided weights
        loss, score = message[k + 1:2 * k + 1].tolist(), message[2 * k + 1:].tolist()
        first_sample = (iteration + self.settings.lag) * self.gbs
        if self.settings.apply:
            self.rows.append((first_sample, weights))
            for schedule in self.schedules:
                schedule.append(first_sample, self.component_weights(weights))
                used_up = schedule.passed_end(self.component_lengths)
                if used_up:
                    warnings.warn(f"channel mixture: from sample {first_sample} on, the blend components of "
                                  f"{[self.names[self.component_channels[c]] for c in used_up]} have given all "
                                  "their samples; they repeat from their first", UserWarning, stacklevel=2)
        self._write(self._record(iteration, first_sample, weights, (loss, score)), margs, check=True)

    def _record(self, iteration, first_sample, weights, detail) -> MixtureRecord:
        loss, score = detail if detail is not None else ([None] * len(weights), [None] * len(weights))
        clean = [None if v is None or v != v else float(v) for v in loss]
        return MixtureRecord(
            iteration=int(iteration), first_iteration=first_sample // self.gbs + 1, first_sample=int(first_sample),
            policy=self.settings.policy, signal=self.settings.signal, applied=self.settings.apply,
            channels={name: MixtureChannel(weight=float(w), loss=l, score=None if s is None else float(s))
                      for name, w, l, s in zip(self.names, weights, clean, score)})

    def rows_digest(self) -> int:
        text = json.dumps(self.rows)
        return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)

    def _write(self, record: MixtureRecord, margs, check: bool = False) -> None:
        agree = self._ranks_agree() if check else None
        if not is_last_rank():
            return
        if self.jsonl_path:
            append_jsonl(self.jsonl_path, record)
        fields = "".join(f" weight {name}: {c.weight:.4f} |" for name, c in record.channels.items())
        mode = f"applied from iteration {record.first_iteration}" if record.applied else "advice, not applied"
        same = "" if agree is None else f" same rows on all {torch.distributed.get_world_size()} ranks |" \
            if agree else " ROWS DIFFER ACROSS RANKS |"
        print(f" channel mixture at iteration {record.iteration} ({record.policy}, {record.signal} signal, {mode}) |"
              f"{fields}{same}", flush=True)
        from ..megatron_internals.loop import training_module

        module = training_module()
        write_scalars(module.get_tensorboard_writer(), module.get_wandb_writer(),
                      {MIXTURE_WEIGHT + name: c.weight for name, c in record.channels.items()}, record.iteration)

    def _ranks_agree(self) -> bool | None:
        dist = torch.distributed
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return True
        digest = torch.tensor([self.rows_digest(), -self.rows_digest()], dtype=torch.int64)
        on_device = digest.to(_collective_device())
        dist.all_reduce(on_device, op=dist.ReduceOp.MAX)
        high, negative_low = on_device.cpu().tolist()
        if high != -negative_low:
            raise RuntimeError("the channel mixture rows differ across ranks; the data would differ too")
        return True

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: str, iteration: int) -> None:
        if not is_last_rank():
            return
        path = sidecar_path(directory, iteration)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        window = self._window.cpu().tolist() if self._window is not None else self._saved_window
        state = {"rows": self.rows, "controller": self.controller.state_dict(), "window": window,
                 "lag": self.settings.lag, "global_batch_size": self.gbs, "names": list(self.names),
                 "policy": self.settings.policy, "applied": self.settings.apply}
        with open(path + ".tmp", "w") as f:
            json.dump(state, f)
        os.replace(path + ".tmp", path)

    def load(self, directory: str, iteration: int) -> None:
        path = sidecar_path(directory, iteration)
        if not os.path.exists(path):
            warnings.warn(f"no channel mixture schedule at {path}: the mixture starts again from the blend's "
                          "weights at this iteration", UserWarning, stacklevel=2)
            self.loaded_from = path
            return
        with open(path) as f:
            state = json.load(f)
        saved = (state["names"], state["global_batch_size"], state["policy"], state["applied"], state["lag"])
        ours = (list(self.names), self.gbs, self.settings.policy, self.settings.apply, self.settings.lag)
        if saved != ours:
            raise ValueError(f"{path} was saved by a run with (channels, global batch, policy, applied, lag) = "
                             f"{saved}; this run has {ours}: resume with the same mixture flags")
        self.rows = [(int(start), list(weights)) for start, weights in state["rows"]]
        self.controller.load_state_dict(state["controller"])
        self._saved_window = state["window"]
        self.pending_records = []
        self.loaded_from = path


def install_mixture_runtime(runtime: MixtureRuntime, save_dir: str | None) -> None:
    """Hand ``runtime`` to the installed channel logging (which calls it every iteration and
    evaluation) and, when the run saves checkpoints, write the schedule beside each one."""
    from ..channel_logging.install import installed_channel_logging
    from ..megatron_internals.loop import training_module
    from ..megatron_internals.patches import apply_patch

    state = installed_channel_logging()
    if state is None:
        raise RuntimeError("the channel mixture needs the channel logging: call install_channel_logging first")
    state.mixture = runtime
    if not save_dir:
        return
    module = training_module()
    original = module.save_checkpoint

    def save_checkpoint(iteration, *args, **kwargs):
        runtime.save(save_dir, int(iteration))  # the rows are final: written first, so no checkpoint lacks them
        return original(iteration, *args, **kwargs)

    apply_patch(module, {"save_checkpoint": save_checkpoint},
                reason="megatron_channel: the channel mixture schedule beside each checkpoint")
