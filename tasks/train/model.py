"""The seed model and its per-batch graph (MXNet Gluon; rank side only)."""

from __future__ import annotations

import mxnet as mx
from mxnet import gluon, init, nd
from mxnet.gluon import nn

from tasks.train.errors import TrainingError

NUM_CLASSES = 10
NUM_FEATURES = 28 * 28


def select_context(num_gpus: int, local_rank: int) -> mx.Context:
    """One GPU per local rank when the host has GPUs, else the CPU."""
    if num_gpus == 0:
        return mx.cpu()
    if local_rank >= num_gpus:
        raise TrainingError(
            f"local rank {local_rank} has no GPU: this host has {num_gpus}; "
            "start at most one process per GPU on each host"
        )
    return mx.gpu(local_rank)


def build_net(init_sigma: float, ctx: mx.Context) -> nn.HybridSequential:
    """The seed model: one Dense(10) on flattened 28x28 inputs, Normal(sigma) initialised."""
    net = nn.HybridSequential()
    net.add(nn.Dense(NUM_CLASSES, in_units=NUM_FEATURES))
    net.initialize(init.Normal(sigma=init_sigma), ctx=ctx)
    return net


class ScoredBatch(gluon.HybridBlock):
    """(uint8 images, labels, batch index) -> (summed loss, correct count) of `net` on the
    indexed samples, as one cached graph.

    The model is so small that per-operator overhead, not arithmetic, sets the speed: one
    graph (static memory and shapes) per batch does the gather, the scaling, the forward pass,
    the loss and the metrics, instead of a dozen imperative calls. The data stays uint8 on the
    device (4x less memory) and is scaled to [0, 1] inside the graph.
    """

    def __init__(self, net: gluon.HybridBlock) -> None:
        super().__init__()
        self.net = net
        self.loss = gluon.loss.SoftmaxCrossEntropyLoss()

    def hybrid_forward(self, F, images, labels, index):
        images, labels = F.take(images, index), F.take(labels, index)
        scores = self.net(F.cast(images, "float32") / 255)
        correct = F.sum(F.broadcast_equal(F.argmax(scores, axis=1), labels))
        return F.sum(self.loss(scores, labels)), correct


def count_correct(scored: ScoredBatch, images: nd.NDArray, labels: nd.NDArray) -> nd.NDArray:
    """Correct predictions on (a rank's shard of) a data set, as a device scalar."""
    if images.shape[0] == 0:  # no validation set, or fewer samples than ranks
        return nd.zeros((1,), ctx=images.context)
    everything = nd.arange(images.shape[0], ctx=images.context, dtype="int32")
    return scored(images, labels, everything)[1]


# --- saved training state (no pickle: MXNet's own NDArray format and JSON) ------------------


def optimizer_state(trainer: gluon.Trainer) -> tuple[dict[str, nd.NDArray], dict, dict]:
    """The optimizer's state arrays, their layout and its update counters.

    Trainer.save_states would pickle the optimizer object (and load_states would unpickle
    whatever a checkpoint file holds); the arrays and counters are all a resume needs.
    """
    updater = trainer._updaters[0]
    arrays, layout = {}, {}
    for index, state in updater.states.items():
        parts = state if isinstance(state, list | tuple) else [state]
        if any(part is None for part in parts):
            continue  # plain SGD keeps no state
        if not all(isinstance(part, nd.NDArray) for part in parts):
            raise TrainingError(f"optimizer state of parameter {index} is not a set of arrays")
        layout[str(index)] = len(parts) if isinstance(state, list | tuple) else -1
        arrays.update({f"{index}:{j}": part for j, part in enumerate(parts)})
    optimizer = updater.optimizer
    counters = {
        "num_update": optimizer.num_update,
        "index_update_count": {str(k): v for k, v in optimizer._index_update_count.items()},
    }
    return arrays, layout, counters


def restore_optimizer(
    trainer: gluon.Trainer, arrays: dict[str, nd.NDArray], layout: dict, counters: dict
) -> None:
    """Put back what `optimizer_state` saved."""
    for updater in trainer._updaters:
        for index, count in layout.items():
            parts = [arrays[f"{index}:{j}"] for j in range(abs(count))]
            updater.states[int(index)] = parts[0] if count == -1 else tuple(parts)
            updater.states_synced[int(index)] = False  # copied to the weight's context on use
        optimizer = updater.optimizer
        optimizer.num_update = int(counters.get("num_update", 0))
        optimizer._index_update_count.update(
            {int(k): int(v) for k, v in counters.get("index_update_count", {}).items()}
        )
