"""The LM head applied outside ``model.forward``, in chunks, only where values are needed.

A full forward materialises ``[tokens, vocab]`` logits (plus as much again for ``log_softmax``): 1 GiB
per 8x1024 tokens at V=32k in fp32. Here the body's last hidden states are gathered at the positions
that need a value (supervised targets by default) and the head runs on ``chunk`` of them at a time,
so the extra memory is about ``2 * chunk * V * 4`` bytes whatever the batch.

Maths, per position with logits ``z`` (fp32) and target ``t``; one ``exp`` pass over the vocabulary::

    m = max z,  d = z - m,  e = exp d,  s = sum e
    log p(t)  = d[t] - log s
    H         = lse - sum softmax(z) * z  =  log s - (sum e * d) / s

The entropy form has no ``0 * log 0`` (a softmax that underflows to 0 contributes ``0 * d``, d finite),
so it never returns NaN. ``sum e * d`` is a batched dot product (``bmm``), not ``(e * d).sum``, so no
third ``(chunk, V)`` buffer exists. Measured alternative, rejected: ``torch.softmax`` (a fused kernel
with a faster, less accurate exp) cut the elementwise time by ~40% but put entropy errors at 1.4e-4
against float64 (8e-7 with ``torch.exp``), above the 1e-5 the passes promise.

The contrast score of cDPO (ALGORITHMS.md §4) is ``p_CE(t) = softmax((1 + beta) * z_pos - beta *
z_neg)[t]``, computed on the same chunks with both models' logits alive at once.

Chunk size: the auto chunk (:data:`AUTO_CHUNK_LOGITS`, 256 positions at V=32k) bounds a chunk's logits
to 32 MiB. Smaller chunks are slower here: every chunk streams the whole ``(V, d)`` weight from memory
(32 MB at V=32k, d=256), so 32-position chunks ran ~3x slower than 256-position ones.

The head reproduces the model's own logit post-processing: ``logits * scale`` (Cohere's
``logit_scale``; ``1 / logits_scaling`` for Granite) and then ``cap * tanh(logits / cap)`` (Gemma's
``final_logit_softcapping``). :func:`winnow.core.model_io.check_head` verifies it against a full
forward when a model is loaded. The head always runs in fp32 (the weight is upcast once), whatever
dtype the body ran in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# logits per chunk when the caller does not say: 8M fp32 values = 32 MiB (two such buffers live at once)
AUTO_CHUNK_LOGITS = 8 * 1024 * 1024


@dataclass
class LMHead:
    """``logits = post(hidden @ weight.T + bias)`` with post = scale, then optional tanh softcap."""

    weight: torch.Tensor  # (V, d)
    bias: torch.Tensor | None = None  # (V,)
    scale: float = 1.0
    softcap: float | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, hidden: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(N, d) -> (N, V) logits; in ``dtype`` (default fp32)."""
        import torch

        dtype = dtype or torch.float32
        w = self.weight if self.weight.dtype == dtype else self.weight.to(dtype)
        z = hidden.to(dtype) @ w.T  # (N, V), fresh: post-processing works in place
        if self.bias is not None:
            z.add_(self.bias.to(dtype))
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def to_fp32(self) -> LMHead:
        import torch

        f = lambda t: None if t is None else t.detach().to(torch.float32)  # noqa: E731
        return LMHead(f(self.weight), f(self.bias), self.scale, self.softcap)


def auto_chunk(vocab_size: int, chunk: int = 0) -> int:
    """Positions per head chunk: ``chunk`` if > 0, else about 32 MiB of fp32 logits (>= 8 positions)."""
    if chunk > 0:
        return chunk
    return max(8, AUTO_CHUNK_LOGITS // max(vocab_size, 1) // 8 * 8)


def _stats_from_logits(z: torch.Tensor, targets: torch.Tensor, entropy: bool):
    """(n, V) fp32 logits (overwritten) -> log p(target) (n,), entropy (n,) or None."""
    import torch

    m = z.amax(dim=-1, keepdim=True)  # (n, 1)
    d = z.sub_(m)  # in place: z is scratch
    e = torch.exp(d)  # (n, V), the one exp pass
    s = e.sum(dim=-1)  # (n,)
    log_s = torch.log(s)
    lp = d.gather(-1, targets[:, None]).squeeze(-1) - log_s
    ent = None
    if entropy:
        ed = torch.bmm(e.unsqueeze(1), d.unsqueeze(2)).view(-1)  # sum e*d, no (n, V) temporary
        ent = log_s - ed / s
    return lp, ent


def logprob_entropy(
    head: LMHead,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 0,
    entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of ``targets`` and predictive entropy at each of the N hidden states, in fp32.

    ``hidden``: (N, d), the state that *predicts* the target (position i-1 for target i); ``targets``:
    (N,) token ids. Returns two (N,) fp32 tensors (entropy None when not asked for).
    """
    import torch

    n = hidden.shape[0]
    step = auto_chunk(head.vocab_size, chunk)
    lp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    ent = torch.empty(n, dtype=torch.float32, device=hidden.device) if entropy else None
    for a in range(0, n, step):
        b = min(n, a + step)
        z = head.logits(hidden[a:b])  # (c, V) fp32
        lp_c, ent_c = _stats_from_logits(z, targets[a:b], entropy)
        lp[a:b] = lp_c
        if ent is not None:
            ent[a:b] = ent_c
        del z
    return lp, ent


def contrast_scores(
    head_pos: LMHead,
    hidden_pos: torch.Tensor,
    head_neg: LMHead,
    hidden_neg: torch.Tensor,
    targets: torch.Tensor,
    beta: float = 1.0,
    chunk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cDPO contrastive estimate ``p_CE`` plus each model's log p(target), all (N,) fp32."""
    import torch

    if head_pos.vocab_size != head_neg.vocab_size:
        raise ValueError(f"vocab sizes differ: {head_pos.vocab_size} vs {head_neg.vocab_size}")
    n = hidden_pos.shape[0]
    step = auto_chunk(head_pos.vocab_size, chunk)
    out = [torch.empty(n, dtype=torch.float32, device=hidden_pos.device) for _ in range(3)]
    for a in range(0, n, step):
        b = min(n, a + step)
        t = targets[a:b]
        zp = head_pos.logits(hidden_pos[a:b])  # (c, V)
        zn = head_neg.logits(hidden_neg[a:b])
        lp_pos = zp.gather(-1, t[:, None]).squeeze(-1) - torch.logsumexp(zp, dim=-1)
        lp_neg = zn.gather(-1, t[:, None]).squeeze(-1) - torch.logsumexp(zn, dim=-1)
        cd = zp.mul_(1.0 + beta).sub_(zn, alpha=beta)  # contrast logits in place over zp
        del zn
        lp_cd = cd.gather(-1, t[:, None]).squeeze(-1) - torch.logsumexp(cd, dim=-1)
        out[0][a:b] = torch.exp(lp_cd)
        out[1][a:b] = lp_pos
        out[2][a:b] = lp_neg
    return out[0], out[1], out[2]
