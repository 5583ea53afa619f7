"""Attention recall and density of each method on the model's own q/k.

The prompt is a ``niah_single`` prompt (needle at 50 %) of the asked length. The runner captures every layer's
query and key after the rotary embedding (through transformers' attention-function registry), then for each method
selects a layout from them and measures, per layer, the dense softmax mass the layout keeps
(``sparseflash.metrics.attention_recall``) and its block density (``sparseflash.metrics.density``). The case
score is the mean recall over layers; the per-layer lists are stored with the case.
"""

from __future__ import annotations

from typing import Any

from sparseflash.eval.tasks.base import PromptFormat, Sample, Task, Tokenizer, plain_format, register_task
from sparseflash.eval.tasks.niah import NiahSingle


@register_task
class Recall(Task):
    name = "recall"
    kind = "recall"
    uses_depth = False
    description = "per-layer attention recall and density of each method on the model's own q/k"
    options = {"text_source": "auto", "layers": "all"}

    def build(
        self,
        tokenizer: Tokenizer,
        length: int,
        depth: float | None,
        seed: int,
        fmt: PromptFormat = plain_format,
        **options: Any,
    ) -> Sample:
        opts = self.check_options(options)
        sample = NiahSingle().build(tokenizer, length, 50.0, seed, fmt, text_source=opts["text_source"])
        sample.task, sample.depth, sample.metric, sample.max_new_tokens = self.name, None, "recall", 0
        sample.meta["options"] = opts
        return sample
