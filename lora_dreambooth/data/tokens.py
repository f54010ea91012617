"""Choosing the subject's token: rare single-token words (the DreamBooth paper's recipe) and checks on `--token`.

The paper binds the subject to a *rare* token: one the tokenizer keeps as a single piece, short, and with little
prior meaning, so the model neither has to overwrite a strong concept ("dog") nor learn a word spread over many
pieces. CLIP's BPE numbers merges from frequent to rare, so a token's id tells its rarity.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

_COMMON = """
a about after again all also am an and any are as at away back be because been before being best big both
boy but by can car cat city come could day did do dog does down each eat end even eye face far few find
first for from get girl give go good great had has have he her here him his home house how i if in into is
it its just know last life like little long look make man many may me men more most much must my new no
not now of off old on one only or other our out over own part people photo picture place play put red
right run said same see she should show side so some still such take tell than that the their them then
there these they thing think this those time to too two up us use very want was water way we well went
were what when where which while who why will with woman word work world would year yes you your art bag
bed bird blue book box cup dark day fish fun hat key leg map pen pet pig red sea sky sun tea toy tree
van war web zoo
""".split()
COMMON_WORDS = frozenset(_COMMON)
MANY_PIECES = 3
_LETTERS = re.compile(r"^[a-z]+$")
_BYTE_TOKENS = 512  # CLIP BPE: 256 bytes, then the same with an end-of-word mark; merges follow in frequency order


@dataclass(frozen=True)
class TokenSuggestion:
    """A candidate token: its text, its id, and how rare it is (0 = most frequent merge, 1 = rarest)."""

    text: str
    token_id: int
    rarity: float


def token_pieces(tokenizer: Any, word: str) -> list[int]:
    """The token ids `word` becomes on its own (no start/end tokens)."""
    return list(tokenizer(word, add_special_tokens=False).input_ids)


def _rarity(tokenizer: Any, token_id: int) -> float:
    merges = max(len(tokenizer) - _BYTE_TOKENS - len(tokenizer.all_special_ids), 1)
    return min(max((token_id - _BYTE_TOKENS) / merges, 0.0), 1.0)


def suggest_tokens(tokenizer: Any, count: int = 20, *, min_length: int = 2, max_length: int = 4,
                   min_rarity: float = 0.5) -> list[TokenSuggestion]:
    """Rare single-token words: whole-word vocabulary entries of `min_length`..`max_length` lowercase letters
    that decode to themselves and encode back to exactly one token, are not common English words, and sit in
    the rarest part of the vocabulary (`rarity` >= `min_rarity`). Rarest first."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    candidates = []
    for piece, token_id in vocab.items():
        if not piece.endswith("</w>"):
            continue
        text = piece[:-len("</w>")]
        if not (min_length <= len(text) <= max_length and _LETTERS.match(text)) or text in COMMON_WORDS:
            continue
        rarity = _rarity(tokenizer, token_id)
        if rarity >= min_rarity:
            candidates.append(TokenSuggestion(text, token_id, rarity))
    candidates.sort(key=lambda s: (-s.token_id, s.text))
    chosen = []
    for candidate in candidates:
        if token_pieces(tokenizer, candidate.text) == [candidate.token_id] \
                and tokenizer.decode([candidate.token_id]).strip() == candidate.text:
            chosen.append(candidate)
            if len(chosen) == count:
                break
    return chosen


def token_warnings(tokenizer: Any, token: str) -> list[str]:
    """Why `token` may be a poor subject token (empty when it is fine)."""
    warnings = []
    pieces = token_pieces(tokenizer, token)
    if len(pieces) >= MANY_PIECES:
        shown = " ".join(tokenizer.convert_ids_to_tokens(pieces)).replace("</w>", "")
        warnings.append(f"--token '{token}' splits into {len(pieces)} tokenizer pieces ({shown}); a rare word that "
                        f"stays one piece binds the subject better (try: lora-dreambooth suggest-token --base MODEL)")
    frequent = len(pieces) == 1 and len(tokenizer) >= 10_000 and _rarity(tokenizer, pieces[0]) < 0.15
    if token.lower() in COMMON_WORDS or frequent:
        warnings.append(f"--token '{token}' is a common word: the model already has a meaning for it, which "
                        f"training must overwrite and which leaks into the subject (pick a rare token instead)")
    return warnings


def check_tokens(tokenizer: Any, tokens: list[str]) -> None:
    """Log a warning for each subject token that splits into many pieces or is a common word."""
    for token in tokens:
        for message in token_warnings(tokenizer, token):
            log.warning(message)


