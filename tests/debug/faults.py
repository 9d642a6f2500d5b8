"""Faults that `paratron parity` must find, one at a time: each function patches
Paratron in the processes of a parallel layout (named in PARATRON_PARITY_FAULT as
`tests.debug.faults:<function>`), before the model is built."""

import torch.nn.functional as F

from paratron.model import attention
from paratron.model.transformer import TransformerLayer
from paratron.parallel import pipeline, tensor_parallel


def drop_attention_all_reduce():
    """Layer 1's attention output projection keeps its partial sums: no all-reduce."""
    build = attention.SelfAttention.__init__

    def init(self, config, layer_number, pg=None):
        build(self, config, layer_number, pg)
        if layer_number == 1:
            proj = self.linear_proj
            proj.forward = lambda x: proj.matmul(x, proj.weight)

    attention.SelfAttention.__init__ = init


def skip_sequence_parallel_norm_grads():
    """The norms' gradients stay this rank's sequence shard's: no sum over TP."""
    tensor_parallel.all_reduce_sequence_parallel_grads = lambda params, pg: None


def dropout_from_model_parallel_stream():
    """Hidden dropout draws from the TP rank's own stream (meant for sequence shards)
    where every TP rank must draw the same mask."""
    def dropout(self, x):
        with self.pg.rng.fork():
            return F.dropout(x, self.hidden_dropout, self.training)

    TransformerLayer._dropout = dropout


def _reverse_first_send(kind):
    """The first `kind` tensor a pipeline rank sends goes out reversed along the
    sequence."""
    exchange = pipeline.PointToPoint.exchange
    done = []

    def reversed_once(self, group, outbox):
        for message in group:
            key = (message.kind, message.chunk, message.micro)
            if message.op == "send" and message.kind == kind and not done:
                outbox[key] = outbox[key].flip(0)
                done.append(key)
        return exchange(self, group, outbox)

    pipeline.PointToPoint.exchange = reversed_once


def reverse_activation_send():
    _reverse_first_send("activation")


def reverse_gradient_send():
    _reverse_first_send("gradient")
