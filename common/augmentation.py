"""Perturbed copies of the training texts, for distillation without labels (``--unlabeled_dataset train_perturbed``).

With every labelled row already used, the student still sees the teacher's function only at those rows. Texts near
them, labelled by the teacher rather than by the original label (a perturbation may change the meaning), show it
more of that function: the data augmentation of TinyBERT (Jiao et al., 2020), here with the cheap word-level edits of
EDA (Wei and Zou, 2019) instead of a masked language model, which the fine-tuned teacher does not carry. Each text gets
one edit, drawn at random:

- a contiguous span of 50-90% of its words (a phrase of the review, as in SST's phrase-level data);
- each word deleted with probability 0.15 (at least one deleted, at least three kept);
- 10% of its words swapped in random pairs (at least one swap of two places).

Texts of fewer than four words, and edits that give the text back unchanged, yield no row. The draws depend only on
the seed, so every stage that asks for them gets the same texts.
"""

from __future__ import annotations

import random
from typing import Optional, Sequence, Union

SHORTEST_PERTURBED = 4  # words; shorter texts have too little to cut or swap
SPAN_SHARE = (0.5, 0.9)
DELETE_PROBABILITY = 0.15
SWAP_SHARE = 0.1

Text = Union[str, tuple[str, str]]


def perturb_words(text: str, rng: random.Random) -> Optional[str]:
    """One random edit of ``text`` (span, deletion or swap); None when it is too short or the edit changed nothing."""
    words = text.split()
    if len(words) < SHORTEST_PERTURBED:
        return None
    choice = rng.random()
    if choice < 0.4:
        keep = max(3, int(len(words) * rng.uniform(*SPAN_SHARE)))
        start = rng.randint(0, len(words) - keep)
        words = words[start:start + keep]
    elif choice < 0.7:
        deleted = {i for i in range(len(words)) if rng.random() < DELETE_PROBABILITY} or {rng.randrange(len(words))}
        kept = [word for i, word in enumerate(words) if i not in deleted]
        words = kept if len(kept) >= 3 else words[:3]
    else:
        for _ in range(max(1, int(SWAP_SHARE * len(words)))):
            i, j = rng.sample(range(len(words)), 2)
            words[i], words[j] = words[j], words[i]
    edited = " ".join(words)
    return None if edited == " ".join(text.split()) else edited


def perturbed_copies(texts: Sequence[Text], seed: int) -> list[Text]:
    """One perturbed copy of each text (of each side of a sentence pair, drawn independently: a pair yields a row when
    either side changed), in the order of ``texts``; texts that yield nothing are left out."""
    rng = random.Random(seed)
    copies: list[Text] = []
    for text in texts:
        if isinstance(text, tuple):
            first, second = (perturb_words(side, rng) for side in text)
            if first is not None or second is not None:
                copies.append((first or text[0], second or text[1]))
        else:
            edited = perturb_words(text, rng)
            if edited is not None:
                copies.append(edited)
    return copies
