"""Prompt text per domain, generated from a seed (no downloads): tenants in different domains send different
kinds of text, so a trained model routes them to different experts.

- ``python``: function and class definitions;  - ``prose``: English sentences;
- ``json``: configuration objects;              - ``shell``: shell sessions.

:func:`prompt_ids` cuts a prompt of a given token count out of the domain's text (at a seeded offset); a model
without a tokenizer gets seeded token ids instead, each domain from its own quarter of the vocabulary.
"""

from __future__ import annotations

import random

NAMES = ["parse", "load", "merge", "split", "score", "render", "fetch", "encode", "update", "filter", "build",
         "check", "resolve", "flatten", "schedule", "retry"]
NOUNS = ["config", "items", "tokens", "rows", "nodes", "paths", "weights", "events", "users", "batch", "cache",
         "frames", "keys", "records", "scores", "tasks"]
WORDS = ("the of and a to in is was that for it with as his on be at by had not are but from or have an they which "
         "one you were her all she there would their we him been has when who will more no if out so said what up "
         "its about into than them can only other new some could time these two may then do first any my now such "
         "like our over man me even most made after also did many before must through back years where much your "
         "way well down should because each just those people how too little state good very make world still own "
         "see men work long get here between both life being under never day same another know while last might "
         "us great old year off come since against go came right used take three").split()
COMMANDS = ["ls -la", "cd {p}", "grep -rn {n} .", "cat {p}/{n}.txt", "git status", "git log --oneline -5",
            "python -m pytest -q", "tar czf {n}.tgz {p}", "du -sh {p}", "chmod +x {n}.sh", "./{n}.sh --verbose",
            "curl -s http://localhost:8000/{n}", "docker ps", "find {p} -name '*.py'", "wc -l {p}/*.py"]


def _python(rng: random.Random) -> str:
    name, noun, other = rng.choice(NAMES), rng.choice(NOUNS), rng.choice(NOUNS)
    if rng.random() < 0.3:
        return (f"class {name.title()}{noun.title()}:\n    def __init__(self, {noun}):\n        self.{noun} = {noun}\n"
                f"        self.{other} = []\n\n    def {name}(self):\n        for item in self.{noun}:\n"
                f"            self.{other}.append(item)\n        return self.{other}\n\n")
    return (f"def {name}_{noun}({noun}, {other}=None):\n    result = []\n    for i, x in enumerate({noun}):\n"
            f"        if {other} is None or x in {other}:\n            result.append((i, x))\n    return result\n\n")


def _prose(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(8, 20))]
    return " ".join(words).capitalize() + rng.choice([". ", ". ", "? ", "! "])


def _json(rng: random.Random) -> str:
    noun = rng.choice(NOUNS)
    return ('{"' + noun + '": {"id": ' + str(rng.randint(1, 999)) + ', "enabled": ' + rng.choice(["true", "false"])
            + ', "tags": ["' + rng.choice(NAMES) + '", "' + rng.choice(NOUNS) + '"], "limit": '
            + str(rng.randint(1, 100)) + '}}\n')


def _shell(rng: random.Random) -> str:
    return "$ " + rng.choice(COMMANDS).format(p=rng.choice(NOUNS), n=rng.choice(NAMES)) + "\n"


MAKERS = {"python": _python, "prose": _prose, "json": _json, "shell": _shell}


def corpus_text(domain: str, seed: int, chars: int = 20000) -> str:
    rng = random.Random(f"{domain}:{seed}")
    parts, size = [], 0
    while size < chars:
        part = MAKERS[domain](rng)
        parts.append(part)
        size += len(part)
    return "".join(parts)


class Corpora:
    """Tokenised domain texts, cut into prompts of given lengths."""

    def __init__(self, tokenizer, vocab_size: int, seed: int):
        self.tokenizer, self.vocab_size, self.seed = tokenizer, vocab_size, seed
        self._ids: dict[str, list[int]] = {}

    def _domain_ids(self, domain: str) -> list[int]:
        if domain not in self._ids:
            self._ids[domain] = self.tokenizer(corpus_text(domain, self.seed), verbose=False)["input_ids"]
        return self._ids[domain]

    def prompt_ids(self, domain: str, n_tokens: int, rng: random.Random) -> list[int]:
        if self.tokenizer is None:                      # seeded ids from the domain's quarter of the vocabulary
            quarter = max(1, self.vocab_size // 4)
            base = quarter * list(MAKERS).index(domain)
            return [base + rng.randrange(quarter) for _ in range(n_tokens)]
        ids = self._domain_ids(domain)
        start = rng.randrange(max(1, len(ids) - n_tokens))
        return ids[start:start + n_tokens]
