"""Open-set identification on LFW (NIST FRVT 1:N style): FNIR at FPIR 1 % and 0.1 %, rank-1,
the DET curve, and the FPIR a gallery measures at the threshold it derives for a target.

Only LFW's evaluation half is used (``facenet_train.openset_lfw``: people split by name;
the model card's impostor distribution comes from the other half, so the thresholds
checked here were not fitted on these faces). People with at least ``--min-images`` (K)
photos are shuffled and cut into galleries of N people (N = all: one gallery); each is
enrolled with E photos per person into a real ``Gallery`` (SQLite, int8 samples, its
search). Probes, through ``Gallery.match``:

* mated: one further photo of each enrolled person; missed when its nearest person is
  someone else or farther than the threshold (FNIR);
* non-mated: every photo of the evaluation half's people with fewer than K photos, who are
  never enrolled; a false positive when any enrolled person is within the threshold (FPIR).
  At least 10x the mated probes of any gallery.

Each round draws new galleries, enrolment photos and mated probes (``--rounds``, seeded);
counts are pooled over galleries and rounds. Every image goes detector -> the subject's
face -> aligner -> model once (``runtime_embeddings``, cached in ``--cache``).

    python benchmarks/openset.py [--model M_int8.tflite] [--rounds 3] [--write-card]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    Target,
    add_common_arguments,
    default_lfw,
    machine_info,
    machine_line,
    markdown_table,
    report,
    resolve_model,
    run_script,
    targets_table,
    write_json,
)

from facenet_edge import Gallery
from facenet_edge.arguments import int_list, positive_int
from facenet_edge.detect import DEFAULT_DETECTOR
from facenet_edge.embed import Embedder
from facenet_edge.errors import FacenetEdgeError
from facenet_edge.fpir import DEFAULT_FPIR, card_distribution, threshold_for_fpir
from facenet_train.openset_lfw import (
    EVALUATION,
    LfwImages,
    OpensetEmbeddings,
    lfw_images,
    runtime_embeddings,
    write_card_entry,
)

# FNIR is reported where the DET curve crosses these FPIRs (FRVT's operating points).
FPIR_POINTS = (0.01, 0.001)
# Targets a gallery derives its threshold for, from the card (the default first).
TARGETS = (DEFAULT_FPIR, 0.01)
NONMATED_RATIO = 10
# A gallery's threshold is accepted if it measures within this factor of its target.
WITHIN = 2.0
# Any valid threshold: the benchmark reads distances, not the gallery's accept flag.
_STORED_THRESHOLD = 2.0
QUICK = {"people": 20, "nonmated": 200, "sizes": (5, 0), "rounds": 1}


@dataclass(frozen=True)
class Design:
    """Who can be enrolled (``people``: name -> rows of their images, in name order) and who
    probes as a stranger (``nonmated``: rows)."""

    people: dict[str, np.ndarray]
    nonmated: np.ndarray


def split_people(names: np.ndarray, rows: np.ndarray, min_images: int) -> Design:
    """``rows`` (``names[rows]`` their people) split into people with at least
    ``min_images`` photos, who can be enrolled, and every photo of the others, strangers."""
    by_name: dict[str, list[int]] = {}
    for row in rows:
        by_name.setdefault(str(names[row]), []).append(int(row))
    people = {n: np.array(r) for n, r in sorted(by_name.items()) if len(r) >= min_images}
    nonmated = np.array(sorted(r for rs in by_name.values() if len(rs) < min_images for r in rs), dtype=int)
    return Design(people, nonmated)


def design(lfw: LfwImages, min_images: int, max_people: int | None, max_nonmated: int | None) -> Design:
    """The benchmark's people and strangers, from the evaluation half."""
    split = split_people(lfw.names, np.flatnonzero(lfw.half(EVALUATION)), min_images)
    people, nonmated = split.people, split.nonmated
    if max_people is not None:  # --quick: spread over the alphabet, deterministic
        keep = sorted(people)[:: max(1, len(people) // max_people)][:max_people]
        people = {n: people[n] for n in keep}
    if max_nonmated is not None:
        nonmated = nonmated[:: max(1, len(nonmated) // max_nonmated)][:max_nonmated]
    return Design(people, nonmated)


@dataclass
class Scores:
    """Pooled over galleries and rounds for one (N, E)."""

    size: int
    enrol: int
    galleries: int = 0
    samples: list[int] = field(default_factory=list)  # per gallery
    mated_distance: list[np.ndarray] = field(default_factory=list)
    mated_correct: list[np.ndarray] = field(default_factory=list)
    nonmated_distance: list[np.ndarray] = field(default_factory=list)
    # target -> per gallery (threshold, false positives, misses)
    at_target: dict[float, list[tuple[float, int, int]]] = field(default_factory=dict)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            np.concatenate(self.mated_distance),
            np.concatenate(self.mated_correct),
            np.concatenate(self.nonmated_distance),
        )


def nearest(gallery: Gallery, embedded: OpensetEmbeddings, rows: np.ndarray, identity) -> tuple[list[str], np.ndarray]:
    """Each probe's nearest enrolled person and squared-L2 distance (through the gallery's search)."""
    found = gallery.match(embedded.embeddings[rows], identity)
    return [m.name for m in found], np.array([m.distance for m in found])


def score_gallery(
    scores: Scores,
    people: dict[str, tuple[np.ndarray, int]],
    nonmated: np.ndarray,
    embedded: OpensetEmbeddings,
    identity,
    folder: Path,
    distribution,
) -> None:
    """Enrol ``people`` (name -> (enrolment rows, mated probe row)) into a new gallery and
    score its mated and non-mated probes."""
    path = folder / f"g{scores.size}-{scores.enrol}-{scores.galleries}.db"
    with Gallery.create(path, identity, _STORED_THRESHOLD) as gallery:
        for name, (enrol, _) in people.items():
            gallery.add(name, embedded.embeddings[enrol], identity)
        probes = np.array([probe for _, probe in people.values()])
        named, mated = nearest(gallery, embedded, probes, identity)
        _, strangers = nearest(gallery, embedded, nonmated, identity)
    path.unlink()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    correct = np.array([n == p for n, p in zip(named, people)])
    samples = sum(len(enrol) for enrol, _ in people.values())
    scores.galleries += 1
    scores.samples.append(samples)
    scores.mated_distance.append(mated)
    scores.mated_correct.append(correct)
    scores.nonmated_distance.append(strangers)
    if distribution is not None:
        for target in TARGETS:
            threshold = threshold_for_fpir(distribution, target, samples).threshold
            entry = (threshold, int(np.sum(strangers <= threshold)), int(np.sum(~(correct & (mated <= threshold)))))
            scores.at_target.setdefault(target, []).append(entry)


def threshold_at_fpir(nonmated: np.ndarray, fpir: float) -> float | None:
    """The largest threshold (accepting d < threshold) that names at most ``fpir`` of the
    non-mated scores: the next one's score. None when too few to resolve ``fpir``."""
    allowed = int(np.floor(fpir * len(nonmated)))
    return float(np.sort(nonmated)[allowed]) if allowed >= 1 else None


def fnir_at_fpir(scores: Scores, fpir: float) -> dict[str, float | None]:
    """FNIR at the largest threshold whose FPIR is at most ``fpir`` (None when too few
    non-mated probes to resolve it)."""
    mated, correct, nonmated = scores.arrays()
    threshold = threshold_at_fpir(nonmated, fpir)
    if threshold is None:
        return {"fpir": fpir, "threshold": None, "fnir": None, "measured_fpir": None}
    return {
        "fpir": fpir,
        "threshold": threshold,
        "fnir": float(np.mean(~(correct & (mated < threshold)))),
        "measured_fpir": float(np.mean(nonmated < threshold)),
    }


def det_curve(scores: Scores, points: int = 200) -> dict[str, list[float]]:
    """(FPIR, FNIR) at thresholds spread over the non-mated distances' lower tail."""
    mated, correct, nonmated = scores.arrays()
    ordered = np.sort(nonmated)
    picks = np.unique(np.geomspace(1, len(ordered), points).astype(int)) - 1
    thresholds = ordered[picks]
    fpir = np.searchsorted(ordered, thresholds, side="right") / len(ordered)
    hits = np.sort(mated[correct])
    fnir = 1.0 - np.searchsorted(hits, thresholds, side="right") / len(mated)
    return {"threshold": thresholds.tolist(), "fpir": fpir.tolist(), "fnir": fnir.tolist()}


def summary(scores: Scores) -> dict[str, Any]:
    mated, correct, nonmated = scores.arrays()
    result: dict[str, Any] = {
        "size": scores.size,
        "enrol": scores.enrol,
        "galleries": scores.galleries,
        "samples_per_gallery": int(np.median(scores.samples)),
        "mated": len(mated),
        "nonmated": len(nonmated),
        "rank1": float(np.mean(correct)),
        "at_fpir": [fnir_at_fpir(scores, p) for p in FPIR_POINTS],
        "det": det_curve(scores),
    }
    result["at_target"] = [
        {
            "target": target,
            "threshold_median": float(np.median([t for t, _, _ in entries])),
            "fpir": sum(f for _, f, _ in entries) / len(nonmated),
            "false_positives": sum(f for _, f, _ in entries),
            "fnir": sum(m for _, _, m in entries) / len(mated),
        }
        for target, entries in scores.at_target.items()
    ]
    return result


def run_rounds(
    plan: Design, embedded: OpensetEmbeddings, identity, sizes: Sequence[int], enrols: Sequence[int],
    rounds: int, seed: int, distribution,
) -> list[Scores]:
    names = sorted(plan.people)
    table = {(s or len(names), e): Scores(s or len(names), e) for s in sizes for e in enrols}
    with tempfile.TemporaryDirectory(prefix="openset-") as scratch:
        for round_index in range(rounds):
            rng = np.random.default_rng([seed, round_index])
            order = [names[i] for i in rng.permutation(len(names))]
            # One shuffle of each person's photos per round: the first E are enrolled and
            # the last is the mated probe, so E = 1 and E = 3 meet the same probes.
            photos = {n: rng.permutation(plan.people[n]) for n in names}
            for (size, enrol), scores in table.items():
                for start in range(0, len(order) - size + 1, size):
                    chosen = order[start : start + size]
                    people = {n: (photos[n][:enrol], int(photos[n][-1])) for n in chosen}
                    score_gallery(scores, people, plan.nonmated, embedded, identity, Path(scratch), distribution)
                print(f"round {round_index + 1}/{rounds}: N={size} E={enrol}", file=sys.stderr, flush=True)
    return list(table.values())


def pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def print_tables(results: list[dict[str, Any]]) -> None:
    print("\n## Open-set identification (LFW evaluation half)\n")
    headers = ["N", "E", "galleries", "mated", "non-mated", "rank-1 %"]
    headers += [f"FNIR % @ FPIR {p:g}" for p in FPIR_POINTS]
    rows = []
    for r in results:
        rows.append(
            [r["size"], r["enrol"], r["galleries"], r["mated"], r["nonmated"], pct(r["rank1"])]
            + [pct(a["fnir"]) for a in r["at_fpir"]]
        )
    print(markdown_table(headers, rows))
    if not results[0]["at_target"]:
        print("\nThe model card has no impostor distribution: thresholds per target not checked.")
        return
    print("\n## Threshold derived from the card for a target FPIR per attempt\n")
    headers = ["N", "E", "samples", "target FPIR", "threshold (median)", "measured FPIR", "false positives",
               "measured / target", "FNIR %"]
    rows = []
    for r in results:
        for a in r["at_target"]:
            rows.append(
                [r["size"], r["enrol"], r["samples_per_gallery"], f"{a['target']:g}", f"{a['threshold_median']:.4f}",
                 f"{a['fpir']:.2e}", a["false_positives"], f"{a['fpir'] / a['target']:.2f}", pct(a["fnir"])]
            )  # fmt: skip
    print(markdown_table(headers, rows))


def plot_det(results: list[dict[str, Any]], path: Path) -> Path:
    """Every (N, E) DET curve on log FPIR, with the default target's operating point."""
    from matplotlib.figure import Figure  # optional: no pyplot, no global backend state

    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    for r in results:
        line = ax.plot(r["det"]["fpir"], r["det"]["fnir"], label=f"N={r['size']}, E={r['enrol']}")[0]
        for a in r["at_target"]:
            if a["target"] == DEFAULT_FPIR and a["fpir"] > 0:
                ax.plot([a["fpir"]], [a["fnir"]], "o", color=line.get_color())
    ax.axvline(DEFAULT_FPIR, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("FPIR (strangers given a name)")
    ax.set_ylabel("FNIR (enrolled people missed or misnamed)")
    ax.set_title(f"DET, LFW open set; dots: threshold for target FPIR {DEFAULT_FPIR:g}", fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def targets_of(results: list[dict[str, Any]], quick: bool) -> list[Target]:
    """FPIR at the default target within WITHIN x of it, per (N, E)."""
    targets = []
    for r in results:
        for a in r["at_target"]:
            if a["target"] != DEFAULT_FPIR:
                continue
            ratio = a["fpir"] / a["target"]
            off = max(ratio, 1 / ratio) if ratio > 0 else float("inf")
            name = f"FPIR off target {DEFAULT_FPIR:g} (either way), N={r['size']} E={r['enrol']}"
            if quick or off == float("inf"):
                targets.append(Target(name, WITHIN, "x", note="too few non-mated probes" if not quick else "--quick"))
            else:
                targets.append(Target(name, WITHIN, "x", measured=off))
    return targets


def card_entry(results: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """The card's headline figures: per (N, E), rank-1, FNIR at each FPIR point, and FPIR
    and FNIR at the default target's threshold."""
    rows = []
    for r in results:
        rows.append({
            "size": r["size"], "enrol": r["enrol"], "rank1": round(r["rank1"], 4),
            **{f"fnir_at_fpir_{p:g}": None if a["fnir"] is None else round(a["fnir"], 4)
               for p, a in zip(FPIR_POINTS, r["at_fpir"])},
            **{f"target_{a['target']:g}": {"fpir": round(a["fpir"], 6), "fnir": round(a["fnir"], 4)}
               for a in r["at_target"]},
        })  # fmt: skip
    return {"benchmark": "benchmarks/openset.py", **config, "results": rows}


def run(args: argparse.Namespace) -> int:
    if args.lfw is None or not args.lfw.is_dir():
        raise FacenetEdgeError(f"LFW not found ({args.lfw or '../shared/data/lfw'}): pass --lfw DIR")
    model = resolve_model(args.model)
    sizes = QUICK["sizes"] if args.quick else args.sizes
    rounds = QUICK["rounds"] if args.quick else args.rounds
    machine = machine_info([args.threads] if args.threads else None)
    print("# facenet-edge open-set identification\n")
    print(machine_line(machine))
    started = time.monotonic()
    lfw = lfw_images(args.lfw)
    plan = design(lfw, args.min_images, QUICK["people"] if args.quick else None,
                  QUICK["nonmated"] if args.quick else None)  # fmt: skip
    if max(args.enrol) >= args.min_images:
        raise FacenetEdgeError(f"--enrol values must be below --min-images ({args.min_images}): one photo is the probe")
    # The largest gallery's mated probes: one per person.
    mated = len(plan.people) if 0 in sizes else min(max(sizes), len(plan.people))
    if len(plan.nonmated) < NONMATED_RATIO * mated:
        raise FacenetEdgeError(
            f"{len(plan.nonmated)} non-mated probes are fewer than {NONMATED_RATIO}x the {mated} mated ones"
        )
    # Only the images the plan uses are embedded. The same design on them is the same plan:
    # it holds every photo of the people kept, and strangers keep fewer than K photos.
    used = np.concatenate([*plan.people.values(), plan.nonmated])
    subset = LfwImages(lfw.root, [lfw.images[i] for i in sorted(used)])
    plan = design(subset, args.min_images, None, None)
    embedded = runtime_embeddings(model, subset, args.cache or args.out / "cache", DEFAULT_DETECTOR, args.threads)
    embed_s = time.monotonic() - started
    with Embedder.from_path(model) as embedder:
        identity, card = embedder.identity, embedder.card
    distribution = card_distribution(card)
    scored = run_rounds(plan, embedded, identity, sizes, args.enrol, rounds, args.seed, distribution)
    results = [summary(s) for s in scored]
    elapsed = time.monotonic() - started
    print_tables(results)
    print(f"\n{len(subset.images)} images embedded or read from the cache in {embed_s:.0f} s; "
          f"{elapsed:.0f} s in all")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    png = plot_det(results, args.out / "openset_det.png")
    config = {
        "model": model,
        "card_version": card.version,
        "detector": DEFAULT_DETECTOR,
        "lfw_half": EVALUATION,
        "min_images": args.min_images,
        "people": len(plan.people),
        "nonmated_probes": len(plan.nonmated),
        "sizes": list(sizes),
        "enrol": list(args.enrol),
        "rounds": rounds,
        "seed": args.seed,
        "quick": args.quick,
    }
    targets = targets_of(results, args.quick)
    path = write_json(
        args.out / "openset.json",
        report("openset", machine, config, {"scores": results, "det_png": png, "seconds": elapsed}, targets),
    )
    if targets:
        print("\n" + targets_table(targets))
    if args.write_card:
        card_path = write_card_entry(model, "openset", card_entry(results, {k: config[k] for k in
                                     ("detector", "min_images", "people", "nonmated_probes", "rounds", "seed")}))
        print(f"\nwrote the headline figures into {card_path}")
    print(f"\nwrote {path} and {png}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="openset", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--lfw", type=Path, default=default_lfw(), metavar="DIR",
                        help="LFW folder, one folder of images per person (default: ../shared/data/lfw)")
    parser.add_argument("--cache", type=Path, metavar="DIR", help="embedding cache (default: OUT/cache)")
    parser.add_argument("--min-images", type=positive_int, default=4, metavar="K",
                        help="people with at least K photos can be enrolled (default: 4)")
    parser.add_argument("--sizes", type=lambda t: tuple(int(v) for v in t.split(",")), default=(10, 100, 0),
                        metavar="N,N", help="gallery sizes in people, 0 for all (default: 10,100,0)")
    parser.add_argument("--enrol", type=int_list, default=(1, 3), metavar="E,E",
                        help="photos enrolled per person (default: 1,3; each below K)")
    parser.add_argument("--rounds", type=positive_int, default=3, metavar="R",
                        help="new galleries, enrolment photos and probes per round (default: 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, metavar="N", help="interpreter threads (default: the runtime's)")
    parser.add_argument("--write-card", action="store_true",
                        help="write the headline figures into the model's card (extra.openset)")
    return run_script(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
