"""`ttt eval asr`: long-form transcription quality (WER) with reset policies side by side (SPEC §5.7)."""
