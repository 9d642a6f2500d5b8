"""Context parallelism: the sequence split over CP ranks, attention exact over the whole.

Every layer but attention works token by token, so CP ranks simply hold different tokens;
only attention needs the other ranks' keys and values. Under a causal mask late tokens
do more work, so (as Megatron-LM and Transformer Engine) the sequence is cut into 2 x CP
chunks and rank r keeps chunks r and 2CP-1-r (CP 2: rank 0 holds [0, 3], rank 1 [1, 2]).
`split_for_context_parallel` cuts anything laid out along the sequence this way and
`context_parallel_positions` gives the positions a rank holds.

`context_parallel_attention` returns this rank's rows of causal attention over the whole
sequence, seeing the other keys and values by all-gathering them (`all_gather`) or around
a ring (`p2p`: CP-1 steps, each transfer overlapping the previous step's attention,
partial results merged with the online softmax; the step kernel recomputes its scores in
backward, as flash attention does). Both support grouped query heads and a value head
size different from the key's (multi-latent attention).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from paratron.parallel.comm import all_gather, reduce_scatter, wide
from paratron.parallel.process_groups import ProcessGroups
from paratron.parallel.random import get_rng_state, set_rng_state

COMM_TYPES = ("p2p", "all_gather")


# ---------------------------------------------------------------------- layout
def context_parallel_chunks(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two of the 2 x CP sequence chunks that rank `cp_rank` holds, in its order."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"context-parallel rank {cp_rank} is outside 0..{cp_size - 1}")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def check_sequence_length(seq_len: int, cp_size: int) -> None:
    """One-line refusal of a sequence the load-balanced layout cannot split."""
    if cp_size > 1 and seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x "
                         f"context-parallel size {cp_size} = {2 * cp_size}; change "
                         f"--seq-length or --context-parallel-size")


def split_for_context_parallel(tensor: torch.Tensor, cp_size: int, cp_rank: int,
                               seq_dim: int) -> torch.Tensor:
    """This rank's tokens of `tensor`: chunks r and 2CP-1-r of 2 x CP along `seq_dim`.

    The identity at CP 1, else a new tensor (torch.cat); autograd passes through.
    """
    if cp_size == 1:
        return tensor
    check_sequence_length(tensor.shape[seq_dim], cp_size)
    parts = tensor.chunk(2 * cp_size, dim=seq_dim)
    first, second = context_parallel_chunks(cp_size, cp_rank)
    return torch.cat([parts[first], parts[second]], dim=seq_dim)


def context_parallel_positions(seq_len: int, cp_size: int, cp_rank: int,
                               device: torch.device | str | None = None) -> torch.Tensor:
    """Positions (int64, [seq_len / CP]) of the tokens this rank holds, in its order."""
    check_sequence_length(seq_len, cp_size)
    return split_for_context_parallel(torch.arange(seq_len, device=device), cp_size,
                                      cp_rank, 0)


# ---------------------------------------------------------------------- collectives
class AllGatherFromContextParallelRegion(torch.autograd.Function):
    """Forward: all-gather along dim 0 (in CP-rank order).

    Backward: reduce-scatter along dim 0: every rank attended its own queries to the
    gathered keys, so each holds a partial gradient of all of them.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, ctx.group), None


class _Ring:
    """This rank's neighbours in the CP group, as global ranks."""

    def __init__(self, pg: ProcessGroups):
        size, rank, group = pg.cp.size, pg.cp.rank, pg.cp.group
        self.group = group
        self.next = dist.get_global_rank(group, (rank + 1) % size)
        self.prev = dist.get_global_rank(group, (rank - 1) % size)

    def shift(self, tensors, forward: bool):
        """Post sends of `tensors` to the next rank (forward) or the previous one
        (backward) and receives of the same shapes from the other side. Returns the
        receive buffers and what to wait for before reading them."""
        to, frm = (self.next, self.prev) if forward else (self.prev, self.next)
        sends = [t.contiguous() for t in tensors]
        recvs = [torch.empty_like(t) for t in sends]
        ops = [dist.P2POp(dist.isend, t, to, group=self.group) for t in sends]
        ops += [dist.P2POp(dist.irecv, t, frm, group=self.group) for t in recvs]
        works = dist.batch_isend_irecv(ops)
        # The send buffers travel with the handles: they must live until the wait.
        return recvs, (works, sends)


def _wait(pending) -> None:
    works, _ = pending
    for work in works:
        work.wait()


class RingExchange(torch.autograd.Function):
    """Forward: send (k, v) to the next CP rank, receive the previous rank's (posted, not
    awaited: the caller waits via `pending` once it needs them, so the transfer overlaps
    the current step's attention). Backward: send the gradients to the previous rank and
    receive the next rank's, which belong to the blocks this rank passed on."""

    @staticmethod
    def forward(ctx, k, v, ring, pending: list):
        ctx.ring = ring
        (k_recv, v_recv), handles = ring.shift((k, v), forward=True)
        pending.append(handles)
        return k_recv, v_recv

    @staticmethod
    def backward(ctx, dk, dv):
        (dk_prev, dv_prev), handles = ctx.ring.shift((dk, dv), forward=False)
        _wait(handles)
        return dk_prev, dv_prev, None, None


# ---------------------------------------------------------------------- step kernel
@contextlib.contextmanager
def _rng_state(state, device):
    """Run with the default generator of `device` set to `state`; restore it after."""
    saved = get_rng_state(device)
    set_rng_state(state, device)
    try:
        yield
    finally:
        set_rng_state(saved, device)


def _scores(q, k, causal: bool, scale: float, heads_per_group: int) -> torch.Tensor:
    """fp32 scores [b, groups, heads_per_group x s_q, s_k], causal positions -inf.

    q [b, groups, heads_per_group x s_q, d] (the query heads of one K/V head stacked
    along rows), k [b, groups, s_k, d]: grouped heads need no copies of K.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        s_q, s_k = scores.shape[-2] // heads_per_group, scores.shape[-1]
        # Lower-right aligned: the last query sees every key.
        rows = torch.arange(s_q, device=q.device).unsqueeze(1) + (s_k - s_q)
        allowed = torch.arange(s_k, device=q.device).unsqueeze(0) <= rows
        scores = scores.masked_fill(~allowed.repeat(heads_per_group, 1), float("-inf"))
    return scores


class BlockAttention(torch.autograd.Function):
    """softmax(q k^T scale) v over one K/V block, and its log-sum-exp, computed in fp32.

    q [b, n, s_q, d], k [b, g, s_k, d], v [b, g, s_k, d_v] with g dividing n (query head
    h uses K/V head h // (n / g)) -> out [b, n, s_q, d_v], lse [b, n, s_q], both fp32.
    `causal`: lower-right triangular mask (s_q <= s_k). Dropout masks the normalised
    probabilities; its mask is drawn again in backward from the saved generator state.

    Backward recomputes the probabilities P from the saved lse and takes gradients of
    both outputs: dS = P * (dP - rowsum(P * dP) + dlse).
    """

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, dropout_p: float):
        b, n, s_q, d = q.shape
        g = k.shape[1]
        m = n // g
        qf = wide(q).reshape(b, g, m * s_q, d)
        kf, vf = wide(k), wide(v)
        scores = _scores(qf, kf, causal, scale, m)
        lse = torch.logsumexp(scores, dim=-1)
        p = torch.exp(scores - lse.unsqueeze(-1))
        rng_state = None
        if dropout_p > 0:
            rng_state = get_rng_state(q.device)
            p = p * (torch.rand_like(p) >= dropout_p) / (1.0 - dropout_p)
        out = torch.matmul(p, vf)
        ctx.save_for_backward(q, k, v, lse)
        ctx.causal, ctx.scale, ctx.dropout_p, ctx.rng_state = causal, scale, dropout_p, rng_state
        return out.view(b, n, s_q, -1), lse.view(b, n, s_q)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, lse = ctx.saved_tensors
        b, n, s_q, d = q.shape
        g = k.shape[1]
        m = n // g
        qf = wide(q).reshape(b, g, m * s_q, d)
        kf, vf = wide(k), wide(v)
        p = torch.exp(_scores(qf, kf, ctx.causal, ctx.scale, m) - lse.unsqueeze(-1))
        dout = wide(dout).reshape(b, g, m * s_q, -1)
        dlse = wide(dlse).reshape(b, g, m * s_q)
        dp = torch.matmul(dout, vf.transpose(-1, -2))
        p_used = p
        if ctx.dropout_p > 0:
            with _rng_state(ctx.rng_state, q.device):
                keep = (torch.rand_like(p) >= ctx.dropout_p) / (1.0 - ctx.dropout_p)
            p_used = p * keep
            dp = dp * keep
        dv = torch.matmul(p_used.transpose(-1, -2), dout)
        ds = p * (dp - ((p * dp).sum(-1) - dlse).unsqueeze(-1))
        dq = torch.matmul(ds, kf) * ctx.scale
        dk = torch.matmul(ds.transpose(-1, -2), qf) * ctx.scale
        return (dq.view(b, n, s_q, d).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
                None, None, None)


def _merge(out, lse, out_step, lse_step):
    """Online softmax: combine two partial attentions over disjoint key sets."""
    new_lse = torch.logaddexp(lse, lse_step)
    out = (out * torch.exp(lse - new_lse).unsqueeze(-1)
           + out_step * torch.exp(lse_step - new_lse).unsqueeze(-1))
    return out, new_lse


# ---------------------------------------------------------------------- attention
def _check_inputs(q, k, v, cp_size: int, comm_type: str) -> None:
    if comm_type not in COMM_TYPES:
        raise ValueError(f"--cp-comm-type must be one of {', '.join(COMM_TYPES)}, "
                         f"got {comm_type!r}")
    if q.shape[0] % 2 and cp_size > 1:
        raise ValueError(f"local sequence length {q.shape[0]} is odd: it must hold two "
                         f"equal chunks of the load-balanced context-parallel layout")
    if k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do "
                         f"not fit: k and v need q's sequence and batch, k q's head size")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not divisible by "
                         f"{k.shape[2]} key/value heads")


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               pg: ProcessGroups, comm_type: str = "p2p", *,
                               scale: float | None = None,
                               dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention of this rank's queries over the whole context-parallel sequence.

    q [s_local, b, n, d], k [s_local, b, g, d], v [s_local, b, g, d_v] hold this rank's
    tokens in the load-balanced layout (`split_for_context_parallel`); g divides n.
    Returns [s_local, b, n x d_v] in q's dtype. At CP 1 this is plain causal SDPA.
    """
    _check_inputs(q, k, v, pg.cp.size, comm_type)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s, b, n = q.shape[:3]
    # SDPA's layout: [b, heads, s, d].
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    if pg.cp.size == 1:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                             scale=scale, enable_gqa=k.shape[1] != n)
    elif comm_type == "all_gather":
        out = _all_gather_attention(q, k, v, pg, scale, dropout_p)
    else:
        out = _ring_attention(q, k, v, pg, scale, dropout_p)
    return out.permute(2, 0, 1, 3).reshape(s, b, -1).to(q.dtype)


def _all_gather_attention(q, k, v, pg: ProcessGroups, scale: float, dropout_p: float):
    """All-gather K and V along the sequence (backward: reduce-scatter of their
    gradients), put the chunks back in sequence order and let each local chunk attend
    to the keys up to its own position with `scaled_dot_product_attention`."""
    cp = pg.cp.size
    c = q.shape[2] // 2

    def gather(t):  # [b, g, s_local, d] -> [b, g, s, d] in sequence order
        gathered = AllGatherFromContextParallelRegion.apply(
            t.permute(2, 0, 1, 3), pg.cp.group)  # along the sequence: dim 0
        parts = gathered.chunk(2 * cp)  # rank i contributed parts 2i (chunk i), 2i+1
        order = [2 * j if j < cp else 2 * (2 * cp - 1 - j) + 1 for j in range(2 * cp)]
        return torch.cat([parts[i] for i in order]).permute(1, 2, 0, 3)

    k_all, v_all = gather(k), gather(v)
    outs = []
    for half, chunk in enumerate(context_parallel_chunks(cp, pg.cp.rank)):
        # This chunk's queries see the keys up to the end of the chunk: causal within it.
        end = (chunk + 1) * c
        rows = torch.arange(chunk * c, end, device=q.device).unsqueeze(1)
        allowed = torch.arange(end, device=q.device).unsqueeze(0) <= rows
        outs.append(F.scaled_dot_product_attention(
            q[:, :, half * c:(half + 1) * c], k_all[:, :, :end], v_all[:, :, :end],
            attn_mask=allowed, dropout_p=dropout_p, scale=scale,
            enable_gqa=k.shape[1] != q.shape[1]))
    return torch.cat(outs, dim=2)


def _ring_attention(q, k, v, pg: ProcessGroups, scale: float, dropout_p: float):
    """Ring attention: K and V travel around the ring (rank r sends to r+1 and receives
    from r-1; the gradients go the other way in backward). With the load-balanced layout
    each step is one of three rectangles of equal cost (c = chunk length; this rank r
    holds chunks r and 2CP-1-r, the K/V come from rank i holding chunks i and 2CP-1-i):

      i == r: both chunks against both, causal (the local positions increase, so the
              ordinary lower-triangular mask of the 2c x 2c block is the causal one);
      i <  r: all 2c queries against the first c keys (chunk i is before both of ours;
              chunk 2CP-1-i is after both), no mask;
      i >  r: only the late chunk's c queries against all 2c keys (both of rank i's
              chunks are after our early chunk and before our late one), no mask.
    """
    cp, rank = pg.cp.size, pg.cp.rank
    c = q.shape[2] // 2
    ring = _Ring(pg)
    k, v = k.contiguous(), v.contiguous()
    out = lse = None
    for step in range(cp):
        pending: list = []
        if step + 1 < cp:
            k_next, v_next = RingExchange.apply(k, v, ring, pending)
        source = (rank - step) % cp  # the rank whose K/V this step holds
        if source == rank:  # both our chunks against both: causal
            out, lse = BlockAttention.apply(q, k, v, True, scale, dropout_p)
        elif source < rank:  # every query against the source's early chunk
            o, l = BlockAttention.apply(q, k[:, :, :c], v[:, :, :c], False, scale, dropout_p)
            out, lse = _merge(out, lse, o, l)
        else:  # our late chunk against both of the source's chunks
            o, l = BlockAttention.apply(q[:, :, c:], k, v, False, scale, dropout_p)
            late, late_lse = _merge(out[:, :, c:], lse[:, :, c:], o, l)
            out = torch.cat([out[:, :, :c], late], dim=2)
            lse = torch.cat([lse[:, :, :c], late_lse], dim=2)
        if pending:
            _wait(pending[0])
            k, v = k_next, v_next
    return out
