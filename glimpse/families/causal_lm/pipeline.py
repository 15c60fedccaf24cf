"""Using a causal language model: continue prompts, score texts.  What `glimpse.load`
returns for a `causal_lm` run."""

from __future__ import annotations

import math

import torch

from glimpse.data.tokenizer import Tokenizer
from glimpse.models.decoder import CausalLM


class LanguageModelPipeline:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def generate(self, prompts: list[str], max_new_tokens: int = 32, **options) -> list[str]:
        """Continue each prompt (batched); options are GenerationConfig's (do_sample, temperature,
        top_k, top_p, num_beams, stop_strings, seed).  Generation stops at the tokenizer's eos."""
        from glimpse.infer.generate import GenerationConfig, generate

        self.model.eval()
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=self.tokenizer.ids["eos"], **options)
        ids = [self.tokenizer.encode(p, add_bos=True) for p in prompts]
        out = generate(self.model, ids, cfg, pad_id=self.tokenizer.pad_id, decode=self.tokenizer.decode)
        return [self.tokenizer.decode(o).strip() for o in out]

    @torch.no_grad()
    def perplexity(self, texts: list[str]) -> list[float]:
        """exp(mean next-token loss) of each text, bos + text + eos."""
        from glimpse.losses import lm_loss

        self.model.eval()
        out = []
        for t in texts:
            ids = torch.tensor([self.tokenizer.encode(t, add_bos=True, add_eos=True)])
            out.append(math.exp(lm_loss(self.model(ids), ids).item()))
        return out
