"""Where `ttt eval asr` writes (SPEC §5.7, §7.1): hypothesis paths, the output plan, replacing its own earlier run."""

from __future__ import annotations

import os
import shutil
import typing as tp
from pathlib import Path, PurePosixPath

from ttt_cli.errors import OutputError
from ttt_cli.infer import Job, output_paths
from ttt_cli.outputs import OutputPlan, beside, is_temporary, json_with_keys, named_in

from .. import resume
from ..report import RESULTS, results_record
from ..run import check_earlier_run
from .report import WER_CSV, WER_PNG

HYP_DIR = "hyp"


def _hyp_record():
    return json_with_keys("input", "mode", "outputs")  # `ttt infer`'s per-file record: what hyp .json files are


def hyp_stem(key: str) -> str:
    """A recording's key as a relative path under `hyp/<policy dir>/` (a manifest's keys may be absolute or
    climb out with `..`: the root is dropped, `..` becomes `_`); the audio extension is kept, so that
    `a.wav` and `a.flac` of one manifest never share a hypothesis file.

    Args:
        key: the recording's key.
    """
    parts = [("_" if p == ".." else p) for p in PurePosixPath(key.replace(os.sep, "/")).parts
             if p not in ("/", ".", "")]
    return "/".join(parts) or "_"


def hyp_dir(out: Path, policy_dir: str) -> Path:
    """`OUT/hyp/<policy dir>`.

    Args:
        out: --out.
        policy_dir: the policy's directory name.
    """
    return Path(out) / HYP_DIR / policy_dir


def hyp_paths(out: Path, policy_dir: str, key: str) -> dict[str, Path]:
    """`hyp/<policy dir>/<key>.txt` and `.json` (what `ttt_cli.infer.write_result` writes for the recording).

    Args:
        out: --out.
        policy_dir: the policy's directory name.
        key: the recording's key.
    """
    return output_paths(hyp_dir(out, policy_dir), Job(0, Path(key), hyp_stem(key)), "transcribe")


def outputs_of_a_run(out: Path) -> list[Path]:
    """What a run leaves in --out (outputs and the resume record).

    Args:
        out: --out.
    """
    return [out / RESULTS, out / WER_CSV, out / WER_PNG, resume.state_dir(out), resume.ranks_dir(out), out / HYP_DIR]


def _holds_a_file(root: Path) -> bool:
    """Some file (not a folder) lies under `root`."""
    return any(names for _, _, names in os.walk(root))


def _foreign_in_hyp(root: Path) -> Path | None:
    """The first file under hyp/ that `ttt eval asr` did not write (None: all ours)."""
    record = _hyp_record()
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if is_temporary(n):
                continue
            if p.suffix == ".json" and record(p):
                continue
            if p.suffix == ".txt" and record(p.with_suffix(".json")):
                continue
            return p
    return None


def plan_outputs(o, dataset, policies: tp.Sequence, out: Path) -> OutputPlan:
    """Checks, before any work, where the run writes (SPEC §7.1); returns the prepared `OutputPlan`.

    --out must lie outside DATA (a directory) and be no input; results.json, wer.csv, wer.png and the
    hypothesis files are replaced only when an earlier `ttt eval asr` wrote them, with --resume
    (continue) or --overwrite (start again); anything else in their way is refused.

    Args:
        o: the AsrOptions.
        dataset: the discovered AsrDataset.
        policies: the parsed policies.
        out: --out.
    """
    plan = OutputPlan(overwrite=True)  # ttt's own earlier outputs: decided below (--resume or --overwrite)
    if dataset.kind == "directory":
        plan.read(dataset.source, "the dataset (DATA)", tree=True)
    else:
        plan.read(dataset.source, "the manifest (DATA)")
        for it in dataset.items:
            plan.read(it.audio, "a recording of the manifest")
    plan.read(o.init_state, "the --init-state snapshot")
    plan.read_model(o.model)
    plan.write_into(out)
    results, hyp = results_record(), _hyp_record()
    plan.write(out / RESULTS, "--out", "results of ttt eval asr", results)
    for name in (WER_CSV, WER_PNG):
        plan.write(out / name, "--out", f"{name} of ttt eval asr", beside(out / RESULTS, results))
    for p in policies:
        for it in dataset.items:
            paths = hyp_paths(out, p.dir_name, it.key)
            plan.write(paths["json"], "--out", f"the hypothesis of {it.key} ({p.name})", hyp)
            plan.write(paths["txt"], "--out", f"the hypothesis text of {it.key} ({p.name})", named_in(paths["json"], hyp))
    plan.check()
    _check_earlier_run(o, out)
    return plan.prepare()


def _check_earlier_run(o, out: Path) -> None:
    """Every eval's rules for an earlier run's record and outputs, and hyp/ must hold only ttt's files."""
    # hyp/ holding no file is no earlier run: under torchrun another rank's output plan may have made its
    # folders already (before the barrier that follows the check, no rank writes a file).
    outputs = [p for p in outputs_of_a_run(out) if p.name != HYP_DIR or not p.is_dir() or _holds_a_file(p)]
    check_earlier_run(out, o.resume, o.overwrite, outputs)
    hyp = out / HYP_DIR
    if hyp.exists():
        foreign = _foreign_in_hyp(hyp) if hyp.is_dir() else hyp
        if foreign is not None:
            raise OutputError(f"{foreign} exists and was not written by ttt eval asr; ttt never replaces it. Move it "
                              f"away or choose another --out.", hint="choose another --out")


def clear_earlier_run(out: Path) -> None:
    """Removes the resume record, the ranks' records and the hypotheses of an earlier run (checked to be ours by
    `plan_outputs`).

    Args:
        out: --out.
    """
    for d in (resume.state_dir(out), resume.ranks_dir(out), Path(out) / HYP_DIR):
        if d.is_dir():
            shutil.rmtree(d)
