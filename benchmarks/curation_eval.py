"""The curation benchmark's yardsticks and its random control (``benchmarks/curation.py`` drives them).

* :func:`final_answer` / :func:`exact_match`: the ``#### N`` convention of GSM8K and the demo data. The
  first ``####`` line wins (a model that keeps talking after it is judged on what it committed to);
  thousands separators and a trailing ``.0`` are dropped, so ``#### 1,200`` equals ``#### 1200``.
* :func:`eval_loss`: mean negative log-likelihood over every supervised token (``loss_mask``) of the held-out
  samples, token-weighted across samples, in float64: the same yardstick as the trainer's ``eval_loss``
  (position ``i`` as a target, predicted at ``i - 1``; ``loss_mask[0]`` never counts).
* :func:`greedy_answers`: greedy ``generate`` on the prompt rendered with the tokenizer's chat template and
  ``add_generation_prompt``, batched with left padding; stops at the end-of-turn token.
* :func:`random_pairing`: the random control of a policy: the same number of samples, drawn uniformly, then
  the same number of weighted tokens, drawn uniformly among the supervised tokens of those samples; seeded.
  When the drawn samples hold fewer supervised tokens than the policy weighted (a policy that kept long
  samples), every one of them is kept and the shortfall is reported, never papered over.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def final_answer(text: str) -> str | None:
    """The number after the first ``####`` in ``text`` (normalised), or None when there is none."""
    m = _FINAL.search(text or "")
    if m is None:
        return None
    s = m.group(1).replace(",", "")
    if "." in s:
        s = s.rstrip("0").rstrip(".") if s.split(".", 1)[1].strip("0") == "" else s
    return s.lstrip("+") if s not in ("", "-") else None


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the prediction's ``#### N`` equals the reference's (False when either has none)."""
    p, r = final_answer(prediction), final_answer(reference)
    return p is not None and r is not None and p == r


@torch.no_grad()
def eval_loss(model, ids: list[np.ndarray], loss_mask: list[np.ndarray], batch_tokens: int = 8192) -> float:
    """Token-weighted mean NLL over every supervised target of ``ids`` (right-padded batches)."""
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    total, count = 0.0, 0.0
    start = 0
    while start < len(order):
        width = len(ids[order[start]])
        end = start
        while end < len(order) and (end - start + 1) * max(width, len(ids[order[end]])) <= batch_tokens:
            width = max(width, len(ids[order[end]]))
            end += 1
        end = max(end, start + 1)
        idx = order[start:end]
        width = max(len(ids[i]) for i in idx)
        x = torch.zeros((len(idx), width), dtype=torch.long)
        att = torch.zeros((len(idx), width), dtype=torch.long)
        w = torch.zeros((len(idx), width), dtype=torch.float64)
        for r, i in enumerate(idx):
            n = len(ids[i])
            x[r, :n] = torch.as_tensor(ids[i], dtype=torch.long)
            att[r, :n] = 1
            w[r, :n] = torch.as_tensor(np.asarray(loss_mask[i], dtype=np.float64))
        logits = model(input_ids=x, attention_mask=att).logits.double()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, x[:, 1:, None])[..., 0]
        total += float(-(logp * w[:, 1:]).sum())
        count += float(w[:, 1:].sum())
        start = end
    return total / count if count else float("nan")


def _stop_ids(tok) -> list[int]:
    ids = []
    for t in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i >= 0:
            ids.append(i)
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return sorted(set(ids))


@torch.no_grad()
def greedy_answers(model, tok, prompts: list[list[dict]], max_new_tokens: int, batch: int = 64) -> list[str]:
    """Greedy completions of each chat prompt (a message list ending before the assistant answer)."""
    model.eval()
    stop = _stop_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts]
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(encoded)
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        width = max(len(encoded[i]) for i in idx)
        x = torch.full((len(idx), width), pad, dtype=torch.long)
        att = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):  # left padding: every prompt ends where generation starts
            x[r, width - len(encoded[i]) :] = torch.as_tensor(encoded[i])
            att[r, width - len(encoded[i]) :] = 1
        gen = model.generate(
            input_ids=x,
            attention_mask=att,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=pad,
            use_cache=True,
        )
        for r, i in enumerate(idx):
            out[i] = tok.decode(gen[r, width:], skip_special_tokens=True)
    return out


@dataclass
class Pairing:
    weights: list[np.ndarray]  # one float32 array per sample of the pool (0 on samples not drawn)
    samples: int
    tokens: int
    shortfall: int  # weighted tokens the policy had that the drawn samples could not supply


def random_pairing(loss_mask: list[np.ndarray], n_samples: int, n_tokens: int, seed: int) -> Pairing:
    """``n_samples`` samples uniformly at random, then ``n_tokens`` of their supervised targets."""
    rng = np.random.default_rng(seed)
    eligible = [i for i, m in enumerate(loss_mask) if np.count_nonzero(np.asarray(m)[1:])]
    if n_samples > len(eligible):
        raise ValueError(f"random_pairing: {n_samples} samples asked, {len(eligible)} have supervised tokens")
    drawn = np.sort(rng.choice(np.asarray(eligible, dtype=np.int64), size=n_samples, replace=False))
    # (sample, position) of every supervised target of the drawn samples; position 0 is never a target
    slots = [(i, p) for i in drawn for p in np.flatnonzero(np.asarray(loss_mask[i])) if p > 0]
    take = min(n_tokens, len(slots))
    chosen = rng.choice(len(slots), size=take, replace=False) if take < len(slots) else np.arange(len(slots))
    weights = [np.zeros(len(m), dtype=np.float32) for m in loss_mask]
    for k in chosen:
        i, p = slots[k]
        weights[i][p] = 1.0
    # a drawn sample can lose every token in the second draw; the trainer drops it, so count what is left
    samples = sum(1 for i in drawn if weights[i].any())
    return Pairing(weights, samples, take, n_tokens - take)
