"""Tokens to words: the text of one file's text stream, its tokens and its words with times (docs/infer.md)."""

from __future__ import annotations

import bisect
import typing as tp

from ..units import FRAME_RATE
from .results import Token, Word

LAST_WORD_MAX_SECONDS = 1.0  # an STT word never closed by an end-of-padding token ends at most this late


def special_ids(model) -> set[int]:
    """Text ids that are not text: padding, end of padding, sentencepiece control symbols.

    Args:
        model: the TTTModel (tokenizer, padding ids).
    """
    tok, lm = model.tokenizer, model.lm
    ids = {lm.text_padding_token_id, lm.end_of_text_padding_id}
    ids |= {i for i in range(tok.get_piece_size()) if tok.is_control(i)}
    return ids


def decode_text(model, ids: tp.Sequence[int], special: set[int]) -> str:
    """The text of a text stream: its ids without the `special` ones, decoded, stripped.

    Args:
        model: the TTTModel (tokenizer).
        ids: text token of every output step.
        special: ids to drop (`special_ids(model)`).
    """
    kept = [i for i in ids if i not in special]
    return model.tokenizer.decode(kept).strip() if kept else ""


def text_words(model, steps: list[int], ids: list[int], offset: float, n_steps: int, stt: bool,
               start_step: int = 0, special: set[int] | None = None) -> tuple[list[Token], list[Word]]:
    """Tokens (padding dropped) and words with times, from one file's text stream.

    Args:
        model: the TTTModel (tokenizer, padding ids).
        steps, ids: stream step and text token of every output step.
        offset: seconds subtracted from `step × 0.08` (STT: silence prefix + audio delay).
        n_steps: the file's frames, padding included (bounds an unfinished last STT word).
        stt: word ends from the end-of-padding tokens (kyutai STT), else from the text stream's timing.
        start_step: the file's first stream frame (carry), subtracted from steps.
        special: ids to drop (default `special_ids(model)`).
    """
    tok = model.tokenizer
    special = special_ids(model) if special is None else special
    epad = model.lm.end_of_text_padding_id

    def t(step: float) -> float:
        return round(max(0.0, step / FRAME_RATE - offset), 4)

    tokens: list[Token] = []
    groups: list[list[Token]] = []
    epads: list[int] = []
    for s, i in zip(steps, ids):
        rel = s - start_step
        if i == epad:
            epads.append(rel)
        if i in special:
            continue
        piece = tok.id_to_piece(int(i))
        tk = Token(rel, t(rel), int(i), piece)
        tokens.append(tk)
        if piece.startswith("▁") or not groups:
            groups.append([tk])
        else:
            groups[-1].append(tk)
    words: list[Word] = []
    groups = [g for g in groups if tok.decode([x.id for x in g]).strip()]
    for n, g in enumerate(groups):
        first, last = g[0].step, g[-1].step
        nxt = groups[n + 1][0].step if n + 1 < len(groups) else None
        if stt:
            k = bisect.bisect_right(epads, last)
            if k < len(epads) and (nxt is None or epads[k] <= nxt):
                end: float = epads[k]
            elif nxt is not None:
                end = nxt
            else:
                end = min(float(n_steps), first + LAST_WORD_MAX_SECONDS * FRAME_RATE)
        else:
            end = last + 1
        words.append(Word(tok.decode([x.id for x in g]).strip(), t(first), t(end), first, end))
    return tokens, words
