"""Where `ttt eval librilight` writes (SPEC §6, §7.1): its outputs, the update series, the output plan."""

from __future__ import annotations

from pathlib import Path

from ttt_cli import telemetry
from ttt_cli.errors import ConfigError, OutputError
from ttt_cli.io import check_writable_dir
from ttt_cli.outputs import OutputPlan, beside, real

from .. import resume
from ..policies import Policy
from ..report import RESULTS, results_record
from ..run import check_earlier_run
from .data import Dataset
from .options import EvalOptions
from .report import CURVE_CSV, CURVE_PNG


def outputs_of_a_run(out: Path) -> list[Path]:
    """What a run leaves in --out (outputs and the resume records).

    Args:
        out: --out.
    """
    return [out / RESULTS, out / CURVE_CSV, out / CURVE_PNG, resume.state_dir(out), resume.ranks_dir(out)]


def series_paths(o: EvalOptions, policy: Policy, doc_id: str) -> dict[str, Path]:
    """`--telemetry` files of one policy and document: `DIR/<policy dir>/<document id, / as _>.updates.*`.

    Args:
        o: the options (`telemetry` set).
        policy: the policy.
        doc_id: the document's id.
    """
    return telemetry.series_paths(Path(o.telemetry), telemetry.eval_series_name(policy.dir_name, doc_id))


def output_plan(o: EvalOptions, dataset: Dataset, out: Path, cache_dir: Path | None,
                policies: list[Policy]) -> tuple[OutputPlan, bool, list[str]]:
    """Checks where the run writes before any work (SPEC §7.1); returns (plan, store codes?, notes).

    --out and --codes-cache must lie outside DATA; results.json, curve.csv and curve.png are
    replaced only when an earlier `ttt eval` wrote them (with --overwrite or --resume); an
    unwritable codes cache is used read-only, with a warning.

    Args:
        o: the options.
        dataset: the discovered dataset.
        out: --out.
        cache_dir: the codes cache (None: not used).
        policies: the parsed policies.
    """
    plan = OutputPlan(overwrite=True)  # ttt's own earlier outputs: decided below (--resume or --overwrite)
    plan.read(dataset.root, "the dataset (DATA)", tree=True)
    plan.read(o.init_state, "the --init-state snapshot")
    plan.read_model(o.model)
    plan.write_into(out)
    record = results_record()
    plan.write(out / RESULTS, "--out", "results of ttt eval", record)
    for name in (CURVE_CSV, CURVE_PNG):
        plan.write(out / name, "--out", f"{name} of ttt eval", beside(out / RESULTS, record))
    series = []
    if o.telemetry is not None:
        plan.write_into(o.telemetry, telemetry.FLAG)
        for doc in dataset.documents:
            for p in policies:
                series.append(series_paths(o, p, doc.id))
                telemetry.plan_series(plan, series[-1], f"{doc.id} under policy {p.name}")
    plan.check()
    if cache_dir is not None and Path(real(cache_dir)).is_relative_to(real(dataset.root)):
        raise OutputError(f"--codes-cache {cache_dir} is inside the dataset {dataset.root}: cache files would mix "
                          f"with the books. Choose a directory outside it.")
    check_earlier_run(out, o.resume, o.overwrite, outputs_of_a_run(out) + [f for s in series for f in s.values()])
    plan.prepare()
    store, notes = cache_dir is not None, []
    if cache_dir is not None:
        try:
            check_writable_dir(cache_dir, "--codes-cache")
        except ConfigError as e:
            store = False
            notes.append(f"{e} Entries already there are used; new ones are not stored (--no-codes-cache silences "
                         f"this).")
    return plan, store, notes
