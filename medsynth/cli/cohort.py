"""``medsynth cohort plan | run | audit --spec cohort.yaml``: spec -> plan -> generated cohort -> audit."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from medsynth.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    cohort = sub.add_parser("cohort", help="plan, generate and audit a synthetic cohort from a spec",
                            description="A cohort spec (docs/cohort.md) states counts, class shares, lesions, "
                                        "spacing, demographics and masks; plan compiles it against the real data, "
                                        "run generates it (resumable, multi-GPU), audit checks the result.")
    actions = cohort.add_subparsers(dest="cohort_command", metavar="ACTION")
    actions.required = True

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--spec", required=True, type=Path, help="cohort spec YAML (docs/cohort.md)")
        # dest is not "out": the CLI's clean-up of new output folders must never delete finished cases.
        parser.add_argument("--out", dest="cohort_out", metavar="DIR", type=Path, default=None,
                            help="output folder (default: the spec's 'out')")
        parser.add_argument("--no-progress", action="store_true", help="hide progress bars")

    plan = actions.add_parser("plan", help="compile the spec into per-sample conditions (OUT/plan.json)")
    common(plan)
    plan.add_argument("--dry-run", action="store_true", help="print the plan without writing plan.json")
    plan.set_defaults(func=run_plan)

    run = actions.add_parser("run", help="generate the cohort (resumable; rerun to continue)")
    common(run)
    run.add_argument("--format", default=None, choices=("nifti", "dicom", "both"),
                     help="files per case (default: the spec's, else nifti)")
    run.add_argument("--devices", default="1", help="devices per node (Lightning Fabric): N, or 'auto' (default 1)")
    run.add_argument("--num-nodes", type=int, default=1, help="nodes (Lightning Fabric; default 1)")
    run.add_argument("--accelerator", default="auto", help="auto, cpu, gpu, cuda, mps (default auto)")
    run.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the pipeline files")
    run.set_defaults(func=run_run)

    audit = actions.add_parser("audit", help="compare the cohort with its spec; memorisation audit (OUT/audit/)")
    common(audit)
    audit.add_argument("--tolerance", type=float, default=0.05,
                       help="largest absolute difference of a class share before it is a mismatch (default 0.05)")
    audit.add_argument("--size-tolerance", type=float, default=0.25,
                       help="relative slack of measured lesion diameters around their size bin (default 0.25)")
    audit.add_argument("--no-memorisation", action="store_true", help="skip the memorisation audit")
    audit.set_defaults(func=run_audit)


def _spec_and_out(args: argparse.Namespace) -> tuple[Any, Path]:
    from medsynth.cohort.spec import load_spec

    spec = load_spec(args.spec)
    out = args.cohort_out if args.cohort_out is not None else spec.out
    if out is None:
        raise ConfigError("no output folder: give --out DIR or 'out:' in the spec")
    return spec, Path(out)


def run_plan(args: argparse.Namespace) -> int:
    from medsynth.cohort.plan import PLAN_FILE, describe_plan
    from medsynth.cohort.run import claim_output, load_or_plan

    spec, out = _spec_and_out(args)
    plan = load_or_plan(spec, out, progress=not args.no_progress)
    print(describe_plan(plan))
    if not args.dry_run:
        claim_output(out, plan)
        print(f"plan written to {out / PLAN_FILE}")
    return 0


def run_run(args: argparse.Namespace) -> int:
    from medsynth.cohort.run import COHORT_FILE, MANIFEST_FILE, run_cohort

    spec, out = _spec_and_out(args)
    created = not out.exists()
    devices: Any = int(args.devices) if str(args.devices).isdigit() else args.devices
    try:
        result = run_cohort(spec, out, fmt=args.format, devices=devices, num_nodes=args.num_nodes,
                            accelerator=args.accelerator, progress=not args.no_progress, verify=not args.no_verify)
    except BaseException:
        # A folder this command created and in which no case was finished is removed again; one with
        # finished cases is kept so that a rerun resumes.
        images = out / "imagesTr"
        if created and out.is_dir() and not (images.is_dir() and any(images.iterdir())):
            shutil.rmtree(out, ignore_errors=True)
        raise
    if result["rank"] == 0:
        s = result["statuses"]
        print(f"cohort in {out}: {s['done']} done, {s['flagged']} flagged, {s['skipped']} skipped, {s['failed']} "
              f"failed, {s['pending']} pending (per case: {out / MANIFEST_FILE}; identity: {out / COHORT_FILE})")
    return 0


def run_audit(args: argparse.Namespace) -> int:
    from medsynth.cohort.audit import AUDIT_DIR, audit_cohort

    spec, out = _spec_and_out(args)
    report = audit_cohort(spec, out, tolerance=args.tolerance, size_tolerance=args.size_tolerance,
                          memorisation=not args.no_memorisation, progress=not args.no_progress)
    verdict = "OK" if report["ok"] else f"{len(report['mismatches'])} mismatch(es): " + "; ".join(report["mismatches"])
    print(f"audit of {report['cohort']!r}: {verdict} (report: {out / AUDIT_DIR / 'report.md'})")
    return 0
