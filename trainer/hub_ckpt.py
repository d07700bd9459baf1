"""A checkpoint folder that is also a model directory the Hub's loaders open (issue 28 item 3).

``checkpoints/step-N/`` holds what ``from_pretrained`` reads beside the resume state, so a user can
evaluate a mid-run checkpoint:

* full fine-tuning: ``config.json`` (+ ``generation_config.json``), ``model.safetensors`` with the model's
  own tensor names (the loss module's ``model.`` prefix dropped; the tied output embedding stays, so the
  file is the resume state too and the weights are not stored twice) and the base's tokenizer files:
  ``AutoModelForCausalLM.from_pretrained(step_dir)`` opens it;
* LoRA / prompt tuning: peft's ``adapter_config.json`` + ``adapter_model.safetensors`` (what
  ``AutoPeftModelForCausalLM.from_pretrained`` loads) and the tokenizer; the resume state (base and
  adapter tensors, as before) in ``trainer_weights.safetensors``.

Tensors of the loss module outside the model (a training method's extra heads) go to
``trainer_weights.safetensors``. :func:`read_weights` reassembles the loss module's state from either
layout, and from the older one (``model.safetensors`` with the prefixed names, no ``config.json``), so
resume stays bitwise: the same tensors, only renamed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

RESUME_FILE = "trainer_weights.safetensors"
PREFIX = "model."  # the loss module's attribute holding the language model (WeightedLMLoss.model)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


class HubLayout:
    """Writes the loadable part of a checkpoint for ``lm`` (the unwrapped model) based on ``model_dir``."""

    def __init__(self, lm: Any, model_dir: Path | None):
        self.lm, self.model_dir = lm, model_dir

    def write(self, folder: Path, weights: dict) -> dict:
        """The loadable files into ``folder``; returns the tensors still to be saved for the resume."""
        from safetensors.torch import save_file

        from winnow.trainer.lora import is_peft

        self._tokenizer(folder)
        own = {k[len(PREFIX) :]: v for k, v in weights.items() if k.startswith(PREFIX)}
        if is_peft(self.lm):
            self._adapter(folder, own)
            return weights
        save_file(own, str(folder / "model.safetensors"), metadata={"format": "pt"})
        self._config(folder)
        return {k: v for k, v in weights.items() if not k.startswith(PREFIX)}

    def _tokenizer(self, folder: Path) -> None:
        if self.model_dir is None:
            return
        for name in TOKENIZER_FILES:  # copied byte for byte: the tokenizer the samples were made with
            if (Path(self.model_dir) / name).is_file():
                shutil.copyfile(Path(self.model_dir) / name, folder / name)

    def _config(self, folder: Path) -> None:
        lm = self.lm
        use_cache = lm.config.use_cache  # switched off for packed training only, as in the final save
        lm.config.use_cache = getattr(lm, "winnow_use_cache", True)
        try:
            lm.config.save_pretrained(str(folder))
        finally:
            lm.config.use_cache = use_cache
        gen = getattr(lm, "generation_config", None)
        if gen is not None and lm.can_generate():
            gen.save_pretrained(str(folder))

    def _adapter(self, folder: Path, own: dict) -> None:
        from winnow.trainer.lora import save_adapter

        save_adapter(self.lm, folder, Path(self.model_dir or "."), state_dict=own)


def read_weights(folder: Path) -> dict:
    """The loss module's full state from a checkpoint folder, whichever layout wrote it."""
    from safetensors.torch import load_file

    weights = load_file(str(folder / RESUME_FILE)) if (folder / RESUME_FILE).is_file() else {}
    model_file = folder / "model.safetensors"
    if model_file.is_file():
        own = load_file(str(model_file))
        hub = (folder / "config.json").is_file()  # the model's own names; else the older prefixed layout
        weights |= {PREFIX + k: v for k, v in own.items()} if hub else own
    return weights
