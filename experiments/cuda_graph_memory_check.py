"""On a GPU: greedy captions of the encoder-decoder captioner decoded with CUDA graphs equal those
decoded step by step without them (the cross-attention cache and memory mask are replayed correctly).

    python experiments/cuda_graph_memory_check.py
"""

import torch

from glimpse.families.encoder_decoder.model import EncoderDecoderCaptioner, EncoderDecoderConfig
from glimpse.infer.generate import GenerationConfig, generate
from glimpse.models.decoder import DecoderConfig
from glimpse.models.vision import VisionConfig

torch.manual_seed(0)
cfg = EncoderDecoderConfig(vision=VisionConfig(image_size=64, patch_size=8, width=128, layers=2, heads=4, pre_norm=False,
                                               patch_bias=True),
                           decoder=DecoderConfig(arch="gpt2", vocab_size=300, width=96, layers=3, heads=4),
                           decoder_start_token_id=1)
model = EncoderDecoderCaptioner(cfg).cuda().eval()
with torch.no_grad():
    memory = list(model.encode(torch.randn(5, 3, 64, 64, device="cuda")))
prompts = [[1], [1, 5], [1], [1, 7, 9], [1]]
outs = {g: generate(model.decoder, prompts, GenerationConfig(max_new_tokens=20, ignore_eos=True, cuda_graph=g),
                    memory=memory) for g in (True, False)}
print("cuda graph == eager:", outs[True] == outs[False])
assert outs[True] == outs[False]
