"""Audio -> Mimi codes (streamed in bounded blocks) and the LM input layout for teacher forcing (SPEC §6)."""

from __future__ import annotations

import typing as tp

import numpy as np
import torch
from moshi.models.lm_utils import _delay_sequence  # what LMModel.forward applies; moshi has no public name for it

from .audio import FRAME_SIZE
from .streaming import block_streaming

ENCODE_BLOCK_FRAMES = 64  # frames per Mimi call: bounded memory whatever the document length


@torch.no_grad()
def encode_stream(mimi, chunks: tp.Iterable[np.ndarray], block_frames: int = ENCODE_BLOCK_FRAMES,
                  device: str = "cpu") -> tp.Iterator[torch.Tensor]:
    """Encodes a continuous waveform given as consecutive pieces, yielding codes [n_q, F] per block.

    The pieces are concatenated logically (a piece boundary is not a frame boundary); the
    encoder runs in streaming mode so the codes equal encoding the whole waveform at once.
    The partial last frame is dropped. Mimi's encoder transformer runs at twice the frame rate,
    so its cache must hold context + 2·block_frames − 1 keys (pitfall 7).
    """
    step = block_frames * FRAME_SIZE
    buf = np.zeros(0, dtype=np.float32)
    with block_streaming(mimi, 1, max_block=2 * block_frames):
        for piece in chunks:
            buf = np.concatenate([buf, np.asarray(piece, dtype=np.float32)])
            while buf.shape[0] >= step:
                x = torch.from_numpy(buf[:step].copy()).to(device)[None, None]
                buf = buf[step:]
                yield mimi.encode(x)[0]  # [n_q, block_frames]
        whole = (buf.shape[0] // FRAME_SIZE) * FRAME_SIZE
        if whole:
            x = torch.from_numpy(buf[:whole].copy()).to(device)[None, None]
            yield mimi.encode(x)[0]


def encode_audio(mimi, pieces: tp.Iterable[np.ndarray], block_frames: int = ENCODE_BLOCK_FRAMES,
                 device: str = "cpu") -> torch.Tensor:
    """Codes [n_q, T] (int64, CPU) of a waveform given as consecutive 24 kHz mono pieces (or one array in a list)."""
    parts = [c.cpu() for c in encode_stream(mimi, pieces, block_frames, device)]
    if not parts:
        return torch.zeros(mimi.num_codebooks, 0, dtype=torch.long)
    return torch.cat(parts, dim=-1).long()


def lm_input_codes(lm, audio: torch.Tensor, audio_stream: str = "moshi", text_stream: str = "zero") -> torch.Tensor:
    """LM input codes [K, T] (before delays) from Mimi codes [n_q_audio, T].

    Args:
        lm: moshi LMModel.
        audio: Mimi codes.
        audio_stream: `moshi` (Moshi's own stream, scored by the depformer) or `user`.
        text_stream: `zero` (-1: no token, zero embedding) or `pad` (the text padding id).
    """
    K, T = lm.num_codebooks, audio.shape[-1]
    codes = torch.full((K, T), lm.zero_token_id, dtype=torch.long)
    if text_stream == "pad":
        codes[0] = lm.text_padding_token_id
    elif text_stream != "zero":
        raise ValueError(f"text_stream must be zero or pad, got {text_stream!r}")
    if audio_stream == "moshi" and lm.dep_q > 0:
        rows = range(1, 1 + lm.dep_q)
    elif audio_stream in ("user", "moshi"):
        rows = range(1 + lm.dep_q, K)
    else:
        raise ValueError(f"audio_stream must be moshi or user, got {audio_stream!r}")
    n = min(len(rows), audio.shape[0])
    codes[rows.start:rows.start + n] = audio[:n].long()
    return codes


def transformer_input(lm, codes: torch.Tensor) -> torch.Tensor:
    """The sequence `LMModel.forward` feeds to `forward_text` for codes [B, K, T]: the initial
    token, then the codes with their delays applied, last step dropped. Position s predicts step s."""
    B = codes.shape[0]
    initial = lm._get_initial_token().to(codes.device).expand(B, -1, -1)
    delayed = _delay_sequence(lm.delays, codes, initial)
    return torch.cat([initial, delayed], dim=2)[:, :, :-1]
