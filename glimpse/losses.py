"""Training objectives as plain functions of model outputs.

Contrastive losses gather the other processes' embeddings, so under DDP each process
scores its local rows against the whole global batch.  Each process's loss is weighted by
its share of the global batch (x world / total rows: 1 when shares are equal), so the mean
DDP takes equals the single-process loss on the same global batch, and so do the
gradients, even when processes dropped different numbers of bad samples.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from glimpse.distributed import all_reduce_int, gather_with_grad
from glimpse.errors import GlimpseError
from glimpse.models.fusion import pad_tokens


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
              negative_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over normalised embeddings [B, E].  `negative_embeds` [n, E], texts that
    match no image (hard negatives), join every image's candidates, as in NegCLIP; texts still choose
    among the images only."""
    (all_image, offset), (all_text, _) = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
    labels = torch.arange(image_embeds.shape[0], device=image_embeds.device) + offset
    all_text = _with_negatives(all_text, negative_embeds)
    logits_i2t = logit_scale * image_embeds @ all_text.T  # [b, B (+ N)]
    logits_t2i = logit_scale * text_embeds @ all_image.T  # [b, B]
    loss = (F.cross_entropy(logits_i2t.float(), labels) + F.cross_entropy(logits_t2i.float(), labels)) / 2
    return loss * _share(image_embeds.shape[0], all_image.shape[0])


def _with_negatives(all_text: torch.Tensor, negative_embeds: torch.Tensor | None) -> torch.Tensor:
    """The gathered texts followed by every process's hard negatives (after all the positives, so the
    positives' columns stay where the labels say)."""
    if negative_embeds is None:
        return all_text
    return torch.cat([all_text, gather_with_grad(negative_embeds)[0]])


def siglip_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
    negative_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss, normalised per image as in the paper: -Σ log σ(z·(s·x·y + b)) / B.
    `negative_embeds` (hard negatives) are more texts labelled -1 for every image."""
    all_text, offset = gather_with_grad(text_embeds)
    b, B = image_embeds.shape[0], all_text.shape[0]
    all_text = _with_negatives(all_text, negative_embeds)
    logits = (logit_scale * image_embeds @ all_text.T + logit_bias).float()  # [b, B (+ N)]
    labels = -torch.ones_like(logits)
    cols = torch.arange(b, device=logits.device) + offset
    labels[torch.arange(b, device=logits.device), cols] = 1.0
    return -F.logsigmoid(labels * logits).sum() / b * _share(b, B)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy: logits [B, T, V] at position t predict labels[:, t + 1];
    positions labelled `ignore_index` (padding, prompts) carry no loss."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=ignore_index)


def lm_loss_at_targets(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
                       ignore_index: int = -100) -> torch.Tensor:
    """`lm_loss` computed from hidden states [B, T, D], with logits only at the positions that
    have a target.  The same value; with few targets (assistant tokens only, never image tokens)
    and a large vocabulary, most of the head's matmul and the [B, T, V] logits are never made."""
    targets = labels[:, 1:]
    keep = targets != ignore_index
    logits = lm_head(hidden[:, :-1][keep])  # [N, V]
    return F.cross_entropy(logits.float(), targets[keep])


def seq2seq_loss(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
                 ignore_index: int = -100) -> torch.Tensor:
    """An encoder-decoder's cross-entropy: hidden [B, T, D] at position t predicts labels[:, t] (the
    decoder's input is already shifted right), logits made only where a label is."""
    keep = labels != ignore_index
    return F.cross_entropy(lm_head(hidden[keep]).float(), labels[keep])


def _share(local: int, total: int) -> float:
    """local rows / the mean rows per process: the weight that makes DDP's mean the global mean."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return local * world / total


def contrastive_loss(out: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    negatives = out.get("negative_embeds")
    if kind == "siglip":
        return siglip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"], out["logit_bias"], negatives)
    return clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"], negatives)


# -- fusion encoders (ALBEF): ITC, ITM with hard negatives, MLM ----------------------------------

def known_matches(text_keys: torch.Tensor, image_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch's true pairs from description keys (glimpse.data.pairs.description_keys): text i
    matches image j when its key is among image j's.  Returns (t2i [b, B]: local texts against every
    image, i2t [b, B]: local images against every text); the diagonal is always a match."""
    K = all_reduce_int(image_keys.shape[1], image_keys.device, "max")
    padded = F.pad(image_keys, (0, K - image_keys.shape[1]), value=-1)
    (all_text, offset), (all_image, _) = gather_with_grad(text_keys), gather_with_grad(padded)
    b, B = text_keys.shape[0], all_text.shape[0]
    t2i = (text_keys[:, None, None] == all_image[None]).any(-1)  # [b, B]
    i2t = (all_text[None, :, None] == padded[:, None, :]).any(-1)  # [b, B]
    diagonal = F.one_hot(torch.arange(b, device=text_keys.device) + offset, B).bool()
    return t2i | diagonal, i2t | diagonal


def itc_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
             teacher_image: torch.Tensor | None = None, teacher_text: torch.Tensor | None = None,
             alpha: float = 0.0, matches: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """ALBEF's image-text contrastive loss: CLIP's InfoNCE over the global batch; with a teacher's
    embeddings, the one-hot targets are mixed with the teacher's softmax (momentum distillation):
    targets = alpha * softmax(teacher similarities) + (1 - alpha) * one-hot.  With `matches`
    (known_matches: (t2i, i2t) [b, B]), the one-hot target is spread evenly over every true pair, as
    ALBEF's retrieval fine-tuning does over captions of the same image id."""
    if teacher_image is None and matches is None:
        return clip_loss(image_embeds, text_embeds, logit_scale)
    (all_image, offset), (all_text, _) = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
    with torch.no_grad():
        if matches is None:
            eye = F.one_hot(torch.arange(image_embeds.shape[0], device=image_embeds.device) + offset,
                            all_image.shape[0]).float()
            hard_i2t = hard_t2i = eye
        else:
            hard_t2i, hard_i2t = (m.float() / m.sum(1, keepdim=True) for m in matches)
        soft_i2t, soft_t2i = hard_i2t, hard_t2i
        if teacher_image is not None:
            (t_image, _), (t_text, _) = gather_with_grad(teacher_image), gather_with_grad(teacher_text)
            rows = slice(offset, offset + image_embeds.shape[0])
            soft_i2t = alpha * (logit_scale * t_image[rows] @ t_text.T).float().softmax(1) + (1 - alpha) * hard_i2t
            soft_t2i = alpha * (logit_scale * t_text[rows] @ t_image.T).float().softmax(1) + (1 - alpha) * hard_t2i
    logits_i2t = (logit_scale * image_embeds @ all_text.T).float()
    logits_t2i = (logit_scale * text_embeds @ all_image.T).float()
    loss = -((logits_i2t.log_softmax(1) * soft_i2t).sum(1).mean() + (logits_t2i.log_softmax(1) * soft_t2i).sum(1).mean()) / 2
    return loss * _share(image_embeds.shape[0], all_image.shape[0])


def hard_negative_indices(sim: torch.Tensor, positive: torch.Tensor, same: torch.Tensor | None = None) -> torch.Tensor:
    """For each row of `sim` [b, B] (a local sample against every candidate of the global batch),
    one negative column drawn with probability softmax(sim) over the allowed candidates: the more
    similar, the likelier, so the matcher trains on the pairs ITC confuses (ALBEF).  Never the
    positive column `positive` [b]; never a candidate marked in `same` [b, B] (a duplicate of the
    positive, which would be a wrong label) unless a row has nothing else left."""
    b, B = sim.shape
    if B < 2:
        raise GlimpseError("ITM needs at least 2 samples in the global batch to draw a negative")
    rows = torch.arange(b, device=sim.device)
    is_pos = torch.zeros(b, B, dtype=torch.bool, device=sim.device)
    is_pos[rows, positive] = True
    exclude = is_pos if same is None else is_pos | same
    exclude = torch.where(exclude.all(1, keepdim=True), is_pos, exclude)  # only duplicates left: allow them
    weights = sim.detach().float().masked_fill(exclude, float("-inf")).softmax(1)
    return torch.multinomial(weights, 1).squeeze(1)


def itm_hard_negatives(out: dict[str, torch.Tensor], matches: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The `hard_negatives` function a fusion encoder's forward calls: gathers the batch over
    processes (with gradient, so a negative drawn from another process trains its towers too),
    scores local rows against it by ITC similarity, and draws one negative image per local text
    and one negative text per local image, never a known match (`matches`: known_matches' (t2i,
    i2t)).  Returns (negative patches, pooled, text states, mask)."""
    img, txt, ids = out["image_embeds"], out["text_embeds"], out["input_ids"]
    T = all_reduce_int(ids.shape[1], ids.device, "max")
    all_img, offset = gather_with_grad(img.detach())
    all_txt, _ = gather_with_grad(txt.detach())
    all_ids, _ = gather_with_grad(pad_tokens(ids, T))
    all_mask, _ = gather_with_grad(pad_tokens(out["text_mask"], T))
    all_ids = all_ids.masked_fill(all_mask == 0, -1)
    b = img.shape[0]
    positive = torch.arange(b, device=img.device) + offset
    # the same caption text as the positive: a "negative" that would in fact match
    local_ids = all_ids[offset:offset + b]
    same = (local_ids[:, None, :] == all_ids[None, :, :]).all(-1)  # [b, B]
    with torch.no_grad():  # similarities at the ITC temperature, as ALBEF weighs them
        scale = out["logit_scale"].detach()
        same_image = same_text = same
        if matches is not None:
            same_image, same_text = same | matches[0], same | matches[1]
        neg_image = hard_negative_indices(scale * txt @ all_img.T, positive, same_image)  # for each text, an image
        neg_text = hard_negative_indices(scale * img @ all_txt.T, positive, same_text)  # for each image, a text
    patches, _ = gather_with_grad(out["patches"])
    pooled, _ = gather_with_grad(out["pooled"])
    states, _ = gather_with_grad(pad_tokens(out["text_states"], T))
    return patches[neg_image], pooled[neg_image], states[neg_text], all_mask[neg_text]


def itm_loss(itm_logits: torch.Tensor, global_rows: int | None = None) -> torch.Tensor:
    """Cross-entropy of the matcher over b positive then 2b negative pairs [3b, 2] (ALBEF's layout)."""
    b = itm_logits.shape[0] // 3
    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(itm_logits.device)
    loss = F.cross_entropy(itm_logits.float(), labels)
    return loss * (_share(b, global_rows) if global_rows else 1.0)


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None,
             alpha: float = 0.0) -> torch.Tensor:
    """Cross-entropy at the masked positions (logits [n, V], targets [n]); with a teacher, mixed
    with the cross-entropy against its softmax: (1 - alpha) * CE + alpha * soft CE (ALBEF)."""
    if targets.numel() == 0:  # nothing masked in this batch: a zero that still reaches the graph
        return logits.sum() * 0.0
    loss = F.cross_entropy(logits.float(), targets)
    if teacher_logits is not None and alpha > 0:
        soft = -(logits.float().log_softmax(-1) * teacher_logits.float().softmax(-1)).sum(-1).mean()
        loss = (1 - alpha) * loss + alpha * soft
    return loss


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_id: int, vocab_size: int,
                special_ids: list[int], probability: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: each real, non-special token is picked with `probability`; a picked token
    becomes the mask token 80% of the time, a random token 10%, and stays itself 10%.  Returns the
    masked ids and the labels (the original id at picked positions, -100 elsewhere)."""
    dev = input_ids.device

    def rand(shape):
        return torch.rand(shape, generator=generator, device=dev)

    can = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids, device=dev))
    picked = (rand(input_ids.shape) < probability) & can
    labels = input_ids.masked_fill(~picked, -100)
    r = rand(input_ids.shape)
    masked = input_ids.masked_fill(picked & (r < 0.8), mask_id)
    swap = picked & (r >= 0.8) & (r < 0.9)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=dev)
    return torch.where(swap, random_ids, masked), labels


def answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """VQA as classification: cross-entropy against soft targets [B, A] (each answer's VQA score
    for the question, normalised to sum to 1), so a question with split annotators teaches all
    of its acceptable answers."""
    soft = targets / targets.sum(1, keepdim=True).clamp_min(1e-6)
    return -(logits.float().log_softmax(-1) * soft).sum(1).mean()
