"""`ttt infer` as a library: options, the streaming run, its results, words, and writing them into a directory."""

from .directory import DirectoryPlan, DirectoryRun, plan_directory, run_to_directory
from .files import output_paths, output_recognisers, plan_jobs, plan_outputs, state_paths, write_result
from .options import (DEFAULT_OUT, DEFAULT_SEED, LMGEN_DEFAULTS, MODES, RESET_POLICIES, InferOptions, batch_slots,
                      model_facts, padding, preflight, resolve_mode, sampling_settings, ttt_summary, validate_options)
from .results import FileResult, InferRun, Job, Token, Word, result_json
from .runner import infer
from .subtitles import FORMATS, SUBTITLE_FORMATS, Cue, cut_cues, parse_formats, subtitle_texts
from .words import decode_text, special_ids, text_words

__all__ = [
    "DEFAULT_OUT", "DEFAULT_SEED", "FORMATS", "LMGEN_DEFAULTS", "MODES", "RESET_POLICIES", "SUBTITLE_FORMATS",
    "Cue", "DirectoryPlan", "DirectoryRun", "FileResult", "InferOptions", "InferRun", "Job", "Token", "Word",
    "batch_slots", "cut_cues", "decode_text", "infer", "model_facts", "output_paths", "output_recognisers", "padding",
    "parse_formats", "plan_directory", "plan_jobs", "plan_outputs", "preflight", "resolve_mode", "result_json", "run_to_directory",
    "sampling_settings", "special_ids", "subtitle_texts", "state_paths", "text_words", "ttt_summary", "validate_options",
    "write_result",
]
