"""What a Flamingo model learns from the examples in its prompt.

Binding episodes (glimpse.families.flamingo.data): the episode gives `colours` of the world's colours
made-up words (from the test pool, never seen in training), shows k solved examples
`<image>Output: word<|endofchunk|>`, then a query image `<image>Output:`.  The answer is the episode's
word for the query's colour, which only the examples can tell.  Each episode is scored as a choice
among its words (the candidate whose tokens and end-of-chunk the model finds likeliest), so chance
is 1 / colours and k = 0 sits at chance.  For each k in `ks`, the same episodes (query, words and
examples, the first k of them) are scored: `fewshot_acc_{k}`; an episode whose prompt and answer
do not fit the LM's context is left out and counted (`fewshot_too_long_acc_{k}`), never scored on a
cut-off sequence.  The control, `fewshot_control_acc_{k}`
for k >= 2 (one example has nothing to trade places with), shuffles the examples' images, so a word no
longer names its image's colour: a model that reads the binding from the examples falls back to
chance there.  A uniform shuffle, not a derangement: forcing every image to move makes a binding
model pick a wrong word more often than chance (0.14 at k = 2; docs/results.md, session 16).  A
diagnostic, `fewshot_text_examples_acc_4`: the same episodes with their 4 examples in text ("red
dakim", no image) before the query image, which the LM's own induction can solve if the blocks write
the query's colour as the LM represents its word.

Captions: greedy captions of the split's images after k solved examples from the training split
(`<image>Output: caption<|endofchunk|>`), stopped at `<|endofchunk|>`, scored by CIDEr-D (`cider_{k}shot`).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from glimpse.data.images import ImageError, load_image
from glimpse.families.flamingo.data import (
    IGNORE,
    binding_episode,
    caption_text,
    encode_chunks,
    nonce_words,
    read_scenes,
    single_object_images,
    text_example,
)
from glimpse.infer.generate import GenerationConfig, generate
from glimpse.metrics.captions import cider, tokenize


class _Pixels:
    """Decoded, preprocessed images by index, each read once; unreadable ones remembered."""

    def __init__(self, scenes, transform, max_pixels):
        self.scenes, self.transform, self.max_pixels = scenes, transform, max_pixels
        self.done: dict[int, torch.Tensor] = {}
        self.bad: set[int] = set()

    def get(self, indices: list[int]) -> torch.Tensor | None:
        for i in indices:
            if i not in self.done and i not in self.bad:
                try:
                    self.done[i] = self.transform(load_image(self.scenes[i].image, max_pixels=self.max_pixels))
                except ImageError:
                    self.bad.add(i)
        if any(i in self.bad for i in indices):
            return None
        return torch.stack([self.done[i] for i in indices])


@torch.no_grad()
def choice_scores(model, tokenizer, rows: list[tuple], candidates: list[list[str]],
                  context_length: int) -> list[int | None]:
    """For each (texts before the query, images incl. the query[, which texts have no image]) row, the
    index of the likeliest candidate text for the query's chunk; None where a candidate's sequence
    does not fit `context_length` (a cut-off query chunk would score 0, the best log-probability)."""
    device = next(model.parameters()).device
    picks = []
    for row, cands in zip(rows, candidates):
        texts, pixels = row[:2]
        text_only = list(row[2]) if len(row) > 2 else [False] * len(texts)
        start = len(encode_chunks(tokenizer, texts, context_length, text_only=text_only)[0])  # the query chunk
        seqs = [encode_chunks(tokenizer, texts + [caption_text(c)], 10**9, text_only=text_only + [False])
                for c in cands]
        T = max(len(s[0]) for s in seqs)
        if T > context_length:
            picks.append(None)
            continue
        starts = [start] * len(seqs)
        ids = torch.full((len(seqs), T), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        target = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
        for r, ((s, lab), start) in enumerate(zip(seqs, starts)):
            ids[r, :len(s)], mask[r, :len(s)] = torch.tensor(s), 1
            target[r, start:len(s)] = torch.tensor(lab[start:])  # the query chunk's text only
        feats = model.tower_features(pixels.to(device))  # [N, T, Dv], once for every candidate
        feats = feats[None].expand(len(seqs), *feats.shape)
        logits = model(ids.to(device), mask.to(device), image_features=feats).float()
        logp = logits[:, :-1].log_softmax(-1)
        tgt = target[:, 1:].to(device)
        keep = tgt != IGNORE
        per_token = logp.gather(-1, tgt.clamp_min(0)[..., None])[..., 0] * keep
        picks.append(int(per_token.sum(-1).argmax()))
    return picks


def binding_figures(model, tokenizer, transform, scenes, *, ks: list[int], episodes: int, colours: int,
                    context_length: int, max_pixels: int, seed: int = 0) -> dict[str, float]:
    by_colour = single_object_images(scenes)
    if len(by_colour) < colours:
        return {}
    words = nonce_words("test")
    pixels = _Pixels(scenes, transform, max_pixels)
    K = max(ks)
    eps = []
    for e in range(episodes):
        rng = random.Random(f"binding/{seed}/{e}")
        images, texts, cands, answer = binding_episode(rng, by_colour, words, colours, K)
        orders = {}  # the control's order of the first k examples' images, per k
        for k in ks:
            if k >= 2:
                orders[k] = list(range(k))
                rng.shuffle(orders[k])
        eps.append((images, texts, cands, answer, orders))
    out: dict[str, float] = {"fewshot_chance": 1 / colours}

    def right(rows, cand_lists, answers, name: str) -> float:
        """The share right of the episodes that fit the LM's context; how many did not, if any."""
        picks = choice_scores(model, tokenizer, rows, cand_lists, context_length)
        fit = [(p, a) for p, a in zip(picks, answers) if p is not None]
        if len(fit) < len(picks):
            out[f"fewshot_too_long_{name}"] = len(picks) - len(fit)
        return sum(p == a for p, a in fit) / max(len(fit), 1)

    for control in (False, True):
        for k in ks:
            if control and k < 2:  # nothing to permute
                continue
            rows, cand_lists, answers = [], [], []
            for images, texts, cands, answer, orders in eps:
                ex = [images[j] for j in orders[k]] if control else images[:k]
                px = pixels.get(ex + [images[-1]])
                if px is None:
                    continue
                rows.append((texts[:k], px))
                cand_lists.append(cands)
                answers.append(cands.index(answer))
            name = f"{'control_' if control else ''}acc_{k}"
            out[f"fewshot_{name}"] = right(rows, cand_lists, answers, name)
    if 4 in ks:
        rows, cand_lists, answers = [], [], []
        for images, texts, cands, answer, _ in eps:
            px = pixels.get(images[:4] + [images[-1]])  # the episodes above (an unreadable image skips one)
            if px is None:
                continue
            shown = [text_example(scenes[i].colours[0], t) for i, t in zip(images[:4], texts[:4])]
            rows.append((shown, px[-1:], [True] * 4))
            cand_lists.append(cands)
            answers.append(cands.index(answer))
        out["fewshot_text_examples_acc_4"] = right(rows, cand_lists, answers, "text_examples_acc_4")
    out["fewshot_n"] = len(eps)
    out["skipped"] = len(pixels.bad)
    return out


@torch.no_grad()
def caption_figures(model, tokenizer, transform, scenes, train_scenes, *, shots: list[int], limit: int,
                    batch_size: int, max_new_tokens: int, max_pixels: int, end_id: int, seed: int = 0) -> dict:
    pixels, pool = _Pixels(scenes, transform, max_pixels), _Pixels(train_scenes, transform, max_pixels)
    queries = list(range(min(limit or len(scenes), len(scenes))))
    out = {}
    for k in shots:
        rng = random.Random(f"captions/{seed}/{k}")
        gts, res = {}, {}
        for start in range(0, len(queries), batch_size):
            prompts, images, rows = [], [], []
            for q in queries[start:start + batch_size]:
                ex = [rng.randrange(len(train_scenes)) for _ in range(k)]
                qp, ep = pixels.get([q]), pool.get(ex) if k else torch.zeros(0)
                if qp is None or ep is None:
                    continue
                texts = [caption_text(rng.choice(train_scenes[i].captions)) for i in ex]
                ids, _ = encode_chunks(tokenizer, texts, 10**9, prompt="Output:")
                prompts.append(ids)
                images.append(torch.cat([ep, qp]) if k else qp)
                rows.append(q)
            if not prompts:
                continue
            memory, masks = model.generation_memory(prompts, images)
            cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=end_id)
            outs = generate(model, prompts, cfg, pad_id=tokenizer.pad_id, memory=memory, memory_mask=masks)
            for q, o in zip(rows, outs):
                gts[q] = [tokenize(c) for c in scenes[q].captions]
                res[q] = [tokenize(tokenizer.decode(o))]
        if res:
            out[f"cider_{k}shot"] = cider(gts, res)
    out["caption_n"] = len(queries)
    return out


def evaluate_flamingo(model, tokenizer, transform, data_cfg, root: Path, splits: list[str], eval_cfg, m) -> dict:
    train_scenes = read_scenes(data_cfg, root, "train")
    results: dict[str, float] = {}
    for split in splits:
        scenes = read_scenes(data_cfg, root, split)
        figures = binding_figures(model, tokenizer, transform, scenes, ks=eval_cfg.few_shot or [0, 1, 2, 4, 8],
                                  episodes=eval_cfg.vqa_limit or 500, colours=m.episode_colours,
                                  context_length=m.lm.context_length, max_pixels=data_cfg.max_pixels)
        caps = caption_figures(model, tokenizer, transform, scenes, train_scenes, shots=[0, 4],
                               limit=(eval_cfg.vqa_limit or 500) // 2, batch_size=eval_cfg.batch_size,
                               max_new_tokens=eval_cfg.max_new_tokens, max_pixels=data_cfg.max_pixels,
                               end_id=m.end_of_chunk_token_id)
        figures.update(caps)
        results.update({f"{split}/{k}": v for k, v in figures.items()})
    return results
