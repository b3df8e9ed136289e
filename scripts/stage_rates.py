"""A rates file: what a machine's stages reached, so that the clock can price runs for that
machine from any other (`first run --dry-run --rates FILE`, `python -m scripts.build_book
--dry-run --rates FILE`).

    python -m scripts.stage_rates --profile cpu --setting obqa [--seed 0] [--set K=V ...]
        --out bench/stage-rates-NAME.json
    python -m scripts.stage_rates --observed bench/stage-rates-NAME.json

The first form reads a finished run of this machine: every stage's `perf` (its model FLOPs,
seconds, the machine's matmul peak, `mfu`, padding, the cores other processes kept busy) from its
`meta.json`, and writes them with the machine and the `rates` block the clock reads
(`clock.rates_from_stages`: the peak and the median `mfu` per kind of stage and per model role).
Stages that shared the machine with other work are left out, as the clock leaves them out.

The second form is for a machine whose stage records are gone but whose stage times were written
down: the file's `observed` list holds, per stage, the wall seconds and the `mfu` its meta.json
reported (or only the seconds, for evaluations). Each observation's peak is its FLOPs as this
version counts them (`clock.stage_work`) over (seconds - the clock's load overhead) x mfu; the
machine's peak is their median, and an observation without an `mfu` gets the achieved rate over
that peak. The `rates` block is rewritten from them, so the derivation can be checked and redone.
A `check` entry (a whole run and the seconds it took there) is priced with the derived rates and
printed beside what it took: the rates against a run they were not fitted to as a whole.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from first_lib import flops
from first_lib.errors import FirstError


def _work(profile: str, setting: str, precision: str, seed: int = 0, overrides=None) -> dict:
    from first_lib.pipeline import clock
    from first_lib.profiles import for_setting, get_profile

    over = {**(overrides or {}), "precision": precision, "seed": seed}
    prof = for_setting(get_profile(profile, **over), setting)
    work = clock.stage_work(prof, setting, None, clock._tokenizer_if_cached(prof))
    if not work:
        raise FirstError(f"cannot count the FLOPs of {profile}/{setting}: is the data wheel here?")
    return {w.stage: w for w in work}


def count(data: dict) -> dict:
    """`data` (a rates file with an `observed` list) with each observation's FLOPs and load
    overhead counted by this version of the clock (it needs the data wheel and the tokenizer)."""
    precision = data["machine"]["precision"]
    for o in data["observed"]:
        works = _work(o["profile"], o["setting"], precision)
        o["model_gflop"] = round(sum(works[s].gflop for s in o["stages"]), 1)
        o["overhead_s"] = round(sum(works[s].overhead_s for s in o["stages"]), 1)
    data = derive(data)
    check = data.get("check")
    if check:  # a whole run the rates were not fitted to as a whole: priced with them
        check["priced_s"] = round(_run_seconds(data, check["profile"], check["setting"]), 1)
    return data


def _run_seconds(data: dict, profile: str, setting: str, seed: int = 0) -> float:
    """Seconds the clock prices one run at with `data`'s rates, from an empty cache."""
    from first_lib.pipeline import clock
    from first_lib.profiles import for_setting, get_profile

    block = data["rates"]
    rates = clock.Rates(
        "the file's machine", block["precision"], block["peak_gflops"], block["mfu"]
    )
    prof = for_setting(get_profile(profile, precision=rates.precision, seed=seed), setting)
    return 60 * clock.total_minutes(clock.estimate(prof, setting, rates=rates), only_missing=False)


def derive(data: dict) -> dict:
    """From the counted observations: each one's peak (or, without a recorded `mfu`, its share of
    the machine's peak, the median of the others') and the `rates` block."""
    obs = data["observed"]
    for o in obs:
        if o.get("mfu") is not None:
            busy = o["seconds"] - o["overhead_s"]
            o["peak_gflops"] = round(o["model_gflop"] / (busy * o["mfu"]), 1)
    peak = statistics.median(o["peak_gflops"] for o in obs if "peak_gflops" in o)
    by: dict[str, list[float]] = {}
    for o in obs:
        if o.get("mfu") is None:
            o["derived_mfu"] = round(o["model_gflop"] / (o["seconds"] - o["overhead_s"]) / peak, 3)
        share = o["mfu"] if o.get("mfu") is not None else o["derived_mfu"]
        keys = (o["kind"],) if o.get("role") is None else (o["kind"], f"{o['kind']} {o['role']}")
        for key in keys:
            by.setdefault(key, []).append(share)
    data["rates"] = {
        "precision": data["machine"]["precision"],
        "peak_gflops": round(peak, 1),
        "mfu": {k: round(statistics.median(v), 3) for k, v in sorted(by.items())},
    }
    return data


def from_run(profile: str, setting: str, seed: int, overrides: dict) -> dict:
    """The rates of this machine from the finished stages of one run."""
    from first_lib import device
    from first_lib.artefacts import read_meta
    from first_lib.pipeline import clock
    from first_lib.pipeline.graph import run_precision, stage_graph
    from first_lib.profiles import for_setting, get_profile

    prof = for_setting(get_profile(profile, **{**overrides, "seed": seed}), setting)
    precision = run_precision(prof)
    stages, left_out = {}, []
    for node in stage_graph(prof, setting, precision):
        if node.kind == "check":  # priced at extraction's share (`clock.stage_work`): no kind
            continue  # of its own, and two short forwards would blur the training rates
        perf = read_meta(node.path).get("perf") if node.done() else None
        if not perf or not perf.get("mfu"):
            continue
        if flops.contended(perf):
            left_out.append(node.name)
            continue
        stages[node.name] = {"artefact": node.path.name, **perf}
    if not stages:
        raise FirstError(f"no finished stage of {profile}/{setting} (seed {seed}) records its rate")
    from first_lib.bench.context import _git_commit

    info = device.info()
    return {
        "what": f"per-stage model FLOPs utilisation of a {profile}-profile {setting} run "
        f"(seed {seed}) at {precision} on this machine, alone",
        "command": f"first run --profile {profile} --setting {setting} "
        + " ".join(f"--set {k}={json.dumps(v)}" for k, v in overrides.items()),
        "machine": {
            "cpu": info["cpu"],
            "threads": info["threads"],
            "precision": precision,
            "versions": info["versions"],
        },
        "commit": _git_commit(),
        "left_out_shared": left_out,
        "stages": stages,
        "rates": clock.rates_from_stages(stages),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="cpu")
    p.add_argument("--setting", default="csqa")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="the rates file to write")
    p.add_argument("--observed", metavar="FILE", help="recompute FILE's rates from its observed")
    args = p.parse_args(argv)
    try:
        if args.observed:
            path = Path(args.observed)
            data = count(json.loads(path.read_text()))
        else:
            if not args.out:
                p.error("--out FILE (or --observed FILE)")
            from first_lib.pipeline.cli import _overrides

            path = Path(args.out)
            data = from_run(args.profile, args.setting, args.seed, _overrides(args.set))
    except FirstError as err:
        p.exit(1, f"stage_rates: {err}\n")
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(data["rates"], indent=1))
    check = data.get("check")
    if check and "priced_s" in check:
        print(
            f"check: {check['setting']} run priced at {check['priced_s'] / 60:.1f} min with these "
            f"rates; it took {check['seconds'] / 60:.1f} min ({check['recorded']})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
