"""LoRA adapters in PEFT's format, for the Hugging Face model that glimpse's export writes.

    ADAPTER/adapter_config.json         peft_type LORA, r, lora_alpha, lora_dropout, target_modules, task_type,
                                        base_model_name_or_path
    ADAPTER/adapter_model.safetensors   base_model.model.<module>.lora_A.weight [r, in]
                                        base_model.model.<module>.lora_B.weight [out, r]

`<module>` is the module's path in the transformers class that loads the exported folder: the folder's
tensor name without `.weight`, with the family's module prefixes (`HFFolder.module_prefixes`: LLaVA's
files keep transformers' older names, its modules sit under `model.`) applied.  The weight map of the
export (glimpse.hub.mapping rules) says which Hugging Face layer a glimpse layer is: one to one, as is or
transposed (GPT-2's Conv1D: `fan_in_fan_out`), or one glimpse layer to several (a fused qkv to q_proj,
k_proj, v_proj): each of those gets A as it is and its rows of B, which computes exactly the same.  A
layer the export has no single linear layer for is an error naming it.  `peft.PeftModel.from_pretrained
(model, ADAPTER)` then computes what glimpse's LoRA model computes (tests/test_lora.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from glimpse.errors import GlimpseError
from glimpse.hub.export import HFFolder
from glimpse.hub.mapping import TRANSPOSE, _same, _split
from glimpse.models.lora import LoraLayer

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class PeftAdapter:
    config: dict  # adapter_config.json
    tensors: dict[str, torch.Tensor]  # adapter_model.safetensors, float32

    def write(self, dst: Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write the two files into `dst` (created; written under a temporary name and renamed into place)."""
        dst = Path(dst)
        tmp = dst.with_name(f".tmp-{dst.name}")
        if tmp.exists():
            for f in tmp.iterdir():
                f.unlink()
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: v.to(dtype).contiguous() for k, v in self.tensors.items()}, str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(self.config, indent=2) + "\n")
        if dst.exists():  # a run's adapter written again (a resumed run): the new one replaces it
            for f in dst.iterdir():
                f.unlink()
            dst.rmdir()
        tmp.rename(dst)
        return dst


def _module(hf_key: str, prefixes) -> str:
    name = hf_key.removesuffix(".weight")
    for old, new in prefixes:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def task_type(config: dict) -> str | None:
    """PEFT's task type for an exported architecture: CAUSAL_LM for the language models and LLaVA (whose
    PeftModelForCausalLM passes pixel_values on), none for the others (a plain PeftModel)."""
    arch = (config.get("architectures") or [""])[0]
    return "CAUSAL_LM" if arch.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) else None


def peft_adapter(folder: HFFolder, layers: list[LoraLayer], r: int, alpha: float, dropout: float,
                 base: str | None = None) -> PeftAdapter:
    """The PEFT adapter of glimpse's LoRA `layers` on the model of `folder` (the model's export, `to_hf`);
    `base`: base_model_name_or_path, the folder the adapter applies to (None if unknown)."""
    if not isinstance(folder, HFFolder):
        raise GlimpseError("LoRA adapters: this family's export is not a transformers model; no PEFT adapter")
    by_ours = {k: rule for rule in folder.rules for k in rule.ours}
    tensors: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    transposed = False
    for layer in layers:
        rule = by_ours.get(layer.name + ".weight")
        if rule is None or len(rule.ours) != 1 or rule.to_hf not in (_same, TRANSPOSE[1]):
            raise GlimpseError(f"LoRA on {layer.name}: the Hugging Face export has no linear layer that is exactly "
                               "this one, so its adapter has no PEFT form; leave it out of train.lora.targets")
        transposed |= rule.to_hf is TRANSPOSE[1]
        if rule.to_hf is TRANSPOSE[1] and len(rule.hf) > 1:
            raise GlimpseError(f"LoRA on {layer.name}: split across several transposed layers; no PEFT form")
        # B's rows are the layer's outputs: split as the weight's rows are (A is shared, computed once)
        for hf_key, b in zip(rule.hf, _split(layer.B, None, len(rule.hf))):
            module = _module(hf_key, folder.module_prefixes)
            modules.append(module)
            tensors[f"base_model.model.{module}.lora_A.weight"] = layer.A.clone()
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    config = {"peft_type": "LORA", "task_type": task_type(folder.config), "base_model_name_or_path": base,
              "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": _targets(modules, folder),
              "fan_in_fan_out": transposed, "bias": "none", "use_rslora": False, "use_dora": False,
              "lora_bias": False, "init_lora_weights": True, "modules_to_save": None, "inference_mode": True}
    return PeftAdapter(config, tensors)


def _targets(modules: list[str], folder: HFFolder) -> list[str]:
    """The layers' last names (q_proj, v_proj) when they pick out exactly these layers of the model, as PEFT
    matches them (a name or a "."-suffix); else every layer's full name."""
    every = {_module(k, folder.module_prefixes) for r in folder.rules for k in r.hf if k.endswith(".weight")}
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    picked = {m for m in every if any(m == s or m.endswith("." + s) for s in short)}
    return short if picked == set(modules) else sorted(modules)


def adapter_of(folder: HFFolder, layers: list[LoraLayer], cfg, base: str | None = None) -> PeftAdapter:
    """`peft_adapter` with `cfg` a recipe's `train.lora`."""
    return peft_adapter(folder, layers, cfg.r, cfg.alpha, cfg.dropout, base)
