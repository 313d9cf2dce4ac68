"""transformers' own greedy ``generate``, one prompt at a time: the reference the engine's output is checked
against (demo, tests, benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Reference:
    prompt_token_ids: list[int]
    token_ids: list[int]           # generated ids, up to and including an end-of-sequence token
    logits: torch.Tensor           # [steps, vocab] float32, the raw logits of every generated token


def reference_generate(model, tokenizer, prompts: Sequence[str | Sequence[int]], max_new_tokens: int) -> list[Reference]:
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        with torch.inference_mode():
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        new = gen.sequences[0, len(ids):].tolist()
        logits = torch.stack(gen.logits)[:, 0].float()
        out.append(Reference(list(ids), new, logits[:len(new)]))
    return out
