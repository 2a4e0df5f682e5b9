"""Audio at the boundary: decoding to 24 kHz mono (decode, resample), 80 ms frames (frames), WAV writing (wav)."""

from .decode import AUDIO_EXTENSIONS, FRAME_SIZE, AudioInfo, iter_audio, load_audio
from .frames import WHOLE_FILE_SECONDS, FrameSource, open_frames
from .resample import SAMPLE_RATE
from .wav import WavStream

# CHUNK_SECONDS is left to its modules: `open_frames` reads `ttt_cli.audio.frames.CHUNK_SECONDS` at call time.
__all__ = ["AUDIO_EXTENSIONS", "FRAME_SIZE", "SAMPLE_RATE", "WHOLE_FILE_SECONDS", "AudioInfo",
           "FrameSource", "WavStream", "iter_audio", "load_audio", "open_frames"]
