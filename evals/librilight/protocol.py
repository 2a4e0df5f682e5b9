"""`evaluate_librilight`: the long-context perplexity protocol of SPEC §6 as a task of the `evals.run` driver."""

from __future__ import annotations

import shutil
from pathlib import Path

from ttt_cli.distributed import current
from ttt_cli.outputs import OutputPlan
from ttt_cli.units import seconds_to_steps

from .. import resume
from ..policies import parse_policies
from ..run import EvalResult, Setup, evaluate
from . import loop, sharded
from .codes_cache import default_cache_dir
from .data import discover
from .options import PROTOCOL_FLAGS, EvalOptions, LibriLightRun, check_layout, validate
from .outputs import output_plan
from .records import carry_path, inputs_changed, load_carry
from .results import finish, rank_result


def evaluate_librilight(options: EvalOptions, progress=None, model=None) -> EvalResult:
    """Runs the LibriLight long-context protocol (SPEC §6) and writes its outputs into `options.out`.

    Args:
        options: what to run (see EvalOptions).
        progress: a `ttt_cli.progress` hook (None: silent).
        model: a loaded `TTTModel`, or a function returning one, called once the data and --out are
            checked (None: load `options.model`). The model is left as it was found.
    Returns:
        EvalResult (`policies`: PolicySummary lines); `interrupted` is True when Ctrl-C stopped the run
        (finished documents are kept, `--resume` continues).
    Raises:
        ConfigError / CheckpointError / StateMismatchError / OutputError: bad options, data, model,
            snapshot or output path (before any work).
        WriteError: writing failed part-way (finished documents are kept for --resume).
        EvalStopped: Ctrl-C while the results were being written (exit 130; --resume writes them).
    """
    return evaluate(LibriLightTask(options), options, progress, model)


class LibriLightTask:
    """`ttt eval librilight` as `evals.run.evaluate` runs it: books of DATA scored under each policy."""

    def __init__(self, o: EvalOptions):
        self.o = o
        # Set by `check`: what the options and DATA name, and how the codes cache may be used.
        self.policies: list = []
        self.dataset = None
        self.out = Path(o.out)
        self.cache_dir: Path | None = None
        self.store = False
        self.notes: list[str] = []

    def check(self) -> OutputPlan:
        """Options, policies, the dataset and where the run writes, before the model loads."""
        o = self.o
        validate(o)
        self.policies = parse_policies(o.policies)
        sharded.refuse_carrying(self.policies)
        self.dataset = discover(o.data, o.max_seconds, o.min_seconds, o.limit_books)
        if o.use_codes_cache:
            self.cache_dir = Path(o.codes_cache) if o.codes_cache else default_cache_dir()
        plan, self.store, self.notes = output_plan(o, self.dataset, self.out, self.cache_dir, self.policies)
        return plan

    def prepare(self, m) -> list[str]:
        """Refuses a model that leaves nothing to score; the output plan's notes (a read-only codes cache)."""
        check_layout(m.lm, self.o)
        return self.notes

    def protocol(self, init_state: dict | None) -> dict:
        """results.json's `protocol` section."""
        o = self.o
        return {"policies": [p.name for p in self.policies], "max_seconds": o.max_seconds,
                "min_seconds": o.min_seconds, "limit_books": o.limit_books, "block_steps": o.block_steps,
                "bin_seconds": o.bin_seconds, "bin_steps": seconds_to_steps(o.bin_seconds),
                "audio_stream": o.audio_stream, "text_stream": o.text_stream,
                "codes_cache": str(self.cache_dir) if self.cache_dir else None, "save_token_nll": o.save_token_nll,
                "init_state": init_state, "seed": o.seed, "data": str(self.dataset.root.resolve()),
                "scoring": "teacher forcing in streaming mode; nats per step and codebook"}

    def run(self, setup: Setup) -> EvalResult:
        """Scores every document not done yet (shared among ranks under torchrun), then writes the outputs."""
        o = self.o
        run = LibriLightRun(o, self.policies, self.dataset, self.out, setup.m, self.cache_dir, self.store, setup.warm,
                            setup.lr, setup.mimi_fp, seconds_to_steps(o.bin_seconds), setup.progress,
                            warnings=setup.warnings)
        config = resume.run_config(setup.protocol, setup.model_rec, PROTOCOL_FLAGS)
        if current().active:
            interrupted = sharded.score_shared(run, config, open_resume)
            if not current().is_main:  # rank 0 writes the outputs
                return rank_result(run, interrupted)
        else:
            open_resume(run, config)
            interrupted = loop.score_all(run)
        return finish(run, setup, interrupted)


def open_resume(run: LibriLightRun, config: dict) -> None:
    """Loads (and verifies) the resume record, or starts one; written at once, so that a run interrupted
    before its first document finished resumes like any other.

    Args:
        run: the run (its `state` and `carries` are set).
        config: the run's `resume.run_config`.
    """
    o, out, progress = run.o, run.out, run.progress
    sdir = resume.state_dir(out)
    carrying = any(p.carries_across_documents for p in run.policies)
    if o.resume and ((sdir / resume.STATE_FILE).is_file() or resume.ranks_dir(out).is_dir()):
        root = Path(run.dataset.root)
        run.state, notes = resume.open_state(out, config, run.dataset, carrying,
                                             lambda entry, doc: inputs_changed(entry, doc, root))
        run.warnings += notes  # printed once, as warnings, with the results
        progress.log(f"resuming: {len(run.state['done'])} of {len(run.dataset.documents)} documents already done.")
    else:
        if o.resume:
            progress.log(f"--resume: nothing to resume in {out}; starting a new run.")
        if sdir.exists():
            shutil.rmtree(sdir)  # checked to hold only ttt's own resume files (--overwrite)
        resume.remove_ranks(out)  # the same for the records of an earlier run under torchrun
        run.state = resume.new_state(config)
    load_carries(run, config)
    try:
        sdir.mkdir(parents=True, exist_ok=True)
        resume.write_state(sdir, run.state)
        resume.remove_ranks(out)  # their documents are in the state file now (checked to be ours)
    except OSError as e:
        loop.stop(run, e)


def load_carries(run: LibriLightRun, config: dict) -> None:
    """The fast weights each `never` policy carries into the next document, from the resume record; when one
    does not follow the last finished document, every document is computed again.

    Args:
        run: the run (its `state` set; `carries` and perhaps `state` are set here).
        config: the run's `resume.run_config`.
    """
    run.carries = {p.name: None for p in run.policies}
    scored_before = any(run.state["docs"][d]["record"]["steps"] for d in run.state["done"])
    for p in run.policies:
        if p.carries_across_documents and scored_before:
            path = carry_path(run.out, p.dir_name)
            carry, after = load_carry(path) if path.is_file() else ({}, None)
            if after != run.state["done"][-1]:  # missing, damaged, or from another point of the run
                note = (f"--resume: the fast weights that policy {p.name} carries across documents ({path}) do not "
                        f"follow the last finished document; every document is computed again.")
                run.warnings.append(note)
                run.state = resume.new_state(config)
                run.carries = {q.name: None for q in run.policies}
                break
            run.carries[p.name] = carry
