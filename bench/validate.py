"""Validation sweep as a benchmark: gpureg vs SimpleITK and elastix on known synthetic distortions.

Runs :func:`gpureg.run_validation` (translation, rotation, scale, shear and a
smooth deformation, each crossed with salt-and-pepper noise 0/2/5/10/30 %,
binarized and raw; both methods on the same prepared arrays), writes its table,
summary and figures to an output folder, and a DESIGN.md-schema JSON with one
result per distortion, mode and noise level (median time, mean error over the
magnitudes, SimpleITK's and elastix's in the same run on the same prepared arrays,
ratio = SimpleITK time / gpureg time; elastix: mean squares on 2048 random samples).

    python bench/validate.py                 # 64^3, full sweep -> bench/results/validation/
    python bench/validate.py --noise 0.1 0.3 # the 10 % and 30 % tables only
    python bench/validate.py --quick         # 32^3, 10 cases (< 1 min) -> a temporary folder
    python bench/validate.py --device gpu --size 256
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpureg  # noqa: E402
from common import RESULTS, save  # noqa: E402
from gpureg.validate import NOISE_LEVELS, QUICK, summarize  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "gpu"))
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default: bench/results/validation, or a temporary folder with --quick)")
    ap.add_argument("--quick", action="store_true", help="32^3, largest magnitudes, 0 and 10 %% noise, binarized")
    ap.add_argument("--no-sitk", action="store_true", help="skip SimpleITK")
    ap.add_argument("--no-elastix", action="store_true", help="skip elastix (itk-elastix)")
    ap.add_argument("--noise", type=float, nargs="+", default=list(NOISE_LEVELS), help="salt-and-pepper fractions")
    args = ap.parse_args(argv)
    kw = dict(size=args.size, noise=tuple(args.noise))
    if args.quick:
        kw = dict(QUICK)
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpureg-validation-")) if args.quick else RESULTS / "validation")

    def progress(done, total, rows):
        print(f"[{done}/{total}] " + " | ".join(
            f"{r['method']} {r['distortion']} {r['magnitude']:g} noise {100 * r['noise']:g}% {r['mode']}: "
            + (f"{r['error_vox']:.3f} vox {r['seconds']:.2f} s" if r["status"] == "ok" else r["status"])
            for r in rows), flush=True)

    res = gpureg.run_validation(out, device=args.device, sitk=False if args.no_sitk else None,
                                elastix=False if args.no_elastix else None, progress=progress, **kw)
    results = []
    for x in summarize(res.rows):
        if x["method"] != "gpureg":
            continue
        ref = [y for y in summarize(res.rows, noise=x["noise"], mode=x["mode"])
               if y["distortion"] == x["distortion"] and y["method"] == "SimpleITK"]
        row = {"case": f"{x['distortion']}, {x['mode']}, salt-and-pepper {100 * x['noise']:g} %",
               "size": res.settings["size"], "cases": x["cases"], "failed": x["failed"],
               "registration_ms": round(1e3 * x["median_seconds"], 1),
               "error_vox": round(x["error_mean_vox"], 4), "error_worst_vox": round(x["error_worst_vox"], 4)}
        if x["distortion"] == "deformation":
            row["affine_floor_vox"] = round(x["floor_mean_vox"], 4)
        if ref:
            r = ref[0]
            row.update(reference="SimpleITK", reference_ms=round(1e3 * r["median_seconds"], 1),
                       reference_error_vox=round(r["error_mean_vox"], 4),
                       reference_error_worst_vox=round(r["error_worst_vox"], 4),
                       ratio=round(r["median_seconds"] / x["median_seconds"], 2) if x["median_seconds"] > 0 else None)
        ela = [y for y in summarize(res.rows, noise=x["noise"], mode=x["mode"])
               if y["distortion"] == x["distortion"] and y["method"] == "elastix"]
        if ela:
            e = ela[0]
            row.update(elastix_ms=round(1e3 * e["median_seconds"], 1), elastix_error_vox=round(e["error_mean_vox"], 4),
                       elastix_error_worst_vox=round(e["error_worst_vox"], 4))
        results.append(row)
    save("validation-quick" if args.quick else "validation", res.settings["device"], results,
         extra={"quick": args.quick, "output": str(out), "settings": res.settings})
    if res.failures:
        print(f"{len(res.failures)} registrations failed; see {out / 'summary.md'}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
