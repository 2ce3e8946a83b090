"""Two-phase training of a `HierarchicalLlama` on its frozen base, and router calibration.

Phases (`HierarchicalLlama.set_phase`): `routers` (FFN skip routers, with a capacity
schedule), `exits` (exit gates and exit norms, routers frozen), `full` (both), and
`base` (pretraining a small base from scratch, no routing and no gates).

The loss of a phase, on next-token targets:

- LM loss: cross-entropy of the output distribution. With gates, the output is the
  mixture over exits given by straight-through Gumbel samples (`GumbelExitGate.sample`):
  exit `k` is taken with weight `g_k * prod_{j<k} (1 - g_j)`, the final layer with the
  rest. The samples are hard, so the forward pass is a real exit decision per token.
- distillation: `KL(teacher || output)`, the teacher being the same frozen base at full
  depth with every FFN (routing off), gradient stopped; plus the same KL for each exit
  head on its own, so an exit head learns even when its gate is closed.
- router losses (`SkipRouter`): z-loss, entropy and the causal predictor's BCE.
- compute penalty: `compute_weight * E[exit layer] / num_layers` under the gates.

The model is wrapped in `LlamaPhaseTrainer`, a `keras.Model` for `fit`; the wrapper is
never saved: save `trainer.model`.

With an `output_dir`, `train_phase` checkpoints and resumes exactly, as GPT training
does (`toex_tf.training.tf_train`): the checkpoint holds the weights, the optimizer
state (its step drives the learning-rate schedule) and the random-generator states (the
Gumbel noise), and the batch order is a pure function of (seed, step), so a resumed
phase ends with the same weights as one that was never interrupted.
"""

import contextlib
import hashlib
import os

import keras
import numpy as np
from keras import ops

from toex_tf.layers import SkipRouter
from toex_tf.training.checkpoint import (
    CheckpointEvery,
    CheckpointManager,
    check_output_dir,
    checkpoint_bytes,
)
from toex_tf.training.multi_worker import (
    MultiWorkerFit,
    check_same_run,
    scale_loss_for_replicas,
    share_batches,
    weights_digest,
    write_dir,
)
from toex_tf.training.tensorboard import GlobalStepTensorBoard

TRAIN_PHASES = ("base", "routers", "exits", "full")


def forward_exits(model, token_ids, training=False, routing=None, router_inputs=None):
    """Runs a model block by block through its own `EarlyExitBlock`s, keeping what
    training and calibration read at each exit.

    Args:
        model: the model.
        token_ids: int `(batch, seq)`.
        training: bool.
        routing: `SkipRouter` routing (`"top_k"`, `"predictor"`, `"all"`) or None (the
            default for `training`).
        router_inputs: optional list; receives each router's (normed) input in order.

    Returns:
        dict: `"normed"` and `"logits"`, lists over the exit layers (final last).
    """
    hidden = model.embed_tokens(ops.cast(token_ids, "int32"))
    normed_states, logits = [], []
    for block in model.blocks:
        # The model's own blocks; the FFN input only when a router's is wanted.
        wants_input = router_inputs is not None and isinstance(block.block.ffn, SkipRouter)
        outputs = block(hidden, training=training, routing=routing, return_ffn_input=wants_input)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        hidden = outputs[0]
        if wants_input:
            router_inputs.append(outputs[-1])
        if block.has_exit:
            normed_states.append(block.exit_normed(hidden))
            logits.append(outputs[1])
    return {"normed": normed_states, "logits": logits}


def capacity_schedule(start: float, end: float, steps: int, stages: int = 4) -> list:
    """`[(capacity, steps)]`: capacity falls from `start` to `end` in `stages` equal
    steps over the first half of training, then stays at `end` (each distinct capacity
    is one trace of the training step, since the routed count is static)."""
    for name, value in (("start", start), ("end", end)):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"capacity {name} must be in (0, 1]; got {value}.")
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}.")
    if start <= end or stages <= 1 or steps < 2 * stages:
        return [(end, steps)]
    ramp = steps // 2
    per_stage = ramp // stages
    values = np.linspace(start, end, stages + 1)[:-1]
    schedule = [(float(v), per_stage) for v in values]
    schedule.append((float(end), steps - per_stage * stages))
    return schedule


class LlamaPhaseTrainer(MultiWorkerFit, keras.Model):
    """Wraps a `HierarchicalLlama` for `fit` in one training phase (module docstring).

    Args:
        model: the model; `set_phase(phase)` is applied.
        phase: one of `TRAIN_PHASES`.
        distill_weight: weight of the KL to the full-depth teacher. Defaults to `1.0`.
        lm_weight: weight of the LM cross-entropy. Defaults to `1.0`.
        exit_distill_weight: weight of each exit head's own KL (exits/full). Defaults to
            `1.0`.
        compute_weight: weight of the gates' expected depth. Defaults to `0.5`.
        seed: int, the Gumbel noise seed.
    """

    def __init__(
        self,
        model,
        phase: str,
        distill_weight: float = 1.0,
        lm_weight: float = 1.0,
        exit_distill_weight: float = 1.0,
        compute_weight: float = 0.5,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if phase not in TRAIN_PHASES:
            raise ValueError(f"phase must be one of {TRAIN_PHASES}; got {phase!r}.")
        for name, value in (
            ("distill_weight", distill_weight),
            ("lm_weight", lm_weight),
            ("exit_distill_weight", exit_distill_weight),
            ("compute_weight", compute_weight),
        ):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0; got {value}.")
        if phase in ("routers", "full") and not model.routers:
            raise ValueError(f"phase {phase!r} needs routers: the model has capacity 1.0.")
        if phase in ("exits", "full") and not model.gates:
            raise ValueError(f"phase {phase!r} needs exit gates: the model has no early exit.")
        self.model = model
        self.phase = phase
        self.distill_weight = float(distill_weight)
        self.lm_weight = float(lm_weight)
        self.exit_distill_weight = float(exit_distill_weight)
        self.compute_weight = float(compute_weight)
        self.seed_generator = keras.random.SeedGenerator(seed)
        model.set_phase(phase)
        # No weights of its own: built with the model, so a checkpoint loads into it
        # before the first step (`load_weights` refuses an unbuilt model).
        self.built = model.built
        self.trackers = {
            name: keras.metrics.Mean(name=name)
            for name in ("lm", "distill", "exit_distill", "avg_exit_layer", "router", "capacity")
        }

    def call(self, inputs, training=None):
        model = self.model
        gated = self.phase in ("exits", "full")
        routing = "all" if self.phase == "base" else None
        student = forward_exits(model, inputs, training=training, routing=routing)
        outputs = {"logits": student["logits"]}
        if self.phase != "base":
            teacher = forward_exits(model, inputs, training=False, routing="all")
            outputs["teacher"] = ops.stop_gradient(teacher["logits"][-1])
        if gated:
            samples = [
                gate.sample(normed, seed=self.seed_generator)
                for gate, normed in zip(model.gates, student["normed"][:-1], strict=True)
            ]
            outputs["gate_samples"] = samples
        return outputs

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        model = self.model
        logits = [ops.cast(v, "float32") for v in y_pred["logits"]]
        log_probs = [ops.log_softmax(v, axis=-1) for v in logits]
        if "gate_samples" in y_pred:
            # Exit weights: exit k is taken where its gate opens and no earlier one did.
            remaining = ops.ones_like(y_pred["gate_samples"][0])
            weights, depth = [], 0.0
            for layer, sample in zip(model.exit_layers[:-1], y_pred["gate_samples"], strict=True):
                weights.append(remaining * sample)
                depth = depth + remaining * sample * layer
                remaining = remaining * (1.0 - sample)
            weights.append(remaining)
            depth = depth + remaining * model.num_layers
            stacked = ops.stack(log_probs, axis=0)  # (exits, batch, seq, vocab)
            mix = ops.log(ops.stack(weights, axis=0) + 1e-9)[..., None]
            output = ops.logsumexp(stacked + mix, axis=0)
        else:
            output = log_probs[-1]
            depth = ops.full(ops.shape(output)[:2], float(model.num_layers))
        targets = ops.cast(y, "int32")
        picked = ops.take_along_axis(output, targets[..., None], axis=-1)[..., 0]
        lm = -ops.mean(picked)
        total = self.lm_weight * lm
        self.trackers["lm"].update_state(lm)
        if "teacher" in y_pred:
            teacher = ops.log_softmax(ops.cast(y_pred["teacher"], "float32"), axis=-1)
            teacher_probs = ops.exp(teacher)

            def kl(student):
                return ops.mean(ops.sum(teacher_probs * (teacher - student), axis=-1))

            distill = kl(output)
            total = total + self.distill_weight * distill
            self.trackers["distill"].update_state(distill)
            if "gate_samples" in y_pred and self.exit_distill_weight > 0:
                exit_distill = ops.mean(ops.stack([kl(v) for v in log_probs[:-1]]))
                total = total + self.exit_distill_weight * exit_distill
                self.trackers["exit_distill"].update_state(exit_distill)
        # The capacity stage of the schedule, logged beside the losses it shapes.
        self.trackers["capacity"].update_state(model.routers[0].capacity if model.routers else 1.0)
        mean_depth = ops.mean(depth)
        self.trackers["avg_exit_layer"].update_state(mean_depth)
        if "gate_samples" in y_pred:
            total = total + self.compute_weight * mean_depth / model.num_layers
        if self.losses:
            router = ops.sum(ops.stack([ops.cast(v, "float32") for v in self.losses]))
            self.trackers["router"].update_state(router)
            total = total + router
        # Gradients are summed over replicas: each replica's share is 1/replicas.
        return scale_loss_for_replicas(total)

    @property
    def metrics(self):
        return super().metrics + list(self.trackers.values())


def warmup_cosine_adamw(steps: int, learning_rate: float):
    """AdamW (no weight decay, clipnorm 1) with a 10% linear warm-up, then cosine decay
    to a tenth of `learning_rate` over `steps`."""
    warmup = min(max(steps // 10, 1), steps - 1) if steps > 1 else 0
    rate = keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else learning_rate,
        decay_steps=max(steps - warmup, 1),
        alpha=0.1,
        warmup_target=learning_rate if warmup else None,
        warmup_steps=warmup,
    )
    return keras.optimizers.AdamW(rate, weight_decay=0.0, clipnorm=1.0)


def _run_config(trainer, inputs, schedule, batch_size, learning_rate, seed) -> dict:
    """What a phase's checkpoint must match to be resumed (`CheckpointManager`)."""
    return {
        "phase": trainer.phase,
        "model_config": trainer.model.config.to_dict(),
        "schedule": [[float(c), int(s)] for c, s in schedule],
        "batch_size": int(batch_size),
        "learning_rate": float(learning_rate),
        "seed": int(seed),
        "loss_weights": {
            name: getattr(trainer, name)
            for name in ("lm_weight", "distill_weight", "exit_distill_weight", "compute_weight")
        },
        "windows": list(inputs.shape),
        "windows_sha256": hashlib.sha256(inputs.tobytes()).hexdigest(),
    }


def train_phase(
    model,
    inputs: np.ndarray,
    targets: np.ndarray,
    phase: str,
    steps: int,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    capacity_start: float | None = None,
    seed: int = 0,
    verbose: int = 0,
    output_dir: str | None = None,
    checkpoint_every: int = 100,
    callbacks=(),
    strategy=None,
    make_dataset=None,
    **trainer_kwargs,
) -> dict:
    """Trains one phase with Keras `fit` (the model on TensorFlow or JAX; the input
    pipeline is `tf.data`), with checkpoints, exact resume and TensorBoard.

    Args:
        model: a `HierarchicalLlama`.
        inputs, targets: int `(n, seq)` next-token windows (`toex_tf.data.lm_windows`),
            `n >= batch_size`.
        phase: one of `TRAIN_PHASES`.
        steps: optimizer steps.
        batch_size, learning_rate: the optimizer's (AdamW, cosine decay after warm-up).
        capacity_start: `routers`/`full`: the capacity schedule starts here and falls to
            the model's capacity (`capacity_schedule`); None: no schedule.
        seed: shuffling and Gumbel seed.
        verbose: `fit` verbosity.
        output_dir: str or None. Checkpoints go to `output_dir/checkpoints/PHASE` (every
            `checkpoint_every` steps and at the end of each capacity stage), TensorBoard
            logs (losses, metrics and capacity, every 10 steps) to
            `output_dir/tensorboard/PHASE`. A checkpoint there is resumed; one written by
            another run (phase, model config, schedule, data) is refused by name. None
            (the default): neither.
        checkpoint_every: int, steps between checkpoints. Defaults to `100`.
        callbacks: extra Keras callbacks, passed to every `fit` (one per capacity stage).
        strategy: a `tf.distribute.Strategy` or None (the default: none). `model` must
            have been built or loaded in its scope. Under a multi-worker strategy only
            the chief writes into `output_dir`; other workers write into temporary
            directories (`toex_tf.training.multi_worker.write_dir`) and resume from the
            chief's checkpoints.
        make_dataset: None, or `(skip_batches) -> tf.data.Dataset` of `batch_size`
            batches (a streamed corpus, `PreparedData.train_dataset`): training reads it
            instead of `inputs, targets`, which are then its head (checked, hashed into
            the checkpoints' run config, and used to calibrate the routers).
        **trainer_kwargs: `LlamaPhaseTrainer` loss weights.

    Returns:
        dict: the last logged value of every metric (none when a finished phase is
        resumed), plus `"schedule"`.
    """
    from toex_tf.data.tf_pipeline import make_lm_dataset  # noqa: PLC0415 - TensorFlow

    inputs = np.asarray(inputs, "int32")
    targets = np.asarray(targets, "int32")
    if inputs.shape != targets.shape or inputs.ndim != 2 or len(inputs) == 0:
        raise ValueError(
            f"inputs and targets must be equal non-empty (n, seq) arrays; got {inputs.shape} "
            f"and {targets.shape}."
        )
    vocab = model.config.vocab_size
    if inputs.min() < 0 or max(inputs.max(), targets.max()) >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab}).")
    if type(checkpoint_every) is not int or checkpoint_every < 1:  # not bool, not float
        raise ValueError(f"checkpoint_every must be a positive int; got {checkpoint_every!r}.")
    target_capacity = model.config.capacity
    if phase in ("routers", "full") and capacity_start is not None:
        schedule = capacity_schedule(capacity_start, target_capacity, steps)
    else:
        schedule = [(target_capacity, steps)]
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        trainer = LlamaPhaseTrainer(model, phase, seed=seed, **trainer_kwargs)
        optimizer = warmup_cosine_adamw(steps, learning_rate)
        trainer.compile(optimizer=optimizer)
        optimizer.build(trainer.trainable_variables)
    step, callbacks = 0, list(callbacks)
    if output_dir is not None:
        # The trainer, not only the model: it holds the Gumbel noise's seed generator.
        writes = write_dir(output_dir)  # the chief's output_dir, a worker's own
        run_config = _run_config(trainer, inputs, schedule, batch_size, learning_rate, seed)
        check_same_run(strategy, run_config)  # workers with different data must not train
        manager = CheckpointManager(
            os.path.join(output_dir, "checkpoints", phase),
            run_config=run_config,
            write_directory=os.path.join(writes, "checkpoints", phase),
        )
        # A read-only or full disk fails now, not at the first checkpoint.
        check_output_dir(
            writes, (manager.max_to_keep + 2) * checkpoint_bytes(trainer, optimizer), "output_dir"
        )
        latest = manager.latest()
        if latest is not None:
            step = manager.restore(trainer, optimizer, latest)
            print(f"Resumed from {latest} at step {step}.")
        log_dir = os.path.join(writes, "tensorboard", phase)
        callbacks = [
            CheckpointEvery(manager, trainer, checkpoint_every, step),
            GlobalStepTensorBoard(log_dir, initial_step=step, update_freq=10),
            *callbacks,
        ]
    logs, stage_end = {}, 0
    for capacity, stage_steps in schedule:
        stage_start, stage_end = stage_end, stage_end + stage_steps
        if stage_end <= step:  # done before the checkpoint
            continue
        for router in model.routers:
            router.capacity = float(capacity)
        trainer.train_function = None  # the routed count is static: retrace
        first = max(step, stage_start)
        # Batch k of the phase is the same whether or not the run was resumed.
        if make_dataset is not None:
            dataset = make_dataset(first)
        else:
            dataset = make_lm_dataset(
                inputs, targets, batch_size, True, seed, repeat=True, skip_batches=first
            )
        dataset = share_batches(dataset, strategy)  # each worker: its share of every batch
        history = trainer.fit(
            dataset,
            epochs=1,
            steps_per_epoch=stage_end - first,
            shuffle=False,  # the dataset is already shuffled, reproducibly
            callbacks=callbacks,
            verbose=verbose,
        )
        logs = {k: float(v[-1]) for k, v in history.history.items()}
    for router in model.routers:
        router.capacity = float(target_capacity)
    if logs:  # comparable across runs and workers (every worker prints the same)
        print(f"Phase {phase} trained to step {steps}: weights sha256 {weights_digest(model)}.")
    model.set_phase("frozen")
    logs["schedule"] = [[float(c), int(s)] for c, s in schedule]
    return logs
