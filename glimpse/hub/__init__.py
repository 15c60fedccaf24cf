"""Hugging Face checkpoints in and out: the mapping engine and the maps of glimpse's parts.

    mapping.py   template rules between glimpse's and Hugging Face's tensor names, applied strictly both ways
    folder.py    reading a model folder: config, tensors, tokenizer, chat template, image preprocessing
    towers.py    CLIP, SigLIP and BERT vision and text towers
    decoder.py   Llama-family and GPT-2 causal decoders
    parts.py     strict loading; a recipe's part checked against a checkpoint's
    export.py    writing a model folder

The maps of whole models (CLIPModel, LlamaForCausalLM, LlavaForConditionalGeneration) live with their
families (glimpse/families/*/hf.py); glimpse.families.load_hf loads any folder by its model_type.
"""

from glimpse.hub.folder import is_hf_folder, resolve

__all__ = ["is_hf_folder", "resolve"]
