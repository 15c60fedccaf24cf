"""Episode distillation: the frozen LM, reading a binding episode in its own text form, teaches the gated
blocks what to write into the image chunks (`model.episode_distill`, off by default).

Why: the LM learned in-context binding in text ("red dakim / blue vomal / red" -> "dakim"): in one layer
its induction heads attend from the query's colour to the words that followed that colour before
(experiments/lm_heads_probe.py).  In an image episode (`<image>Output: dakim<|endofchunk|>` per example)
the colour exists only where the blocks write it, and the next-token loss alone did not teach them to
write it in the form those heads match (docs/results.md, 2026-11-27).  This loss asks for the heads'
behaviour directly: at each chunk's `:` (where the text form has the colour), the attention of LM layer
`layer` over the earlier examples' word tokens should be the text form's over the same words (KL, each
head, over the aligned word positions only, each side renormalised).  The heads' matching itself is
the target, not a proxy: a residual-stream (or query/key) match is dominated by the tokens' own
embeddings, alike in both forms (docs/results.md, 2026-11-27, session 15).
"""

from __future__ import annotations

import torch

from glimpse.models.decoder import apply_rope, rope


def _attention_logits(lm, layer: int, x: torch.Tensor, rows: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Pre-softmax attention logits [N, H, T] of LM layer `layer` from position at[n] of row rows[n] to
    every position of that row, x [B, T, D] being the residual stream the layer reads."""
    block, cfg = lm.blocks[layer], lm.cfg
    a = block.attn
    h = block.attn_norm(x)
    B, T, D = h.shape
    H, KV, hd = a.heads, a.kv_heads, a.head_dim
    if a.fused:  # gpt2: q, k, v side by side
        qkv = a.qkv(h)
        q, k = (t.reshape(B, T, H, hd).transpose(1, 2) for t in (qkv[..., :D], qkv[..., D:2 * D]))
    else:
        q = a.q(h).view(B, T, H, hd).transpose(1, 2)
        k = a.k(h).view(B, T, KV, hd).transpose(1, 2)
    pos = torch.arange(T, device=x.device)[None].expand(B, T)
    if lm.pos_embed is None:  # RoPE (llama); gpt2's learned positions are already in x
        cos, sin = rope(pos, hd, cfg.rope_theta, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(H // k.shape[1], dim=1)  # [B, H, T, hd]
    qn = q[rows, :, at]  # [N, H, hd]
    return torch.einsum("nhd,nhtd->nht", qn, k[rows]) / hd ** 0.5


def episode_distill_loss(model, student: torch.Tensor, batch: dict, layer: int) -> torch.Tensor:
    """KL(teacher || student) of LM layer `layer`'s attention from each binding chunk's `:` (the
    teacher's colour) over the earlier chunks' word tokens, mean over heads and chunks with two or
    more earlier word tokens.  `student`: the residual stream layer `layer` reads on the image episode
    (FlamingoModel.residual_before); `batch` carries data.teacher_episode's text form and pairs."""
    valid, key = batch["pair_valid"], batch["pair_key"]
    ps, pt = batch["pair_student"], batch["pair_teacher"]
    q_rows, q_idx = (valid & key).nonzero(as_tuple=True)  # every chunk's `:`: a query of its own
    if q_rows.numel() == 0:
        return student.sum() * 0.0
    lm = model.lm
    with torch.no_grad():
        teacher = lm(batch["teacher_ids"], batch["teacher_mask"], stop_before=layer)
        t_logits = _attention_logits(lm, layer, teacher, q_rows, pt[q_rows, q_idx])
    s_logits = _attention_logits(lm, layer, student, q_rows, ps[q_rows, q_idx])
    # the candidates of query n: the word tokens of its row that come before it
    cand = valid[q_rows] & ~key[q_rows] & (ps[q_rows] < ps[q_rows, q_idx][:, None])  # [N, P]
    keep = cand.sum(-1) >= 2
    if not bool(keep.any()):
        return student.sum() * 0.0
    H = s_logits.shape[1]
    gather_s = ps[q_rows][:, None, :].expand(-1, H, -1)  # [N, H, P]
    gather_t = pt[q_rows][:, None, :].expand(-1, H, -1)
    neg = torch.finfo(torch.float32).min
    m = cand[:, None, :]
    log_s = s_logits.float().gather(-1, gather_s).masked_fill(~m, neg).log_softmax(-1)
    log_t = t_logits.float().gather(-1, gather_t).masked_fill(~m, neg).log_softmax(-1)
    kl = (log_t.exp() * (log_t - log_s)).masked_fill(~m, 0.0).sum(-1)  # [N, H]
    return kl[keep].mean()
